"""Integrity: one plan is one contract, and a process that lost its lock never writes again.

Each test builds the engine tests' table `t` (`doubled = val * 2` up, `val = doubled / 2`
down) or the seeded bug tracker, runs the real CLI (in-process or as a subprocess), and
checks rows, the ledger and exit codes.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from phasegate.db import libpq_url

from .conftest import Phasegate
from .test_backfill_engine import (
    ROWS,
    assert_all_agree,
    cli,
    engine_plan_text,
    execute,
    fetch,
    make_plan,
    seeded_table,
    wait_for_batches,
)

pytestmark = pytest.mark.db

SLOW = ("--batch-size", "20", "--pause", "0.05")
TRIPLED = engine_plan_text(set_="doubled: new.val * 3")
UNSYNCED = engine_plan_text().split("        sync:")[0]


def sync_function_comment(url: str) -> str:
    [(comment,)] = fetch(
        url,
        "SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'phasegate'"
        " AND p.proname LIKE 'sync%'",
    )
    return comment


# -- 1. a worker started from another version of the plan --------------------------------------


def test_a_worker_whose_plan_differs_refuses_at_once_and_writes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    """A helper from a checkout whose `set` was edited must not write its expression into
    the slices it claims: it exits 2 at once, naming the job and the key; the walk the
    orchestrator runs ends with every row right."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    edited = tmp_path / "edited.yaml"
    edited.write_text(TRIPLED)
    owner = cli(
        database_url, "backfill", plan, "--live-version", "1", "--yes", "--slices", "6", *SLOW
    )
    wait_for_batches(database_url, 3)
    helper = cli(database_url, "worker", str(edited), "--wait", "30", *SLOW)
    _out, helper_err = helper.communicate(timeout=60)
    assert helper.returncode == 2, helper_err
    assert "job 'fill': `set.doubled` was `new.val * 2`" in helper_err
    assert "the file now says `new.val * 3`" in helper_err
    assert f"{edited}:11: job" in helper_err  # the line of `doubled:` in the helper's file
    assert not fetch(database_url, "SELECT k FROM t WHERE doubled = val * 3 LIMIT 1")
    _out, owner_err = owner.communicate(timeout=120)
    assert owner.returncode == 0, owner_err
    assert_all_agree(database_url, ROWS)


def test_a_worker_with_the_same_plan_reformatted_joins(database_url: str, tmp_path: Path) -> None:
    """Whitespace and comments are not a change: the expressions are compared as
    PostgreSQL's parser reads them."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    same = tmp_path / "same.yaml"
    same.write_text(engine_plan_text(set_="doubled: new.val   *   2  -- the same"))
    owner = cli(
        database_url, "backfill", plan, "--live-version", "1", "--yes", "--slices", "6", *SLOW
    )
    wait_for_batches(database_url, 3)
    helper = cli(database_url, "worker", str(same), "--wait", "30", *SLOW)
    _out, helper_err = helper.communicate(timeout=120)
    assert helper.returncode == 0, helper_err
    assert re.search(r"helped, [1-9][0-9,]* rows walked", _out), _out
    _out, owner_err = owner.communicate(timeout=120)
    assert owner.returncode == 0, owner_err
    assert_all_agree(database_url, ROWS)


# -- 2. a resume with an edited plan -------------------------------------------------------------


def stopped_backfill(url: str, plan: str) -> int:
    """A backfill stopped with SIGTERM part way; returns the rows it had written."""
    owner = cli(url, "backfill", plan, "--live-version", "1", "--yes", *SLOW)
    wait_for_batches(url, 5)
    owner.send_signal(signal.SIGTERM)
    _out, err = owner.communicate(timeout=60)
    assert owner.returncode == 3, err
    [(written,)] = fetch(url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL")
    assert 0 < written < ROWS
    return written


def test_a_resume_with_an_edited_plan_refuses_and_changes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    written = stopped_backfill(database_url, plan)
    comment = sync_function_comment(database_url)
    [(digest,)] = fetch(database_url, "SELECT plan_digest FROM phasegate.plan_state")
    Path(plan).write_text(TRIPLED)

    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    assert "`set.doubled` was `new.val * 2`" in result.stderr
    assert f"phasegate rollback {plan}" in result.stderr  # the two honest ways out
    assert "--restart-job fill" in result.stderr
    # nothing touched: the trigger, the recorded digest, the rows
    assert sync_function_comment(database_url) == comment
    assert fetch(database_url, "SELECT plan_digest FROM phasegate.plan_state") == [(digest,)]
    assert fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL") == [(written,)]
    assert fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 3") == [(0,)]
    status = json.loads(Phasegate(database_url)("status", plan, json_output=True).stdout)
    assert any("set.doubled" in change for change in status["contract_changes"])


def test_restart_job_rewrites_every_row_with_the_new_expression(
    database_url: str, tmp_path: Path
) -> None:
    """`--restart-job` walks the job again from its first key: the rows the old `set`
    wrote are rewritten too (never a mix), and the trigger runs the new one."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    stopped_backfill(database_url, plan)
    Path(plan).write_text(TRIPLED)  # a new `set` (a new `sync.down` cannot be restarted)
    phasegate = Phasegate(database_url)
    result = phasegate("backfill", plan, "--live-version", "1", "--yes", "--restart-job", "fill")
    assert result.exit_code == 0, result.output
    assert "job 'fill': restarted" in result.stderr
    assert fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 3") == [(ROWS,)]
    execute(database_url, "INSERT INTO t (k, val) VALUES (100000, 7)")  # old code, via the trigger
    assert fetch(database_url, "SELECT doubled FROM t WHERE k = 100000") == [(21,)]
    kinds = fetch(database_url, "SELECT kind FROM phasegate.event WHERE kind = 'job.restarted'")
    assert kinds == [("job.restarted",)]
    # the new contract binds from now on: the old file is the one refused now
    Path(plan).write_text(engine_plan_text())
    assert phasegate("status", plan).exit_code == 0
    assert json.loads(phasegate("status", plan, json_output=True).stdout)["contract_changes"]


def test_restart_job_names_a_job_of_the_plan_and_needs_the_backfill_next(
    database_url: str, tmp_path: Path
) -> None:
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    phasegate = Phasegate(database_url)
    result = phasegate("backfill", plan, "--live-version", "1", "--yes", "--restart-job", "nope")
    assert result.exit_code == 2 and "has no such job" in result.stderr, result.output
    assert phasegate("backfill", plan, "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("advance", plan, "--live-version", "1", "--yes", "--restart-job", "fill")
    assert result.exit_code == 2 and "roll back to expand" in result.stderr, result.output


def test_a_rollback_of_backfill_then_an_edited_plan_leaves_no_row_with_the_old_result(
    database_url: str, tmp_path: Path
) -> None:
    """The other way out: roll the backfill back and start over with the file as it is.
    The new walk rewrites what the old expression wrote, not only the empty rows."""
    seeded_table(database_url)
    plan = tmp_path / "copy.yaml"  # a copy with no sync: no trigger keeps it, yet no mix
    plan.write_text(UNSYNCED)
    stopped_backfill(database_url, str(plan))
    phasegate = Phasegate(database_url)
    assert phasegate("rollback", str(plan), "--live-version", "1", "--yes").exit_code == 0
    plan.write_text(UNSYNCED.replace("new.val * 2", "new.val * 3"))
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 3") == [(ROWS,)]


def own_connection(url: str) -> psycopg.Connection:
    return psycopg.connect(libpq_url(url), autocommit=True)


def wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_expression_may_end_in_a_sql_comment(database_url: str, tmp_path: Path) -> None:
    """A `--` comment at the end of an expression must not swallow what phasegate writes
    after it (the closing parenthesis, the rest of the batch or trigger statement)."""
    seeded_table(database_url)
    plan = tmp_path / "commented.yaml"
    plan.write_text(
        engine_plan_text(
            set_="doubled: new.val * 2  -- twice",
            where="new.doubled IS NULL  -- not yet",
            down="val: new.doubled / 2  -- half",
        )
    )
    result = Phasegate(database_url)("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, ROWS)
    execute(database_url, "INSERT INTO t (k, val) VALUES (100000, 7)")  # through the trigger
    assert fetch(database_url, "SELECT doubled FROM t WHERE k = 100000") == [(14,)]


# -- 5. fencing: a process that lost its lock ----------------------------------------------------


def orchestrator_pid(url: str, application_name: str) -> int:
    rows: list[tuple[int]] = []

    def found() -> bool:
        rows[:] = fetch(
            url,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            f" AND application_name = '{application_name}'",
        )
        return bool(rows)

    wait_until(found, what=f"a session named {application_name!r}")
    return rows[0][0]


def batches(url: str) -> int:
    [(count,)] = fetch(url, "SELECT coalesce(sum(batches), 0) FROM phasegate.job_slice")
    return int(count)


def test_workers_stop_within_a_batch_once_their_orchestrator_lost_its_session(
    database_url: str, tmp_path: Path
) -> None:
    """The orchestrator's session is terminated while two workers walk: they stop within
    one batch each; a second phasegate (a rollback) then runs, and the first process never
    writes again: no `advance.failed` after `rollback.completed`."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    walk = ("--workers", "2", "--batch-size", "20", "--pause", "0.1")
    owner = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *walk)
    wait_for_batches(database_url, 6)
    pid = orchestrator_pid(database_url, "phasegate backfill engine.yaml")
    execute(database_url, f"SELECT pg_terminate_backend({pid})")
    then = batches(database_url)
    time.sleep(2.0)  # twenty pauses: a worker that went on would have walked many batches
    assert batches(database_url) <= then + 2  # at most the batch each worker had in flight

    result = Phasegate(database_url)("rollback", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    _out, err = owner.communicate(timeout=60)
    assert owner.returncode == 3, err
    kinds = [k for (k,) in fetch(database_url, "SELECT kind FROM phasegate.event ORDER BY id")]
    assert kinds[-1] == "rollback.completed", kinds
    [state] = fetch(database_url, "SELECT state, phase, active_phase FROM phasegate.plan_state")
    assert state == ("pending", None, None)


def test_a_run_that_is_no_longer_current_writes_nothing(database_url: str, tmp_path: Path) -> None:
    """Fencing in the ledger: once another run has begun, a session of the older one (had
    it survived, or reconnected) may write no ledger row."""
    from phasegate import db, ledger
    from phasegate.errors import Fenced

    seeded_table(database_url)
    url = db.normalize_url(database_url)
    with db.session(url, "test older run") as older, db.session(url, "test newer run") as newer:
        ledger.ensure_schema(older)
        first = ledger.begin_run(older)
        second = ledger.begin_run(newer)
        assert second == first + 1
        with pytest.raises(Fenced, match=f"run {first}"), older.tx():
            ledger.record_event(older, "engine-test", "advance.failed", "test")
        with newer.tx():
            ledger.record_event(newer, "engine-test", "rollback.completed", "test")
    assert fetch(database_url, "SELECT kind FROM phasegate.event") == [("rollback.completed",)]


# -- 13. idle_session_timeout ---------------------------------------------------------------------


def test_a_backfill_outlives_a_short_idle_session_timeout(
    database_url: str, tmp_path: Path
) -> None:
    """Managed PostgreSQL often ends sessions idle for under 30 s; the orchestrator's own
    session idles while its workers walk. Its session must survive the whole walk."""
    seeded_table(database_url)
    [(name,)] = fetch(database_url, "SELECT current_database()")
    execute(database_url, f"ALTER DATABASE {name} SET idle_session_timeout = '1s'")
    plan = make_plan(tmp_path)
    walk = ("--workers", "2", "--batch-size", "20", "--pause", "0.05")
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes", *walk)
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, ROWS)


def test_lock_retries_outlive_a_short_idle_session_timeout(phasegate, seeded_url: str) -> None:
    """Between lock retries the orchestrator's session idles for up to seconds: a short
    idle_session_timeout must not end the run."""
    from .conftest import PLAN

    [(name,)] = fetch(seeded_url, "SELECT current_database()")
    result = phasegate("advance", str(PLAN), "--to", "backfill", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    execute(seeded_url, f"ALTER DATABASE {name} SET idle_session_timeout = '1s'")
    blocker = own_connection(seeded_url)
    blocker.execute("BEGIN")
    blocker.execute("LOCK TABLE bug IN ACCESS SHARE MODE")
    release = threading.Timer(5.0, blocker.close)
    release.start()
    try:
        result = phasegate(
            "switch", str(PLAN), "--live-version", "1", "--lock-timeout", "200ms", "--yes"
        )
    finally:
        release.join()
    assert result.exit_code == 0, result.output
    assert "lock timeout (200ms)" in result.stderr  # it did wait, and retry, in between


# -- 17. rows whose key moves behind the walk -----------------------------------------------------


def test_rows_whose_key_moves_behind_the_walk_are_walked_again(
    database_url: str, tmp_path: Path
) -> None:
    """The app changes keys while the walk runs, moving rows from ahead of the walk to
    behind it: the walk never reaches them and the trigger does not fill them (only the
    key changed). The job says so and walks them; it does not blame `set`."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    owner = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *SLOW)
    wait_for_batches(database_url, 3)
    with own_connection(database_url) as app:  # rows far ahead of the walk, moved below it
        app.execute(f"UPDATE t SET k = -k WHERE k > {ROWS - 50}")
    _out, err = owner.communicate(timeout=120)
    assert owner.returncode == 0, err
    assert "50 row(s) had moved behind the walk" in err
    assert "return NULL" not in err
    assert_all_agree(database_url, ROWS)
    assert fetch(database_url, "SELECT count(*) FROM t WHERE k < 0") == [(50,)]


def test_rows_set_leaves_matching_still_fail_verification_after_one_catch_up(
    database_url: str, tmp_path: Path
) -> None:
    """When a walk over the whole range again changes nothing, what is left is `set`'s
    doing: verification fails, saying so."""
    seeded_table(database_url)
    plan = tmp_path / "nulls.yaml"
    plan.write_text(
        engine_plan_text(set_="doubled: CASE WHEN new.val % 100 = 0 THEN NULL ELSE new.val * 2 END")
    )
    result = Phasegate(database_url)("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 3, result.output
    assert "20 row(s) of t still match `where`" in result.stderr
    assert "`set` leaves them matching" in result.stderr
    assert "walking the range again" in result.stderr  # once, then it stops
    assert result.stderr.count("walking the range again") == 1


# -- 6. repairing drift never leaves data behind ---------------------------------------------------

WRONG_ROOT_CAUSES = (
    "SELECT count(*) FROM bug b LEFT JOIN root_cause r ON r.id = b.root_cause_id"
    " WHERE b.root_cause IS DISTINCT FROM r.name"
)


def test_an_out_of_band_contract_mid_plan_cannot_drop_the_synced_column(
    phasegate, seeded_url: str
) -> None:
    """Even with the revision guard turned off, a deploy's `alembic upgrade head` mid-plan
    cannot drop an old column while the sync trigger watches it (its UPDATE trigger's WHEN
    depends on the column): the contract revision fails whole and old code keeps working."""
    from .conftest import PLAN
    from .test_failures import alembic

    plan = str(PLAN)
    result = phasegate("advance", plan, "--to", "switch", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    with pytest.raises(Exception, match="other objects depend on it"):
        alembic(seeded_url, "upgrade", "head")
    assert fetch(seeded_url, "SELECT version_num FROM alembic_version") == [("d7e2b9f4a613",)]
    assert fetch(seeded_url, WRONG_ROOT_CAUSES) == [(0,)]
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert not status["drift"] and status["emptied"] == []


def test_an_old_column_dropped_and_added_back_is_said_and_refilled(
    phasegate, seeded_url: str
) -> None:
    """The whole story, as an operator may write it after the error above: the contract's
    DROP COLUMN with CASCADE (the hint PostgreSQL gives), which takes the sync trigger
    along, then the downgrade that adds the column back, empty. The version table and the
    ledger agree again; status must still say the old column is empty, and the next
    command refills it with sync.down before anything else."""
    from .conftest import PLAN

    plan = str(PLAN)
    result = phasegate("advance", plan, "--to", "switch", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    execute(seeded_url, "ALTER TABLE bug DROP COLUMN root_cause CASCADE")
    execute(seeded_url, "ALTER TABLE bug ADD COLUMN root_cause text")
    [(empty,)] = fetch(seeded_url, "SELECT count(*) FROM bug WHERE root_cause_id IS NOT NULL")
    assert empty > 0

    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    [said] = status["emptied"]
    assert "bug.root_cause were dropped and added back" in said and f"{empty:,} row(s)" in said
    assert "EMPTIED: column(s) bug.root_cause" in phasegate("status", plan).stdout
    # the missing trigger is drift: advance refuses, and its way out is a rollback, which
    # refills the column before it undoes anything
    result = phasegate("advance", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 1 and "missing or disabled" in result.output, result.output
    result = phasegate("rollback", plan, "--to", "backfill", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert fetch(seeded_url, WRONG_ROOT_CAUSES) == [(0,)]
    assert json.loads(phasegate("status", plan, json_output=True).stdout)["emptied"] == []
    kinds = [k for (k,) in fetch(seeded_url, "SELECT kind FROM phasegate.event")]
    assert "columns.refilled" in kinds


def test_a_new_column_dropped_and_added_back_is_walked_again(phasegate, seeded_url: str) -> None:
    """The same for a new column after the backfill: v2 would read NULL; the next command
    walks the job again first."""
    from .conftest import PLAN

    plan = str(PLAN)
    result = phasegate("advance", plan, "--to", "backfill", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    execute(
        seeded_url,
        "ALTER TABLE bug DROP COLUMN root_cause_id CASCADE",
        "ALTER TABLE bug ADD COLUMN root_cause_id bigint",
    )
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert any("bug.root_cause_id were dropped and added back" in e for e in status["emptied"])
    result = phasegate("rollback", plan, "--live-version", "1", "--yes")  # back to expand
    assert result.exit_code == 0, result.output
    assert fetch(seeded_url, WRONG_ROOT_CAUSES) == [(0,)]


# -- the sync trigger and column defaults -----------------------------------------------------


def test_a_default_set_on_a_synced_column_after_the_backfill_is_honoured(
    database_url: str, tmp_path: Path
) -> None:
    """A revision (switch, say) gives the new column a DEFAULT after the trigger was built:
    an old-code INSERT then leaves it at the default, not NULL. The next command re-installs
    the trigger with the default, so such an insert is synced again."""
    seeded_table(database_url)
    plan = tmp_path / "with-switch.yaml"
    plan.write_text(engine_plan_text() + '  switch:\n    compatible: ">=0"\n')
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", str(plan), "--live-version", "1", "--yes").exit_code == 0
    execute(database_url, "ALTER TABLE t ALTER COLUMN doubled SET DEFAULT 0")
    result = phasegate("switch", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert "defaults on t changed" in result.stderr
    execute(database_url, "INSERT INTO t (k, val) VALUES (100000, 7)")  # old code
    assert fetch(database_url, "SELECT doubled FROM t WHERE k = 100000") == [(14,)]


def test_a_synced_column_with_a_volatile_default_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    seeded_table(database_url)
    execute(database_url, "ALTER TABLE t ALTER COLUMN doubled SET DEFAULT (random() * 10)::int")
    plan = make_plan(tmp_path)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    assert f"{plan}:11:" in result.stderr and "which is not a constant" in result.stderr
    assert "DROP DEFAULT" in result.stderr
    assert not fetch(database_url, "SELECT FROM pg_trigger WHERE tgrelid = 't'::regclass")


def test_an_out_of_band_downgrade_of_contract_is_said_and_rolled_back_with_its_data(
    phasegate, seeded_url: str
) -> None:
    """The issue's story, after the contract: someone runs `alembic downgrade` of the
    contract revision by hand (downgrades are not guarded), which brings bug.root_cause
    back with every row NULL while the ledger says done. status says the old column is
    empty and offers `phasegate rollback`, which re-installs the sync trigger and refills
    the column with sync.down: every row right, and old code's writes synced again."""
    from .conftest import PLAN
    from .test_failures import alembic

    plan = str(PLAN)
    result = phasegate("advance", plan, "--to", "switch", "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    result = phasegate("contract", plan, "--live-version", "2", "--yes")
    assert result.exit_code == 0, result.output
    alembic(seeded_url, "downgrade", "d7e2b9f4a613")  # by hand: root_cause is back, empty

    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["drift"] and "phasegate rollback" in " ".join(status["drift_details"])
    [said] = status["emptied"]
    assert "bug.root_cause were dropped and added back" in said
    assert phasegate("advance", plan, "--live-version", "2", "--yes").exit_code == 1  # drift

    result = phasegate("rollback", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert fetch(seeded_url, WRONG_ROOT_CAUSES) == [(0,)]
    execute(seeded_url, "UPDATE bug SET root_cause = 'disk full' WHERE id = 1")  # old code
    [(name,)] = fetch(
        seeded_url,
        "SELECT r.name FROM bug b JOIN root_cause r ON r.id = b.root_cause_id WHERE b.id = 1",
    )
    assert name == "disk full"
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert (status["phase"], status["drift"], status["emptied"]) == ("switch", False, [])
