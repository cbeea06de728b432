"""Failure paths: a revision that fails, a backfill cut short, drift, a second orchestrator."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from phasegate.db import LOCK_NAMESPACE, LOCK_ORCHESTRATOR, libpq_url, normalize_url

from .conftest import ALEMBIC_INI, PLAN, Phasegate, guard_off
from .test_seed_story import scalar

P = str(PLAN)


def hold(url: str, statement: str, application_name: str = "blocker") -> psycopg.Connection:
    """Another session that holds a lock until closed."""
    conn = psycopg.connect(libpq_url(url), application_name=application_name)
    conn.execute(statement)
    return conn


# switch (its ALTER needs ACCESS EXCLUSIVE on bug) giving up each lock wait after 200 ms
SWITCH_WITH_SHORT_LOCK_WAITS = ("switch", P, "--live-version", "1", "--lock-timeout", "200ms")


def blocked_at_backfill(phasegate: Phasegate, url: str) -> psycopg.Connection:
    """The plan advanced to backfill, and a session ('blocker') holding ACCESS SHARE on
    bug in an open transaction: switch cannot get its lock until the caller closes it."""
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    return hold(url, "BEGIN; LOCK TABLE bug IN ACCESS SHARE MODE")


def release_after_a_retry(
    url: str, holder: psycopg.Connection, release: Callable[[], None] | None = None
) -> threading.Thread:
    """A thread that ends `holder`'s hold (closes it, or calls `release`) once phasegate,
    blocked by it, has tried twice (two statements seen waiting on it: the first one timed
    out), instead of after a fixed time, which a loaded machine may not fill."""
    pid = holder.info.backend_pid
    blocked = (
        "SELECT pid, query_start FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        " AND application_name LIKE 'phasegate %%'"
    )

    def run() -> None:
        seen: set[tuple] = set()
        deadline = time.monotonic() + 120
        with psycopg.connect(libpq_url(url), autocommit=True) as watcher:
            while len(seen) < 2 and time.monotonic() < deadline:
                seen.update(watcher.execute(blocked, (pid,)).fetchall())
                time.sleep(0.02)
        (release or holder.close)()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_failed_revision_is_recorded_and_the_phase_resumes(phasegate, engine, seeded_url) -> None:
    blocker = blocked_at_backfill(phasegate, seeded_url)
    try:
        result = phasegate(*SWITCH_WITH_SHORT_LOCK_WAITS, "--lock-retries", "1", "--yes")
    finally:
        blocker.close()
    assert result.exit_code == 3, result.output
    assert "lock timeout (200ms) in revision a41c7e9d2b58" in result.stderr
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert (status["state"], status["active_phase"], status["next"]) == (
        "failed",
        "switch",
        "switch",
    )
    # the failed revision rolled back as a whole: nothing of it is applied
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "8f3a2d1c9b7e"

    result = phasegate("advance", P, "--to", "switch", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "d7e2b9f4a613"
    kinds = scalar(
        engine,
        "SELECT string_agg(kind, ',' ORDER BY id) FROM phasegate.event WHERE phase = 'switch'",
    )
    assert "advance.failed" in kinds and kinds.endswith("advance.completed")


def test_backfill_resumes_from_its_checkpoint(phasegate, engine, seeded_url) -> None:
    assert phasegate("expand", P, "--live-version", "1", "--yes").exit_code == 0
    blocker = hold(seeded_url, "BEGIN; SELECT * FROM bug WHERE id = 2000 FOR UPDATE")
    try:
        flags = ["--batch-size", "500", "--batch-lock-timeout", "100ms", "--retries", "3"]
        result = phasegate("backfill", P, "--live-version", "1", "--yes", *flags)
    finally:
        blocker.close()
    assert result.exit_code == 3, result.output
    assert "hit lock timeout 4 times in a row" in result.stderr
    with engine.connect() as c:
        cp = c.execute(
            sa.text(
                "SELECT status, last_key::int, rows_done, walked FROM phasegate.job_checkpoint "
                "WHERE job = 'bug-root-cause-id'"
            )
        ).one()
        done = c.execute(
            sa.text("SELECT count(*) FROM bug WHERE root_cause_id IS NOT NULL")
        ).scalar()
    status, last_key, rows_done, walked = cp
    # retried smaller and smaller, it stopped right before the locked row ...
    assert status == "running" and 1500 <= last_key < 2000
    # ... and every committed batch is exactly what the checkpoint says
    assert rows_done == walked == last_key == done

    result = phasegate("backfill", P, "--live-version", "1", "--batch-size", "500", "--yes")
    assert result.exit_code == 0, result.output
    assert "already done" in result.stderr  # the sql job is not run twice
    with engine.connect() as c:
        cp = c.execute(
            sa.text(
                "SELECT status, rows_done, walked, verified_at IS NOT NULL "
                "FROM phasegate.job_checkpoint WHERE job = 'bug-root-cause-id'"
            )
        ).one()
    assert tuple(cp) == ("done", 3000, 3000, True)  # each key walked once: resumed, not redone


def alembic(url: str, verb: str, target: str) -> None:
    """An operator's out-of-band `alembic <verb> <target>`, around phasegate's back: the
    revision guard would stop it at a plan revision, so it is turned off explicitly."""
    config = Config(str(ALEMBIC_INI))
    engine = sa.create_engine(url)
    with engine.connect() as connection, guard_off():
        config.attributes["connection"] = connection
        getattr(command, verb)(config, target)
        connection.commit()
    engine.dispose()


def test_manual_downgrade_is_drift_and_blocks_advance(phasegate, seeded_url) -> None:
    assert phasegate("expand", P, "--live-version", "1", "--yes").exit_code == 0
    alembic(seeded_url, "downgrade", "bc25b5f8939f")
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert status["drift"] is True
    assert (
        "recorded as done but revision(s) 6c55e0560fd4, 8f3a2d1c9b7e" in status["drift_details"][0]
    )
    result = phasegate("advance", P, "--live-version", "1", "--yes")
    assert result.exit_code == 1, result.output
    assert "drifted" in result.stderr and "alembic upgrade 8f3a2d1c9b7e" in result.stderr


def test_manual_upgrade_past_the_plan_is_drift(phasegate, seeded_url) -> None:
    alembic(seeded_url, "upgrade", "8f3a2d1c9b7e")
    result = phasegate("expand", P, "--live-version", "1", "--yes")
    assert result.exit_code == 1
    assert "phase 'expand' has not run but revision(s)" in result.stderr
    assert "alembic downgrade bc25b5f8939f" in result.stderr


def test_second_orchestrator_is_busy_and_names_the_holder(phasegate, engine, seeded_url) -> None:
    holder = hold(
        seeded_url,
        f"SELECT pg_advisory_lock({LOCK_NAMESPACE}, {LOCK_ORCHESTRATOR})",
        application_name="phasegate advance other-plan",
    )
    try:
        pid = holder.info.backend_pid
        result = phasegate("advance", P, "--live-version", "1", "--yes")
    finally:
        holder.close()
    assert result.exit_code == 4, result.output
    assert f"pid {pid}" in result.stderr and "phasegate advance other-plan" in result.stderr
    assert scalar(engine, "SELECT to_regclass('root_cause')") is None
    assert phasegate("expand", P, "--live-version", "1", "--yes").exit_code == 0


def test_a_ledger_from_a_newer_phasegate_is_refused(phasegate, engine) -> None:
    assert phasegate("expand", P, "--live-version", "1", "--yes").exit_code == 0
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE phasegate.meta SET value = '99' WHERE key = 'schema_version'")
        )
    for args in (
        ("backfill", P, "--live-version", "1", "--yes"),
        ("status", P),
        ("check-deploy", P, "--app-version", "1.0"),
    ):
        result = phasegate(*args)
        assert result.exit_code == 2, (args, result.output)  # check-deploy: never fail open
        assert "version 99, written by a newer phasegate" in result.stderr, args
    assert scalar(engine, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%sync_%'") == 0


def test_a_set_column_that_does_not_exist_is_a_plan_error(phasegate, engine, tmp_path) -> None:
    plan = tmp_path / "typo.yaml"
    plan.write_text(
        PLAN.read_text().replace("          root_cause_id:", "          root_cause_id2:")
    )
    assert phasegate("expand", str(plan), "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    line = next(
        n for n, text in enumerate(plan.read_text().splitlines(), 1) if "root_cause_id2" in text
    )
    assert f"{plan}:{line}: phases.backfill.jobs[1].set.root_cause_id2:" in result.stderr
    assert "column 'root_cause_id2' does not exist in table 'bug'" in result.stderr
    assert scalar(engine, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%sync_%'") == 0


@pytest.mark.parametrize(
    ("original", "broken", "key", "says"),
    [
        (  # a misspelt column in sync.down: batches never run it, app writes would
            "(SELECT name FROM root_cause",
            "(SELECT nam FROM root_cause",
            "sync.down.root_cause",
            'column "nam" does not exist',
        ),
        (
            "root_cause_id_for(new.root_cause)",
            "root_cause_id_for(new.rootcause)",
            "set.root_cause_id",
            "new.rootcause",
        ),
        (  # text for a bigint column: the assignment cannot take it
            "root_cause_id_for(new.root_cause)",
            "new.root_cause",
            "set.root_cause_id",
            "is of type bigint but expression is of type text",
        ),
        ("AND new.root_cause_id IS NULL", "AND new.root_cause_id", "where", "type boolean"),
    ],
)
def test_a_broken_expression_is_a_plan_error_before_any_trigger(
    phasegate, engine, tmp_path, original: str, broken: str, key: str, says: str
) -> None:
    """The trigger would run it on every app write: refused at its line, nothing installed."""
    plan = tmp_path / "typo.yaml"
    assert PLAN.read_text().count(original) == 1
    plan.write_text(PLAN.read_text().replace(original, broken))
    assert phasegate("expand", str(plan), "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    line = next(n for n, text in enumerate(plan.read_text().splitlines(), 1) if broken in text)
    assert f"{plan}:{line}: phases.backfill.jobs[1].{key}:" in result.stderr
    assert says in result.stderr
    assert scalar(engine, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%sync_%'") == 0
    assert scalar(engine, "SELECT count(*) FROM bug WHERE root_cause_id IS NOT NULL") == 0


def test_a_recorded_phase_gone_from_the_plan_is_a_usage_error(phasegate, tmp_path) -> None:
    assert (
        phasegate("advance", P, "--to", "backfill", "--live-version", "1", "--yes").exit_code == 0
    )
    text = PLAN.read_text()
    plan = tmp_path / "no_backfill.yaml"
    plan.write_text(text[: text.index("  backfill:\n")] + text[text.index("  # switch:") :])
    for args in (("status", str(plan)), ("advance", str(plan), "--live-version", "1", "--yes")):
        result = phasegate(*args)
        assert result.exit_code == 2, result.output
        assert "records phase 'backfill' of plan 'bug-root-cause' as done" in result.stderr
        assert "no longer has it (it has expand, switch, contract)" in result.stderr


def test_an_empty_database_is_refused_before_anything_is_written(database_url) -> None:
    """The wrong URL (alembic.ini names `postgres`): expand would build the whole app."""
    result = Phasegate(database_url)("advance", P, "--to", "expand", "--live-version", "1", "--yes")
    assert result.exit_code == 1, result.output
    assert "has no Alembic revision" in result.stderr
    assert "`alembic upgrade bc25b5f8939f` first" in result.stderr
    engine = sa.create_engine(normalize_url(database_url))
    assert scalar(
        engine, "SELECT to_regclass('bug') IS NULL AND to_regnamespace('phasegate') IS NULL"
    )
    engine.dispose()


def test_override_gate_proceeds_and_is_recorded(phasegate, engine) -> None:
    result = phasegate("expand", P, "--override-gate", "no app deployed yet", "--yes")
    assert result.exit_code == 0, result.output
    assert "OVERRIDDEN (no app deployed yet)" in result.stderr
    reason = scalar(
        engine,
        "SELECT detail->>'override_reason' FROM phasegate.event WHERE kind = 'gate.overridden'",
    )
    assert reason == "no app deployed yet"


def test_failed_verification_then_new_rows_then_a_fixed_plan_completes(
    phasegate, engine, tmp_path
) -> None:
    """A re-run after failed verification sweeps every row there now, new ones included."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        PLAN.read_text().replace(
            "root_cause_id: root_cause_id_for(new.root_cause)",
            "root_cause_id: CASE WHEN new.root_cause = 'race condition' THEN NULL "
            "ELSE root_cause_id_for(new.root_cause) END",
        )
    )
    assert phasegate("expand", P, "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("backfill", str(broken), "--live-version", "1", "--yes")
    assert result.exit_code == 3 and "verification failed" in result.stderr, result.output
    assert 'Inspect them with: SELECT * FROM "bug" AS new WHERE' in result.stderr
    unfilled = scalar(engine, "SELECT count(*) FROM bug WHERE root_cause_id IS NULL")
    assert unfilled > 0 and f"{unfilled:,} row(s) of bug still match" in result.stderr
    # the ledger records the failure: the count, and no verification time
    with engine.begin() as c:
        recorded = c.execute(
            sa.text(
                "SELECT status, remaining, verified_at FROM phasegate.job_checkpoint"
                " WHERE job = 'bug-root-cause-id'"
            )
        ).one()
    assert tuple(recorded) == ("failed", unfilled, None)
    with engine.begin() as c:  # a v1 write above the first walk's bound, through the bad trigger
        c.execute(
            sa.text(
                "INSERT INTO bug (bug_tracker_url, root_cause) VALUES ('late', 'race condition')"
            )
        )
    # the fixed plan is another contract: taken only on the operator's word
    result = phasegate("backfill", P, "--live-version", "1", "--yes")
    assert result.exit_code == 2 and "--restart-job bug-root-cause-id" in result.output
    restart = ("--restart-job", "bug-root-cause-id")
    result = phasegate("backfill", P, "--live-version", "1", "--yes", *restart)
    assert result.exit_code == 0, result.output
    assert scalar(engine, "SELECT count(*) FROM bug WHERE root_cause_id IS NULL") == 0


def test_plan_errors_found_with_the_database_do_not_touch_the_ledger(
    phasegate, engine, tmp_path
) -> None:
    plan = tmp_path / "typo.yaml"
    plan.write_text(PLAN.read_text().replace("        key: id\n", "        key: ident\n"))
    assert phasegate("expand", str(plan), "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 2 and "column 'ident' does not exist" in result.stderr
    state = scalar(engine, "SELECT state || '/' || phase FROM phasegate.plan_state")
    assert state == "pending/expand"
    started = "SELECT count(*) FROM phasegate.event WHERE kind = 'advance.started'"
    assert scalar(engine, started + " AND phase = 'backfill'") == 0
