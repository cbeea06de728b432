"""The same commands on a foreign Alembic project: tests/external_project ("shop").

That project has its own alembic.ini (passed with --config, no usable sqlalchemy.url), its own
env.py written from Alembic's cookbook recipe "Sharing a Connection across one or more
programmatic migration commands" (no transaction_per_migration, no on_version_apply, no import
of phasegate), and a plan with two revisions in expand and in switch and a real `sync.down`:
customer.email (as typed) → customer.email_normalized = lower(btrim(email)).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from click.testing import CliRunner
from sqlalchemy.pool import NullPool

from phasegate.cli import cli
from phasegate.db import normalize_url

from .conftest import Phasegate

PROJECT = Path(__file__).resolve().parent / "external_project"
ALEMBIC_INI = PROJECT / "alembic.ini"
PLAN = str(PROJECT / "plans" / "customer_email.yaml")
PLAN_NAME = "customer-email-normalized"
BASELINE = "ba5e11de0001"
EXPAND = ["e1add0c01000", "e21de0c0c000"]
SWITCH = ["51c4ecc00000", "525e7a0110a0"]
CONTRACT = ["c0de1e7e0001"]
ROWS = 3000

# Three spellings per id: mixed case, already normalized, and mixed case with blanks around.
SEED = sa.text(
    """
    INSERT INTO customer (email)
    SELECT CASE g % 3
               WHEN 0 THEN format('Customer.%s@Example.COM', g)
               WHEN 1 THEN format('customer.%s@example.com', g)
               ELSE format('  Shopper.%s@Shop.Example  ', g)
           END
    FROM generate_series(1, :rows) AS g
    """
)


@pytest.fixture
def shop_url(database_url: str) -> Iterator[str]:
    """A fresh database at the shop's untagged baseline, seeded with ROWS customers."""
    engine = sa.create_engine(normalize_url(database_url), poolclass=NullPool)
    cfg = Config(str(ALEMBIC_INI))
    with engine.begin() as connection:
        # The baseline belongs to no plan, so plain Alembic applies it, on a shared connection
        # (the cookbook recipe), since alembic.ini's sqlalchemy.url is a placeholder.
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, BASELINE)
        connection.execute(SEED, {"rows": ROWS})
    engine.dispose()
    yield database_url


@pytest.fixture
def shop_engine(shop_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(normalize_url(shop_url), poolclass=NullPool)
    yield engine
    engine.dispose()


def columns(engine: sa.Engine) -> dict[str, str]:
    """customer's columns → is_nullable, from information_schema."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT column_name, is_nullable FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = 'customer'"
            )
        )
        return {name: nullable for name, nullable in rows}


def pairs(connection: sa.Connection, query: str) -> dict[int, str]:
    return {key: value for key, value in connection.execute(sa.text(query))}


def test_validate_needs_no_database() -> None:
    env = {"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None}
    result = CliRunner().invoke(
        cli, ["--json", "--config", str(ALEMBIC_INI), "validate", PLAN], env=env
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["valid"] is True, result.output
    (plan,) = document["plans"]
    assert plan["plan"] == PLAN_NAME
    assert plan["phases"]["expand"]["revisions"] == EXPAND
    assert plan["phases"]["backfill"]["jobs"] == ["email-normalized"]
    assert plan["phases"]["switch"]["revisions"] == SWITCH
    assert plan["phases"]["contract"]["revisions"] == CONTRACT

    text = CliRunner().invoke(cli, ["--config", str(ALEMBIC_INI), "validate", PLAN], env=env)
    assert text.exit_code == 0, text.output
    assert "expand: 2 revision(s) (e1add0c01000, e21de0c0c000)" in text.output
    assert "switch: 2 revision(s) (51c4ecc00000, 525e7a0110a0)" in text.output


def test_full_cycle_on_foreign_project(shop_url: str, shop_engine: sa.Engine) -> None:
    phasegate = Phasegate(shop_url, config=ALEMBIC_INI)

    # -- expand, backfill, switch --------------------------------------------------------------
    result = phasegate(
        "advance", PLAN, "--to", "switch", "--live-version", "1.0", "--batch-size", "500", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert columns(shop_engine) == {
        "id": "NO",
        "email": "YES",  # switch dropped NOT NULL: 2.x may stop writing it
        "email_normalized": "NO",  # switch made it NOT NULL through a validated CHECK
        "created_at": "NO",
    }
    with shop_engine.connect() as connection:
        pending = connection.execute(
            sa.text(
                "SELECT count(*) FROM customer "
                "WHERE email_normalized IS DISTINCT FROM lower(btrim(email))"
            )
        ).scalar_one()
        assert pending == 0
        index_valid = connection.execute(
            sa.text(
                "SELECT indisvalid FROM pg_index "
                "WHERE indexrelid = to_regclass('ix_customer_email_normalized')"
            )
        ).scalar_one()
        assert index_valid is True

    # -- dual write through the sync trigger, both directions ----------------------------------
    with shop_engine.begin() as connection:
        # shop 1.x knows only email: `set` (up) fills email_normalized.
        old_id = connection.execute(
            sa.text("INSERT INTO customer (email) VALUES (' Old.Writer@Example.COM ') RETURNING id")
        ).scalar_one()
        # shop 2.x knows only email_normalized: `sync.down` fills email.
        new_id = connection.execute(
            sa.text(
                "INSERT INTO customer (email_normalized) VALUES ('new.writer@example.com') "
                "RETURNING id"
            )
        ).scalar_one()
        # Updates too: 1.x changes email (up), 2.x changes email_normalized (down).
        connection.execute(
            sa.text("UPDATE customer SET email = 'Renamed.Old@Example.COM' WHERE id = 1")
        )
        connection.execute(
            sa.text("UPDATE customer SET email_normalized = 'renamed.new@example.com' WHERE id = 2")
        )
    with shop_engine.connect() as connection:
        rows = dict(
            (r.id, (r.email, r.email_normalized))
            for r in connection.execute(
                sa.text(
                    "SELECT id, email, email_normalized FROM customer WHERE id IN (1, 2, :o, :n)"
                ),
                {"o": old_id, "n": new_id},
            )
        )
    assert rows[old_id] == (" Old.Writer@Example.COM ", "old.writer@example.com")
    assert rows[new_id] == ("new.writer@example.com", "new.writer@example.com")
    assert rows[1] == ("Renamed.Old@Example.COM", "renamed.old@example.com")
    assert rows[2] == ("renamed.new@example.com", "renamed.new@example.com")

    # What each row's email_normalized is before contract drops email: the rollback rebuilds
    # email from exactly this.
    with shop_engine.connect() as connection:
        before = pairs(connection, "SELECT id, email_normalized FROM customer")
        originals = pairs(connection, "SELECT id, email FROM customer")
    assert len(before) == ROWS + 2

    # -- contract: refused while 1.x runs, done once only 2.x runs -----------------------------
    result = phasegate("contract", PLAN, "--live-version", "1.0", "--yes")
    assert result.exit_code == 1, result.output
    assert "email" in columns(shop_engine)

    result = phasegate("contract", PLAN, "--live-version", "2.0", "--yes")
    assert result.exit_code == 0, result.output
    assert set(columns(shop_engine)) == {"id", "email_normalized", "created_at"}

    # -- rollback of contract: email comes back, rebuilt by sync.down -------------------------
    result = phasegate("rollback", PLAN, "--live-version", "1.0", "--batch-size", "500", "--yes")
    assert result.exit_code == 0, result.output
    assert columns(shop_engine)["email"] == "YES"
    with shop_engine.connect() as connection:
        after = pairs(connection, "SELECT id, email FROM customer")
    # sync.down is `email: new.email_normalized`, so every email comes back as the normalized
    # value: the lossy direction. Rows typed in mixed case or with blanks come back lowercased
    # and trimmed; only rows already typed in normal form are unchanged.
    assert after == before
    assert all(after[i] == originals[i].strip().lower() for i in originals)
    changed = {i for i in after if after[i] != originals[i]}
    assert changed == {i for i in originals if originals[i] != originals[i].strip().lower()}
    assert len(changed) > ROWS // 2  # the mixed-case and padded spellings lost their form
    assert after[old_id] == "old.writer@example.com"

    # The trigger is back too: 1.x may write email again and 2.x sees it normalized.
    with shop_engine.begin() as connection:
        back = connection.execute(
            sa.text("INSERT INTO customer (email) VALUES ('Back.Again@Example.COM') RETURNING *")
        ).one()
    assert back.email_normalized == "back.again@example.com"

    result = phasegate("status", PLAN, json_output=True)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert (status["plan"], status["phase"], status["next"]) == (PLAN_NAME, "switch", "contract")
    assert status["drift"] is False, result.output
    assert status["heads"] == [SWITCH[-1]]

    # Every tagged revision was recorded through on_version_apply, which the cookbook env.py
    # never passes: phasegate injected it (and transaction_per_migration) into configure().
    with shop_engine.connect() as connection:
        applied = connection.execute(
            sa.text(
                "SELECT detail->>'revision' FROM phasegate.event "
                "WHERE kind = 'revision.applied' ORDER BY id"
            )
        ).scalars()
        reverted = connection.execute(
            sa.text(
                "SELECT detail->>'revision' FROM phasegate.event "
                "WHERE kind = 'revision.reverted' ORDER BY id"
            )
        ).scalars()
        assert list(applied) == [*EXPAND, *SWITCH, *CONTRACT]
        assert list(reverted) == CONTRACT

    # -- all the way back: the real downgrades of both multi-revision phases ------------------
    result = phasegate("rollback", PLAN, "--to", "start", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert columns(shop_engine) == {"id": "NO", "email": "NO", "created_at": "NO"}
    with shop_engine.connect() as connection:
        heads = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        assert list(heads) == [BASELINE]
        leftovers = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_class WHERE relname = 'ix_customer_email_normalized' "
                "UNION ALL SELECT count(*) FROM pg_constraint "
                "WHERE conrelid = 'customer'::regclass AND contype = 'c' "
                "UNION ALL SELECT count(*) FROM pg_trigger "
                "WHERE tgrelid = 'customer'::regclass AND NOT tgisinternal"
            )
        ).scalars()
        assert list(leftovers) == [0, 0, 0]  # no index, no helper CHECK, no sync trigger
        reverted = connection.execute(
            sa.text(
                "SELECT detail->>'revision' FROM phasegate.event "
                "WHERE kind = 'revision.reverted' ORDER BY id"
            )
        ).scalars()
        assert list(reverted) == [*CONTRACT, *reversed(SWITCH), *reversed(EXPAND)]
        assert pairs(connection, "SELECT id, email FROM customer") == {
            **after,
            back.id: "Back.Again@Example.COM",
        }


def test_env_py_with_its_own_single_on_version_apply_callable(
    tmp_path: Path, shop_url: str, shop_engine: sa.Engine
) -> None:
    """Alembic accepts one callable for on_version_apply; phasegate keeps it and adds its own."""
    project = tmp_path / "shop"
    shutil.copytree(PROJECT, project)
    env = project / "migrations" / "env.py"
    env.write_text(
        env.read_text().replace(
            "context.configure(connection=connectable, target_metadata=target_metadata)",
            "context.configure(connection=connectable, target_metadata=target_metadata, "
            "on_version_apply=lambda **kw: kw['ctx'].connection.exec_driver_sql("
            "'CREATE TABLE IF NOT EXISTS own_hook_ran (id int)'))",
        )
    )
    phasegate = Phasegate(shop_url, project / "alembic.ini")
    plan = str(project / "plans" / "customer_email.yaml")
    result = phasegate("expand", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    with shop_engine.connect() as c:
        assert c.execute(sa.text("SELECT to_regclass('own_hook_ran')")).scalar() is not None
        applied = c.execute(
            sa.text("SELECT count(*) FROM phasegate.event WHERE kind = 'revision.applied'")
        ).scalar()
    assert applied == len(EXPAND)


SCHEMA_ENV_PY = """\
        import os

        from sqlalchemy import text

        schema = os.environ.get("SHOP_SCHEMA")
        if schema:  # the cookbook's schema-per-tenant recipe: the path, committed
            connectable.execute(text(f'SET search_path TO "{schema}"'))
            connectable.commit()
        context.configure(connection=connectable, target_metadata=target_metadata)
"""


def phasegate_process(
    config: Path, url: str, *args: str, schema: str | None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHOP_SCHEMA", "DATABASE_URL")}
    env |= {"PHASEGATE_DATABASE_URL": url, **({"SHOP_SCHEMA": schema} if schema else {})}
    argv = [sys.executable, "-m", "phasegate", "--config", str(config), *args]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_an_env_py_that_sets_search_path_is_followed_by_every_walk_session(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shop lives in schema "app", which only env.py puts on the search_path. The
    orchestrator's session (where env.py ran) installs the trigger and verifies; its own
    workers and a `phasegate worker` (which runs no env.py) walk on fresh connections and
    must find app.customer too, in the walk forward and in contract's rollback refill."""
    project = tmp_path / "shop"
    shutil.copytree(PROJECT, project)
    env_py = project / "migrations" / "env.py"
    configure = (
        "        context.configure(connection=connectable, target_metadata=target_metadata)\n"
    )
    assert env_py.read_text().count(configure) == 1
    env_py.write_text(env_py.read_text().replace(configure, SCHEMA_ENV_PY))
    config, plan = project / "alembic.ini", str(project / "plans" / "customer_email.yaml")
    monkeypatch.setenv("SHOP_SCHEMA", "app")

    engine = sa.create_engine(normalize_url(database_url), poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE SCHEMA app"))
    with engine.connect() as connection:
        cfg = Config(str(config))
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, BASELINE)  # env.py sets and commits the path
        connection.execute(SEED, {"rows": ROWS})
        connection.commit()

    phasegate = Phasegate(database_url, config)
    result = phasegate("expand", plan, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    slow = ["--slices", "4", "--batch-size", "25", "--pause", "0.05"]  # ~7 s: time to join
    owner = phasegate_process(
        config,
        database_url,
        "backfill",
        plan,
        "--live-version",
        "1.0",
        "--yes",
        *slow,
        schema="app",
    )
    helper = phasegate_process(
        config, database_url, "worker", plan, "--wait", "30", *slow, schema=None
    )
    _out, owner_err = owner.communicate(timeout=120)
    helper_out, helper_err = helper.communicate(timeout=120)
    assert owner.returncode == 0, owner_err
    assert helper.returncode == 0, helper_err
    with engine.connect() as connection:
        owners = connection.execute(sa.text("SELECT DISTINCT owner FROM phasegate.job_slice"))
        assert "assist 0" in set(owners.scalars()), helper_out  # the helper walked a slice
        pending = connection.execute(
            sa.text(
                "SELECT count(*) FROM app.customer "
                "WHERE email_normalized IS DISTINCT FROM lower(btrim(email))"
            )
        ).scalar_one()
        assert pending == 0
        assert connection.execute(sa.text("SELECT to_regclass('public.customer')")).scalar() is None

    for step in (
        ("switch", plan, "--live-version", "1.0"),
        ("contract", plan, "--live-version", "2.0"),
        ("rollback", plan, "--live-version", "1.0", "--workers", "2", "--batch-size", "300"),
    ):
        result = phasegate(*step, "--yes")
        assert result.exit_code == 0, (step, result.output)
    with engine.connect() as connection:
        wrong = connection.execute(
            sa.text(
                "SELECT count(*) FROM app.customer WHERE email IS DISTINCT FROM email_normalized"
            )
        ).scalar_one()
    assert wrong == 0  # the refill rebuilt email from email_normalized in app.customer
    engine.dispose()
