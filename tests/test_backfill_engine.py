"""The backfill engine: key types and shapes, refusal, kills, signals, workers, agreement.

Each test builds its own table `t` in a fresh database and runs a backfill-only plan over
it: `doubled = val * 2` up, `val = doubled / 2` down, so old and new columns must agree.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from sqlalchemy.engine import make_url

from phasegate import backfill, batch, db, keys, ledger, provision
from phasegate.db import libpq_url
from phasegate.orchestrator import Options, Orchestrator
from phasegate.pacing import BackfillSettings
from phasegate.plan import load_plan
from phasegate.progress import LogProgress
from phasegate.revisions import AlembicProject

from .conftest import ALEMBIC_INI, ROOT, Phasegate, on_a_terminal
from .test_failures import release_after_a_retry

ROWS = 2000
PLAN_TEXT = """\
plan: engine-test
app: enginetest
baseline_compatible: ">=0"
phases:
  backfill:
    compatible: ">=0"
    jobs:
      - name: fill
        table: {table}
{key}        set:
          {set_}
        where: {where}
        sync:
          down:
            {down}
"""


def engine_plan_text(
    table: str = "t",
    set_: str = "doubled: new.val * 2",
    where: str = "new.doubled IS NULL",
    down: str = "val: new.doubled / 2",
    key: str = "",
) -> str:
    """The engine tests' one-job plan; each argument is one line of the job."""
    key_line = f"        key: {key}\n" if key else ""
    return PLAN_TEXT.format(table=table, key=key_line, set_=set_, where=where, down=down)


KEYS = {
    "bigint": ("k bigint PRIMARY KEY", "g"),
    "uuid": ("k uuid PRIMARY KEY", "md5(g::text)::uuid"),
    "text": ("k text PRIMARY KEY", "md5(g::text)"),
    "timestamptz": ("k timestamptz PRIMARY KEY", "'2026-01-01'::timestamptz + g * interval '1 ms'"),
    # a NOT NULL domain over a domain: walked as its base type (a PL/pgSQL variable of the
    # domain itself would refuse the NULL it starts with)
    "domain": ("k stamp PRIMARY KEY", "'2026-01-01'::timestamptz + g * interval '1 ms'"),
}
DOMAINS = (
    "CREATE DOMAIN moment AS timestamptz(3) CHECK (VALUE > '2000-01-01')",
    "CREATE DOMAIN stamp AS moment NOT NULL",
)


def make_plan_text(key: str = "") -> str:
    return engine_plan_text(key=key)


def make_plan(tmp_path: Path, key: str = "") -> str:
    path = tmp_path / "engine.yaml"
    path.write_text(make_plan_text(key))
    return str(path)


def execute(url: str, *statements: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def fetch(url: str, query: str) -> list[tuple]:
    with psycopg.connect(libpq_url(url)) as conn:
        return conn.execute(query).fetchall()


def assert_all_agree(url: str, rows: int) -> None:
    [(total, agreeing)] = fetch(
        url, "SELECT count(*), count(*) FILTER (WHERE doubled = val * 2) FROM t"
    )
    assert (total, agreeing) == (rows, rows)


def checkpoint(url: str) -> dict:
    [row] = fetch(
        url,
        "SELECT json_build_object('status', status, 'walked', walked, 'rows', rows_done,"
        " 'batches', batches) FROM phasegate.job_checkpoint WHERE job = 'fill'",
    )
    return row[0]


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_single_column_keys_of_every_type(kind: str, database_url: str, tmp_path: Path) -> None:
    column, value = KEYS[kind]
    execute(
        database_url,
        *DOMAINS,
        f"CREATE TABLE t ({column}, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT {value}, g FROM generate_series(1, {ROWS}) g",
    )
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path), "--live-version", "1", "--batch-size", "97", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, ROWS)
    batches = -(-ROWS // 97)
    assert checkpoint(database_url) == {
        "status": "done",
        "walked": ROWS,
        "rows": ROWS,
        "batches": batches,
    }
    # the summary on stderr and in the event log
    assert f"job fill: {ROWS:,} rows walked, {ROWS:,} written, in {batches} batches, " in (
        result.stderr
    )
    [(event,)] = fetch(
        database_url, "SELECT detail FROM phasegate.event WHERE kind = 'job.finished'"
    )
    assert {k: event[k] for k in ("name", "kind", "status", "rows", "batches", "walked")} == {
        "name": "fill",
        "kind": "update",
        "status": "done",
        "rows": ROWS,
        "batches": batches,
        "walked": ROWS,
    }
    assert event["rows_per_second"] > 0 and set(event["batch_ms"]) == {"p50", "p99", "max"}


def job_finished(url: str) -> dict[str, Any]:
    """The job.finished event's detail: the job's summary in the event log."""
    [(event,)] = fetch(url, "SELECT detail FROM phasegate.event WHERE kind = 'job.finished'")
    return event


def test_target_batch_ms_from_the_command_line_sizes_the_batches(
    database_url: str, tmp_path: Path
) -> None:
    """`--target-batch-ms 1` reaches the sizing: `set` sleeps 0.1 ms a row, so no rate can
    fill 1 ms with more than 10 rows and every batch after the first 1,000 is the 100-row
    floor: exactly 1 + 10 batches for 2,000 rows (the default 50 ms would take 500-row
    batches or larger). Counted, never timed."""
    execute(
        database_url,
        "CREATE TABLE t (id int PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
    )
    plan = tmp_path / "slow.yaml"
    plan.write_text(engine_plan_text(set_="doubled: (SELECT new.val * 2 FROM pg_sleep(0.0001))"))
    result = Phasegate(database_url)(
        "backfill", str(plan), "--live-version", "1", "--target-batch-ms", "1", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, ROWS)
    assert checkpoint(database_url)["batches"] == 1 + (ROWS - 1000) // 100
    event = job_finished(database_url)
    assert event["batches"] == 11 and event["paused_seconds"] == 0  # no pause asked for


def test_pause_ratio_from_the_command_line_pauses_after_each_batch(
    database_url: str, tmp_path: Path
) -> None:
    """`--pause-ratio 2` reaches the walk: after each of the first three of four 500-row
    batches it pauses twice that batch's time, recorded in the job's summary (event log and
    --json), at most twice the slowest batch each."""
    execute(
        database_url,
        "CREATE TABLE t (id int PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
    )
    result = Phasegate(database_url)(
        "backfill",
        make_plan(tmp_path),
        "--live-version",
        "1",
        "--batch-size",
        "500",
        "--pause-ratio",
        "2",
        "--yes",
        json_output=True,
    )
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, ROWS)
    event = job_finished(database_url)
    assert event["batches"] == 4
    slowest = event["batch_ms"]["max"] / 1000
    assert 0 < event["paused_seconds"] <= 2 * 3 * slowest + 0.01, event
    [step] = json.loads(result.stdout)["steps"]
    [job] = [j for j in step["jobs"] if j["name"] == "fill"]
    assert job["paused_seconds"] == event["paused_seconds"]


def test_composite_primary_key_walks_as_a_row(database_url: str, tmp_path: Path) -> None:
    execute(
        database_url,
        "CREATE TABLE t (a int, b text, val int NOT NULL, doubled int, PRIMARY KEY (a, b))",
        f"INSERT INTO t SELECT g % 7, md5(g::text) || 'ü\"', g FROM generate_series(1, {ROWS}) g",
    )
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path), "--live-version", "1", "--batch-size", "50", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert "walking a, b (primary key)" in result.stderr
    assert_all_agree(database_url, ROWS)
    assert checkpoint(database_url)["walked"] == ROWS
    [(last_key,)] = fetch(database_url, "SELECT last_key FROM phasegate.job_checkpoint")
    assert json.loads(last_key)[0] == "6"  # the largest (a, b) pair, stored as a JSON row
    # the batch statement writes it in SQL; Python's encoding of the same key is identical
    [largest] = fetch(database_url, "SELECT a::text, b FROM t ORDER BY a DESC, b DESC LIMIT 1")
    assert last_key == keys.encode(largest)


def test_without_primary_key_a_unique_not_null_column_is_used(
    database_url: str, tmp_path: Path
) -> None:
    execute(
        database_url,
        "CREATE TABLE t (code text NOT NULL UNIQUE, nick text UNIQUE, val int NOT NULL, "
        "doubled int)",
        f"INSERT INTO t SELECT 'c' || g, NULL, g FROM generate_series(1, {ROWS}) g",
    )
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path), "--live-version", "1", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert "walking code (unique index t_code_key on NOT NULL columns)" in result.stderr
    assert_all_agree(database_url, ROWS)


def plan_line(plan: str, text: str) -> str:
    """`file:line: ` of the plan's line that reads `text` (as an error names it)."""
    return f"{plan}:{Path(plan).read_text().splitlines().index(text) + 1}: "


def nothing_installed(url: str) -> bool:
    """No sync trigger on t and no row written: a refusal touched nothing."""
    return fetch(url, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass") == [
        (0,)
    ] and fetch(url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL") == [(0,)]


def test_without_any_usable_key_the_refusal_says_what_to_add(
    database_url: str, tmp_path: Path
) -> None:
    """A plan error at the job's line (exit 2), before the sync trigger is installed."""
    execute(
        database_url,
        "CREATE TABLE t (nick text UNIQUE, val int NOT NULL, doubled int)",
        "INSERT INTO t SELECT NULL, g FROM generate_series(1, 10) g",
    )
    plan = make_plan(tmp_path)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    assert plan_line(plan, "        table: t") + "phases.backfill.jobs[0].table:" in result.stderr
    assert "has no primary key and no UNIQUE index on NOT NULL columns" in result.stderr
    assert 'ALTER TABLE "t" ADD COLUMN id bigint GENERATED BY DEFAULT' in result.stderr
    plan = make_plan(tmp_path, key="nick")
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 2 and "may be NULL" in result.stderr
    assert plan_line(plan, "        key: nick") + "phases.backfill.jobs[0].key:" in result.stderr
    assert nothing_installed(database_url)


INCLUDED = {
    "primary key": ("k bigint, PRIMARY KEY (k) INCLUDE (note)", ""),
    "unique index": ("k bigint NOT NULL, UNIQUE (k) INCLUDE (note)", ""),
    "named key": ("k bigint NOT NULL, UNIQUE (k) INCLUDE (note)", "k"),
    # a unique key plus more columns is unique too: still accepted when named
    "named key and more": (
        "k bigint NOT NULL, n int NOT NULL DEFAULT 0, UNIQUE (k) INCLUDE (n)",
        "[k, n]",
    ),
}


@pytest.mark.parametrize("shape", sorted(INCLUDED))
def test_include_columns_of_a_unique_index_are_not_part_of_the_key(
    shape: str, database_url: str, tmp_path: Path
) -> None:
    """An index's INCLUDE column (here a nullable json, which has no ordering) is stored
    in the index but is not part of its key: the key is k alone."""
    columns, key = INCLUDED[shape]
    execute(
        database_url,
        f"CREATE TABLE t ({columns}, note json, val int NOT NULL, doubled int)",
        f"INSERT INTO t (k, val) SELECT g, g FROM generate_series(1, {ROWS}) g",
    )
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path, key=key), "--live-version", "1", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert "walking k (" in result.stderr or "walking k, n (job key)" in result.stderr
    assert_all_agree(database_url, ROWS)


def test_parallel_workers_claim_slices(database_url: str, tmp_path: Path) -> None:
    seeded_table(database_url)
    flags = ["--workers", "3", "--slices", "6", "--batch-size", "50", "--pause", "0.01"]
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path), "--live-version", "1", "--yes", *flags
    )
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, ROWS)
    slices = fetch(
        database_url, "SELECT status, owner, lower_key, upper_key FROM phasegate.job_slice"
    )
    assert len(slices) == 6 and {s[0] for s in slices} == {"done"}
    assert len({s[1] for s in slices}) >= 2  # the slices were shared out
    assert checkpoint(database_url)["walked"] == ROWS  # and no key was walked twice


def cli(url: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PHASEGATE_DATABASE_URL": url}
    return subprocess.Popen(
        [sys.executable, "-m", "phasegate", "--config", str(ALEMBIC_INI), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def poll(url: str, query: str) -> list[tuple]:
    """`query`'s rows, or none while the process under test has not created the ledger."""
    try:
        return fetch(url, query)
    except psycopg.errors.UndefinedTable:
        return []


def wait_for_batches(url: str, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = poll(url, "SELECT batches FROM phasegate.job_checkpoint WHERE job = 'fill'")
        if rows and rows[0][0] >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"the backfill did not reach {at_least} batches")


def seeded_table(url: str) -> None:
    execute(
        url,
        "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
    )


def test_resume_after_kill_at_a_random_batch(database_url: str, tmp_path: Path) -> None:
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    kill_after = random.randint(2, 12)
    slow = ["--batch-size", "40", "--pause", "0.02"]
    process = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *slow)
    wait_for_batches(database_url, kill_after)
    process.kill()  # SIGKILL: no chance to clean up; the batch in flight rolls back
    process.communicate()
    before = checkpoint(database_url)
    [(updated,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL")
    assert before["status"] == "running" and before["rows"] == updated  # checkpoint = data

    result = Phasegate(database_url)(
        "backfill", plan, "--live-version", "1", "--batch-size", "40", "--yes"
    )
    assert result.exit_code == 0, (kill_after, result.output)
    assert_all_agree(database_url, ROWS)
    after = checkpoint(database_url)
    assert after["walked"] == ROWS  # resumed: every key walked exactly once
    # the summary and the event give this run's rows and the whole job's
    this_run = ROWS - before["rows"]
    assert (
        f"job fill: {ROWS - before['walked']:,} rows walked, {this_run:,} written, in "
        f"{after['batches'] - before['batches']:,} batches "
        f"this run ({ROWS:,} rows written in {after['batches']:,} batches in all"
    ) in result.stderr
    [(event,)] = fetch(
        database_url,
        "SELECT detail FROM phasegate.event WHERE kind = 'job.finished' ORDER BY id DESC LIMIT 1",
    )
    assert (event["rows"], event["job_rows"], event["job_batches"]) == (
        this_run,
        ROWS,
        after["batches"],
    )


def test_sigterm_finishes_the_batch_checkpoints_and_says_how_to_resume(
    database_url: str, tmp_path: Path
) -> None:
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "40", "--pause", "0.05"]
    process = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *slow)
    wait_for_batches(database_url, 3)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 3, err
    assert "SIGTERM: finishing the current step" in err
    assert "stopped on request" in err and "Resume with the same command" in err
    assert "phasegate: stopped: " in err  # a stop asked for is not reported as a failure
    stopped = checkpoint(database_url)
    assert 0 < stopped["walked"] < ROWS and stopped["rows"] == stopped["walked"]
    status = json.loads(Phasegate(database_url)("status", plan, json_output=True).stdout)
    assert (status["state"], status["next"]) == ("failed", "backfill")

    # a resume keeps the walk's slices, and says so when asked for others
    result = Phasegate(database_url)(
        "backfill", plan, "--live-version", "1", "--yes", "--slices", "4"
    )
    assert result.exit_code == 0, result.output
    assert "resuming in the 1 slice(s) it was cut into when its walk started" in result.stderr
    assert_all_agree(database_url, ROWS)
    assert checkpoint(database_url)["walked"] == ROWS


def test_a_worker_elsewhere_helps_and_its_crash_is_absorbed(
    database_url: str, tmp_path: Path
) -> None:
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    flags = ["--batch-size", "20", "--pause", "0.03"]
    owner = cli(
        database_url, "backfill", plan, "--live-version", "1", "--yes", "--slices", "4", *flags
    )
    helper = cli(database_url, "worker", plan, "--wait", "30", *flags)
    held: list[tuple] = []
    deadline = time.monotonic() + 60
    while not held and time.monotonic() < deadline:  # wait for the helper to hold a slice
        held = poll(
            database_url,
            "SELECT slice FROM phasegate.job_slice WHERE owner LIKE 'assist%' "
            "AND status = 'running'",
        )
        time.sleep(0.02)
    helper.kill()  # crash it mid-slice
    helper.communicate()
    assert held, "the helper never claimed a slice"
    _out, err = owner.communicate(timeout=120)
    assert owner.returncode == 0, err
    assert_all_agree(database_url, ROWS)
    slices = dict(
        fetch(database_url, "SELECT slice, status || ' by ' || owner FROM phasegate.job_slice")
    )
    assert len(slices) == 4 and all(v.startswith("done") for v in slices.values())
    assert slices[held[0][0]] == "done by worker 0"  # the crashed helper's slice, taken over
    assert checkpoint(database_url)["walked"] >= ROWS


def test_status_from_another_terminal_shows_rate_and_eta(database_url: str, tmp_path: Path) -> None:
    seeded_table(database_url)
    execute(database_url, "ANALYZE t")
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "40", "--pause", "0.05"]
    process = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *slow)
    try:
        wait_for_batches(database_url, 4)
        status = json.loads(Phasegate(database_url)("status", plan, json_output=True).stdout)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    [job] = [j for j in status["jobs"] if j["name"] == "fill"]
    assert job["status"] == "running" and job["total_estimate"] == ROWS
    assert job["rows_per_second"] > 0 and job["eta_seconds"] > 0


@pytest.mark.parametrize("analysed_empty", [False, True])
def test_a_table_without_statistics_gets_the_planners_estimate(
    analysed_empty: bool, database_url: str, tmp_path: Path
) -> None:
    """reltuples is -1 until the first ANALYZE, and 0 when that ran on the empty table:
    the job's total comes from the planner either way."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL, doubled int)"
        " WITH (autovacuum_enabled = off)",
        *(["ANALYZE t"] if analysed_empty else []),
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
    )
    assert fetch(database_url, "SELECT reltuples FROM pg_class WHERE oid = 't'::regclass") == [
        (0 if analysed_empty else -1,)
    ]
    plan = make_plan(tmp_path)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    status = json.loads(Phasegate(database_url)("status", plan, json_output=True).stdout)
    [job] = [j for j in status["jobs"] if j["name"] == "fill"]
    assert ROWS / 2 <= job["total_estimate"] <= ROWS * 2


def test_an_analysed_table_full_of_dead_rows_is_estimated_by_reltuples(
    database_url: str, tmp_path: Path
) -> None:
    """Right after a walk half the table's pages are dead rows: the planner, which scales
    reltuples by the pages now, would say twice the rows."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL, doubled int)"
        " WITH (autovacuum_enabled = off)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
        "ANALYZE t",
        "UPDATE t SET val = val",  # every row again: twice the pages
    )
    plan = make_plan(tmp_path)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    status = json.loads(Phasegate(database_url)("status", plan, json_output=True).stdout)
    [job] = [j for j in status["jobs"] if j["name"] == "fill"]
    assert job["total_estimate"] == ROWS


# -- old-code writes, new-code writes and batches, in any interleaving ------------------------

# (kind, row, value, after): `row` is a key relative to where the walk is (negative:
# behind it), `after` the number of batches done when the write happens (0: before the
# first; past the last: after the walk)
Write = tuple[str, int, int, int]
AGREEMENT_ROWS, AGREEMENT_BATCH = 300, 7
writes = st.lists(
    st.tuples(
        st.sampled_from(["old-insert", "new-insert", "old-update", "new-update"]),
        st.integers(min_value=-15, max_value=15),
        st.integers(min_value=-500, max_value=500),
        st.integers(min_value=0, max_value=AGREEMENT_ROWS // AGREEMENT_BATCH + 3),
    ),
    min_size=5,
    max_size=40,
)


@pytest.fixture(scope="module")
def agreement_template(pg_server: provision.Server) -> Iterator[str]:
    url = pg_server.create_database("pgagree")
    seeded_table_small = [
        "CREATE TABLE t (k bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
        "val int, doubled int)",
        f"INSERT INTO t (k, val) SELECT g, g FROM generate_series(1, {AGREEMENT_ROWS}) g",
        f"SELECT setval(pg_get_serial_sequence('t', 'k'), {AGREEMENT_ROWS})",
    ]
    execute(url, *seeded_table_small)
    yield make_url(url).database
    pg_server.drop_database(url)


class AppBetweenBatches:
    """A Progress that plays the app: each write runs between two batches, as chosen.

    The walk calls `batch_done` after each batch commits and before the next starts, so
    a write made there lands exactly between them; `job_started` comes after the trigger
    is installed and before the first batch, `job_finished` after the walk.
    """

    def __init__(self, url: str, sequence: list[Write]) -> None:
        self.app = psycopg.connect(libpq_url(url), autocommit=True)
        self.pending = sorted(sequence, key=lambda write: write[3])
        self.batches = self.walked = 0
        self.done: list[tuple[int, Write]] = []  # (batches done when made, write)

    def job_started(self, job: str, total: int | None, done: int) -> None:
        self._write_due()

    def batch_done(self, job: str, scanned: int, updated: int) -> None:
        self.batches += 1
        self.walked += scanned
        self._write_due()

    def job_finished(self, result: backfill.JobResult) -> None:
        self._write_due(everything=True)

    def _write_due(self, everything: bool = False) -> None:
        while self.pending and (everything or self.pending[0][3] <= self.batches):
            write = self.pending.pop(0)
            kind, offset, value, _after = write
            row = self.walked + offset  # keys 1..300 in order: the walk is at `walked`
            if kind == "old-insert":
                self.app.execute("INSERT INTO t (val) VALUES (%s)", (value,))
            elif kind == "new-insert":
                self.app.execute("INSERT INTO t (doubled) VALUES (%s)", (value * 2,))
            elif kind == "old-update":
                self.app.execute("UPDATE t SET val = %s WHERE k = %s", (value, row))
            else:
                self.app.execute("UPDATE t SET doubled = %s WHERE k = %s", (value * 2, row))
            self.done.append((self.batches, write))


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=writes)
def test_trigger_and_backfill_agree_under_any_interleaving(
    sequence: list[Write], pg_server: provision.Server, agreement_template: str, tmp_path: Path
) -> None:
    """Old- and new-code inserts and updates land between chosen batches, on rows behind
    the walk, under it and ahead of it, and after it: every row's columns agree at the end."""
    url = pg_server.create_database("pgagree", template=agreement_template)
    app = AppBetweenBatches(url, sequence)
    try:
        plan = load_plan(make_plan(tmp_path))
        project = AlembicProject(ALEMBIC_INI)
        options = Options(
            actor="test",
            live_versions=("1",),
            backfill=BackfillSettings(batch_size=AGREEMENT_BATCH),
        )
        with db.locked_session(url, "test backfill") as session:
            Orchestrator(session, project, plan, options, progress=app).advance(only="backfill")
        # every write was made, each once the walk had done the batches it asked for
        assert len(app.done) == len(sequence)
        assert all(made >= min(after, app.batches) for made, (*_, after) in app.done)
        [(total, agreeing)] = fetch(
            url, "SELECT count(*), count(*) FILTER (WHERE doubled = val * 2) FROM t"
        )
        assert total == agreeing, fetch(
            url, "SELECT * FROM t WHERE doubled IS DISTINCT FROM val * 2"
        )
    finally:
        app.app.close()
        pg_server.drop_database(url)


def test_app_writes_between_batches_land_on_every_side_of_the_walk(
    pg_server: provision.Server, agreement_template: str, tmp_path: Path
) -> None:
    """The harness above really interleaves: writes planned after batch 5 run when five
    batches are done, and an old-code update of a row the walk has passed is synced."""
    url = pg_server.create_database("pgagree", template=agreement_template)
    app = AppBetweenBatches(
        url, [("old-update", -3, 1000, 5), ("new-update", 4, 7, 5), ("old-insert", 0, 9, 5)]
    )
    try:
        options = Options(
            actor="test", live_versions=("1",), backfill=BackfillSettings(batch_size=7)
        )
        with db.locked_session(url, "test backfill") as session:
            Orchestrator(
                session,
                AlembicProject(ALEMBIC_INI),
                load_plan(make_plan(tmp_path)),
                options,
                progress=app,
            ).advance(only="backfill")
        assert [made for made, _ in app.done] == [5, 5, 5]
        rows = dict(fetch(url, "SELECT k, val FROM t WHERE k IN (32, 39)"))
        assert rows == {32: 1000, 39: 7}  # behind the walk (35 walked): old; ahead: new
        assert_all_agree(url, AGREEMENT_ROWS + 1)
    finally:
        app.app.close()
        pg_server.drop_database(url)


def test_percent_signs_in_author_sql_survive_every_path(database_url: str, tmp_path: Path) -> None:
    """`%` in a plan's SQL must reach PostgreSQL as written: in batches (which use parameters),
    in the trigger and in verification (which do not)."""
    seeded_table(database_url)
    plan = tmp_path / "percent.yaml"
    plan.write_text(
        make_plan_text()
        .replace(
            "doubled: new.val * 2",
            "doubled: \"new.val * 2 + CASE WHEN 'x%' LIKE '%' THEN 0 ELSE 1 END\"",
        )
        .replace(
            "where: new.doubled IS NULL",
            "where: \"new.doubled IS NULL AND 'a%b' LIKE 'a%'\"",
        )
    )
    result = Phasegate(database_url)(
        "backfill", str(plan), "--live-version", "1", "--batch-size", "300", "--yes"
    )
    assert result.exit_code == 0, result.output
    execute(database_url, "INSERT INTO t (k, val) VALUES (999999, 21)")  # through the trigger
    assert_all_agree(database_url, ROWS + 1)


def test_a_helper_on_another_process_takes_slices_and_exits_0(
    database_url: str, tmp_path: Path
) -> None:
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "20", "--pause", "0.02"]
    owner = cli(
        database_url, "backfill", plan, "--live-version", "1", "--yes", "--slices", "6", *slow
    )
    helper = cli(database_url, "worker", plan, "--wait", "30", *slow)
    _out, owner_err = owner.communicate(timeout=120)
    helper_out, helper_err = helper.communicate(timeout=120)
    assert owner.returncode == 0, owner_err
    assert helper.returncode == 0, helper_err
    assert "helped, " in helper_out and " walked, " in helper_out
    assert_all_agree(database_url, ROWS)
    owners = {r[0] for r in fetch(database_url, "SELECT owner FROM phasegate.job_slice")}
    assert "assist 0" in owners and "worker 0" in owners
    assert checkpoint(database_url)["walked"] == ROWS


def test_a_helper_stops_when_the_orchestrator_stops(database_url: str, tmp_path: Path) -> None:
    """Ctrl-C on the orchestrator stops the walk: a helper must not finish it, a helper
    started afterwards must not join it, and status must not show it as running."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "20", "--pause", "0.05"]
    owner = cli(
        database_url, "backfill", plan, "--live-version", "1", "--yes", "--slices", "6", *slow
    )
    helper = cli(database_url, "worker", plan, "--wait", "30", *slow)
    wait_for_batches(database_url, 10)
    owner.send_signal(signal.SIGINT)
    _out, owner_err = owner.communicate(timeout=60)
    assert owner.returncode == 3, owner_err
    [(left_then,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NULL")
    _helper_out, helper_err = helper.communicate(timeout=30)
    assert helper.returncode == 0, helper_err
    assert "its orchestrator stopped, so this worker stopped too" in helper_err
    [(left,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NULL")
    # alone, at 20 rows a batch, the helper would have walked the rest (hundreds of rows);
    # it checks about once a second, not at its slice's end: it stops within a few batches
    # (counted in rows, not seconds, so a loaded machine cannot fail it)
    assert left_then - left <= 20 * 30 and left > ROWS // 3

    late = cli(database_url, "worker", plan, "--wait", "1")
    late_out, late_err = late.communicate(timeout=30)
    assert late.returncode == 0 and "needed help" in late_out, late_err
    assert fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NULL") == [(left,)]

    status = json.loads(Phasegate(database_url)("status", plan, json_output=True).stdout)
    [job] = [j for j in status["jobs"] if j["name"] == "fill"]
    assert (job["status"], job["rows_per_second"], job["eta_seconds"]) == ("stopped", None, None)

    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output  # the next run goes on
    assert_all_agree(database_url, ROWS)


JSON_PLAN = engine_plan_text(
    "doc", "body: new.raw::json", "new.body IS NULL", "raw: new.body::text"
)


def backfill_rollback_write_backfill(url: str, plan: Path, text: str, old_code_write: str) -> None:
    """Backfill, roll it back, let old code write with no trigger, backfill again: the
    walk after a rollback (resweep) must find the row the write left stale."""
    plan.write_text(text)
    phasegate = Phasegate(url)
    for args in (("backfill", str(plan)), ("rollback", str(plan))):
        result = phasegate(*args, "--live-version", "1", "--yes")
        assert result.exit_code == 0, result.output
    execute(url, old_code_write)
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output


def test_a_rollback_then_backfill_of_a_json_column(database_url: str, tmp_path: Path) -> None:
    """json has no `=`: the next walk after a rollback must still tell stale rows apart."""
    execute(
        database_url,
        "CREATE TABLE doc (k bigint PRIMARY KEY, raw text NOT NULL, body json)",
        "INSERT INTO doc SELECT g, format('{\"n\": %s}', g) FROM generate_series(1, 500) g",
    )
    backfill_rollback_write_backfill(
        database_url,
        tmp_path / "json.yaml",
        JSON_PLAN,
        """UPDATE doc SET raw = '{"n": "edited"}' WHERE k = 7""",
    )
    assert fetch(database_url, "SELECT count(*) FROM doc WHERE body::text <> raw") == [(0,)]


def test_a_job_moved_to_another_table_leaves_no_trigger_on_either(
    database_url: str, tmp_path: Path
) -> None:
    """Same job name, so the same trigger function: its trigger on the old table must go
    before DROP FUNCTION, which would otherwise refuse."""
    seeded_table(database_url)
    execute(database_url, "CREATE TABLE t2 (LIKE t INCLUDING ALL)")
    plan = make_plan(tmp_path)
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", plan, "--live-version", "1", "--yes").exit_code == 0
    Path(plan).write_text(make_plan_text().replace("        table: t\n", "        table: t2\n"))
    result = phasegate("rollback", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('t'::regclass, 't2'::regclass)"
    assert fetch(database_url, triggers + " AND NOT tgisinternal") == [(0,)]


def test_a_job_moved_while_its_trigger_is_installed_leaves_the_old_table_alone(
    database_url: str, tmp_path: Path
) -> None:
    """A backfill failed after installing the trigger on t; the file then moves the job to
    t2 (and drops the failing job), which the next run takes only on the operator's word
    (`--restart-job`). It must then take the trigger off t: it would call the replaced
    function."""
    seeded_table(database_url)
    execute(database_url, "CREATE TABLE t2 (LIKE t INCLUDING ALL)")
    plan = tmp_path / "engine.yaml"
    failing = make_plan_text().replace(
        "    jobs:\n", "    jobs:\n      - name: boom\n        sql: SELECT 1/0\n"
    )
    plan.write_text(failing)
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", str(plan), "--live-version", "1", "--yes").exit_code == 3
    plan.write_text(make_plan_text().replace("        table: t\n", "        table: t2\n"))
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes")
    assert result.exit_code == 2 and "--restart-job boom --restart-job fill" in result.output
    restarts = ("--restart-job", "boom", "--restart-job", "fill")
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes", *restarts)
    assert result.exit_code == 0, result.output
    triggers = "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE '%sync_%'"
    assert fetch(database_url, triggers) == [("t2",), ("t2",)]  # its INSERT and UPDATE triggers
    execute(database_url, "INSERT INTO t (k, val) VALUES (999999, 1)")  # no trigger in the way


GUARDED_PLAN = engine_plan_text(
    "m", "n: new.raw::int", "new.raw ~ '^[0-9]+$' AND new.n IS NULL", "raw: new.n::text"
)


def test_a_resweep_evaluates_set_only_where_the_plan_guards_it(
    database_url: str, tmp_path: Path
) -> None:
    """`where` keeps `raw::int` off 'legacy-10'; the walk after a rollback must too."""
    execute(
        database_url,
        "CREATE TABLE m (k bigint PRIMARY KEY, raw text, n int)",
        "INSERT INTO m SELECT g, CASE WHEN g % 10 = 0 THEN 'legacy-' || g ELSE g::text END"
        " FROM generate_series(1, 500) g",
    )
    backfill_rollback_write_backfill(
        database_url,
        tmp_path / "guarded.yaml",
        GUARDED_PLAN,
        "UPDATE m SET raw = '77' WHERE k = 7",
    )
    assert fetch(database_url, "SELECT n FROM m WHERE k = 7") == [(77,)]
    assert fetch(database_url, "SELECT count(*) FROM m WHERE n IS NULL") == [(50,)]


def test_a_resweep_sees_a_float_change_in_the_last_bits(database_url: str, tmp_path: Path) -> None:
    execute(
        database_url,
        "CREATE TABLE f (k bigint PRIMARY KEY, x float8 NOT NULL, y float8)",
        "INSERT INTO f SELECT g, g * 1.1 FROM generate_series(1, 100) g",
        f"ALTER DATABASE {make_url(database_url).database} SET extra_float_digits = 0",
    )
    backfill_rollback_write_backfill(
        database_url,
        tmp_path / "float.yaml",
        engine_plan_text("f", "y: new.x * 3", "new.y IS NULL", "x: new.y / 3"),
        "UPDATE f SET x = x + 4.5e-16 WHERE k = 3",
    )
    assert fetch(database_url, "SELECT y = x * 3 FROM f WHERE k = 3") == [(True,)]


def test_a_stopped_helper_exits_3(database_url: str, tmp_path: Path) -> None:
    seeded_table(database_url)
    helper = cli(database_url, "worker", make_plan(tmp_path), "--wait", "60")
    # signalled once its session is there, which it opens only with its handlers installed
    # (signalled earlier, Python's default handler ends it without a word); not once it
    # runs its job lookup: that statement shows in pg_stat_activity only until its COMMIT
    connected = "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'phasegate worker %'"
    deadline = time.monotonic() + 60
    while not fetch(database_url, connected):
        assert time.monotonic() < deadline and helper.poll() is None, "it never connected"
        time.sleep(0.05)
    helper.send_signal(signal.SIGTERM)
    _out, err = helper.communicate(timeout=60)
    assert helper.returncode == 3, err
    assert "stopped on request" in err


def test_a_floating_point_key_is_refused(database_url: str, tmp_path: Path) -> None:
    execute(
        database_url,
        "CREATE TABLE t (k double precision PRIMARY KEY, val int NOT NULL, doubled int)",
        "INSERT INTO t SELECT g / 3.0, g FROM generate_series(1, 10) g",
    )
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path), "--live-version", "1", "--yes"
    )
    assert result.exit_code == 2, result.output
    assert "floating point" in result.stderr
    assert nothing_installed(database_url)


def test_a_second_signal_aborts_with_exit_3_and_the_ledger_says_failed(
    database_url: str, tmp_path: Path
) -> None:
    """The first signal asks for a stop after the batch; a second, while that batch still
    waits on a lock, aborts it: exit 3, and the ledger records the failure, not 'running'."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    blocker = psycopg.connect(libpq_url(database_url))
    blocker.execute("SELECT * FROM t WHERE k = 100 FOR UPDATE")
    try:
        flags = ["--batch-size", "20", "--batch-lock-timeout", "60s"]
        process = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *flags)
        deadline = time.monotonic() + 60
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND application_name LIKE 'phasegate backfill%'"  # noqa: E501
        while not fetch(database_url, waiting)[0][0]:
            assert time.monotonic() < deadline, "the batch never waited on the locked row"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=60)
    finally:
        blocker.close()
    assert process.returncode == 3, err
    assert "aborted by a second signal" in err
    [(state,)] = fetch(database_url, "SELECT state FROM phasegate.plan_state")
    assert state == "failed"
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, ROWS)


def test_a_table_lock_between_batches_times_out_the_next_one_which_is_retried(
    database_url: str, tmp_path: Path
) -> None:
    """The batch's lock_timeout governs the whole batch statement, the locks it takes while
    it is planned included (the walk session's limits are set before its first batch):
    ACCESS EXCLUSIVE held by someone else times the batch out, and it is retried."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    flags = ["--batch-size", "40", "--pause", "0.02", "--batch-lock-timeout", "200ms"]
    process = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *flags)
    wait_for_batches(database_url, 3)
    with psycopg.connect(libpq_url(database_url)) as blocker:
        blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        release_after_a_retry(database_url, blocker, blocker.rollback).join()
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "batch hit lock timeout; retrying" in err
    assert checkpoint(database_url)["status"] == "done"
    assert_all_agree(database_url, ROWS)
    # the attempt that waited out its lock_timeout is one of the batch durations reported
    [(detail,)] = fetch(
        database_url, "SELECT detail FROM phasegate.event WHERE kind = 'job.finished'"
    )
    assert detail["batch_ms"]["max"] >= 200, detail


def test_a_batch_whose_slice_was_taken_over_writes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    """A batch writes its rows only while its slice is still its worker's: once the ledger
    says otherwise (the job was re-cut or cleared meanwhile), the next batch changes no row
    and the worker stops with the reason; the checkpoint still matches the data."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "40", "--pause", "0.3"]
    process = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *slow)
    wait_for_batches(database_url, 2)
    execute(database_url, "UPDATE phasegate.job_slice SET owner_pid = NULL")
    [(updated_then,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL")
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 3, err
    assert "is no longer this worker's" in err
    [(updated,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL")
    [(rows_done,)] = fetch(database_url, "SELECT rows_done FROM phasegate.job_slice")
    assert 0 < updated == updated_then == rows_done < ROWS


@contextmanager
def walk_statements(url: str, tmp_path: Path) -> Iterator[tuple[db.Session, batch.BatchSQL, tuple]]:
    """A session with the plan's batch statement (no ledger CTEs) and the table's largest key."""
    job = next(j for j in load_plan(make_plan(tmp_path)).jobs() if j.is_batched)
    work = backfill.up_work(job)
    with db.session(db.normalize_url(url), "test walk") as session:
        key = keys.resolve(session, work.table, work.key)
        statements = batch.BatchSQL(session, work, key, checkpoint=False)
        with session.tx():
            row = session.execute(
                sql.SQL("SELECT {} FROM t ORDER BY {} LIMIT 1").format(
                    key.as_text_array(), key.order(descending=True)
                )
            ).fetchone()
        yield session, statements, tuple(row[0])


def test_a_batch_marks_its_own_transaction_only(database_url: str, tmp_path: Path) -> None:
    """The trigger's mark and synchronous_commit off are the batch statement's own: a
    server connection a pooler hands on afterwards carries neither."""
    seeded_table(database_url)
    with (
        walk_statements(database_url, tmp_path) as (session, statements, upper),
        session.autocommit(),
    ):
        outcome = statements.run(session, None, upper, 100)
        mark = session.scalar("SELECT current_setting('phasegate.backfill', true)")
        commit = session.scalar("SHOW synchronous_commit")
    assert (outcome.scanned, outcome.updated, outcome.done) == (100, 100, False)
    assert mark in (None, "") and commit == "on"
    [(filled,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 2")
    assert filled == 100


def uuid_table(url: str) -> None:
    execute(
        url,
        "CREATE TABLE t (k uuid PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT md5(g::text)::uuid, g FROM generate_series(1, {ROWS}) g",
        "ANALYZE t",
    )


@pytest.fixture
def no_temporary_url(database_url: str) -> Iterator[str]:
    """The URL of a role that owns the database (so it can run a backfill) but may not
    create temporary objects, whose batches are therefore one SQL statement of CTEs."""
    database = make_url(database_url).database
    role = f"notemp_{database}"
    with role_owning_the_database(
        database_url, role, f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC, "{role}"'
    ) as url:
        yield url


@contextmanager
def role_owning_the_database(database_url: str, role: str, *setup: str) -> Iterator[str]:
    """A login role that owns the test database, after `setup`; yields its URL, then drops
    it and everything it owns."""
    database = make_url(database_url).database
    execute(
        database_url,
        f'CREATE ROLE "{role}" LOGIN',
        f'ALTER DATABASE "{database}" OWNER TO "{role}"',
        *setup,
    )
    try:
        yield make_url(database_url).set(username=role).render_as_string(hide_password=False)
    finally:
        execute(
            database_url, f'REASSIGN OWNED BY "{role}" TO CURRENT_USER', f'DROP OWNED BY "{role}"'
        )
        execute(database_url, f'DROP ROLE "{role}"')


def test_a_slice_first_batch_walks_the_index(database_url: str, tmp_path: Path) -> None:
    """A first batch has no lower key: its upper key, found by the batch, reaches the
    UPDATE as a parameter of the session's batch function, so the planner sees the real
    range and walks the index (a sequential scan would read every row of a large table
    for each first batch). The session keeps `enable_seqscan` as it was: turned off, it
    would push the author's expressions and the foreign-key checks under every row onto
    indexes too. Past PostgreSQL's first five (custom) plans of each statement, the
    batches stay on the index."""
    uuid_table(database_url)
    with walk_statements(database_url, tmp_path) as (session, statements, upper):
        assert 'pg_temp."phasegate_batch_' in statements.statement[True]
        scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 't'"
        with session.tx():  # under a walk session's limits, which leave the planner alone
            backfill.set_limits(session, BackfillSettings(), local=True)
            assert session.scalar("SHOW enable_seqscan") == "on"
            [before] = session.all(scans)
            first = statements.run(session, None, upper, 100)
            for _ in range(7):  # the first batch's statement, planned again and again
                statements.run(session, None, upper, 100)
            last, later = first.reached, []
            for _ in range(8):
                later.append(statements.run(session, last, upper, 100))
                last = later[-1].reached
            [after] = session.all(scans)
    assert (first.scanned, first.updated, first.done) == (100, 100, False)
    assert [(o.scanned, o.updated) for o in later] == [(100, 100)] * 8
    seq_scans, index_scans = (b - a for a, b in zip(before, after, strict=True))
    assert seq_scans == 0 and index_scans >= 2 * 16  # each batch's end, then its UPDATE
    [(filled,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 2")
    assert filled == 900


def test_a_composite_key_keeps_its_batches_on_the_index(database_url: str, tmp_path: Path) -> None:
    """PostgreSQL estimates a row comparison from its first column, one side at a time:
    a batch in the middle of a composite key's range looks like a quarter of the table
    and is planned as a sequential scan. Its walk session turns `enable_seqscan` off, and
    batches past PostgreSQL's five custom plans stay on the index."""
    execute(
        database_url,
        "CREATE TABLE t (a text, b int, val int NOT NULL, doubled int, PRIMARY KEY (a, b))",
        "INSERT INTO t SELECT md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text),"
        f" g % 7, g FROM generate_series(1, {ROWS}) g",
        "ANALYZE t",
    )
    [(middle,)] = fetch(
        database_url,
        f"SELECT json_build_array(a, b::text) FROM t ORDER BY a, b OFFSET {ROWS // 2} LIMIT 1",
    )
    scans = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 't'"

    def seq_scans(session: db.Session, statements: batch.BatchSQL, upper: tuple) -> int:
        before = session.scalar(scans)
        last = tuple(middle)
        for _ in range(8):
            outcome = statements.run(session, last, upper, 50)
            assert (outcome.scanned, outcome.updated) == (50, 50)
            last = outcome.reached
        return session.scalar(scans) - before

    with walk_statements(database_url, tmp_path) as (session, statements, upper):
        assert 'pg_temp."phasegate_batch_' in statements.statement[False]
        session.ensure_idle()
        transaction = session.connection.begin()  # rolled back: the next walk finds the rows
        try:
            session.execute("SET LOCAL enable_seqscan = on")
            planned_alone = seq_scans(session, statements, upper)
        finally:
            transaction.rollback()
    with walk_statements(database_url, tmp_path) as (session, statements, upper), session.tx():
        backfill.set_limits(session, BackfillSettings(), local=True)
        assert session.scalar("SHOW enable_seqscan") == "off"
        kept = seq_scans(session, statements, upper)
    assert planned_alone > 0  # what the estimate alone picks for this key
    assert kept == 0


def test_a_table_without_statistics_keeps_its_batches_on_the_index(
    database_url: str, tmp_path: Path
) -> None:
    """Without statistics a first batch's one-sided bound is a one-in-three guess: the
    walk session turns `enable_seqscan` off; once the table is analyzed it stays on."""
    execute(
        database_url,
        "CREATE TABLE t (k uuid PRIMARY KEY, val int NOT NULL, doubled int)"
        " WITH (autovacuum_enabled = false)",
        f"INSERT INTO t SELECT md5(g::text)::uuid, g FROM generate_series(1, {ROWS}) g",
    )
    with walk_statements(database_url, tmp_path) as (session, statements, upper), session.tx():
        assert session.scalar("SHOW enable_seqscan") == "off"
        outcome = statements.run(session, None, upper, 100)
    assert (outcome.scanned, outcome.updated) == (100, 100)
    execute(database_url, "ANALYZE t")
    with walk_statements(database_url, tmp_path) as (session, statements, upper), session.tx():
        assert session.scalar("SHOW enable_seqscan") == "on"


def test_without_the_function_a_first_batch_walks_the_index_on_a_walk_session(
    no_temporary_url: str, tmp_path: Path
) -> None:
    """The one-statement form finds the upper key at run time, so the planner sees a third
    of the table; that form turns `enable_seqscan` off for its session, which keeps the
    batch on the index."""
    url = no_temporary_url
    uuid_table(url)
    with walk_statements(url, tmp_path) as (session, statements, upper):
        assert "pg_temp" not in statements.statement[True]
        params = {**statements.key.params("upper", upper), "skip": 99}
        explain = "EXPLAIN " + statements.statement[True]
        with session.tx():
            session.execute("SET LOCAL enable_seqscan = on")
            plain = "\n".join(r[0] for r in session.all(explain, params))
        with session.tx():
            assert session.scalar("SHOW enable_seqscan") == "off"
            kept = "\n".join(r[0] for r in session.all(explain, params))
    assert "Seq Scan on t" in plain  # what the estimate alone picks on this table
    assert "Seq Scan on t" not in kept and "Index" in kept


def test_a_role_without_plpgsql_gets_the_one_statement_form(
    database_url: str, no_temporary_url: str, tmp_path: Path
) -> None:
    """TEMPORARY is not enough: a hardened database may revoke USAGE on PL/pgSQL."""
    database = make_url(database_url).database
    role = make_url(no_temporary_url).username
    execute(
        database_url,
        f'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}"',
        "REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC",
    )
    uuid_table(no_temporary_url)
    with walk_statements(no_temporary_url, tmp_path) as (session, statements, upper):
        assert "pg_temp" not in statements.statement[True]
        with session.autocommit():
            outcome = statements.run(session, None, upper, 100)
    assert (outcome.scanned, outcome.updated, outcome.done) == (100, 100, False)


def test_a_role_without_temporary_backfills_with_one_statement_a_batch(
    no_temporary_url: str, tmp_path: Path
) -> None:
    url = no_temporary_url
    execute(
        url,
        "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
    )
    assert fetch(url, "SELECT has_database_privilege(current_database(), 'TEMPORARY')") == [
        (False,)
    ]
    result = Phasegate(url)(
        "backfill", make_plan(tmp_path), "--live-version", "1", "--yes", "--batch-size", "300"
    )
    assert result.exit_code == 0, result.output
    assert_all_agree(url, ROWS)
    assert checkpoint(url) == {"status": "done", "walked": ROWS, "rows": ROWS, "batches": 7}


def test_the_orchestrator_session_is_kept_alive_and_its_loss_stops_the_walk(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers walk on their own sessions while the orchestrator's, which holds its lock,
    waits: it is pinged meanwhile, and when it is gone the walk stops after its batch
    instead of finishing a job nobody can verify."""
    monkeypatch.setattr(backfill._Walk, "KEEPALIVE_EVERY", 0.1)
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    orchestrator = (
        "SELECT pid, state_change FROM pg_stat_activity"
        " WHERE datname = current_database()"
        " AND application_name = 'phasegate backfill engine.yaml'"
    )
    pinged: list[bool] = []

    def terminate_the_orchestrator() -> None:
        wait_for_batches(database_url, 3)
        # the walk is under way; its orchestrator's session must be used again after this
        [(walking_since,)] = fetch(database_url, "SELECT clock_timestamp()")
        deadline = time.monotonic() + 60
        while not pinged and time.monotonic() < deadline:
            [(pid, last_used)] = fetch(database_url, orchestrator)
            if last_used > walking_since:
                pinged.append(True)
            time.sleep(0.05)
        execute(database_url, f"SELECT pg_terminate_backend({pid})")

    killer = threading.Thread(target=terminate_the_orchestrator)
    killer.start()
    slow = ["--batch-size", "40", "--pause", "0.05"]
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes", *slow)
    killer.join()
    assert pinged, "the orchestrator's session sat idle while the walk went on"
    assert result.exit_code == 3, result.output
    assert "lost the connection" in result.stderr
    assert checkpoint(database_url)["walked"] < ROWS  # stopped, not walked to the end


def test_a_table_with_an_update_rule_is_refused_before_anything_is_installed(
    database_url: str, tmp_path: Path
) -> None:
    """PostgreSQL refuses an UPDATE inside WITH (a batch) on a table with rules: the
    refusal names the plan's line, the rule and what to do, and nothing is touched."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL, doubled int)",
        "CREATE TABLE t_log (k bigint)",
        "INSERT INTO t SELECT g, g FROM generate_series(1, 10) g",
        'CREATE RULE "Log updates" AS ON UPDATE TO t DO ALSO INSERT INTO t_log VALUES (new.k)',
    )
    plan = make_plan(tmp_path)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    line = Path(plan).read_text().splitlines().index("        table: t") + 1
    assert f"{plan}:{line}: phases.backfill.jobs[0].table:" in result.stderr
    assert "table 't' has ON UPDATE rule(s) Log updates" in result.stderr
    assert 'DROP RULE "Log updates" ON "t"' in result.stderr
    assert fetch(database_url, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass") == [
        (0,)
    ]
    assert fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL") == [(0,)]
    preview = Phasegate(database_url)("preview", plan, "--live-version", "1", json_output=True)
    assert preview.exit_code == 0, preview.output
    [job] = json.loads(preview.stdout)["phases"][0]["jobs"]
    assert "has ON UPDATE rule(s) Log updates" in job["sample"]["error"]


def test_a_walk_session_resets_every_limit_it_set(no_temporary_url: str, tmp_path: Path) -> None:
    """A pooler may hand the server connection to someone else: nothing of ours stays,
    the one-statement form's `enable_seqscan` included."""
    uuid_table(no_temporary_url)
    names = ["statement_timeout", "lock_timeout", "row_security", "extra_float_digits"]
    names += ["enable_seqscan"]  # BatchSQL's, for the one-statement form
    with db.session(no_temporary_url) as session:
        if session.raw.info.server_version >= 140000:
            names.append("client_connection_check_interval")

        def shown() -> list[str]:
            with session.tx():
                return [session.scalar(f"SHOW {name}") for name in names]

        defaults = shown()
        with session.tx():
            backfill.set_limits(session, BackfillSettings(), local=False)
        job = next(j for j in load_plan(make_plan(tmp_path)).jobs() if j.is_batched)
        work = backfill.up_work(job)
        key = keys.resolve(session, work.table, work.key)
        with session.tx():  # as a walk session builds its statements
            batch.BatchSQL(session, work, key, checkpoint=False)
        changed = shown()
        assert [n for n, a, b in zip(names, defaults, changed, strict=True) if a == b] == []
        backfill.reset_limits(session)
        assert shown() == defaults


def test_a_resume_keeps_what_other_processes_counted_meanwhile(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume writes the checkpoint row back whole: a batch of another process (a
    `phasegate worker`) that commits between its first read and that write must not be
    lost from the row's counters. The batch is injected at that moment: just before the
    resume prepares its walk, another session adds 777 walked rows, as a batch's
    checkpoint does."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    before = checkpoint(database_url)["walked"]
    execute(  # as if the orchestrator had been killed after the last batch
        database_url,
        "UPDATE phasegate.job_checkpoint SET status = 'running' WHERE job = 'fill'",
        "UPDATE phasegate.plan_state SET state = 'running', active_phase = 'backfill',"
        " phase = NULL",
    )
    prepare = backfill._prepare

    def prepare_after_another_batch_landed(*args: Any, **kwargs: Any) -> Any:
        execute(
            database_url,
            "UPDATE phasegate.job_checkpoint SET walked = walked + 777 WHERE job = 'fill'",
        )
        return prepare(*args, **kwargs)

    monkeypatch.setattr(backfill, "_prepare", prepare_after_another_batch_landed)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert checkpoint(database_url)["walked"] == before + 777


REFILL_PLAN = """\
plan: refill-test
app: refilltest
baseline_compatible: ">=0"
phases:
  backfill:
    compatible: ">=0"
    jobs:
      - name: norm
        table: t
        set:
          email_norm: lower(new.email)
        where: new.email_norm IS NULL
        sync:
          down:
            email: new.email_norm
"""


def test_the_contract_refill_rewrites_empty_and_stale_old_columns_only(
    database_url: str, tmp_path: Path
) -> None:
    """The refill after a contract: an empty old column is filled; one that new code made
    stale while no trigger ran (a new column that is not what `set` gives for the old
    one) is rewritten; a lossy but consistent pair (what old code and the trigger leave)
    and a row without a new value are left alone."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, email text, email_norm varchar(100))",
        "INSERT INTO t VALUES (1, 'Alice@X', 'alice@x'), (2, 'bob@x', 'carol@x'),"
        " (3, NULL, 'dave@x'), (4, NULL, NULL), (5, 'Eve@X', NULL)",
    )
    path = tmp_path / "refill.yaml"
    path.write_text(REFILL_PLAN)
    plan = load_plan(str(path))
    [job] = plan.jobs()
    with db.session(db.normalize_url(database_url), "test refill") as session:
        ledger.ensure_schema(session)
        work = backfill.down_work(job, keys.base_types(session, "t"))
        result = backfill.run_batched(
            session, plan.name, work, BackfillSettings(), LogProgress(io.StringIO())
        )
    assert result.rows == 2
    assert fetch(database_url, "SELECT k, email, email_norm FROM t ORDER BY k") == [
        (1, "Alice@X", "alice@x"),
        (2, "carol@x", "carol@x"),
        (3, "dave@x", "dave@x"),
        (4, None, None),
        (5, "Eve@X", None),
    ]


def test_a_key_made_by_an_earlier_sql_job_is_checked_when_the_walk_starts(
    database_url: str, tmp_path: Path
) -> None:
    """The key is checked before anything is installed, unless an `sql` job of the phase
    runs first: that job may create it (here: the primary key)."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint NOT NULL, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
    )
    path = tmp_path / "engine.yaml"
    path.write_text(
        make_plan_text().replace(
            "    jobs:\n",
            "    jobs:\n      - name: key\n        sql: ALTER TABLE t ADD PRIMARY KEY (k)\n",
        )
    )
    result = Phasegate(database_url)("backfill", str(path), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert "walking k (primary key)" in result.stderr
    assert_all_agree(database_url, ROWS)


def test_a_helper_started_before_the_plan_has_its_columns_waits_without_failing(
    database_url: str, tmp_path: Path
) -> None:
    """`phasegate worker` may start before expand has added the job's new columns: it finds
    nothing to join and says so at the end of its wait, instead of failing on the refill's
    column types."""
    execute(database_url, "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL)")
    helper = cli(database_url, "worker", make_plan(tmp_path), "--wait", "1")
    _out, err = helper.communicate(timeout=60)
    assert helper.returncode == 0, err


def plan_with_sql_after(tmp_path: Path, statement: str) -> str:
    """The engine plan with an `sql` job after the batched one."""
    path = tmp_path / "engine.yaml"
    path.write_text(make_plan_text() + f"      - name: after\n        sql: {statement}\n")
    return str(path)


@pytest.mark.parametrize(
    "statement, rows",
    [
        ("UPDATE t SET val = val + 1000 WHERE k % 2 = 0", ROWS),  # old columns only: up
        ("INSERT INTO t (k, val) SELECT g, g FROM generate_series(5001, 5100) g", ROWS + 100),
        ("UPDATE t SET doubled = 4 * k WHERE k <= 10", ROWS),  # new columns only: down
    ],
    ids=["updates-old", "inserts", "updates-new"],
)
def test_an_sql_job_is_an_ordinary_writer_for_the_sync_trigger(
    statement: str, rows: int, database_url: str, tmp_path: Path
) -> None:
    """An `sql` job's writes are synced like the app's: the mark that makes the trigger step
    aside belongs to the batches only. Run after the batched job, nothing would sweep them."""
    seeded_table(database_url)
    path = plan_with_sql_after(tmp_path, statement)
    result = Phasegate(database_url)("backfill", path, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert_all_agree(database_url, rows)


def test_rows_a_later_sql_job_leaves_unfilled_fail_the_phase_and_a_rerun_fills_them(
    database_url: str, tmp_path: Path
) -> None:
    """A batched job is checked again after an `sql` job that ran later in the phase: here
    the `sql` job inserts behind the trigger's back (replica role), so its rows still match
    the batched job's `where`. The phase fails (exit 3) naming both jobs; the next run
    walks the batched job again and ends done."""
    seeded_table(database_url)
    path = plan_with_sql_after(
        tmp_path,
        '"SET LOCAL session_replication_role = replica; '
        'INSERT INTO t (k, val) SELECT g, g FROM generate_series(5001, 5007) g"',
    )
    phasegate = Phasegate(database_url)
    failed = phasegate("backfill", path, "--live-version", "1", "--yes")
    assert failed.exit_code == 3, failed.output
    assert "7 row(s) of t still match `where` of job 'fill'" in failed.stderr
    assert "after job 'after'" in failed.stderr
    assert checkpoint(database_url)["status"] == "failed"
    [(unfilled,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NULL")
    assert unfilled == 7

    again = phasegate("backfill", path, "--live-version", "1", "--yes")
    assert again.exit_code == 0, again.output
    assert_all_agree(database_url, ROWS + 7)
    assert checkpoint(database_url)["status"] == "done"


@pytest.fixture
def rls_url(database_url: str) -> Iterator[str]:
    """The URL of a role that owns the database but not `t`, which has row-level security
    showing it the even keys only."""
    role = f"rls_{make_url(database_url).database}"
    seeded_table(database_url)
    with role_owning_the_database(
        database_url,
        role,
        f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"',
        f'GRANT SELECT, UPDATE, TRIGGER ON t TO "{role}"',
        "ALTER TABLE t ENABLE ROW LEVEL SECURITY",
        f'CREATE POLICY even ON t TO "{role}" USING (k % 2 = 0)',
    ) as url:
        yield url


def test_row_level_security_stops_the_walk_instead_of_hiding_rows(
    rls_url: str, database_url: str, tmp_path: Path
) -> None:
    """A role that row-level security shows part of the table would walk and verify that
    part only, and call the job done. The walk and its count run with row_security off,
    so PostgreSQL refuses instead, and the error says which role may run it."""
    result = Phasegate(rls_url)("backfill", make_plan(tmp_path), "--live-version", "1", "--yes")
    assert result.exit_code == 3, result.output
    assert "row-level security" in result.stderr
    assert "BYPASSRLS" in result.stderr
    statuses = fetch(database_url, "SELECT status FROM phasegate.job_checkpoint WHERE job = 'fill'")
    assert ("done",) not in statuses
    [(filled,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL")
    assert filled == 0


def test_a_resume_after_the_key_changed_walks_again_from_the_start(
    database_url: str, tmp_path: Path
) -> None:
    """The walk is stopped while it walks a unique column; a primary key is added before
    the resume. The saved bounds are values of the old key, so the resume must not read
    them as the new key's: it says so and walks again from the start."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint NOT NULL, code text NOT NULL UNIQUE, val int NOT NULL, "
        "doubled int)",
        f"INSERT INTO t SELECT g, 'c' || g, g FROM generate_series(1, {ROWS}) g",
    )
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "40", "--pause", "0.05"]
    process = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *slow)
    wait_for_batches(database_url, 3)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 3, err
    assert "walking code (unique index" in err
    execute(database_url, "ALTER TABLE t ADD PRIMARY KEY (k)")

    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert "key changed since its walk started (code text, now k bigint)" in result.stderr
    assert "walking k (primary key)" in result.stderr
    assert_all_agree(database_url, ROWS)
    assert checkpoint(database_url)["walked"] == ROWS


def test_a_helper_does_not_join_a_walk_over_a_key_that_has_changed(
    database_url: str, tmp_path: Path
) -> None:
    """A primary key added while a walk over a unique column runs: a helper that starts
    then finds the new key, whose bounds are not the walk's, and stays out."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint NOT NULL, code text NOT NULL UNIQUE, val int NOT NULL, "
        "doubled int)",
        f"INSERT INTO t SELECT g, 'c' || g, g FROM generate_series(1, {ROWS}) g",
    )
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "20", "--pause", "0.05"]
    owner = cli(
        database_url, "backfill", plan, "--live-version", "1", "--yes", "--slices", "6", *slow
    )
    wait_for_batches(database_url, 2)
    execute(database_url, "ALTER TABLE t ADD PRIMARY KEY (k)")
    helper = cli(database_url, "worker", plan, "--wait", "30", *slow)
    _out, helper_err = helper.communicate(timeout=120)
    owner.send_signal(signal.SIGTERM)  # the owner walks on over `code`; no need to wait
    owner.communicate(timeout=120)
    assert helper.returncode == 0, helper_err
    assert "not joined: its walk is over code text, but its key is k bigint now" in helper_err
    owners = {r[0] for r in fetch(database_url, "SELECT owner FROM phasegate.job_slice")}
    assert "assist 0" not in owners


def test_batches_leave_the_old_columns_of_a_lossy_pair_as_they_were(
    database_url: str, tmp_path: Path
) -> None:
    """The trigger steps aside for the backfill's own batches: were it to see a batch as a
    new-code write, its `down` would rewrite `email` from the lowered copy."""
    execute(
        database_url,
        "CREATE TABLE u (k bigint PRIMARY KEY, email text, email_lower text)",
        "INSERT INTO u SELECT g, 'User' || g || '@Example.COM', NULL "
        "FROM generate_series(1, 500) g",
    )
    path = tmp_path / "lossy.yaml"
    path.write_text(
        engine_plan_text(
            "u",
            "email_lower: lower(new.email)",
            "new.email_lower IS NULL",
            "email: new.email_lower",
        )
    )
    result = Phasegate(database_url)(
        "backfill", str(path), "--live-version", "1", "--batch-size", "50", "--yes"
    )
    assert result.exit_code == 0, result.output
    [(kept, filled)] = fetch(
        database_url,
        "SELECT count(*) FILTER (WHERE email = 'User' || k || '@Example.COM'),"
        " count(*) FILTER (WHERE email_lower = lower(email)) FROM u",
    )
    assert (kept, filled) == (500, 500)


SLOW_DOUBLE = (
    "CREATE FUNCTION slow_double(v int) RETURNS int LANGUAGE sql VOLATILE"
    " AS $$ SELECT v * 2 FROM pg_sleep(0.003) $$"
)


def slow_table_and_plan(url: str, tmp_path: Path, rows: int) -> str:
    """`t` of `rows` rows whose `set` sleeps 3 ms a row: 100 rows take ~0.3 s."""
    execute(
        url,
        SLOW_DOUBLE,
        "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {rows}) g",
    )
    path = tmp_path / "slow.yaml"
    path.write_text(make_plan_text().replace("new.val * 2", "slow_double(new.val)"))
    return str(path)


def test_a_batch_over_its_statement_timeout_is_retried_smaller(
    database_url: str, tmp_path: Path
) -> None:
    """Each batch runs under --batch-statement-timeout: 100 rows (~0.3 s) time out at
    100 ms, and are retried with 50, then 25 rows, which fit; the job finishes."""
    plan = slow_table_and_plan(database_url, tmp_path, 60)
    timeout = ["--batch-statement-timeout", "100ms", "--batch-size", "100"]
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes", *timeout)
    assert result.exit_code == 0, result.output
    assert "batch hit statement timeout; retrying with 50 rows" in result.stderr
    assert "batch hit statement timeout; retrying with 25 rows" in result.stderr
    assert_all_agree(database_url, 60)


def test_statement_timeouts_past_the_retries_stop_the_job_with_exit_3(
    database_url: str, tmp_path: Path
) -> None:
    plan = slow_table_and_plan(database_url, tmp_path, 60)
    options = ["--batch-statement-timeout", "100ms", "--batch-size", "100", "--retries", "1"]
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes", *options)
    assert result.exit_code == 3, result.output
    assert "a batch hit statement timeout 2 times in a row" in result.stderr
    [(filled,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled IS NOT NULL")
    assert filled == 0  # every attempt rolled back


# A real error with the SQLSTATE a deadlock or a serialization failure has, raised by the
# server while a batch updates row 1000, the first two times (a sequence is never rolled
# back, so it counts the attempts across the batches' rollbacks).
CONFLICT_AT_ROW_1000 = (
    "CREATE SEQUENCE conflicts",
    "CREATE FUNCTION conflict() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN"
    " IF NEW.k = 1000 AND nextval('conflicts') <= 2 THEN"
    " RAISE EXCEPTION 'simulated conflict' USING ERRCODE = '{sqlstate}'; END IF;"
    " RETURN NEW; END$$",
    "CREATE TRIGGER conflict BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION conflict()",
)


@pytest.mark.parametrize(
    "sqlstate, reason", [("40P01", "deadlock"), ("40001", "serialization failure")]
)
def test_a_batch_that_deadlocks_or_fails_to_serialize_is_retried_and_the_walk_completes(
    sqlstate: str, reason: str, database_url: str, tmp_path: Path
) -> None:
    """The server cancelled the batch to let other transactions go on: it is rolled back
    and retried smaller, the batches before it stay committed, and every row ends right."""
    seeded_table(database_url)
    execute(database_url, *(s.replace("{sqlstate}", sqlstate) for s in CONFLICT_AT_ROW_1000))
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path), "--live-version", "1", "--batch-size", "100", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.count(f"job fill: batch hit {reason}; retrying with ") == 2
    assert fetch(database_url, "SELECT last_value FROM conflicts") == [(3,)]
    assert checkpoint(database_url)["status"] == "done"
    assert_all_agree(database_url, ROWS)


def test_a_terminal_gets_the_bar_and_a_pipe_gets_log_lines(
    database_url: str, tmp_path: Path
) -> None:
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    slow = ["--batch-size", "100", "--pause", "0.05"]
    code, shown = on_a_terminal(
        database_url, "backfill", plan, "--live-version", "1", "--yes", *slow
    )
    assert code == 0, shown
    assert "rows/s" in shown and "━" in shown  # rich's bar and its rate column
    assert "job fill: started" not in shown  # no log lines
    assert f"job fill: {ROWS:,} rows walked, {ROWS:,} written, in 20 batches" in shown

    execute(database_url, "DROP SCHEMA phasegate CASCADE", "UPDATE t SET doubled = NULL")
    piped = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *slow)
    _out, err = piped.communicate(timeout=60)
    assert piped.returncode == 0, err
    assert "job fill: started" in err and "━" not in err


@pytest.mark.parametrize("key, warned", [("[b, k]", True), ("[k, b]", False)])
def test_an_explicit_key_no_index_starts_with_gets_a_warning(
    key: str, warned: bool, database_url: str, tmp_path: Path
) -> None:
    """`[b, k]` is unique (k is) but no index starts with b: each batch would sort the rest
    of the table, so the walk says what index to create; `[k, b]` walks k's index."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint NOT NULL UNIQUE, b int NOT NULL, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g % 7, g FROM generate_series(1, {ROWS}) g",
    )
    result = Phasegate(database_url)(
        "backfill", make_plan(tmp_path, key), "--live-version", "1", "--yes"
    )
    assert result.exit_code == 0, result.output
    hint = "no index of t starts with b, so every batch sorts the rest of the table"
    assert (hint in result.stderr) is warned
    if warned:
        assert 'CREATE INDEX CONCURRENTLY ON "t" ("b", "k")' in result.stderr
    assert_all_agree(database_url, ROWS)
