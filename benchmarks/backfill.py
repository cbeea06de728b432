"""Backfill benchmark: phasegate's batched backfill vs. the same jobs as set-based statements.

What it measures. The seed plan's backfill phase (plans/bug_root_cause.yaml: fill
``root_cause`` from the distinct texts, then ``bug.root_cause_id`` in keyset batches) on a bug
table of ``--rows`` rows, against the same two jobs written as single set-based statements
(the ``sql`` job as written, the batched job as one ``UPDATE bug AS new SET ... WHERE ...``
composed from its ``table``/``set``/``where``). Every run gets its own clone (CREATE DATABASE
... TEMPLATE) of one template that is seeded, through the plan's expand phase and
``VACUUM ANALYZE``-ed, and the server is CHECKPOINTed before each run so no run pays for
another's dirty buffers. phasegate's modules are compiled to bytecode first, as an
installed copy's are (see ``_common.compile_bytecode``). Whole processes are timed (wall
clock, start to exit):

* phasegate: ``python -m phasegate backfill PLAN --override-gate benchmark --yes`` with 1 and
  with 2 workers (it also installs the sync trigger and verifies that no row is left); its
  batch statistics come from the ledger's ``job.finished`` event, its peak RSS from
  ``os.wait4``;
* set-based: psql (or ``python -c`` with psycopg when there is no psql) running the two
  statements, each in its own transaction, each timed by the client (psql's ``\\timing``).

Besides the targets, the report splits each process in two: the batched job itself
(phasegate's walk, from ``job.finished``; set-based's UPDATE, as timed by its client)
and the rest of the process (start-up, the ``sql`` job, the sync trigger, verification).
That shows which part of the gap is the walk and which is fixed cost.

Targets: set-based / phasegate wall time ≥ 0.9 with one worker and > 1.0 with two; the
worst p99 batch duration ≤ 100 ms, judged on the runs of at least 100 batches (in fewer,
the 99th percentile is just the slowest batch; every run's max is printed too);
phasegate's peak RSS (one worker) at ``--rows`` within ±10 % of its peak RSS at
``--small-rows`` (memory flat in table size). Exit 0 when all are met, else 1.

Why medians. A shared machine wanders by 10-20 % from one run to the next, more than
the margin the targets care about. So the contestants run interleaved in ``--repeat`` rounds
(set-based, phasegate 1 worker, phasegate 2 workers, phasegate 1 worker on the small table;
each round starts one further along that list, so no contestant always opens the round),
every run is printed, and the ratios are ratios of the medians: one slow run in either
contestant moves nothing.

Both contestants do the same work. The set-based statement runs the plan's own ``set`` and
``where`` (``root_cause_id_for()`` once per row, as the sync trigger does), not a hand-tuned
join, which is a different, faster statement (``downtime.py``'s naive migration uses one).
After every run each row must hold a ``root_cause_id`` naming its own ``root_cause`` text:
a run that leaves a NULL or writes a wrong value fails, however fast it was.

Run (results are printed side by side; this is a benchmark, never a timed test):

    .venv/bin/python benchmarks/backfill.py --rows 1000000 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python benchmarks/backfill.py --rows 100000 --small-rows 20000 --repeat 1 --json

The server comes from --database-url, else $PHASEGATE_TEST_DATABASE_URL, else
``phasegate.provision.start()`` (testcontainers or the embedded pgserver). Databases are created
on it (two templates and one clone per run) and dropped at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from _common import (
    PLAN,
    ROOT,
    child_env,
    compile_bytecode,
    drop_all,
    make_template,
    note,
    phasegate_argv,
)
from _common import server_version as version_of

from phasegate import provision
from phasegate.db import libpq_url
from phasegate.plan import Job, load_plan

TARGET_RATIO_1 = 0.9  # set-based / phasegate with one worker: at least this
TARGET_RATIO_2 = 1.0  # with two workers: more than this
TARGET_P99_MS = 100.0
P99_MIN_BATCHES = 100  # below this many batches, "p99" is simply the slowest batch
TARGET_RSS_SPREAD = 0.10  # |RSS(rows) / RSS(small rows) - 1| at most this
RUN_TIMEOUT_S = 3600
OVERRIDE = ("--override-gate", "benchmark", "--yes")  # no app is connected: nothing to gate on
# Every row must end with root_cause_id naming its own root_cause text: a NULL left behind
# (where the plan's `where` asks for a value), or a wrong (or merely cheaper) value, fails.
CHECK_SQL = (
    "SELECT count(*) FILTER (WHERE b.root_cause_id IS NULL AND b.root_cause IS NOT NULL),"
    " count(*) FILTER (WHERE b.root_cause_id IS NOT NULL AND rc.name IS DISTINCT FROM b.root_cause)"
    " FROM bug AS b LEFT JOIN root_cause AS rc ON rc.id = b.root_cause_id"
)
BATCHED_JOB_SQL = (
    "SELECT detail FROM phasegate.event WHERE kind = 'job.finished' "
    "AND detail->>'name' = %s ORDER BY id DESC LIMIT 1"
)

SET_BASED = "set-based"
PG1, PG2, PG1_SMALL = "phasegate 1 worker", "phasegate 2 workers", "phasegate 1 worker"

# The fallback when psql is missing: argv[1] is the URL, the rest are statements. It prints
# each statement's time as psql's \timing does, so one parser reads both.
PSYCOPG_SCRIPT = (
    "import sys, time, psycopg\n"
    "with psycopg.connect(sys.argv[1], autocommit=True) as conn:\n"
    "    for statement in sys.argv[2:]:\n"
    "        started = time.perf_counter()\n"
    "        conn.execute(statement)\n"
    "        print(f'Time: {1000 * (time.perf_counter() - started):.3f} ms')\n"
)
TIMING_LINE = re.compile(r"^Time: ([0-9.]+) ms", re.MULTILINE)


# -- the contestants --------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """A table name as a quoted SQL identifier ("schema"."table")."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def set_based_statements(job: Job) -> str:
    """One job as a single statement: its ``sql``, or its batched update as one UPDATE."""
    if not job.is_batched:
        return (job.sql or "").strip()
    assignments = ", ".join(f"{quote_ident(c)} = {e}" for c, e in (job.set_ or {}).items())
    return f"UPDATE {quote_ident(job.table or '')} AS new SET {assignments} WHERE {job.where}"


def set_based_argv(url: str, statements: list[str]) -> list[str]:
    """psql running each statement in its own transaction, or the same through psycopg."""
    psql = shutil.which("psql")
    if psql:
        commands = [arg for statement in statements for arg in ("-c", statement)]
        timing = ("-c", "\\timing on")
        return [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", libpq_url(url), *timing, *commands]
    return [sys.executable, "-c", PSYCOPG_SCRIPT, libpq_url(url), *statements]


@dataclass
class Run:
    """One timed process on its own clone."""

    round: int
    contestant: str
    rows: int
    seconds: float = 0.0
    exit_code: int | None = None
    peak_rss_kib: int | None = None
    batches: int | None = None
    walked: int | None = None
    job_seconds: float | None = None  # the batched job: phasegate's walk, set-based's UPDATE
    rows_per_second: int | None = None
    workers: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    left_null: int | None = None  # bug rows with root_cause_id still NULL afterwards
    wrong: int | None = None  # bug rows whose root_cause_id names another root cause
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def is_phasegate(self) -> bool:
        return self.contestant.startswith("phasegate")


def timed_process(argv: list[str]) -> tuple[float, int, int, str, str]:
    """Run argv; returns (wall seconds, exit code, peak RSS in KiB, stderr's tail, stdout).

    ``os.wait4`` on the child's pid (not Popen.wait) yields the child's own rusage; on Linux
    ``ru_maxrss`` is in KiB.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out, stderr=err)
        timer = threading.Timer(RUN_TIMEOUT_S, process.kill)  # the pid is ours until reaped
        timer.start()
        try:
            _pid, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    return seconds, process.returncode, usage.ru_maxrss, " | ".join(tail), stdout


Command = Callable[[str], list[str]]  # a clone's URL → the argv to time on it


def run_one(
    server: provision.Server,
    template: str,
    created: list[str],
    run: Run,
    argv_for: Command,
) -> None:
    """Clone the template (noted in ``created``), CHECKPOINT, time ``argv_for(clone)``, drop it."""
    url = server.create_database("bench", template=template)
    created.append(url)
    with psycopg.connect(libpq_url(server.url), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    run.seconds, run.exit_code, rss, tail, stdout = timed_process(argv_for(url))
    if run.exit_code != 0:
        run.problem = f"exit {run.exit_code}: {tail}"
    elif not run.is_phasegate:
        run.job_seconds = batched_statement_seconds(stdout)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(CHECK_SQL).fetchone()
        run.left_null, run.wrong = (int(row[0]), int(row[1])) if row else (None, None)
        if run.left_null or run.wrong:
            run.problem = run.problem or (
                f"{run.left_null:,} rows left with root_cause_id NULL, {run.wrong:,} pointing "
                "at another root cause than their root_cause text"
            )
        if run.is_phasegate:
            run.peak_rss_kib = rss
            row = conn.execute(BATCHED_JOB_SQL, (batched_job_name(),)).fetchone()
            if row is None:
                run.problem = run.problem or "no job.finished event in the ledger"
            else:
                detail = row[0]
                run.batches, run.walked = detail.get("batches"), detail.get("walked")
                run.job_seconds = detail.get("seconds")
                run.rows_per_second = detail.get("rows_per_second")
                run.workers = detail.get("workers")
                batch_ms = detail.get("batch_ms") or {}
                run.p50_ms, run.p99_ms = batch_ms.get("p50"), batch_ms.get("p99")
                run.max_ms = batch_ms.get("max")
    server.drop_database(url)  # one clone at a time keeps the disk footprint small
    created.remove(url)


@functools.cache
def batched_job_name() -> str:
    """The name of the plan's batched job (the seed plan has exactly one)."""
    return next(job.name for job in load_plan(PLAN).jobs() if job.is_batched)


def batched_statement_seconds(stdout: str) -> float | None:
    """The set-based UPDATE's own time, from the client's per-statement timing lines."""
    jobs = list(load_plan(PLAN).jobs())
    times = [float(ms) / 1000 for ms in TIMING_LINE.findall(stdout)]
    if len(times) != len(jobs):
        return None
    return next(t for t, job in zip(times, jobs, strict=True) if job.is_batched)


# -- setup, report, main ----------------------------------------------------------------------


def expand(url: str) -> None:
    """Run the plan's expand phase on the template through the CLI (gate overridden)."""
    done = subprocess.run(
        phasegate_argv(url, "expand", str(PLAN), *OVERRIDE),
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(f"phasegate expand exited {done.returncode}: {done.stderr.strip()}")


def median(runs: list[Run], contestant: str, rows: int, attr: str = "seconds") -> float | None:
    """The median of ``attr`` over the successful runs of one contestant at one size."""
    values = [
        getattr(r, attr)
        for r in runs
        if r.ok and r.contestant == contestant and r.rows == rows and getattr(r, attr)
    ]
    return statistics.median(values) if values else None


def split_seconds(runs: list[Run], contestant: str, rows: int) -> dict[str, float | None]:
    """Median seconds in the batched job and in the rest of the process, run by run."""
    timed = [
        r
        for r in runs
        if r.ok and r.contestant == contestant and r.rows == rows and r.job_seconds is not None
    ]
    if not timed:
        return {"job": None, "rest": None}
    return {
        "job": statistics.median(r.job_seconds or 0.0 for r in timed),
        "rest": statistics.median(r.seconds - (r.job_seconds or 0.0) for r in timed),
    }


def summarize(runs: list[Run], rows: int, small_rows: int) -> dict[str, Any]:
    """Medians, ratios, and each target's verdict."""
    set_s, pg1_s, pg2_s = (median(runs, c, rows) for c in (SET_BASED, PG1, PG2))
    split = {c: split_seconds(runs, c, rows) for c in (SET_BASED, PG1)}
    set_job, pg1_job = split[SET_BASED]["job"], split[PG1]["job"]
    rss_big = median(runs, PG1, rows, "peak_rss_kib")
    rss_small = median(runs, PG1_SMALL, small_rows, "peak_rss_kib")
    ratio_1 = set_s / pg1_s if set_s and pg1_s else None
    ratio_2 = set_s / pg2_s if set_s and pg2_s else None
    rss_ratio = rss_big / rss_small if rss_big and rss_small else None
    timed = [r for r in runs if r.is_phasegate and r.p99_ms is not None]
    judged = [r for r in timed if (r.batches or 0) >= P99_MIN_BATCHES]
    p99_scope = f"runs of >= {P99_MIN_BATCHES} batches" if judged else "all runs, each under 100"
    judged = judged or timed
    worst_p99 = max(r.p99_ms for r in judged) if judged else None
    failed = [r for r in runs if not r.ok]
    targets = {
        "ratio_1_worker": ratio_1 is not None and ratio_1 >= TARGET_RATIO_1,
        "ratio_2_workers": ratio_2 is not None and ratio_2 > TARGET_RATIO_2,
        "p99_batch_ms": worst_p99 is not None and worst_p99 <= TARGET_P99_MS,
        "rss_flat": rss_ratio is not None and abs(rss_ratio - 1) <= TARGET_RSS_SPREAD,
        "every_run_succeeded": not failed,
    }
    return {
        "median_seconds": {SET_BASED: set_s, PG1: pg1_s, PG2: pg2_s},
        "ratio_1_worker": ratio_1,
        "ratio_2_workers": ratio_2,
        "split_seconds": split,
        "job_ratio_1_worker": set_job / pg1_job if set_job and pg1_job else None,
        "worst_p99_batch_ms": worst_p99,
        "p99_judged_on": p99_scope,
        "median_peak_rss_kib": {str(rows): rss_big, str(small_rows): rss_small},
        "rss_ratio": rss_ratio,
        "targets_met": targets,
        "passed": all(targets.values()),
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(context: dict[str, Any], runs: list[Run], summary: dict[str, Any]) -> str:
    """The plain-text report: header, every run, then the targets."""
    out = [
        f"backfill benchmark: {context['rows']:,} bugs (RSS also at {context['small_rows']:,}), "
        f"PostgreSQL {context['server_version']} ({context['server_kind']}), "
        f"{context['cores']} cores, {context['repeat']} round(s), set-based via "
        f"{context['set_based_client']}",
        "",
        f"{'round':<6}{'contestant':<21}{'rows':>10}{'wall s':>8}{'job s':>7}{'RSS MiB':>9}"
        f"{'batches':>9}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'rows/s':>10}",
    ]
    for r in runs:
        rss = r.peak_rss_kib / 1024 if r.peak_rss_kib else None
        out.append(
            f"{r.round:<6}{r.contestant:<21}{r.rows:>10,}{r.seconds:>8.2f}"
            f"{fmt(r.job_seconds, '.2f'):>7}{fmt(rss, '.1f'):>9}"
            f"{fmt(r.batches, ','):>9}{fmt(r.p50_ms, '.1f'):>8}{fmt(r.p99_ms, '.1f'):>8}"
            f"{fmt(r.max_ms, '.1f'):>8}{fmt(r.rows_per_second, ','):>10}"
            + (f"  FAILED: {r.problem}" if r.problem else "")
        )
    med, met = summary["median_seconds"], summary["targets_met"]
    rss = summary["median_peak_rss_kib"]
    rss_big, rss_small = rss[str(context["rows"])], rss[str(context["small_rows"])]

    def verdict(key: str) -> str:
        return "PASS" if met[key] else "FAIL"

    split = summary["split_seconds"]
    out += [
        "",
        f"job s: the batched job alone ({SET_BASED}: its UPDATE; phasegate: the walk)",
        f"median wall time: {SET_BASED} {fmt(med[SET_BASED], '.2f')} s, {PG1} "
        f"{fmt(med[PG1], '.2f')} s, {PG2} {fmt(med[PG2], '.2f')} s",
        f"set-based / phasegate, 1 worker:  {fmt(summary['ratio_1_worker'], '.3f')} "
        f"(target >= {TARGET_RATIO_1})  {verdict('ratio_1_worker')}",
        f"set-based / phasegate, 2 workers: {fmt(summary['ratio_2_workers'], '.3f')} "
        f"(target > {TARGET_RATIO_2})  {verdict('ratio_2_workers')}",
        f"  split (medians): the batched job {fmt(split[SET_BASED]['job'], '.2f')} s vs "
        f"{fmt(split[PG1]['job'], '.2f')} s (ratio {fmt(summary['job_ratio_1_worker'], '.3f')}), "
        f"the rest of the process {fmt(split[SET_BASED]['rest'], '.2f')} s vs "
        f"{fmt(split[PG1]['rest'], '.2f')} s",
        f"worst p99 batch ({summary['p99_judged_on']}): "
        f"{fmt(summary['worst_p99_batch_ms'], '.1f')} ms "
        f"(target <= {TARGET_P99_MS:.0f} ms)  {verdict('p99_batch_ms')}",
        f"peak RSS, 1 worker: {fmt(rss_big and rss_big / 1024, '.1f')} MiB at "
        f"{context['rows']:,} rows, {fmt(rss_small and rss_small / 1024, '.1f')} MiB at "
        f"{context['small_rows']:,}: ratio {fmt(summary['rss_ratio'], '.3f')} "
        f"(target 1 ± {TARGET_RSS_SPREAD})  {verdict('rss_flat')}",
        f"every run exited 0 and left every root_cause_id set and naming its row's "
        f"root_cause: {verdict('every_run_succeeded')}",
        f"overall: {'PASS' if summary['passed'] else 'FAIL'}",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="phasegate's backfill phase vs. the same jobs as single set-based "
        "statements, on identical clones; ratios of medians over interleaved rounds."
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="seeded bugs (default 1000000)")
    parser.add_argument(
        "--small-rows",
        type=int,
        default=100_000,
        help="bugs of the second table the peak RSS is compared with (default 100000)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server to create the benchmark databases on (default: "
        "$PHASEGATE_TEST_DATABASE_URL, else an embedded server)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.small_rows < 1:
        parser.error("--rows and --small-rows must be >= 1")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    began = time.monotonic()
    statements = [set_based_statements(job) for job in load_plan(PLAN).jobs()]
    compile_bytecode()
    server = provision.start(args.database_url)
    created: list[str] = []
    runs: list[Run] = []
    try:
        note(f"server: {server.description}")
        templates: dict[int, str] = {}
        for rows in dict.fromkeys((args.rows, args.small_rows)):
            note(f"template: seeding {rows:,} bugs, expand, VACUUM ANALYZE …")
            url = make_template(server, rows, prepare=expand)
            created.append(url)
            templates[rows] = str(sa.engine.make_url(url).database)

        def phasegate(workers: int) -> Command:
            extra = ("--workers", str(workers)) if workers > 1 else ()
            return lambda url: phasegate_argv(url, "backfill", str(PLAN), *OVERRIDE, *extra)

        schedule: list[tuple[str, int, Command]] = [
            (SET_BASED, args.rows, lambda url: set_based_argv(url, statements)),
            (PG1, args.rows, phasegate(1)),
            (PG2, args.rows, phasegate(2)),
            (PG1_SMALL, args.small_rows, phasegate(1)),
        ]
        for round_no in range(1, args.repeat + 1):
            turn = (round_no - 1) % len(schedule)  # each round starts with the next contestant
            for contestant, rows, argv_for in schedule[turn:] + schedule[:turn]:
                run = Run(round_no, contestant, rows)
                runs.append(run)
                run_one(server, templates[rows], created, run, argv_for)
                note(
                    f"round {round_no}: {contestant} on {rows:,} rows: {run.seconds:.2f} s"
                    + (f" FAILED: {run.problem}" if run.problem else "")
                )
        context = {
            "rows": args.rows,
            "small_rows": args.small_rows,
            "repeat": args.repeat,
            "server_kind": server.kind,
            "server_version": version_of(server.url),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "set_based_client": "psql" if shutil.which("psql") else "python -c (psycopg)",
            "set_based_statements": statements,
        }
    finally:
        drop_all(server, created)
        server.close()
    summary = summarize(runs, args.rows, args.small_rows)
    context["total_s"] = round(time.monotonic() - began, 1)
    if args.json:
        document = {
            **context,
            "targets": {
                "ratio_1_worker_at_least": TARGET_RATIO_1,
                "ratio_2_workers_above": TARGET_RATIO_2,
                "p99_batch_ms_at_most": TARGET_P99_MS,
                "rss_ratio_within": [1 - TARGET_RSS_SPREAD, 1 + TARGET_RSS_SPREAD],
            },
            "runs": [asdict(r) for r in runs],
            **summary,
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(context, runs, summary))
        print(f"total benchmark time: {context['total_s']:.1f} s")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
