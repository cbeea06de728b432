"""Seed the bug tracker example: schema up to just before a plan, then N bugs as v1 wrote them.

    python examples/bugtracker/seed.py --rows 1000000 [--config alembic.ini] [--plan PLAN.yaml]

The database comes from $PHASEGATE_DATABASE_URL (or $DATABASE_URL). Rows are inserted with one
set-based INSERT ... SELECT FROM generate_series, so a million rows take seconds, not minutes.
The demo and the benchmarks load this file by path and call ``upgrade_to_before_plan`` and
``seed_bugs`` on their own connection.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, make_url, text
from sqlalchemy.pool import NullPool

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from sample_data import PEOPLE, ROOT_CAUSES  # noqa: E402

REPO_ROOT = _HERE.parents[1]
DEFAULT_CONFIG = REPO_ROOT / "alembic.ini"
DEFAULT_PLAN = REPO_ROOT / "plans" / "bug_root_cause.yaml"

# One statement, no per-row round trips. Ids come from the identity default; URL numbers start
# after the current max(id), and every earlier seeded row's number is <= its own id, so running
# the seed again never collides. Zero-padded numbers keep the unique URL index append-only
# (about 15 % faster than scattered inserts). The root cause walks a weighted list (each name
# repeated by its weight) with a prime stride: deterministic, uneven, no random(). "when"
# spreads over the past two years.
_SEED_SQL = text(
    """
    INSERT INTO bug (bug_tracker_url, root_cause, who, "when")
    SELECT 'https://bugs.example.com/BUG-' || lpad((o.base + g)::text, 8, '0'),
           p.causes[1 + ((o.base + g) * 7919 % cardinality(p.causes))::int],
           p.people[1 + ((o.base + g) * 31 % cardinality(p.people))::int],
           now() - make_interval(secs => (o.base + g) * 104729 % 63072000)
    FROM (SELECT coalesce(max(id), 0) AS base FROM bug) AS o
    CROSS JOIN (SELECT CAST(:causes AS text[]) AS causes,
                       CAST(:people AS text[]) AS people) AS p
    CROSS JOIN generate_series(1, CAST(:rows AS bigint)) AS g
    """
)


def psycopg_url(url: str) -> str:
    """Map a plain postgresql:// or postgres:// URL to SQLAlchemy's psycopg 3 driver."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def mask_url(url: str) -> str:
    """The URL with its password replaced, for anything printed."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


def seed_bugs(connection: Connection, rows: int) -> int:
    """Insert ``rows`` bugs as v1 writes them, in one statement; returns the rows inserted.

    Runs in the caller's transaction (the caller commits) and ANALYZEs bug afterwards so the
    planner, and phasegate's row estimates, know the new size.
    """
    if rows <= 0:
        return 0
    causes = [name for name, weight in ROOT_CAUSES for _ in range(weight)]
    result = connection.execute(_SEED_SQL, {"rows": rows, "causes": causes, "people": list(PEOPLE)})
    connection.execute(text("ANALYZE bug"))
    return result.rowcount


def _plan_start_revision(script: ScriptDirectory, plan_name: str) -> str:
    """The revision just before the plan's first tagged revision ("base" if it has none)."""
    for revision in reversed(list(script.walk_revisions())):  # walk_revisions: head -> base
        if getattr(revision.module, "phasegate_plan", None) == plan_name:
            down = revision.down_revision
            if down is None:
                return "base"
            if not isinstance(down, str):
                raise ValueError(
                    f"plan {plan_name!r} starts at merge revision {revision.revision}; "
                    "seed needs a single revision before it"
                )
            return down
    raise LookupError(f"no revision is tagged phasegate_plan = {plan_name!r}")


def upgrade_to_before_plan(
    connection: Connection, config_path: str | Path, plan_path: str | Path
) -> str:
    """Upgrade Alembic on ``connection`` to the revision before the plan; returns that revision.

    A database already there is left alone; one past it is refused (seeding v1 rows into a
    schema the plan has changed would not be the starting point the demo means).
    """
    plan = yaml.safe_load(Path(plan_path).read_text(encoding="utf-8"))
    if not isinstance(plan, dict) or not isinstance(plan.get("plan"), str):
        raise ValueError(f"{plan_path}: no 'plan:' name")
    cfg = Config(str(config_path))
    script = ScriptDirectory.from_config(cfg)
    target = _plan_start_revision(script, plan["plan"])

    # Alembic must get a connection outside any transaction, or it never commits.
    if connection.in_transaction():
        connection.commit()
    heads = set(MigrationContext.configure(connection).get_current_heads())
    connection.commit()
    if heads == ({target} if target != "base" else set()):
        return target
    past = {rev.revision for head in heads for rev in script.walk_revisions(base="base", head=head)}
    if target in past or (target == "base" and heads):
        raise RuntimeError(
            f"the database is at {', '.join(sorted(heads))}, already past {target}, "
            f"the revision before plan {plan['plan']!r}: seed a fresh database"
        )

    cfg.attributes["connection"] = connection
    command.upgrade(cfg, target)
    if connection.in_transaction():
        connection.commit()
    return target


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes follow phasegate's: 2 usage, 3 database failure."""
    parser = argparse.ArgumentParser(
        description="Bring the example schema to just before a plan and insert N v1 bugs."
    )
    parser.add_argument("--rows", type=int, required=True, help="bugs to insert (0: schema only)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="alembic.ini")
    parser.add_argument("--plan", default=str(DEFAULT_PLAN), help="the plan file")
    args = parser.parse_args(argv)
    if args.rows < 0:
        parser.error("--rows must be >= 0")

    url = os.environ.get("PHASEGATE_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        print(
            "seed: error: no database: set PHASEGATE_DATABASE_URL (or DATABASE_URL)",
            file=sys.stderr,
        )
        return 2
    password = make_url(psycopg_url(url)).password

    started = time.perf_counter()
    engine = create_engine(
        psycopg_url(url),
        poolclass=NullPool,
        connect_args={"application_name": "phasegate-example-seed"},
    )
    try:
        with engine.connect() as connection:
            revision = upgrade_to_before_plan(connection, args.config, args.plan)
            inserted = seed_bugs(connection, args.rows)
            connection.commit()
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        if password:
            message = message.replace(str(password), "***")
        print(f"seed: error: {message}", file=sys.stderr)
        return 3
    finally:
        engine.dispose()
    elapsed = time.perf_counter() - started
    print(f"seeded {inserted} bugs into {mask_url(url)} at revision {revision} in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
