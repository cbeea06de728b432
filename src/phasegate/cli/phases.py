"""Commands that change the database: advance, the phase commands, rollback, worker, demo."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from phasegate import backfill, db
from phasegate.cli.app import (
    Context,
    actor,
    check_reason,
    cli,
    emit,
    handle_errors,
    live_version_option,
    log,
    parse_wait,
    stop_on_signals,
    wait_option,
)
from phasegate.config import ProjectConfig
from phasegate.errors import EXIT_OK, EXIT_REFUSED, UsageError
from phasegate.lockguard import LockPolicy
from phasegate.orchestrator import START, Options, Orchestrator, Outcome
from phasegate.pacing import BackfillSettings
from phasegate.plan import PHASES, load_plan
from phasegate.progress import BarProgress, LogProgress, counted

# -- mutating commands ----------------------------------------------------------------------


def gated_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--override-gate",
            metavar="REASON",
            callback=check_reason,
            help="Proceed even if the version gate refuses; the reason, you and the versions "
            "seen go to the event log.",
        ),
        lock_options,
        live_version_option,
        wait_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def lock_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What every command that runs DDL takes: lock limits, the actor, --yes."""
    options = [
        click.option(
            "--lock-timeout",
            metavar="DURATION",
            callback=_check_duration,
            help="lock_timeout of every statement phasegate runs, e.g. 500ms, 2s, 1min "
            "(default: lock_timeout in phasegate.toml, else 2s).",
        ),
        click.option(
            "--lock-retries",
            type=click.IntRange(min=0),
            help="Retries of a revision (or concurrent statement) that timed out waiting for "
            "a lock, with backoff (default 8).",
        ),
        click.option(
            "--lock-retry-time",
            metavar="DURATION",
            callback=parse_wait,
            help="Time budget of those retries, e.g. 2m (the default).",
        ),
        click.option("--actor", help="Who is acting, for the event log (default user@host)."),
        click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def unsafe_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--allow-unsafe",
        metavar="REASON",
        callback=check_reason,
        help="Run although `phasegate lint` finds errors in the plan; the reason and the "
        "findings go to the event log.",
    )(fn)


def restart_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--restart-job",
        "restart_jobs",
        multiple=True,
        metavar="JOB",
        help="Re-walk JOB from its first key with the plan file's expressions (repeatable). "
        "The jobs as the backfill phase started them bind every later run of it; after "
        "editing one, this (or a rollback of backfill) is how to run the new version: "
        "every row the old one wrote is rewritten.",
    )(fn)


def _check_duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A PostgreSQL duration, checked before anything connects."""
    if value is None:
        return None
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(us|ms|s|min|h|d)?\s*", value):
        raise click.BadParameter(f"{value!r} is not a duration; write e.g. 500ms, 2s or 1min")
    return value.strip()


def backfill_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How batched jobs walk (the backfill, and the refill of a contract rollback)."""
    defaults = BackfillSettings()
    options = [
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            help="Fixed rows per batch; turns the adaptive sizing off.",
        ),
        click.option(
            "--target-batch-ms",
            type=click.FloatRange(min=1),
            default=defaults.target_ms,
            show_default=True,
            help="Adaptive sizing aims each batch statement at this duration.",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Parallel workers (connections) walking slices of each job.",
        ),
        click.option(
            "--slices",
            type=click.IntRange(min=1),
            help="Key ranges per job (default: 1 for one worker, 4 per worker otherwise); "
            "more slices let `phasegate worker` processes elsewhere help.",
        ),
        click.option(
            "--pause",
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help="Seconds to sleep between batches (0: none).",
        ),
        click.option(
            "--pause-ratio",
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help="Sleep this multiple of the last batch's time between batches (0: none).",
        ),
        click.option(
            "--max-replica-lag",
            type=click.FloatRange(min=0),
            default=defaults.max_replica_lag,
            show_default=True,
            help="Back off while a replica's replay lag exceeds this many seconds (0: off).",
        ),
        click.option(
            "--batch-lock-timeout",
            metavar="DURATION",
            default=defaults.lock_timeout,
            show_default=True,
            callback=_check_duration,
            help="lock_timeout of each batch; a batch that waits longer is retried smaller.",
        ),
        click.option(
            "--batch-statement-timeout",
            metavar="DURATION",
            default=defaults.statement_timeout,
            show_default=True,
            callback=_check_duration,
            help="statement_timeout of each batch.",
        ),
        click.option(
            "--retries",
            type=click.IntRange(min=0),
            default=defaults.retries,
            show_default=True,
            help="Retries of one batch after a lock/statement timeout, deadlock or "
            "serialization failure; of an `sql` job after a deadlock or serialization failure.",
        ),
    ]
    # decorators apply bottom-up to a function, but append in order to a built Command
    for option in options if isinstance(fn, click.Command) else reversed(options):
        fn = option(fn)
    return fn


def _settings(kw: dict[str, Any]) -> BackfillSettings:
    """Pop the backfill options out of a command's keyword arguments."""
    lag = kw.pop("max_replica_lag")
    return BackfillSettings(
        batch_size=kw.pop("batch_size"),
        target_ms=kw.pop("target_batch_ms"),
        workers=kw.pop("workers"),
        slices=kw.pop("slices"),
        pause=kw.pop("pause"),
        pause_ratio=kw.pop("pause_ratio"),
        max_replica_lag=lag or None,
        lock_timeout=kw.pop("batch_lock_timeout"),
        statement_timeout=kw.pop("batch_statement_timeout"),
        retries=kw.pop("retries"),
    )


@dataclass
class GatedArgs:
    live_versions: tuple[str, ...]
    override_gate: str | None
    lock_timeout: str | None
    lock_retries: int | None
    lock_retry_time: float
    actor: str | None
    yes: bool
    wait: float
    allow_unsafe: str | None = None
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    restart_jobs: tuple[str, ...] = ()


@contextmanager
def orchestrating(
    ctx: Context, plan_path: str, what: str, args: GatedArgs, allow_data_loss: bool = False
) -> Iterator[Orchestrator]:
    """Load and resolve the plan, confirm, connect, take the lock, build the orchestrator."""
    project, plan = ctx.project(), load_plan(plan_path)
    project.resolve(plan)  # an invalid plan stops here, before any connection
    url = ctx.url(project)
    _confirm(args.yes, f"{what} plan {plan.name} on {db.mask_url(url)}")
    options = Options(
        actor=args.actor or actor(),
        live_versions=args.live_versions,
        override_gate=args.override_gate,
        allow_data_loss=allow_data_loss,
        backfill=args.backfill,
        wait=args.wait,
        config=ctx.settings(),
        allow_unsafe=args.allow_unsafe,
        restart_jobs=args.restart_jobs,
    )
    progress = BarProgress() if sys.stderr.isatty() and not ctx.as_json else LogProgress(sys.stderr)
    with (
        db.locked_session(
            url, f"{what} {Path(plan_path).name}", _lock_policy(args, options.config)
        ) as conn,
        stop_on_signals(args.backfill),
    ):
        yield Orchestrator(conn, project, plan, options, progress, notify=log)


def _lock_policy(args: GatedArgs, settings: ProjectConfig) -> LockPolicy:
    """Command line > phasegate.toml > built-in defaults."""
    defaults = LockPolicy()
    retries = args.lock_retries if args.lock_retries is not None else settings.lock_retries
    return LockPolicy(
        lock_timeout=args.lock_timeout or settings.lock_timeout or defaults.lock_timeout,
        concurrent_lock_timeout=settings.concurrent_lock_timeout
        or defaults.concurrent_lock_timeout,
        ddl_statement_timeout=settings.ddl_statement_timeout or defaults.ddl_statement_timeout,
        statement_timeout=settings.statement_timeout or defaults.statement_timeout,
        retries=retries if retries is not None else defaults.retries,
        retry_time=args.lock_retry_time or settings.lock_retry_time or defaults.retry_time,
        notify=log,
        stop=args.backfill.stop,
    )


def _confirm(yes: bool, action: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to {action} without confirmation: pass --yes")
    if not click.confirm(f"{action[0].upper()}{action[1:]}?", default=False, err=True):
        raise UsageError("cancelled")


def _finish(ctx: Context, outcome: Outcome) -> int:
    lines = [f"{s.phase} ({s.direction}): {s.result} — {s.message}" for s in outcome.steps]
    status = outcome.status
    lines.append(
        f"plan {outcome.plan}: phase {status['phase'] or 'not started'}, "
        f"next {status['next'] or '-'}, state {status['state']}"
    )
    emit(ctx, {"ok": not outcome.refused, **outcome.to_dict()}, "\n".join(lines))
    return EXIT_REFUSED if outcome.refused else EXIT_OK


@cli.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(PHASES), help="Stop after this phase.")
@unsafe_option
@restart_option
@gated_options
@backfill_options
@click.pass_obj
@handle_errors
def advance(ctx: Context, plan_path: str, to: str | None, **kw: Any) -> int:
    """Run the next phase(s) of PLAN, each behind its gate, up to --to (default: all).

    Stops at the first refused gate (exit 1), leaving the phases before it done.
    Re-running is safe: finished phases are skipped, a failed one resumes.
    """
    settings = _settings(kw)
    with orchestrating(ctx, plan_path, "advance", GatedArgs(**kw, backfill=settings)) as orch:
        return _finish(ctx, orch.advance(to=to))


def _phase_command(phase: str, summary: str) -> None:
    details = (
        f"Runs exactly the {phase} phase of PLAN, which must be the next one; "
        "a no-op if it is already done."
    )

    @cli.command(name=phase, help=f"{summary}\n\n{details}")
    @click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
    @unsafe_option
    @gated_options
    @click.pass_obj
    @handle_errors
    def command(ctx: Context, plan_path: str, **kw: Any) -> int:
        settings = _settings(kw) if phase == "backfill" else BackfillSettings()
        args = GatedArgs(**kw, backfill=settings)
        with orchestrating(ctx, plan_path, phase, args) as orchestrator:
            return _finish(ctx, orchestrator.advance(only=phase))

    if phase == "backfill":
        backfill_options(command)
        restart_option(command)


_phase_command("expand", "Apply the expand revisions: additive schema only.")
_phase_command("backfill", "Install the sync triggers and run the backfill jobs, verified.")
_phase_command("switch", "Apply the switch revisions: validate and tighten constraints.")
_phase_command("contract", "Drop the sync triggers and apply the contract revisions.")


@cli.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option(
    "--to",
    "to",
    type=click.Choice([*PHASES, START]),
    help="Roll back until this phase is the last one done ('start': undo every phase). "
    "Default: undo only the newest phase.",
)
@click.option(
    "--allow-data-loss",
    is_flag=True,
    help="Roll back contract even when no sync.down can rebuild what it dropped.",
)
@gated_options
@backfill_options
@click.pass_obj
@handle_errors
def rollback(ctx: Context, plan_path: str, to: str | None, allow_data_loss: bool, **kw: Any):
    """Undo the newest phase of PLAN (or phases, newest first, down to --to).

    Each step is gated on the compatible range of the state it returns to. Rolling back
    contract downgrades its revisions, re-installs the sync triggers and refills the old
    columns from the new ones with sync.down.
    """
    settings = _settings(kw)  # pops its options before the rest become GatedArgs
    args = GatedArgs(**kw, backfill=settings)
    with orchestrating(ctx, plan_path, "rollback", args, allow_data_loss) as orch:
        return _finish(ctx, orch.rollback(to=to))


@cli.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option(
    "--wait",
    metavar="DURATION",
    default="60s",
    show_default=True,
    callback=parse_wait,
    help="How long to wait for a job of PLAN to be running before giving up (e.g. 30s, 5m; "
    "a bare number is seconds).",
)
@backfill_options
@click.pass_obj
@handle_errors
def worker(ctx: Context, plan_path: str, wait: float, **kw: Any) -> int:
    """Help a running backfill of PLAN from another process or machine.

    Claims unfinished slices of PLAN's running batched jobs (FOR UPDATE SKIP LOCKED) and
    walks them until none is left. Takes no orchestrator lock and runs no gate: the
    `phasegate backfill` (or `advance`) that started the job owns it and verifies it.
    Start that one with --slices (or --workers) above 1 so there is work to share.
    """
    settings = _settings(kw)
    project, plan = ctx.project(), load_plan(plan_path)
    project.resolve(plan)
    progress = LogProgress(sys.stderr)
    # the handlers first: a SIGTERM while the session connects stops it as cleanly as later
    with (
        stop_on_signals(settings),
        db.session(ctx.url(project), f"phasegate worker {plan.name}") as conn,
    ):
        conn.set_timeouts(settings.lock_timeout, settings.statement_timeout)
        results = backfill.assist(conn, plan, settings, progress, log, wait)
    lines = [
        f"job {r.name}: helped, {counted(r.walked, 'row')} walked, {r.rows:,} written, in "
        f"{counted(r.batches, 'batch', 'batches')}"
        for r in results
    ] or [f"no running job of {plan.name} needed help within {wait:g}s"]
    document = {"ok": True, "plan": plan.name, "jobs": [r.to_dict() for r in results]}
    emit(ctx, document, "\n".join(lines))
    return EXIT_OK


@cli.command()
@click.option("--rows", default=20000, show_default=True, help="Bugs to seed.")
@click.option("--keep", is_flag=True, help="Keep the demo database (prints its URL).")
@click.pass_obj
@handle_errors
def demo(ctx: Context, rows: int, keep: bool) -> int:
    """Run the seed story end to end on a throwaway PostgreSQL.

    Starts an embedded PostgreSQL unless a database URL is configured (then a fresh
    database is created on that server), seeds the bug tracker, connects simulated v1
    and v2 app instances, and walks the plan through all four phases with real gates.
    """
    from phasegate.demo import run_demo  # the demo pulls in the example app

    report = run_demo(ctx.database_url, rows=rows, keep=keep, as_json=ctx.as_json)
    emit(ctx, report.to_dict(), "")
    return EXIT_OK
