"""The seed story end to end through the real CLI on a real PostgreSQL."""

from __future__ import annotations

import json

import sqlalchemy as sa

from .conftest import PLAN, SEED_ROWS

P = str(PLAN)


def columns(engine: sa.Engine, table: str = "bug") -> set[str]:
    with engine.connect() as c:
        rows = c.execute(
            sa.text("SELECT column_name FROM information_schema.columns WHERE table_name = :t"),
            {"t": table},
        )
        return {r[0] for r in rows}


def fetch(engine: sa.Engine, query: str, **params: object) -> list[tuple]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(sa.text(query), params)]


def scalar(engine: sa.Engine, query: str, **params: object) -> object:
    with engine.connect() as c:
        return c.execute(sa.text(query), params).scalar()


def test_acceptance_flow(phasegate, engine) -> None:
    before = dict(fetch(engine, "SELECT id, root_cause FROM bug"))
    assert len(before) == SEED_ROWS

    # contract is refused while a v1 instance is live: the run stops after switch
    result = phasegate("advance", P, "--to", "contract", "--live-version", "1.0", "--yes")
    assert result.exit_code == 1, result.output
    assert "contract (advance): refused" in result.stdout
    assert "1.0 (--live-version)" in result.stdout

    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert (status["phase"], status["next"], status["state"]) == ("switch", "contract", "pending")
    assert status["drift"] is False
    job = {j["name"]: j for j in status["jobs"]}["bug-root-cause-id"]
    assert job["status"] == "done" and job["rows_done"] == SEED_ROWS
    assert "root_cause" in columns(engine)

    result = phasegate("contract", P, "--live-version", "2.0", "--yes")
    assert result.exit_code == 0, result.output
    assert "root_cause" not in columns(engine)
    assert scalar(engine, "SELECT count(*) FROM bug WHERE root_cause_id IS NULL") == 0
    names = dict(
        fetch(engine, "SELECT b.id, r.name FROM bug b JOIN root_cause r ON r.id = b.root_cause_id")
    )
    assert names == before

    result = phasegate("rollback", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    after = dict(fetch(engine, "SELECT id, root_cause FROM bug"))
    assert after == before
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert (status["phase"], status["next"]) == ("switch", "contract")


def test_every_step_is_in_the_event_log(phasegate, engine) -> None:
    result = phasegate("advance", P, "--to", "switch", "--live-version", "1.5", "--yes")
    assert result.exit_code == 0, result.output
    with engine.connect() as c:
        applied = [
            r[0]
            for r in c.execute(
                sa.text(
                    "SELECT detail->>'revision' FROM phasegate.event "
                    "WHERE kind = 'revision.applied' ORDER BY id"
                )
            )
        ]
        gates = c.execute(
            sa.text(
                "SELECT phase, detail->'observed'->0->>'version' FROM phasegate.event "
                "WHERE kind = 'gate.passed' ORDER BY id"
            )
        ).all()
        with_heads = c.execute(
            sa.text("SELECT alembic_heads FROM phasegate.plan_state WHERE plan = 'bug-root-cause'")
        ).scalar()
    assert applied == ["6c55e0560fd4", "8f3a2d1c9b7e", "a41c7e9d2b58", "d7e2b9f4a613"]
    assert [tuple(g) for g in gates] == [("expand", "1.5"), ("backfill", "1.5"), ("switch", "1.5")]
    assert with_heads == ["d7e2b9f4a613"]
    with engine.begin() as c:
        try:
            c.execute(sa.text("DELETE FROM phasegate.event"))
            raise AssertionError("the event log accepted a DELETE")
        except sa.exc.ProgrammingError as exc:
            assert "append-only" in str(exc)


def test_sync_trigger_keeps_both_code_versions_consistent(phasegate, engine) -> None:
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    with engine.begin() as c:
        # v1 insert: only the old column → up fills root_cause_id
        c.execute(
            sa.text("INSERT INTO bug (bug_tracker_url, root_cause) VALUES ('v1', 'brand new')")
        )
        # v2 insert: only the new column → down fills root_cause (root_cause still NOT NULL)
        rc = c.execute(sa.text("SELECT id FROM root_cause WHERE name = 'deadlock'")).scalar()
        c.execute(
            sa.text("INSERT INTO bug (bug_tracker_url, root_cause_id) VALUES ('v2', :rc)"),
            {"rc": rc},
        )
    with engine.begin() as c:
        c.execute(sa.text("UPDATE bug SET root_cause = 'memory leak' WHERE id = 1"))  # v1 update
        c.execute(sa.text("UPDATE bug SET root_cause_id = :rc WHERE id = 2"), {"rc": rc})  # v2
    rows = dict(
        engine.connect()
        .execute(
            sa.text(
                "SELECT b.bug_tracker_url, (b.root_cause, r.name) FROM bug b "
                "JOIN root_cause r ON r.id = b.root_cause_id "
                "WHERE b.bug_tracker_url IN ('v1', 'v2') OR b.id IN (1, 2)"
            )
        )
        .all()
    )
    assert len(rows) == 4
    for old, new in rows.values():
        assert old == new, rows
    assert ("brand new", "brand new") in rows.values()
    assert ("deadlock", "deadlock") in rows.values()
    assert ("memory leak", "memory leak") in rows.values()


def test_backfill_session_is_left_alone_by_the_trigger(phasegate, engine) -> None:
    """A batch that sets the new columns must not have `down` rewrite the old ones."""
    assert (
        phasegate("advance", P, "--to", "backfill", "--live-version", "1", "--yes").exit_code == 0
    )
    with engine.begin() as c:
        rc = c.execute(sa.text("SELECT id FROM root_cause WHERE name = 'deadlock'")).scalar()
        c.execute(sa.text("SELECT set_config('phasegate.backfill', 'on', true)"))
        c.execute(sa.text("UPDATE bug SET root_cause_id = :rc WHERE id = 3"), {"rc": rc})
    old, new_id = (
        engine.connect()
        .execute(sa.text("SELECT root_cause, root_cause_id FROM bug WHERE id = 3"))
        .one()
    )
    assert new_id == rc and old != "deadlock"


def test_rerunning_a_finished_phase_is_a_noop(phasegate, engine) -> None:
    assert (
        phasegate("advance", P, "--to", "backfill", "--live-version", "1", "--yes").exit_code == 0
    )
    events = scalar(engine, "SELECT count(*) FROM phasegate.event")
    result = phasegate("expand", P, "--live-version", "1", "--yes")
    assert result.exit_code == 0 and "already done" in result.stdout
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1", "--yes")
    assert result.exit_code == 0 and "no-op" in result.stdout
    assert scalar(engine, "SELECT count(*) FROM phasegate.event") == events


def test_a_phase_command_must_be_next(phasegate) -> None:
    result = phasegate("switch", P, "--live-version", "1", "--yes")
    assert result.exit_code == 2
    assert "switch is not the next phase" in result.stderr and "next is expand" in result.stderr
