"""Lock-aware execution against a real PostgreSQL: retries on lock timeouts, the blocker
named when they run out, what the application waits meanwhile, the INVALID index of a
failed concurrent build, the DDL statement_timeout, and the lint gate on advance."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.pool import NullPool

from phasegate.db import libpq_url
from phasegate.errors import Interrupted
from phasegate.lockguard import LockPolicy

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate
from .lint_project import Revision, build
from .test_backfill_engine import execute, fetch
from .test_failures import (
    SWITCH_WITH_SHORT_LOCK_WAITS,
    blocked_at_backfill,
    hold,
    release_after_a_retry,
)
from .test_faults import query, wait_for
from .test_seed_story import scalar

P = str(PLAN)


def run_phasegate(url: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env["PHASEGATE_DATABASE_URL"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "phasegate", "--config", str(ALEMBIC_INI), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_blocked_revision_retries_until_the_blocker_ends_and_the_app_barely_waits(
    phasegate, seeded_url
) -> None:
    """The app queues behind phasegate's lock request, but only until that attempt's lock
    timeout: it gets through again while the blocker still holds on. Shown by what
    PostgreSQL says the app waits on and by the app's progress, not by wall-clock time."""
    assert (
        phasegate("advance", P, "--to", "backfill", "--live-version", "1", "--yes").exit_code == 0
    )
    blocker = hold(seeded_url, "BEGIN; SELECT * FROM bug LIMIT 1")  # ACCESS SHARE, idle in tx
    done: list[int] = []  # one entry per query the app completed
    app_pid: list[int] = []
    stop = threading.Event()

    def app() -> None:
        with psycopg.connect(libpq_url(seeded_url), autocommit=True) as conn:
            app_pid.append(conn.info.backend_pid)
            while not stop.is_set():
                conn.execute("SELECT count(*) FROM bug WHERE id = 1")
                done.append(1)
                time.sleep(0.02)

    def app_queued_behind_phasegate() -> bool:
        return bool(
            query(
                seeded_url,
                "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids(%s)) "
                "AND application_name LIKE 'phasegate switch%%'",
                app_pid[0],
            )
        )

    worker = threading.Thread(target=app)
    worker.start()
    process = None
    try:
        assert wait_for(lambda: bool(app_pid))
        process = run_phasegate(
            seeded_url,
            "switch",
            P,
            "--live-version",
            "1",
            "--lock-timeout",
            "500ms",
            "--lock-retries",
            "30",
            "--yes",
        )
        assert wait_for(app_queued_behind_phasegate, timeout=60), "the app never queued"
        queued_at = len(done)
        # phasegate's attempt ends at its lock timeout and lets the queued query through
        # while the blocker still holds on and phasegate still retries (without the lock
        # timeout, the app would wait for the blocker, or phasegate die of statement_timeout)
        assert wait_for(lambda: len(done) > queued_at, timeout=60), "the app stayed stuck"
        assert process.poll() is None, "phasegate no longer retries"
    finally:
        blocker.close()
        out, err = process.communicate(timeout=120) if process else ("", "")
        stop.set()
        worker.join()
    assert process.returncode == 0, out + err
    assert "lock timeout (500ms) in revision a41c7e9d2b58; retry 1 of 30" in err
    assert "blocked by pid" in err and "application 'blocker'" in err
    assert scalar(phasegate_engine(seeded_url), "SELECT version_num FROM alembic_version") == (
        "d7e2b9f4a613"
    )


def phasegate_engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=NullPool)


def test_when_retries_run_out_the_blocker_is_named(phasegate, engine, seeded_url) -> None:
    blocker = blocked_at_backfill(phasegate, seeded_url)
    blocker_pid = blocker.info.backend_pid
    try:
        result = phasegate("--json", *SWITCH_WITH_SHORT_LOCK_WAITS, "--lock-retries", "2", "--yes")
    finally:
        blocker.close()
    assert result.exit_code == 3, result.output
    message = json.loads(result.stdout)["error"]["message"]
    assert "could not get its lock in 3 attempt(s)" in message
    assert f"blocked by pid {blocker_pid} (application 'blocker', user postgres, " in message
    assert "state 'idle in transaction'" in message
    assert "BEGIN; LOCK TABLE bug IN ACCESS SHARE MODE" in message
    blockers = json.loads(result.stdout)["error"]["blockers"]
    assert [b["pid"] for b in blockers] == [blocker_pid]
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "8f3a2d1c9b7e"


def test_lock_retry_time_ends_the_retries_long_before_lock_retries_would(
    phasegate, engine, seeded_url
) -> None:
    """`--lock-retry-time 2s` bounds the retries whatever `--lock-retries` allows: exit 3
    naming the blocker after a handful of attempts, not 100 (counted from the retry lines,
    never timed: a loaded machine only means fewer attempts fit)."""
    blocker = blocked_at_backfill(phasegate, seeded_url)
    blocker_pid = blocker.info.backend_pid
    try:
        process = run_phasegate(
            seeded_url,
            "--json",
            *SWITCH_WITH_SHORT_LOCK_WAITS,
            "--lock-retries",
            "100",
            "--lock-retry-time",
            "2s",
            "--yes",
        )
        assert process.stderr is not None
        retries: list[str] = []
        for line in process.stderr:  # 200 ms + backoff each: 2 s fit at most 4 attempts
            retries += [line] if "retry " in line and " of 100" in line else []
            if len(retries) > 12:  # the time budget was ignored: stop, do not sit it out
                process.kill()
                break
        out, err = process.communicate(timeout=60)
    finally:
        blocker.close()
    assert len(retries) <= 12, retries
    assert process.returncode == 3, out + err
    error = json.loads(out)["error"]
    counted = re.search(r"could not get its lock in (\d+) attempt", error["message"])
    assert counted, error["message"]
    attempts = int(counted[1])
    assert 1 <= attempts <= 6 and attempts == len(retries) + 1, (attempts, retries)
    assert f"blocked by pid {blocker_pid} (application 'blocker'" in error["message"]
    assert [b["pid"] for b in error["blockers"]] == [blocker_pid]
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "8f3a2d1c9b7e"


# -- projects of our own ---------------------------------------------------------------------


class Project:
    """A generated Alembic project whose baseline is applied and seeded in `url`."""

    def __init__(self, root: Path, url: str, revisions: list[Revision], rows: int = 200):
        self.ini, self.plan = build(root, revisions)
        self.url = url
        config = Config(str(self.ini))
        engine = sa.create_engine(url, poolclass=NullPool)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "base0000")
            connection.execute(
                sa.text(
                    "INSERT INTO bug (title, score) "
                    "SELECT 't' || n, n FROM generate_series(1, :n) AS n"
                ),
                {"n": rows},
            )
        engine.dispose()
        self.run = Phasegate(url, self.ini)


AUTOCOMMIT_EXECUTE = "with op.get_context().autocommit_block():\n    op.execute({!r})"
CONCURRENT_BUILD = (
    "with op.get_context().autocommit_block():\n"
    '    op.create_index("ix_bug_score", "bug", ["score"], postgresql_concurrently=True)'
)
# a writer's open transaction: CREATE INDEX CONCURRENTLY starts, then waits for it
OPEN_WRITE = "BEGIN; UPDATE bug SET score = score WHERE id = 1"


def test_an_invalid_index_left_by_a_timed_out_concurrent_build_is_dropped_before_the_retry(
    tmp_path, database_url
) -> None:
    project = Project(tmp_path, database_url, [Revision("expand", CONCURRENT_BUILD)])
    (tmp_path / "phasegate.toml").write_text('concurrent_lock_timeout = "300ms"\n')
    writer = hold(database_url, OPEN_WRITE)
    closer = release_after_a_retry(database_url, writer)
    result = project.run(
        "expand",
        str(project.plan),
        "--live-version",
        "1",
        "--lock-timeout",
        "300ms",
        "--lock-retries",
        "30",
        "--yes",
    )
    closer.join()
    assert result.exit_code == 0, result.output
    assert "dropping the INVALID index ix_bug_score a failed concurrent build left" in result.stderr
    with psycopg.connect(libpq_url(database_url)) as conn:
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_bug_score'::regclass"
        ).fetchone()
    assert valid == (True,)


def test_ddl_that_blocks_writes_runs_under_the_short_statement_timeout(
    tmp_path, database_url
) -> None:
    slow_check = (
        'op.execute("ALTER TABLE bug ADD CONSTRAINT ck_slow '
        'CHECK (pg_sleep(0.01) IS NOT NULL AND score > 0)")'
    )
    project = Project(tmp_path, database_url, [Revision("switch", slow_check)], rows=100)
    (tmp_path / "phasegate.toml").write_text('ddl_statement_timeout = "300ms"\n')
    result = project.run(
        "switch",
        str(project.plan),
        "--live-version",
        "1",
        "--allow-unsafe",
        "testing the timeout",
        "--yes",
    )
    assert result.exit_code == 3, result.output
    assert "canceling statement due to statement timeout" in result.stderr
    (tmp_path / "phasegate.toml").write_text('ddl_statement_timeout = "30s"\n')
    result = project.run(
        "switch",
        str(project.plan),
        "--live-version",
        "1",
        "--allow-unsafe",
        "testing the timeout",
        "--yes",
    )
    assert result.exit_code == 0, result.output


RECORD_TIMEOUT = (
    "CREATE TABLE timeout_seen (statement text, timeout text)",
    "CREATE FUNCTION record_timeout(statement text) RETURNS text LANGUAGE plpgsql AS $$BEGIN"
    " INSERT INTO timeout_seen VALUES (statement, current_setting('statement_timeout'));"
    " RETURN statement; END$$",
    # an index expression must be IMMUTABLE; the volatile function underneath still records
    "CREATE FUNCTION record_timeout_immutable(statement text) RETURNS text LANGUAGE plpgsql"
    " IMMUTABLE AS $$BEGIN RETURN record_timeout(statement); END$$",
)


BACKFILL_RECORDING = """\
  backfill:
    compatible: ">=0"
    jobs:
      - name: sql-job
        sql: UPDATE bug SET title = record_timeout('sql job') WHERE id = 1
      - name: batched-job
        table: bug
        set:
          meta: record_timeout('backfill batch')
        where: new.meta = 'update'
"""


def test_each_statement_runs_under_the_statement_timeout_of_the_lock_it_takes(
    tmp_path, database_url
) -> None:
    """Each statement evaluates a function that records the statement_timeout in effect:
    those whose lock blocks writes (a rewriting ADD COLUMN, a plain CREATE INDEX) run under
    ddl_statement_timeout (5s), the rest (data work, CREATE INDEX CONCURRENTLY, VALIDATE
    CONSTRAINT, a backfill `sql` job) under statement_timeout (none), a backfill batch
    under its own (--batch-statement-timeout, 30s). Ordered so that no statement evaluates
    another's expression again (an UPDATE re-evaluates a CHECK and may an index's)."""

    def execute_each(*statements: str) -> str:
        return "\n".join(f"op.execute({statement!r})" for statement in statements)

    expand = execute_each(
        "ALTER TABLE bug ADD COLUMN seen text DEFAULT record_timeout('add column')",
        "UPDATE bug SET meta = record_timeout('update')",
    )
    check = execute_each(
        "ALTER TABLE bug ADD CONSTRAINT ck_seen"
        " CHECK (record_timeout('validate constraint') IS NOT NULL) NOT VALID"
    )
    validate = execute_each("ALTER TABLE bug VALIDATE CONSTRAINT ck_seen")
    concurrent = AUTOCOMMIT_EXECUTE.format(
        "CREATE INDEX CONCURRENTLY ix_bug_cic"
        " ON bug (record_timeout_immutable('create index concurrently'))"
    )
    plain = execute_each(
        "CREATE INDEX ix_bug_seen ON bug (record_timeout_immutable('create index'))"
    )
    revisions = [Revision("expand", expand)]
    revisions += [Revision("switch", body) for body in (check, validate, concurrent, plain)]
    project = Project(tmp_path, database_url, revisions, rows=20)
    text = project.plan.read_text()
    project.plan.write_text(text.replace("  switch:\n", BACKFILL_RECORDING + "  switch:\n"))
    execute(database_url, *RECORD_TIMEOUT)
    result = project.run(
        "advance",
        str(project.plan),
        "--live-version",
        "1",
        "--allow-unsafe",
        "recording the statement_timeout of each statement",
        "--yes",
    )
    assert result.exit_code == 0, result.output
    seen = set(fetch(database_url, "SELECT statement, timeout FROM timeout_seen"))
    assert seen == {
        ("add column", "5s"),
        ("update", "0"),
        ("sql job", "0"),
        ("backfill batch", "30s"),
        ("validate constraint", "0"),
        ("create index concurrently", "0"),
        ("create index", "5s"),
    }


def test_advance_lints_first_and_refuses_unless_allowed(tmp_path, database_url) -> None:
    unsafe = 'op.create_index("ix_bug_score", "bug", ["score"])'
    project = Project(tmp_path, database_url, [Revision("expand", unsafe)])
    result = project.run("expand", str(project.plan), "--live-version", "1", "--yes")
    assert result.exit_code == 1
    assert "lint found 1 error(s)" in result.stdout and "create-index-blocking" in result.stdout
    result = project.run(
        "expand", str(project.plan), "--live-version", "1", "--allow-unsafe", "  ", "--yes"
    )
    assert result.exit_code == 2
    result = project.run(
        "expand",
        str(project.plan),
        "--live-version",
        "1",
        "--allow-unsafe",
        "bug has 200 rows",
        "--yes",
    )
    assert result.exit_code == 0, result.output
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute(
            "SELECT kind, detail->>'reason', detail->'findings'->0->>'rule' "
            "FROM phasegate.event WHERE kind LIKE 'lint.%' ORDER BY id"
        ).fetchall()
    assert rows == [
        ("lint.refused", None, "create-index-blocking"),
        ("lint.overridden", "bug has 200 rows", "create-index-blocking"),
    ]


def test_an_invalid_index_a_spent_concurrent_build_left_is_dropped_by_the_next_run(
    tmp_path, database_url
) -> None:
    project = Project(tmp_path, database_url, [Revision("expand", CONCURRENT_BUILD)])
    (tmp_path / "phasegate.toml").write_text('concurrent_lock_timeout = "200ms"\n')
    writer = hold(database_url, OPEN_WRITE)
    try:
        result = project.run(
            "--json",
            "expand",
            str(project.plan),
            "--live-version",
            "1",
            "--lock-timeout",
            "200ms",
            "--lock-retries",
            "1",
            "--yes",
        )
    finally:
        writer.close()
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert "could not get its lock in 2 attempt(s)" in error["message"]
    assert "(lock_timeout 200ms each)" in error["message"]
    assert [b["application_name"] for b in error["blockers"]] == ["blocker"]
    assert "the next run drops it before building again" in error["message"]
    assert "raise concurrent_lock_timeout in phasegate.toml" in error["message"]
    with psycopg.connect(libpq_url(database_url)) as conn:  # the blocker stopped the cleanup
        assert conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('ix_bug_score')"
        ).fetchone() == (False,)
    result = project.run("expand", str(project.plan), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert "dropping the INVALID index ix_bug_score" in result.stderr
    with psycopg.connect(libpq_url(database_url)) as conn:
        assert conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_bug_score'::regclass"
        ).fetchone() == (True,)


def test_a_revision_that_commits_by_itself_is_never_retried_whole(tmp_path, database_url) -> None:
    body = (
        "op.execute(\"INSERT INTO owner (name) VALUES ('once')\")\n"
        'op.execute("COMMIT")\n'
        'op.add_column("bug", sa.Column("votes", sa.Integer))'
    )
    project = Project(tmp_path, database_url, [Revision("expand", body)])
    blocker = hold(database_url, "BEGIN; SELECT 1 FROM bug LIMIT 1")
    try:
        result = project.run(
            "expand",
            str(project.plan),
            "--live-version",
            "1",
            "--lock-timeout",
            "200ms",
            "--yes",
        )
    finally:
        blocker.close()
    assert result.exit_code == 3, result.output
    assert "cannot be retried whole" in result.stderr
    with psycopg.connect(libpq_url(database_url)) as conn:
        assert conn.execute("SELECT count(*) FROM owner").fetchone() == (1,)


def test_an_error_allowed_in_a_done_phase_is_not_judged_again(tmp_path, database_url) -> None:
    project = Project(
        tmp_path,
        database_url,
        [
            Revision("expand", 'op.create_index("ix_bug_score", "bug", ["score"])'),
            Revision(
                "switch",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT ck_score CHECK (score > 0) NOT VALID")',
            ),
        ],
    )
    result = project.run(
        "expand", str(project.plan), "--live-version", "1", "--allow-unsafe", "small", "--yes"
    )
    assert result.exit_code == 0, result.output
    result = project.run("switch", str(project.plan), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output


def test_a_stop_while_waiting_for_a_lock_is_an_interruption_not_a_failure() -> None:
    """SIGINT during a lock retry's pause: exit 3 all the same, but reported as 'stopped'."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted) as caught:
        LockPolicy(stop=stop).pause(5.0, "revision a41c7e9d2b58")
    assert caught.value.kind == "interrupted" and "stopped on request" in caught.value.message
