"""The fault suite: kill -9 anywhere, a server restart, two orchestrators, drift by hand, bad
input, and application traffic through every phase and every rollback; nothing is lost.

Run it alone with:  .venv/bin/python -m pytest tests/test_faults.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.pool import NullPool

from phasegate.cli import cli
from phasegate.db import libpq_url

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate, load_example
from .test_failures import alembic, hold, release_after_a_retry
from .test_plan import assert_located

P = str(PLAN)
OVERRIDE = ("--override-gate", "fault suite: no app connected")
SLOW = ("--batch-size", "100", "--pause", "0.03")  # 3,000 rows: ~30 batches, ~1.5 s
KILL_POINTS = 20
SEED = 20261124


# -- helpers -----------------------------------------------------------------------------------


def spawn(
    url: str, *args: str, failpoints: str = "", config: Path = ALEMBIC_INI
) -> subprocess.Popen[str]:
    """The real CLI in its own process (so it can be killed), the database from the env."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PHASEGATE_DATABASE_URL"] = url
    env["PHASEGATE_FAILPOINTS"] = failpoints
    return subprocess.Popen(
        [sys.executable, "-m", "phasegate", "--config", str(config), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def query(url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def no_phasegate_session(url: str) -> bool:
    """The server has noticed that a killed orchestrator is gone (its lock with it)."""
    return not query(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'phasegate %' AND pid <> pg_backend_pid()",
    )


def checksum(url: str) -> dict:
    """Schema and data as the app sees them, independent of ids assigned in walk order."""
    columns = [
        r[0]
        for r in query(
            url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'bug'"
        )
    ]
    if "root_cause_id" in columns and "root_cause" not in columns:
        data = (
            "SELECT md5(string_agg(b.id || '=' || coalesce(r.name, '-'), ',' ORDER BY b.id)) "
            "FROM bug b LEFT JOIN root_cause r ON r.id = b.root_cause_id"
        )
    else:
        data = (
            "SELECT md5(string_agg(id || '=' || coalesce(root_cause, '-'), ',' ORDER BY id)) "
            "FROM bug"
        )
    shape = query(
        url,
        """
        SELECT json_build_object(
          'version', (SELECT string_agg(version_num, ',') FROM alembic_version),
          'columns', (SELECT json_agg(table_name || '.' || column_name || ' ' || data_type
                                      || ' ' || is_nullable ORDER BY table_name, column_name)
                      FROM information_schema.columns WHERE table_schema = 'public'),
          'constraints', (SELECT json_agg(conname || ' ' || contype::text || ' ' || convalidated
                                          ORDER BY conname)
                          FROM pg_constraint WHERE connamespace = 'public'::regnamespace),
          'indexes', (SELECT json_agg(c.relname || ' ' || i.indisvalid ORDER BY c.relname)
                      FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                      WHERE c.relnamespace = 'public'::regnamespace),
          'triggers', (SELECT json_agg(t.tgname ORDER BY t.tgname) FROM pg_trigger t
                       JOIN pg_class c ON c.oid = t.tgrelid
                       WHERE NOT t.tgisinternal AND c.relnamespace = 'public'::regnamespace),
          'functions', (SELECT json_agg(proname ORDER BY proname) FROM pg_proc
                        WHERE pronamespace = 'public'::regnamespace))
        """,
    )[0][0]
    return {**shape, "data": query(url, data)[0][0]}


def plan_state(url: str) -> tuple:
    rows = query(url, "SELECT phase, state FROM phasegate.plan_state")
    return rows[0] if rows else (None, None)


# -- kill -9 anywhere ------------------------------------------------------------------------

# Where to kill: a failpoint makes the orchestrator pause right there (or the backfill is
# slow enough by itself); a ledger condition says it got there; after the kill the ledger
# must show that very place: (state, active phase) and Alembic's version.
MOMENTS: dict[str, tuple[str, str, tuple[str, str], str]] = {
    "inside expand": (
        "before-revision:6c55e0560fd4=30",
        "SELECT 1 FROM phasegate.event WHERE kind = 'advance.started' AND phase = 'expand'",
        ("running", "expand"),
        "bc25b5f8939f",
    ),
    "between revisions": (
        "after-revision:6c55e0560fd4=30",
        "SELECT 1 FROM phasegate.event WHERE kind = 'revision.applied' "
        "AND detail->>'revision' = '6c55e0560fd4'",
        ("running", "expand"),
        "6c55e0560fd4",
    ),
    "inside the backfill": (
        "",
        "SELECT 1 FROM phasegate.job_checkpoint WHERE job = 'bug-root-cause-id' AND rows_done > 0",
        ("running", "backfill"),
        "8f3a2d1c9b7e",
    ),
    "inside switch": (
        "after-revision:a41c7e9d2b58=30",
        "SELECT 1 FROM phasegate.event WHERE kind = 'revision.applied' "
        "AND detail->>'revision' = 'a41c7e9d2b58'",
        ("running", "switch"),
        "a41c7e9d2b58",
    ),
    "inside contract": (
        "before-revision:e59b1f0c3d82=30",  # its sync triggers are already dropped
        "SELECT 1 FROM phasegate.event WHERE kind = 'advance.started' AND phase = 'contract'",
        ("running", "contract"),
        "d7e2b9f4a613",
    ),
}
BACKFILL_STARTED = MOMENTS["inside the backfill"][1]


def ledger_says(url: str, sql: str) -> bool:
    try:
        return bool(query(url, sql))
    except psycopg.errors.UndefinedTable:
        return False


def where_it_stopped(url: str) -> tuple[tuple[str, str], str]:
    state = query(url, "SELECT state, active_phase FROM phasegate.plan_state")[0]
    return (state[0], state[1]), query(url, "SELECT version_num FROM alembic_version")[0][0]


@pytest.fixture(scope="module")
def reference(pg_server, seeded_template) -> dict[str, dict]:
    """Checksums of the seed data (before), and of the plan carried out by hand (after),
    nothing of it by phasegate: Alembic's revisions, and between them the plan's backfill
    as plain SQL applying its expressions directly."""
    url = pg_server.create_database("pgfault", template=seeded_template)
    try:
        before = checksum(url)
        alembic(url, "upgrade", "8f3a2d1c9b7e")  # expand
        query(
            url,
            "INSERT INTO root_cause (name) SELECT DISTINCT root_cause FROM bug "
            "WHERE root_cause IS NOT NULL ON CONFLICT (name) DO NOTHING",
        )
        query(url, "UPDATE bug SET root_cause_id = root_cause_id_for(root_cause)")
        alembic(url, "upgrade", "e59b1f0c3d82")  # switch and contract
        after = checksum(url)
        # the plan moves each bug's text into root_cause and loses none
        assert after["data"] == before["data"]
        assert after["version"] == "e59b1f0c3d82" and not after["triggers"]
        return {"before": before, "after": after}
    finally:
        pg_server.drop_database(url)


def test_kill_9_at_seeded_points_then_the_next_command_finishes_the_job(
    pg_server, seeded_template, reference
) -> None:
    rng = random.Random(SEED)
    landed: dict[str, int] = {}
    for point in range(KILL_POINTS):
        moment = list(MOMENTS)[point % len(MOMENTS)]
        failpoint, reached, state, version = MOMENTS[moment]
        url = pg_server.create_database("pgfault", template=seeded_template)
        try:
            process = spawn(url, "advance", P, *OVERRIDE, *SLOW, "--yes", failpoints=failpoint)
            assert wait_for(lambda u=url, q=reached: ledger_says(u, q), timeout=60), moment
            time.sleep(rng.uniform(0, 0.05))
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert where_it_stopped(url) == (state, version), moment
            landed[moment] = landed.get(moment, 0) + 1
            assert wait_for(lambda u=url: no_phasegate_session(u), timeout=15)
            phasegate = Phasegate(url)
            status = json.loads(phasegate("status", P, json_output=True).stdout)
            assert (status["state"], status["abandoned"]) == ("running", True), moment
            assert all(job["status"] != "running" for job in status["jobs"]), moment
            if point % 2:  # undo everything, then do it all again
                undone = phasegate("rollback", P, "--to", "start", *OVERRIDE, "--yes")
                assert undone.exit_code == 0, f"{moment}: {undone.output}"
                assert checksum(url) == reference["before"], moment
            finished = phasegate("advance", P, *OVERRIDE, "--yes")
            assert finished.exit_code == 0, f"{moment}: {finished.output}"
            if not point % 2:
                assert "never finished (killed, or its connection lost); resuming it" in (
                    finished.stderr
                ), moment
                if moment == "between revisions":  # the first expand revision is in
                    assert "6c55e0560fd4 (" in finished.stderr, finished.stderr
                    assert "already applied" in finished.stderr, moment
            assert checksum(url) == reference["after"], moment
            assert plan_state(url) == ("contract", "done")
        finally:
            pg_server.drop_database(url)
    assert landed == {moment: KILL_POINTS // len(MOMENTS) for moment in MOMENTS}


def test_a_contract_killed_before_its_revision_rolls_back_without_allow_data_loss(
    seeded_url, tmp_path
) -> None:
    """A plan whose job has no `sync.down` may not roll back a contract that dropped the
    old column; one killed before its revision dropped nothing, so no flag is needed."""
    text = PLAN.read_text()
    start = text.index("        sync:\n")
    end = text.index("\n", text.index("root_cause: (SELECT name FROM root_cause")) + 1
    plan = tmp_path / "no_sync.yaml"
    plan.write_text(text[:start] + text[end:])
    phasegate = Phasegate(seeded_url)
    assert phasegate("advance", str(plan), "--to", "switch", *OVERRIDE, "--yes").exit_code == 0
    process = spawn(
        seeded_url,
        "contract",
        str(plan),
        *OVERRIDE,
        "--yes",
        failpoints="before-revision:e59b1f0c3d82=30",
    )
    started = "SELECT 1 FROM phasegate.event WHERE kind = 'advance.started' AND phase = 'contract'"
    assert wait_for(lambda: ledger_says(seeded_url, started), timeout=60)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert wait_for(lambda: no_phasegate_session(seeded_url), timeout=15)
    result = phasegate("rollback", str(plan), *OVERRIDE, "--yes")
    assert result.exit_code == 0, result.output
    assert query(seeded_url, "SELECT count(*) FROM bug WHERE root_cause IS NULL") == [(0,)]


def test_a_killed_orchestrator_waiting_for_a_lock_lets_go_within_seconds(
    seeded_url, tmp_path
) -> None:
    """Killed mid-statement (here: a lock wait), its session ends within about a second
    (client_connection_check_interval), taking its advisory lock along."""
    # the project as it is, but with a DDL statement_timeout and a lock_timeout of a minute:
    # without the client check, the server would notice the kill only when the wait ends
    config = tmp_path / "alembic.ini"
    config.write_text(
        ALEMBIC_INI.read_text().replace("%(here)s/migrations", str(ROOT / "migrations"))
    )
    (tmp_path / "phasegate.toml").write_text('ddl_statement_timeout = "60s"\n')
    blocker = hold(seeded_url, "BEGIN; SELECT 1 FROM bug LIMIT 1")
    try:
        holder = spawn(
            seeded_url, "expand", P, *OVERRIDE, "--lock-timeout", "60s", "--yes", config=config
        )
        waiting = (
            "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'phasegate expand%' "
            "AND wait_event_type = 'Lock' AND datname = current_database()"
        )
        assert wait_for(lambda: ledger_says(seeded_url, waiting), timeout=30)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # the check runs every second; 15 s leaves a loaded machine room and is still a
        # quarter of the minute the wait would otherwise last
        assert wait_for(lambda: no_phasegate_session(seeded_url), timeout=15)
    finally:
        blocker.close()
    result = Phasegate(seeded_url)("expand", P, *OVERRIDE, "--yes")
    assert result.exit_code == 0, result.output


# -- two orchestrators -----------------------------------------------------------------------


SECONDS = [
    ("expand", P),
    ("backfill", P),
    ("switch", P),
    ("contract", P),
    ("advance", P),
    ("rollback", P),
    ("advance", str(ROOT / "tests" / "external_project" / "plans" / "customer_email.yaml")),
]


def _hold_with_backfill(url: str) -> subprocess.Popen[str]:
    assert Phasegate(url)("expand", P, *OVERRIDE, "--yes").exit_code == 0
    first = spawn(url, "backfill", P, *OVERRIDE, "--batch-size", "50", "--pause", "0.1", "--yes")
    assert wait_for(lambda: ledger_says(url, BACKFILL_STARTED))
    return first


def _hold_with_blocked(url: str, *command: str) -> subprocess.Popen[str]:
    """A holder that waits for a table lock, retrying: switch forward or back."""
    first = spawn(
        url, *command, *OVERRIDE, "--lock-timeout", "200ms", "--lock-retries", "100", "--yes"
    )
    kind = "rollback.started" if command[0] == "rollback" else "advance.started"
    started = f"SELECT 1 FROM phasegate.event WHERE kind = '{kind}' AND phase = 'switch'"
    assert wait_for(lambda: ledger_says(url, started))
    return first


@pytest.mark.parametrize("second", SECONDS, ids=[" ".join(s[:1]) for s in SECONDS])
@pytest.mark.parametrize("holder", ["backfill", "switch", "rollback of switch"])
def test_a_second_orchestrator_exits_4_at_once_naming_the_first(
    seeded_url, holder: str, second: tuple[str, str]
) -> None:
    blocker = None
    if holder == "backfill":
        first = _hold_with_backfill(seeded_url)
        command = "backfill"
    else:
        done_to = "backfill" if holder == "switch" else "switch"
        result = Phasegate(seeded_url)("advance", P, "--to", done_to, *OVERRIDE, "--yes")
        assert result.exit_code == 0, result.output
        blocker = hold(seeded_url, "BEGIN; SELECT 1 FROM bug LIMIT 1")
        command = "switch" if holder == "switch" else "rollback"
        first = _hold_with_blocked(seeded_url, command, P)
    try:
        started = time.monotonic()
        result = Phasegate(seeded_url)(*second, *OVERRIDE, "--yes")
        elapsed = time.monotonic() - started
        first_still_runs = first.poll() is None
    finally:
        if blocker is not None:
            blocker.close()
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert result.exit_code == 4, result.output
    assert first_still_runs  # it did not wait for the first to end
    # nor for a lock timeout (2 s by default, retried): seconds at most, even on a loaded
    # machine, where waiting for the advisory lock would last until the first ends
    assert elapsed < 30, elapsed
    assert "another phasegate is running in this database: backend pid" in result.stderr
    assert "then run this command again" in result.stderr
    assert f"phasegate {command} {PLAN.name}" in result.stderr  # the holder's command


# -- a server restart ------------------------------------------------------------------------


@pytest.fixture
def private_server(tmp_path):
    """A server of our own (embedded), so the test may restart it."""
    pgserver = pytest.importorskip("pgserver")
    directory = tmp_path / "pgdata"
    server = pgserver.get_server(str(directory), cleanup_mode="stop")
    state = {"server": server}

    def restart() -> None:
        state["server"].cleanup()
        state["server"] = pgserver.get_server(str(directory), cleanup_mode="stop")

    uri = server.get_uri()
    url = "postgresql+psycopg" + uri[uri.index("://") :]
    admin = libpq_url(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE restart_test")
    database = sa.engine.make_url(url).set(database="restart_test").render_as_string(False)
    seed = load_example("seed")

    engine = sa.create_engine(database, poolclass=NullPool)
    with engine.connect() as connection:
        seed.upgrade_to_before_plan(connection, str(ALEMBIC_INI), str(PLAN))
        seed.seed_bugs(connection, 3000)
        connection.commit()
    engine.dispose()
    yield database, restart
    state["server"].cleanup()


def test_a_server_restart_mid_backfill_exits_3_and_the_next_run_resumes(private_server) -> None:
    url, restart = private_server
    assert Phasegate(url)("expand", P, *OVERRIDE, "--yes").exit_code == 0
    process = spawn(url, "backfill", P, *OVERRIDE, *SLOW, "--yes")
    assert wait_for(lambda: ledger_says(url, BACKFILL_STARTED))
    restart()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 3, out + err
    assert "lost the connection to the database" in err and "run the same command again" in err, (
        err[-1500:]
    )
    done_before = query(
        url, "SELECT rows_done FROM phasegate.job_checkpoint WHERE job = 'bug-root-cause-id'"
    )[0][0]
    assert done_before > 0
    result = Phasegate(url)("backfill", P, *OVERRIDE, "--yes")
    assert result.exit_code == 0, result.output
    assert query(url, "SELECT count(*) FROM bug WHERE root_cause_id IS NULL")[0][0] == 0
    assert plan_state(url) == ("backfill", "pending")


def test_a_server_restart_mid_expand_exits_3_and_the_next_run_finishes(private_server) -> None:
    url, restart = private_server
    blocker = hold(url, "BEGIN; SELECT 1 FROM bug LIMIT 1")  # expand waits and retries
    process = spawn(url, "expand", P, *OVERRIDE, "--lock-timeout", "300ms", "--yes")
    assert wait_for(lambda: ledger_says(url, MOMENTS["inside expand"][1]))
    time.sleep(0.5)
    restart()
    out, err = process.communicate(timeout=60)
    blocker.close()
    assert process.returncode == 3, out + err
    assert "lost the connection to the database" in err
    result = Phasegate(url)("expand", P, *OVERRIDE, "--yes")
    assert result.exit_code == 0, result.output
    assert plan_state(url) == ("expand", "pending")


# -- a long transaction under traffic --------------------------------------------------------


def test_a_long_transaction_blocking_switch_under_app_traffic(seeded_url) -> None:
    app = load_example("app")
    phasegate = Phasegate(seeded_url)
    instances = [app.AppInstance(seeded_url, "1.4.2", ops_per_second=20, seed=s) for s in (1, 2)]
    for instance in instances:
        instance.start()
    try:
        assert phasegate("advance", P, "--to", "backfill", "--yes").exit_code == 0
        instances.append(app.AppInstance(seeded_url, "2.0.0", ops_per_second=20, seed=3))
        instances[-1].start()
        blocker = hold(seeded_url, "BEGIN; SELECT 1 FROM bug LIMIT 1")
        closer = release_after_a_retry(seeded_url, blocker)
        result = phasegate("switch", P, "--lock-timeout", "300ms", "--yes")
        closer.join()
        assert result.exit_code == 0, result.output
        assert "lock timeout (300ms) in revision a41c7e9d2b58" in result.stderr
        time.sleep(0.5)
    finally:
        for instance in instances:
            instance.stop()
    stats = [i.stats() for i in instances]
    assert sum(s.failed for s in stats) == 0, [e for s in stats for e in s.errors][:3]
    assert sum(s.ok for s in stats) > 50
    expectations = {}
    for instance in instances:
        expectations.update(instance.expectations)
    for schema in ("v1", "v2"):
        assert app.check_writes(seeded_url, expectations, schema) == []


def test_the_simulated_app_counts_an_update_that_changed_no_row_as_failed(seeded_url) -> None:
    """The benchmarks' zero-lost-writes claim rests on this: a write a trigger silently
    cancels (RETURN NULL) must be a failed op, not a success the final check cannot see."""
    app = load_example("app")
    with psycopg.connect(libpq_url(seeded_url), autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION drop_updates() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN RETURN NULL; END$$"
        )
        conn.execute(
            "CREATE TRIGGER drop_updates BEFORE UPDATE ON bug FOR EACH ROW "
            "EXECUTE FUNCTION drop_updates()"
        )
        [(first,)] = conn.execute("SELECT min(id) FROM bug").fetchall()
    instance = app.AppInstance(seeded_url, "1.4.2", ops_per_second=50, seed=1, update_ids=[first])
    instance.start()
    try:  # until updates failed and inserts went through, however slow the machine
        assert wait_for(lambda: instance.stats().failed > 0 and instance.stats().ok > 0, 60)
    finally:
        instance.stop()
    stats = instance.stats()
    assert any("changed no row" in error for error in stats.errors), stats.errors
    assert len(instance.latencies) == len(instance.op_due) == stats.ok + stats.failed


def test_the_simulated_app_counts_the_wait_of_ops_that_were_due_while_it_was_blocked(
    seeded_url,
) -> None:
    """Latency runs from when an op was due: the ops queued up behind a blocked one waited
    too, so after a 0.6 s lock several ops show a long latency, not only the blocked one."""
    app = load_example("app")
    instance = app.AppInstance(seeded_url, "1.4.2", ops_per_second=50, seed=1)
    instance.start()
    try:
        assert wait_for(lambda: instance.stats().ok > 0, 60)  # the app is writing
        with psycopg.connect(libpq_url(seeded_url)) as blocker:
            blocker.execute("LOCK TABLE bug IN ACCESS EXCLUSIVE MODE")
            time.sleep(0.6)  # a lower bound: a loaded machine only makes the lock longer
            blocker.rollback()
        blocked_at = len(instance.latencies)
        assert wait_for(lambda: len(instance.latencies) >= blocked_at + 5, 60)  # all drained
    finally:
        instance.stop()
    assert instance.stats().failed == 0
    assert sum(latency >= 0.2 for latency in instance.latencies) >= 3, instance.latencies


# -- app traffic through every phase and every rollback ----------------------------------------


def test_app_traffic_through_every_phase_and_every_rollback(seeded_url) -> None:
    app = load_example("app")
    phasegate = Phasegate(seeded_url)
    v1 = [app.AppInstance(seeded_url, "1.4.2", ops_per_second=20, seed=s) for s in (1, 2)]
    v2: list = []
    everyone: list = [*v1]

    def step(*args: str) -> None:
        result = phasegate(*args, "--lock-timeout", "500ms", "--yes")
        assert result.exit_code == 0, f"{args}: {result.output}"
        time.sleep(0.3)  # traffic between the steps too

    def start_v2() -> None:
        v2.append(app.AppInstance(seeded_url, "2.0.0", ops_per_second=20, seed=len(everyone) + 1))
        everyone.append(v2[-1])
        v2[-1].start()

    for instance in v1:
        instance.start()
    try:
        step("expand", P)
        step("backfill", P)
        start_v2()
        step("switch", P)
        for instance in v1:
            instance.stop()
        step("contract", P)
        step("rollback", P)  # contract: the old column comes back, refilled by sync.down
        v1[:] = [app.AppInstance(seeded_url, "1.4.2", ops_per_second=20, seed=9)]
        everyone.extend(v1)
        v1[0].start()
        step("rollback", P)  # switch: back at backfill, where v1 and v2 both work
        for instance in v2:
            instance.stop()  # expand's "<2" is next: v2 must be gone (the gate checks)
        step("rollback", P)  # backfill
        step("rollback", P)  # expand
        time.sleep(0.5)
    finally:
        for instance in everyone:
            instance.stop()
    stats = [i.stats() for i in everyone]
    assert sum(s.failed for s in stats) == 0, [e for s in stats for e in s.errors][:3]
    expectations = {}
    for instance in everyone:
        expectations.update(instance.expectations)
    assert len(expectations) > 30
    assert app.check_writes(seeded_url, expectations, "v1") == []


# -- drift by hand ---------------------------------------------------------------------------


def test_a_sync_trigger_dropped_by_hand_is_drift_with_a_way_out(phasegate, seeded_url) -> None:
    assert phasegate("advance", P, "--to", "backfill", *OVERRIDE, "--yes").exit_code == 0
    # the UPDATE trigger alone: v1's updates would no longer reach root_cause_id
    [(update_trigger,)] = query(
        seeded_url, "SELECT tgname FROM pg_trigger WHERE tgname LIKE '~%sync_%_upd'"
    )
    query(seeded_url, f'DROP TRIGGER "{update_trigger}" ON bug')
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert status["drift"] is True
    assert "sync trigger of job 'bug-root-cause-id' on bug is missing" in " ".join(
        status["drift_details"]
    )
    result = phasegate("switch", P, *OVERRIDE, "--yes")
    assert result.exit_code == 1 and "rollback PLAN --to expand" in result.stderr
    assert phasegate("rollback", P, "--to", "expand", *OVERRIDE, "--yes").exit_code == 0
    assert phasegate("advance", P, *OVERRIDE, "--yes").exit_code == 0


def test_a_column_renamed_by_hand_is_drift(phasegate, seeded_url) -> None:
    assert phasegate("advance", P, "--to", "backfill", *OVERRIDE, "--yes").exit_code == 0
    query(seeded_url, "ALTER TABLE bug RENAME COLUMN root_cause TO cause")
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert status["drift"] is True
    assert "bug.root_cause of job 'bug-root-cause-id' are missing" in " ".join(
        status["drift_details"]
    )
    assert phasegate("switch", P, *OVERRIDE, "--yes").exit_code == 1


# -- bad input -------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.just(""),
    st.just("x" * 5000),
    st.just(">=2"),
    st.just("=>2!"),
)
_keys = st.sampled_from(
    [
        "plan",
        "app",
        "baseline_compatible",
        "phases",
        "expand",
        "backfill",
        "switch",
        "contract",
        "compatible",
        "revisions",
        "jobs",
        "name",
        "table",
        "key",
        "set",
        "where",
        "sync",
        "down",
        "sql",
        "batch_size",
        "bogus",
        "description",
    ]
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=25,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=st.dictionaries(_keys, _values, max_size=8))
def test_fuzzed_plans_exit_0_or_2_with_a_location_never_a_traceback(tmp_path, document) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert_validate_locates(path)


def assert_validate_locates(path: Path) -> None:
    """`validate` exits 0, or 2 naming the file, the line and the key of every issue, in
    its text and its `--json`; never a traceback."""
    result = CliRunner().invoke(
        cli, ["--config", str(ALEMBIC_INI), "validate", str(path)], catch_exceptions=False
    )
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        return
    document = (
        CliRunner()
        .invoke(cli, ["--config", str(ALEMBIC_INI), "--json", "validate", str(path)])
        .stdout
    )
    [checked] = json.loads(document)["plans"]
    issues = checked["issues"]
    assert issues and all(i["file"] == str(path) for i in issues), issues
    assert_located(issues, path.read_text())
    for issue in issues:
        key = f" {issue['key']}:" if issue["key"] else ""
        assert f"{path}:{issue['line']}:{key} {issue['message']}" in result.output, issue


def test_a_mutated_seed_plan_is_located(tmp_path) -> None:
    rng = random.Random(SEED)
    lines = PLAN.read_text().splitlines()
    for _ in range(40):
        mutated = list(lines)
        n = rng.randrange(len(mutated))
        mutated[n] = rng.choice(
            [
                "  expand: [",
                "      - name: 7",
                "    compatible: >=2",
                "phases: 3",
                "\t bad",
                "  contract:\n    compatible: '<1'\n  expand:\n    compatible: '<2'",
                "",
            ]
        )
        path = tmp_path / "mutated.yaml"
        path.write_text("\n".join(mutated) + "\n")
        assert_validate_locates(path)


@pytest.mark.parametrize(
    ("url", "code", "says"),
    [
        ("not a url", 2, "database URL"),
        ("mysql://user:sekrit@localhost/db", 2, "PostgreSQL"),
        ("postgresql://user:sekrit@[::1:5432/db", 2, "does not parse"),  # a bad port
        ("postgresql://user:sekrit@host:port/db", 2, "does not parse"),
        ("postgresql://user:sekrit@127.0.0.1:1/db", 3, "cannot connect"),
        ("postgresql://no_such_role:sekrit@127.0.0.1:5432/postgres", 3, "cannot connect"),
    ],
)
def test_bad_database_urls(url: str, code: int, says: str) -> None:
    result = CliRunner().invoke(
        cli, ["--database-url", url, "--config", str(ALEMBIC_INI), "status", P]
    )
    assert result.exit_code == code, result.output
    assert says in result.output and "sekrit" not in result.output
    assert "Traceback" not in result.output


def test_unknown_plan_files_and_revisions_that_raise_on_import(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["--config", str(ALEMBIC_INI), "validate", "nope.yaml"])
    assert result.exit_code == 2 and "nope.yaml" in result.output
    project = tmp_path / "project"
    (project / "migrations" / "versions").mkdir(parents=True)
    (project / "migrations" / "env.py").write_text(
        (ROOT / "tests" / "external_project" / "migrations" / "env.py").read_text()
    )
    (project / "alembic.ini").write_text(
        (ROOT / "tests" / "external_project" / "alembic.ini").read_text()
    )
    (project / "migrations" / "versions" / "broken.py").write_text(
        'revision = "broken1"\ndown_revision = None\nraise RuntimeError("oops at import")\n'
    )
    result = CliRunner().invoke(cli, ["--config", str(project / "alembic.ini"), "validate", P])
    assert result.exit_code == 2, result.output
    assert "Alembic cannot read its revisions" in result.output or "oops at import" in (
        result.output
    )
    assert "Traceback" not in result.output


def test_fault_suite_documents_itself() -> None:
    assert "tests/test_faults.py" in Path(ROOT / "README.md").read_text()
