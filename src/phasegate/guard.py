"""The revision guard: a plan's revision runs outside phasegate only once its phase is done.

Many deploys run `alembic upgrade head` on every start. Mid-plan that would apply a
contract revision while old code still writes the column it drops. A tagged revision
therefore carries `@guarded` on its `upgrade()` (rendered by the project's
script.py.mako); before the revision's first statement, the guard lets it run when

- phasegate itself runs it: the orchestrator marks its own session with
  `phasegate.running = '<plan>/<phase>'` while it applies that phase's revisions;
- the ledger (`phasegate.plan_state`) records the phase as done, and no phasegate run
  of it (or of a later phase) is under way or failed part way: re-applying a revision
  after an out-of-band downgrade is safe, and it is what the drift advice says;
- the SQL is only rendered by phasegate (lint, preview); a script rendered with
  `alembic upgrade --sql` carries the same check as a DO block, which raises when the
  script runs (and so fails that revision's transaction) unless it would pass here;
- `PHASEGATE_GUARD=off` says so, for a new, empty database built from the whole
  history (tests, a developer's machine); it warns on stderr for every revision.

Otherwise it raises Alembic's `CommandError` (the alembic command prints `FAILED:
<message>` and exits 1), which rolls the revision's transaction back: nothing of it is
applied. The message names the revision, plan and phase, and the commands to run. No
ledger, or a ledger this role may not read, refuses too (fail closed).

This guards against accidents, not against intent: any session may set the marker.
Revision files import this module when Alembic loads them, so it imports nothing heavier
than Alembic and SQLAlchemy, which are loaded anyway.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

MARKER = "phasegate.running"  # session setting: '<plan>/<phase>' while phasegate runs it
ESCAPE = "PHASEGATE_GUARD"  # environment: 'off' lets every revision run (a new database)
ATTRIBUTE = "phasegate_guard"  # set on a guarded upgrade(): `validate` looks for it
PHASE_ORDER = ("expand", "backfill", "switch", "contract")  # plan.PHASES (a test keeps both)

F = TypeVar("F", bound=Callable[..., Any])


def guarded(upgrade: F) -> F:
    """Decorate a tagged revision's `upgrade()`: it runs only where the guard allows.

    The tags are read from the revision module when the revision runs, so the
    constants may stand anywhere in the file.
    """

    @functools.wraps(upgrade)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check(upgrade.__globals__)
        return upgrade(*args, **kwargs)

    setattr(checked, ATTRIBUTE, True)
    return checked  # type: ignore[return-value]


def is_guarded(upgrade: Any) -> bool:
    return bool(getattr(upgrade, ATTRIBUTE, False))


@dataclass(frozen=True)
class LedgerRow:
    """What `phasegate.plan_state` says about one plan."""

    phase: str | None  # last completed phase
    state: str  # pending | running | done | failed
    active_phase: str | None
    direction: str | None


def phase_done(row: LedgerRow | None, phase: str) -> bool:
    """Whether the ledger lets `phase`'s revisions run outside phasegate: the phase is
    done, and no run of it or of a later phase (forward or back) is under way or failed
    part way, since phasegate resumes those from where the database is."""
    if row is None or row.phase not in PHASE_ORDER or phase not in PHASE_ORDER:
        return False
    if PHASE_ORDER.index(phase) > PHASE_ORDER.index(row.phase):
        return False
    unfinished = row.state in ("running", "failed") and row.active_phase in PHASE_ORDER
    return not (unfinished and PHASE_ORDER.index(str(row.active_phase)) <= PHASE_ORDER.index(phase))


def check(module: Mapping[str, Any]) -> None:
    """Raise CommandError unless the tagged revision whose globals are `module` may run."""
    plan, phase = module.get("phasegate_plan"), module.get("phasegate_phase")
    if not plan or not phase:
        return  # not part of a plan: nothing to guard
    revision = str(module.get("revision") or "?")
    context = op.get_context()
    escape = os.environ.get(ESCAPE, "").strip().lower()
    if context.as_sql:
        config = getattr(context, "config", None)
        rendering = config is not None and config.attributes.get("phasegate_rendering")
        if not rendering and escape != "off":  # a script someone will run: it checks there
            op.execute(_offline_check(revision, str(plan), str(phase), context))
        return
    if escape == "off":
        sys.stderr.write(
            f"phasegate guard: {ESCAPE}=off, so revision {revision} of plan {plan!r} "
            f"(phase {phase!r}) runs outside phasegate; meant for a new, empty database only\n"
        )
        return
    if escape not in ("", "on"):
        raise CommandError(
            f"{ESCAPE}={os.environ.get(ESCAPE)!r} is not 'on' or 'off'; the guard of "
            f"revision {revision} refuses rather than guess"
        )
    connection = op.get_bind()
    try:
        reason = _refusal(connection, str(plan), str(phase))
    except sa.exc.DBAPIError as exc:  # fail closed, with PostgreSQL's reason and no traceback
        reason = f"the guard could not read the phasegate ledger: {exc.orig or exc}".strip()
    if reason is None:
        return
    raise CommandError(_printable(_message(revision, str(plan), str(phase), reason, context)))


def _offline_check(revision: str, plan: str, phase: str, context: Any) -> str:
    """The guard as a statement of the rendered script (`alembic upgrade --sql`, run later
    with psql): it raises, so the revision's transaction fails with it, unless phasegate's
    marker is set or the ledger records the phase as done (`phase_done`, in SQL)."""
    order = "ARRAY[" + ", ".join(_literal(p) for p in PHASE_ORDER) + "]"
    refusal = _message(
        revision, plan, phase, "the script's guard found the phase not done", context
    )
    done = (
        f"SELECT array_position({order}, {_literal(phase)})"
        f" <= array_position({order}, phase)"
        " AND NOT (state IN ('running', 'failed') AND coalesce("
        f"array_position({order}, active_phase) <= array_position({order}, {_literal(phase)}),"
        " false))"
        f" FROM phasegate.plan_state WHERE plan = {_literal(plan)}"
    )
    return (
        "DO $phasegate_guard$\nDECLARE phasegate_done boolean;\nBEGIN\n"
        f"  IF current_setting({_literal(MARKER)}, true) IS NOT DISTINCT FROM "
        f"{_literal(f'{plan}/{phase}')} THEN RETURN; END IF;\n"
        "  IF to_regclass('phasegate.plan_state') IS NOT NULL THEN\n"
        f"    EXECUTE {_literal(done)} INTO phasegate_done;\n"
        "  END IF;\n"
        "  IF phasegate_done IS NOT TRUE THEN\n"
        f"    RAISE EXCEPTION '%', {_literal(_printable(refusal))};\n"
        "  END IF;\n"
        "END\n$phasegate_guard$"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _refusal(connection: sa.Connection, plan: str, phase: str) -> str | None:
    """Why the revision may not run here, or None when it may."""
    marker = connection.execute(
        sa.text("SELECT current_setting(:name, true)"), {"name": MARKER}
    ).scalar()
    if marker == f"{plan}/{phase}":
        return None  # phasegate runs this phase on this session
    access = connection.execute(
        sa.text(
            "SELECT current_user, has_schema_privilege(c.relnamespace, 'USAGE'), "
            "has_table_privilege(c.oid, 'SELECT') "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'phasegate' AND c.relname = 'plan_state'"
        )
    ).one_or_none()
    if access is None:
        return "this database has no phasegate ledger (schema phasegate), so no phase has run"
    role, usage, select = access
    if not (usage and select):
        missing = ([] if usage else ["USAGE ON SCHEMA phasegate"]) + (
            [] if select else ["SELECT ON phasegate.plan_state"]
        )
        grants = "; ".join(f"GRANT {m} TO {_quote(role)}" for m in missing)
        return (
            f"role {role} may not read the phasegate ledger, so the guard cannot tell whether "
            f"the phase has run (it refuses rather than guess); an owner of schema phasegate "
            f"can run: {grants}"
        )
    found = connection.execute(
        sa.text(
            "SELECT phase, state, active_phase, direction FROM phasegate.plan_state "
            "WHERE plan = :plan"
        ),
        {"plan": plan},
    ).one_or_none()
    row = LedgerRow(*found) if found is not None else None
    if phase_done(row, phase):
        return None
    return not_done(row, phase)


def not_done(row: LedgerRow | None, phase: str) -> str:
    """Why the ledger does not count `phase` as done, in words."""
    if row is None or (row.phase is None and row.state not in ("running", "failed")):
        return "the plan has not started"
    if row.state in ("running", "failed") and row.active_phase:
        how = "is running or was interrupted" if row.state == "running" else "failed part way"
        return f"the {row.direction or 'run'} of {row.active_phase} {how}; phasegate resumes it"
    if row.phase is None:
        return "the plan has not started"
    return f"the last phase done is {row.phase}, so {phase} has not run yet"


def _message(revision: str, plan: str, phase: str, reason: str, context: Any) -> str:
    plan_file = _plan_file(plan, context)
    return (
        f"revision {revision} belongs to phase {phase!r} of plan {plan!r}, which phasegate has "
        f"not run here ({reason}). Nothing of {revision} was applied. phasegate applies it "
        f"behind the phase's gate: `phasegate advance {plan_file} --to {phase}`. In a deploy, "
        f"run `phasegate upgrade --yes` instead of `alembic upgrade`: it applies every revision "
        f"that is safe now and names what it leaves for phasegate. Only for a new, empty "
        f"database built from the whole history: `{ESCAPE}=off alembic upgrade head`"
    )


def _plan_file(plan: str, context: Any) -> str:
    """The plan's file in the project's plans directory, for the message; a placeholder
    when it cannot be found (the message must not fail)."""
    try:
        from phasegate.config import load_config

        config = getattr(context, "config", None)
        ini = getattr(config, "config_file_name", None)
        root = Path(ini).resolve().parent if ini else Path.cwd()
        plans = load_config(root).plans_dir
        pattern = re.compile(rf"^plan:\s*['\"]?{re.escape(plan)}['\"]?\s*(#.*)?$", re.M)
        for path in sorted(plans.glob("*.y*ml")):
            if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
                try:
                    return str(path.relative_to(Path.cwd()))
                except ValueError:
                    return str(path)
    except Exception:  # a message helper: any failure means "not found"
        pass
    return "<plan file>"


def _printable(text: str) -> str:
    """Control characters (a role name, a database error) escaped, as a terminal must
    never interpret text that came from the database."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _quote(role: str) -> str:
    return '"' + role.replace('"', '""') + '"'
