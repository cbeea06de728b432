"""phasegate's sessions under a database whose default isolation is not READ COMMITTED
(managed services let a database set `default_transaction_isolation`), and one-shot `sql`
jobs that hit a serialization failure or a deadlock: retried, bounded, like batches."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.pool import NullPool

from phasegate.db import libpq_url

from .conftest import PLAN, Phasegate, load_example
from .test_failures import release_after_a_retry
from .test_faults import query, wait_for
from .test_safety import run_phasegate
from .test_seed_story import fetch, scalar

pytestmark = pytest.mark.db

P = str(PLAN)
EXTRA_ROWS = 150_000  # the `sql` job reads all of bug: long enough for app writes to overlap


def set_database(url: str, setting: str, value: str) -> None:
    """ALTER DATABASE <this test's database> SET ..., as a managed service's console does."""
    name = sa.engine.make_url(url).database
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
            )
        )


def test_the_backfill_runs_to_the_end_under_a_serializable_default_with_app_traffic(
    phasegate, seeded_url
) -> None:
    seed = load_example("seed")
    engine = sa.create_engine(seeded_url, poolclass=NullPool)
    with engine.begin() as connection:
        seed.seed_bugs(connection, EXTRA_ROWS)
    assert phasegate("expand", P, "--live-version", "1", "--yes").exit_code == 0
    set_database(seeded_url, "default_transaction_isolation", "serializable")
    with psycopg.connect(libpq_url(seeded_url)) as conn:  # every new session starts there now
        assert conn.execute("SHOW default_transaction_isolation").fetchone() == ("serializable",)

    app = load_example("app")
    # v1 writes bug; the sync trigger installed by backfill reads and upserts root_cause on
    # every such write, concurrently with the `sql` job that fills root_cause from bug
    instances = [app.AppInstance(seeded_url, "1.4.2", ops_per_second=0, seed=s) for s in (1, 2, 3)]
    for instance in instances:
        instance.start()
    try:
        time.sleep(0.3)
        result = phasegate("backfill", P, "--yes")
        time.sleep(0.3)
    finally:
        for instance in instances:
            instance.stop()
    assert result.exit_code == 0, result.output
    assert "serialization" not in result.output
    stats = [instance.stats() for instance in instances]
    # the app's own serializable transactions fail now and then among themselves (they
    # would without phasegate too); what each of them committed must be right
    assert sum(s.ok for s in stats) > 100, stats
    expectations: dict[str, str] = {}
    for instance in instances:
        expectations |= instance.expectations
    assert app.check_writes(seeded_url, expectations, "v1") == []
    assert app.check_writes(seeded_url, expectations, "v2") == []
    # every row right: each bug points at the root cause its text names, none left NULL
    assert (
        scalar(
            engine,
            "SELECT count(*) FROM bug LEFT JOIN root_cause AS rc ON rc.id = bug.root_cause_id "
            "WHERE rc.name IS DISTINCT FROM bug.root_cause",
        )
        == 0
    )
    assert scalar(engine, "SELECT count(*) FROM root_cause") == len(seed.ROOT_CAUSES)
    engine.dispose()


# -- one-shot `sql` jobs: conflicts are retried --------------------------------------------

# Locks rows 1 and 2 of table `ticket` in that order (ORDER BY under FOR UPDATE: LockRows
# sits above the Sort), then writes them. A table of its own: a session that holds a row of
# bug would hold off the sync trigger's installation instead.
TRIAGE = """\
      - name: triage
        sql: |
          WITH locked AS MATERIALIZED (
            SELECT id FROM ticket WHERE id IN (1, 2) ORDER BY id FOR UPDATE)
          UPDATE ticket SET who = 'triage' FROM locked WHERE ticket.id = locked.id
"""
TICKETS = "CREATE TABLE ticket (id int PRIMARY KEY, who text); INSERT INTO ticket VALUES (1), (2)"

# A real 40001 from the server, on the first `failures` attempts (a sequence is never
# rolled back, so it counts the attempts).
FLAKY = """\
      - name: flaky
        sql: |
          DO $$ BEGIN
            IF nextval('flaky_attempts') <= {failures} THEN
              RAISE EXCEPTION 'simulated conflict' USING ERRCODE = 'serialization_failure';
            END IF;
            UPDATE bug SET who = 'flaky' WHERE id = 1;
          END $$
"""


def plan_with_job(tmp_path: Path, job: str) -> str:
    """The seed plan with `job` run first in its backfill."""
    text = PLAN.read_text()
    first = "      - name: root-causes\n"
    assert text.count(first) == 1
    path = tmp_path / "with_job.yaml"
    path.write_text(text.replace(first, job + first))
    return str(path)


def orchestrator_waits_for_a_lock(url: str) -> bool:
    return bool(
        query(
            url,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'phasegate backfill%' AND wait_event_type = 'Lock'",
        )
    )


def test_a_deadlock_in_an_sql_job_is_retried_and_the_job_completes(seeded_url, tmp_path) -> None:
    plan = plan_with_job(tmp_path, TRIAGE)
    query(seeded_url, TICKETS)
    phasegate = Phasegate(seeded_url)
    assert phasegate("expand", plan, "--live-version", "1", "--yes").exit_code == 0
    other = psycopg.connect(libpq_url(seeded_url), application_name="other writer")
    finished = threading.Event()

    def take_row_1_then_commit() -> None:
        other.execute("UPDATE ticket SET who = 'other' WHERE id = 1")  # closes the cycle
        other.commit()
        finished.set()

    closer = threading.Thread(target=take_row_1_then_commit)
    try:
        other.execute("SET deadlock_timeout = '60s'")  # the server picks phasegate's side
        other.execute("UPDATE ticket SET who = 'other' WHERE id = 2")  # row 2 first
        process = run_phasegate(seeded_url, "backfill", plan, "--live-version", "1", "--yes")
        # the job holds row 1 and waits for row 2; within its deadlock_timeout (1 s), the
        # other session asks for row 1: a deadlock that the server breaks by failing the job
        assert wait_for(lambda: orchestrator_waits_for_a_lock(seeded_url), timeout=60)
        closer.start()
        out, err = process.communicate(timeout=120)
    finally:
        if closer.is_alive():
            closer.join(timeout=30)
        other.close()
    assert finished.is_set()
    assert process.returncode == 0, out + err
    assert "job triage: deadlock; nothing of it is committed; retry 1 of 8 in" in err
    engine = sa.create_engine(seeded_url, poolclass=NullPool)
    assert fetch(engine, "SELECT id, who FROM ticket ORDER BY id") == [
        (1, "triage"),
        (2, "triage"),
    ]
    assert fetch(
        engine, "SELECT status, rows_done FROM phasegate.job_checkpoint WHERE job = 'triage'"
    ) == [("done", 2)]
    assert scalar(engine, "SELECT count(*) FROM bug WHERE root_cause_id IS NULL") == 0
    engine.dispose()


def test_a_serialization_failure_in_an_sql_job_is_retried(phasegate, seeded_url, tmp_path) -> None:
    plan = plan_with_job(tmp_path, FLAKY.format(failures=2))
    query(seeded_url, "CREATE SEQUENCE flaky_attempts")
    assert phasegate("expand", plan, "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert "job flaky: serialization failure; nothing of it is committed; retry 1 of 8" in (
        result.stderr
    )
    assert "retry 2 of 8" in result.stderr and "retry 3 of" not in result.stderr
    assert query(seeded_url, "SELECT last_value FROM flaky_attempts") == [(3,)]
    assert query(seeded_url, "SELECT who FROM bug WHERE id = 1") == [("flaky",)]


def test_an_sql_job_that_keeps_conflicting_fails_after_its_retries(
    phasegate, seeded_url, tmp_path
) -> None:
    plan = plan_with_job(tmp_path, FLAKY.format(failures=100))
    query(seeded_url, "CREATE SEQUENCE flaky_attempts")
    assert phasegate("expand", plan, "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("--json", "backfill", plan, "--live-version", "1", "--retries", "2", "--yes")
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "failure" and error["job"] == "flaky"
    assert "job 'flaky' hit a serialization failure 3 time(s) in a row" in error["message"]
    assert query(seeded_url, "SELECT last_value FROM flaky_attempts") == [(3,)]
    assert query(seeded_url, "SELECT status FROM phasegate.job_checkpoint WHERE job = 'flaky'") in (
        [],
        [("pending",)],
    )
    assert query(seeded_url, "SELECT who FROM bug WHERE id = 1") != [("flaky",)]


def test_an_sql_job_that_hits_a_statement_timeout_is_not_retried(seeded_url, tmp_path) -> None:
    """README: "A statement timeout is not retried (the same statement would run as long
    again)": one attempt (57014, as the server raises it, counted by a sequence no rollback
    returns), exit 3, nothing committed, whatever --retries allows."""
    timing_out = FLAKY.format(failures=100).replace("serialization_failure", "query_canceled")
    plan = plan_with_job(tmp_path, timing_out)
    query(seeded_url, "CREATE SEQUENCE flaky_attempts")
    phasegate = Phasegate(seeded_url)
    assert phasegate("expand", plan, "--live-version", "1", "--yes").exit_code == 0
    result = phasegate("--json", "backfill", plan, "--live-version", "1", "--retries", "5", "--yes")
    assert result.exit_code == 3, result.output
    assert "simulated conflict" in json.loads(result.stdout)["error"]["message"]
    assert "retry 1 of 5" not in result.stderr
    assert query(seeded_url, "SELECT last_value FROM flaky_attempts") == [(1,)]
    assert query(seeded_url, "SELECT who FROM bug WHERE id = 1") != [("flaky",)]


def test_a_stop_ends_the_wait_before_an_sql_job_is_retried(seeded_url, tmp_path) -> None:
    plan = plan_with_job(tmp_path, FLAKY.format(failures=100))
    query(seeded_url, "CREATE SEQUENCE flaky_attempts")
    assert Phasegate(seeded_url)("expand", plan, "--live-version", "1", "--yes").exit_code == 0
    process = run_phasegate(
        seeded_url, "--json", "backfill", plan, "--live-version", "1", "--retries", "50", "--yes"
    )
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:  # the backoff grows to 5 s: stop it after a few retries
        lines.append(line)
        if "retry 4 of 50" in line:
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=30)
    assert process.returncode == 3, out + err
    error = json.loads(out)["error"]
    assert error["kind"] == "interrupted", error
    assert "stopped on request while it waited to retry" in error["message"]
    assert "retry 5 of 50" not in "".join(lines) + err


def test_an_sql_job_that_times_out_waiting_for_a_lock_is_retried(seeded_url, tmp_path) -> None:
    plan = plan_with_job(tmp_path, TRIAGE)
    query(seeded_url, TICKETS)
    phasegate = Phasegate(seeded_url)
    assert phasegate("expand", plan, "--live-version", "1", "--yes").exit_code == 0
    holder = psycopg.connect(libpq_url(seeded_url), application_name="blocker")
    holder.execute("UPDATE ticket SET who = 'other' WHERE id = 2")
    closer = release_after_a_retry(seeded_url, holder, holder.commit)
    try:
        result = phasegate(
            "backfill", plan, "--live-version", "1", "--lock-timeout", "500ms", "--yes"
        )
    finally:
        closer.join()
        holder.close()
    assert result.exit_code == 0, result.output
    assert "lock timeout (500ms) in job 'triage'; retry 1 of 8" in result.stderr
    assert query(seeded_url, "SELECT who FROM ticket ORDER BY id") == [
        ("triage",),
        ("triage",),
    ]
