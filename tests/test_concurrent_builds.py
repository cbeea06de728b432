"""Concurrent statements (CREATE/DROP INDEX CONCURRENTLY, REINDEX CONCURRENTLY, DETACH
PARTITION CONCURRENTLY) wait for every older transaction in the database, and block no
read or write meanwhile: they get a long lock wait of their own instead of lock_timeout."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest
from pglast import parse_sql

from phasegate import lockguard
from phasegate.config import load_config
from phasegate.db import libpq_url
from phasegate.errors import UsageError

from .conftest import PLAN, Phasegate, load_example
from .lint_project import Revision
from .test_failures import hold
from .test_faults import query, wait_for
from .test_safety import Project, run_phasegate

P = str(PLAN)
READ_SECONDS = 20


def blocked_by(url: str, pid: int) -> bool:
    """The orchestrator waits for a lock that session `pid` holds."""
    return bool(
        query(
            url,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'phasegate %%' AND %s = ANY(pg_blocking_pids(pid))",
            pid,
        )
    )


def index_valid(url: str, name: str) -> tuple[bool, ...] | None:
    rows = query(url, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", name)
    return rows[0] if rows else None


@pytest.mark.db
def test_expand_waits_out_a_long_read_elsewhere_at_its_first_attempt_and_the_app_never_waits(
    seeded_url,
) -> None:
    query(seeded_url, "CREATE TABLE audit_log AS SELECT g AS id FROM generate_series(1, 1000) g")
    app = load_example("app")
    instances = [app.AppInstance(seeded_url, "1.4.2", ops_per_second=20, seed=s) for s in (1, 2)]
    reader = psycopg.connect(libpq_url(seeded_url), application_name="report", autocommit=True)
    reader_pid = reader.info.backend_pid
    # a 20 s read of another table: CREATE INDEX CONCURRENTLY waits for its snapshot
    reading = threading.Thread(
        target=reader.execute,
        args=(f"SELECT pg_sleep({READ_SECONDS}) FROM (SELECT count(*) FROM audit_log) AS a",),
    )
    for instance in instances:
        instance.start()
    try:
        reading.start()
        time.sleep(0.5)
        started = time.monotonic()
        process = run_phasegate(seeded_url, "expand", P, "--yes")
        waited = wait_for(lambda: blocked_by(seeded_url, reader_pid), timeout=30)
        out, err = process.communicate(timeout=120)
        finished = time.monotonic()
        reading.join()
        time.sleep(0.3)
    finally:
        for instance in instances:
            instance.stop()
        reader.close()
    assert process.returncode == 0, out + err
    assert waited  # the build did wait for the reader, and at its first attempt:
    assert "lock timeout" not in err and "INVALID" not in err, err
    assert (
        "`CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_bug_root_cause_id ON bug (root_cause_id)` "
        "has waited"
    ) in err
    assert "for older transactions (this blocks no reads or writes; it waits up to " in err
    assert f"blocked by pid {reader_pid} (application 'report'" in err
    assert index_valid(seeded_url, "ix_bug_root_cause_id") == (True,)
    # no app query waited for the build: the worst latency of every op due meanwhile
    during = [
        latency
        for instance in instances
        for due, latency in zip(instance.op_due, instance.latencies, strict=True)
        if started <= due <= finished
    ]
    assert len(during) > 200, len(during)
    assert max(during) < 1.0, sorted(during)[-5:]
    assert sum(instance.stats().failed for instance in instances) == 0


@pytest.mark.db
def test_a_stop_cancels_a_concurrent_build_that_waits_and_the_next_run_finishes_it(
    seeded_url,
) -> None:
    query(seeded_url, "CREATE TABLE audit_log AS SELECT g AS id FROM generate_series(1, 10) g")
    # an idle transaction that keeps its snapshot: the build waits for it
    reader = hold(seeded_url, "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT * FROM audit_log")
    try:
        process = run_phasegate(seeded_url, "--json", "expand", P, "--live-version", "1", "--yes")
        assert wait_for(lambda: blocked_by(seeded_url, reader.info.backend_pid), timeout=30)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = process.communicate(timeout=60)
        # not the 30 minutes it may wait: generous seconds for a loaded machine's shutdown
        assert time.monotonic() - stopped < 30, err
    finally:
        reader.close()
    assert process.returncode == 3, out + err
    error = json.loads(out)["error"]
    assert error["kind"] == "interrupted", error
    assert error["message"].startswith(
        "stopped on request while `CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_bug_root_cause_id "
        "ON bug (root_cause_id)` waited for older transactions; nothing of it is applied."
    ), error
    # its INVALID index was dropped: DROP INDEX CONCURRENTLY waits only for bug's lockers
    assert index_valid(seeded_url, "ix_bug_root_cause_id") is None
    result = Phasegate(seeded_url)("expand", P, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert index_valid(seeded_url, "ix_bug_root_cause_id") == (True,)


DETACH = (
    "with op.get_context().autocommit_block():\n"
    '    op.execute("ALTER TABLE measurement DETACH PARTITION measurement_2024 CONCURRENTLY")'
)


@pytest.mark.db
def test_a_concurrent_detach_waits_out_a_long_read_of_its_table(tmp_path, database_url) -> None:
    """A DETACH ... CONCURRENTLY that timed out is left pending and cannot run again (only
    FINALIZE can end it), so it must not fail on a short lock_timeout or statement_timeout."""
    project = Project(tmp_path, database_url, [Revision("contract", DETACH)])
    query(
        database_url,
        "CREATE TABLE measurement (at date NOT NULL, value int) PARTITION BY RANGE (at); "
        "CREATE TABLE measurement_2024 PARTITION OF measurement "
        "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01'); "
        "INSERT INTO measurement SELECT date '2024-01-01' + g % 300, g "
        "FROM generate_series(1, 1000) g",
    )
    reader = hold(database_url, "BEGIN; SELECT count(*) FROM measurement")
    closer = threading.Timer(6.0, reader.close)  # longer than ddl_statement_timeout too
    closer.start()
    try:
        result = project.run(
            "contract", str(project.plan), "--live-version", "2", "--allow-unsafe", "test", "--yes"
        )
    finally:
        closer.join()
    assert result.exit_code == 0, result.output
    assert "lock timeout" not in result.stderr
    assert query(
        database_url, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'measurement'::regclass"
    ) == [(0,)]


# -- which statements, and the setting: no database -------------------------------------------


@pytest.mark.parametrize(
    "statement, expected",
    [
        ("CREATE INDEX CONCURRENTLY i ON t (a)", True),
        ("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON s.t (a)", True),
        ("DROP INDEX CONCURRENTLY IF EXISTS i", True),
        ("REINDEX INDEX CONCURRENTLY i", True),
        ("REINDEX (VERBOSE) TABLE CONCURRENTLY t", True),
        ("ALTER TABLE p DETACH PARTITION c CONCURRENTLY", True),
        ("CREATE INDEX i ON t (a)", False),
        ("DROP INDEX i", False),
        ("REINDEX TABLE t", False),
        ("ALTER TABLE p DETACH PARTITION c", False),
        ("ALTER TABLE p DETACH PARTITION c FINALIZE", False),
        ("ALTER TABLE t VALIDATE CONSTRAINT c", False),
        ("REFRESH MATERIALIZED VIEW CONCURRENTLY v", False),  # EXCLUSIVE: blocks writes
    ],
)
def test_which_statements_get_the_long_wait(statement: str, expected: bool) -> None:
    assert lockguard.concurrent([raw.stmt for raw in parse_sql(statement)]) is expected


def test_concurrent_lock_timeout_is_a_bounded_duration(tmp_path: Path) -> None:
    settings = tmp_path / "phasegate.toml"
    settings.write_text('concurrent_lock_timeout = "10min"\n')
    assert load_config(tmp_path).concurrent_lock_timeout == "10min"
    for endless in ('"0"', '"0ms"', "0"):
        settings.write_text(f"concurrent_lock_timeout = {endless}\n")
        with pytest.raises(UsageError, match="would wait for ever"):
            load_config(tmp_path)
    settings.write_text('concurrent_lock_timeout = "soon"\n')
    with pytest.raises(UsageError, match="is not a duration"):
        load_config(tmp_path)
