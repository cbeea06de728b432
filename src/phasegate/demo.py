"""`phasegate demo`: the seed story, end to end, on a throwaway PostgreSQL.

It seeds the bug tracker, starts simulated v1 app instances (connected as
`bugtracker/1.4.2`, so the gates see them in pg_stat_activity), runs expand, starts the
backfill in a process of its own and kills it (`kill -9`) part-way, resumes it, brings up
v2 next to v1, runs switch, shows contract refused while v1 is still connected, drains
v1, runs contract, and checks row by row that no app write was lost or garbled. Every
gate decision is real; nothing is passed on the command line. It ends with a summary:
rows, app writes, failed queries, lost writes, worst write latency, time per phase.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.pool import NullPool

from phasegate import db, provision
from phasegate.errors import RuntimeFailure, UsageError
from phasegate.orchestrator import Options, Orchestrator, Outcome
from phasegate.plan import load_plan
from phasegate.progress import BarProgress, LogProgress
from phasegate.revisions import AlembicProject
from phasegate.text import terminal_safe

PLAN_FILE = Path("plans") / "bug_root_cause.yaml"
V1, V2 = "1.4.2", "2.0.0"


@dataclass
class DemoReport:
    database: str
    rows: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    app_ops: int = 0
    app_failures: int = 0
    lost_or_wrong: int = 0
    worst_latency_ms: float = 0.0
    final_columns: list[str] = field(default_factory=list)
    timings: list[tuple[str, str, float]] = field(default_factory=list)  # step, result, s
    crash: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.app_failures == 0 and self.lost_or_wrong == 0,
            "database": self.database,
            "rows": self.rows,
            "steps": self.steps,
            "app_ops": self.app_ops,
            "app_failures": self.app_failures,
            "lost_or_wrong_writes": self.lost_or_wrong,
            "worst_write_latency_ms": round(self.worst_latency_ms, 1),
            "final_bug_columns": self.final_columns,
            "crash": self.crash,
            "timings": [
                {"step": step, "result": result, "seconds": round(seconds, 2)}
                for step, result, seconds in self.timings
            ],
        }


def find_example_root() -> Path:
    """The checkout that holds alembic.ini, plans/ and examples/bugtracker/."""
    candidates = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / PLAN_FILE).is_file() and (root / "examples" / "bugtracker").is_dir():
            return root
    raise UsageError(
        "the demo needs the bundled bug tracker example (alembic.ini, plans/, examples/); "
        "run `phasegate demo` from a checkout of the phasegate repository"
    )


def load_example(root: Path, name: str) -> ModuleType:
    module_name = f"bugtracker_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(
        module_name, root / "examples" / "bugtracker" / f"{name}.py"
    )
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load examples/bugtracker/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def run_demo(database_url: str | None, rows: int, keep: bool, as_json: bool) -> DemoReport:
    """The story, told on stderr under --json (stdout is the report's, printed by the CLI)."""
    console = Console(stderr=as_json, highlight=False)
    root = find_example_root()
    explicit = database_url or next(
        (os.environ[v] for v in db.URL_ENV_VARS if os.environ.get(v)), None
    )
    console.rule("[bold]phasegate demo: bug.root_cause → root_cause table")
    console.print("starting PostgreSQL …")
    server = provision.start(explicit)
    url = server.create_database("phasegate_demo")
    console.print(f"  {server.description}; demo database {db.mask_url(url)}")
    report = DemoReport(database=db.mask_url(url), rows=rows)
    try:
        _story(console, root, url, rows, report)
    finally:
        if keep:
            console.print(f"kept the demo database: {db.mask_url(url)}")
        else:
            server.drop_database(url)
            server.close()
    return report


def _story(console: Console, root: Path, url: str, rows: int, report: DemoReport) -> None:
    seed, app = load_example(root, "seed"), load_example(root, "app")
    project = AlembicProject(root / "alembic.ini")
    plan = load_plan(root / PLAN_FILE)

    console.rule("seed: v1 schema and data")
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        revision = seed.upgrade_to_before_plan(
            connection, str(root / "alembic.ini"), str(root / PLAN_FILE)
        )
        inserted = seed.seed_bugs(connection, rows)
        connection.commit()
    console.print(f"  {inserted:,} bugs written by v1 code, schema at revision {revision}")

    v1 = [app.AppInstance(url, V1, ops_per_second=15, seed=s) for s in (1, 2)]
    for instance in v1:
        instance.start()
    console.print(f"  two v1 instances running as bugtracker/{V1}, writing bugs continuously")
    v2: list[Any] = []

    progress = BarProgress(console) if console.is_terminal else LogProgress(console.file, 1.0)
    options = Options(actor="phasegate-demo")

    def run(step: str, action: Any) -> Outcome:
        console.rule(step)
        started = time.monotonic()
        with db.locked_session(url, f"demo {step}") as session:
            orchestrator = Orchestrator(
                session,
                project,
                plan,
                options,
                progress,
                notify=lambda m: console.print(f"  {escape(terminal_safe(m))}"),
            )
            outcome: Outcome = action(orchestrator)
        for done in outcome.steps:
            report.steps.append(done.to_dict())
        result = "refused" if outcome.refused else "done"
        report.timings.append((step, result, time.monotonic() - started))
        return outcome

    try:
        _expect(run("expand", lambda o: o.advance(only="expand")), refused=False)
        console.rule("backfill, killed part-way (kill -9)")
        started = time.monotonic()
        report.crash = _crash_backfill(console, root, url, rows)
        report.timings.append(("backfill until killed", "killed", time.monotonic() - started))
        _expect(
            run("backfill, resumed after the crash", lambda o: o.advance(only="backfill")),
            refused=False,
        )

        console.rule("deploy v2 next to v1")
        v2 = [app.AppInstance(url, V2, ops_per_second=15, seed=3)]
        v2[0].start()
        console.print(f"  one v2 instance running as bugtracker/{V2} (backfilled: both work)")
        time.sleep(1)

        _expect(run("switch", lambda o: o.advance(only="switch")), refused=False)
        refused = run("contract while v1 is still connected", lambda o: o.advance(only="contract"))
        _expect(refused, refused=True)
        console.print("  [bold]→ contract refused, as it must be: v1 still reads bug.root_cause")

        console.rule("drain v1")
        for instance in v1:
            instance.stop()
        console.print(f"  v1 instances stopped; only bugtracker/{V2} is connected")
        _expect(run("contract", lambda o: o.advance(only="contract")), refused=False)
        time.sleep(1)
    finally:
        for instance in [*v1, *v2]:
            instance.stop()

    console.rule("verify")
    stats = [i.stats() for i in [*v1, *v2]]
    report.app_ops = sum(s.ok + s.failed for s in stats)
    report.app_failures = sum(s.failed for s in stats)
    report.worst_latency_ms = 1000 * max((s.max_latency for s in stats), default=0.0)
    expectations: dict[str, str] = {}
    for instance in [*v1, *v2]:
        expectations.update(instance.expectations)
    problems = app.check_writes(url, expectations, "v2")
    report.lost_or_wrong = len(problems)
    console.print(
        f"  app writes during the migration: {report.app_ops:,} "
        f"({report.app_failures} failed), worst latency {report.worst_latency_ms:.0f} ms"
    )
    console.print(f"  checked {len(expectations):,} written rows: {len(problems)} lost or wrong")
    for line in problems[:5]:
        console.print(f"    {escape(terminal_safe(line))}")
    with engine.connect() as connection:
        columns = connection.execute(
            sa.text(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name = 'bug' ORDER BY ordinal_position"
            )
        ).all()
        counts = connection.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM bug), (SELECT count(*) FROM bug "
                "WHERE root_cause_id IS NOT NULL), (SELECT count(*) FROM root_cause), "
                "(SELECT count(*) FROM phasegate.event)"
            )
        ).one()
    engine.dispose()
    report.final_columns = [c[0] for c in columns]
    table = Table(title="bug, after contract")
    for name in ("column", "type", "nullable"):
        table.add_column(name)
    for column in columns:
        table.add_row(*column)
    console.print(table)
    console.print(
        f"  {counts[0]:,} bugs, {counts[1]:,} with root_cause_id; {counts[2]} curated root "
        f"causes; {counts[3]} events in phasegate.event"
    )
    _summary(console, report)
    if problems or report.app_failures:
        errors = [e for s in stats for e in s.errors][:3]
        raise RuntimeFailure(
            f"the demo saw {report.app_failures} failed app writes and {len(problems)} lost "
            f"or wrong rows: {'; '.join(errors)}"
        )
    console.rule("[bold green]done: four phases, zero failed or lost writes")


def _crash_backfill(console: Console, root: Path, url: str, rows: int) -> dict[str, Any]:
    """Run the backfill in a process of its own and SIGKILL it once a third is done."""
    with tempfile.TemporaryFile(mode="w+") as errors:  # a file, not a pipe: it never fills
        return _kill_backfill(console, root, url, rows, errors)


def _kill_backfill(
    console: Console, root: Path, url: str, rows: int, errors: Any
) -> dict[str, Any]:
    batch = max(100, rows // 40)
    argv, env = backfill_command(root, url, batch)
    process = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    console.print(f"  started `phasegate backfill` as pid {process.pid} ({batch} rows a batch)")
    checkpoint = (
        "SELECT rows_done, last_key, status FROM phasegate.job_checkpoint "
        "WHERE plan = 'bug-root-cause' AND job = 'bug-root-cause-id'"
    )
    engine = sa.create_engine(url, poolclass=NullPool)
    row = None
    try:
        with engine.connect() as connection:
            while process.poll() is None:
                try:
                    row = connection.execute(sa.text(checkpoint)).first()
                except sa.exc.ProgrammingError:
                    row = None  # the ledger's tables are not there yet
                connection.rollback()
                if row is not None and row[0] >= rows / 3:
                    break
                time.sleep(0.02)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
            row = connection.execute(sa.text(checkpoint)).first()
            # the server notices the dead client within about a second; then its lock is free
            for _ in range(100):
                busy = connection.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND application_name LIKE 'phasegate backfill%'"
                    )
                ).scalar()
                connection.rollback()
                if not busy:
                    break
                time.sleep(0.05)
    finally:
        engine.dispose()
    killed = process.returncode == -signal.SIGKILL
    done = int(row[0]) if row else 0
    errors.seek(0)
    said = errors.read().strip()
    if not killed and process.returncode != 0:
        raise RuntimeFailure(
            f"the demo's backfill process exited with {process.returncode} before it could be "
            f"killed: {said[-800:] or '(nothing on stderr)'}"
        )
    if killed:
        console.print(
            f"  [bold]killed[/] pid {process.pid} with SIGKILL after {done:,} of {rows:,} rows "
            f"(checkpoint at id {row[1] if row else '-'}, the ledger still says "
            f"{row[2] if row else '-'})"
        )
    else:
        console.print(
            f"  [bold yellow]the backfill finished before it could be killed[/] ({done:,} rows;"
            " too few rows to interrupt: try --rows 20000)"
        )
    return {"killed": killed, "pid": process.pid, "rows_done_at_kill": done}


def backfill_command(root: Path, url: str, batch: int) -> tuple[list[str], dict[str, str]]:
    """The demo's `phasegate backfill` child: its argv, and its environment, which carries
    the database URL (a command line, password and all, is visible to anyone in `ps`)."""
    argv = [
        sys.executable,
        "-m",
        "phasegate",
        "--config",
        str(root / "alembic.ini"),
        "backfill",
        str(root / PLAN_FILE),
        "--yes",
        "--batch-size",
        str(batch),
        "--pause",
        "0.05",
    ]
    return argv, {**os.environ, db.URL_ENV_VARS[0]: url}


def _summary(console: Console, report: DemoReport) -> None:
    table = Table(title="summary")
    table.add_column("rows", justify="right")
    table.add_column("app writes during the run", justify="right")
    table.add_column("failed app queries", justify="right")
    table.add_column("lost or wrong writes", justify="right")
    table.add_column("worst app write latency", justify="right")
    table.add_column("backfill killed, resumed", justify="right")
    table.add_row(
        f"{report.rows:,}",
        f"{report.app_ops:,}",
        str(report.app_failures),
        str(report.lost_or_wrong),
        f"{report.worst_latency_ms:.0f} ms",
        "yes" if report.crash.get("killed") else "no",
    )
    console.print(table)
    phases = Table(title="time per step")
    for name in ("step", "result", "seconds"):
        phases.add_column(name, justify="right" if name == "seconds" else "left")
    for step, result, seconds in report.timings:
        phases.add_row(step, result, f"{seconds:.2f}")
    phases.add_row("total", "", f"{sum(t for _, _, t in report.timings):.2f}")
    console.print(phases)


def _expect(outcome: Outcome, refused: bool) -> None:
    if outcome.refused != refused:
        step = outcome.steps[-1] if outcome.steps else None
        raise RuntimeFailure(
            f"the demo expected the step to be {'refused' if refused else 'done'}, but: "
            f"{step.message if step else 'nothing ran'}"
        )
