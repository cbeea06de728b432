"""The command line: parsing, confirmation, rendering text or JSON, exit codes.

Exit codes (stable for pipelines): 0 done/pass · 1 refused · 2 usage or invalid plan ·
3 database or runtime failure · 4 busy. With `--json`, stdout carries exactly one JSON
document for every command, success or not; logs and progress go to stderr.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import json
import os
import re
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
from psycopg import Error as PsycopgError

from phasegate import __version__, backfill, db, gates, ledger, lint, sources
from phasegate.config import ProjectConfig, load_config
from phasegate.durations import format_duration, parse_duration
from phasegate.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    PhasegateError,
    UsageError,
)
from phasegate.lockguard import LockPolicy
from phasegate.orchestrator import START, Options, Orchestrator, Outcome
from phasegate.pacing import BackfillSettings
from phasegate.plan import PHASES, REVISION_PHASES, Plan, PlanError, load_plan
from phasegate.plan_lint import lint_plan
from phasegate.preview import PreviewOptions, preview
from phasegate.progress import BarProgress, LogProgress
from phasegate.revisions import AlembicProject


@dataclass
class Context:
    database_url: str | None
    config_path: str
    as_json: bool
    resolved_url: str | None = None  # whichever URL was used, so errors can scrub it

    def project(self) -> AlembicProject:
        return AlembicProject(self.config_path)

    def url(self, project: AlembicProject | None = None) -> str:
        ini_url = project.ini_url if project else None
        self.resolved_url = db.resolve_url(self.database_url, ini_url)
        return self.resolved_url

    def scrub(self, text: str) -> str:
        return db.scrub(db.scrub(text, self.resolved_url), self.database_url)

    def settings(self) -> ProjectConfig:
        """phasegate.toml or [tool.phasegate] next to the Alembic config."""
        return load_config(Path(self.config_path).resolve().parent)

    def plan_paths(self) -> list[str]:
        """Every plan in the project's plans directory."""
        return sorted(str(p) for p in self.settings().plans_dir.glob("*.y*ml"))


def emit(ctx: Context, document: dict[str, Any], text: str) -> None:
    """Print the JSON document on stdout, or the human text."""
    if ctx.as_json:
        click.echo(json.dumps(document, indent=2, default=_json_default))
    elif text:
        click.echo(text)


def log(message: str) -> None:
    click.echo(message, err=True)


def handle_errors(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn our exceptions (and database errors) into a message and the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx: Context = click.get_current_context().find_object(Context)  # type: ignore[assignment]
        try:
            code = fn(*args, **kwargs) or EXIT_OK
        except PhasegateError as exc:
            message = ctx.scrub(exc.message)
            details = json.loads(ctx.scrub(json.dumps(exc.to_dict(), default=str)))
            _report_error(ctx, exc.exit_code, {**details, "message": message})
            code = exc.exit_code
        except KeyboardInterrupt:
            message = (
                "aborted by a second signal; what was committed stays, and the ledger records "
                "where to resume: run the same command again"
            )
            _report_error(ctx, EXIT_FAILURE, {"kind": "interrupted", "message": message})
            code = EXIT_FAILURE
        except (sa.exc.SQLAlchemyError, PsycopgError) as exc:
            original = getattr(exc, "orig", None) or exc
            message = ctx.scrub(str(original).strip())
            if db.connection_lost(exc):
                message = (
                    f"lost the connection to the database ({message}): the server restarted, "
                    "failed over, or ended this session. Everything committed is kept and the "
                    "ledger records where to resume: run the same command again"
                )
            _report_error(ctx, EXIT_FAILURE, {"kind": "database", "message": message})
            code = EXIT_FAILURE
        except Exception as exc:  # a bug of ours: still exit 3, never a bare traceback
            if os.environ.get("PHASEGATE_DEBUG"):
                traceback.print_exc()
            message = ctx.scrub(f"internal error: {type(exc).__name__}: {exc}")
            _report_error(ctx, EXIT_FAILURE, {"kind": "internal", "message": message})
            code = EXIT_FAILURE
        sys.exit(code)

    return wrapper


def _report_error(ctx: Context, code: int, error: dict[str, Any]) -> None:
    if ctx.as_json:
        click.echo(json.dumps({"ok": False, "exit_code": code, "error": error}, indent=2))
    prefix = {1: "refused", 2: "error", 3: "failed", 4: "busy"}.get(code, "error")
    log(f"phasegate: {prefix}: {error['message']}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--database-url",
    metavar="URL",
    help="Target database. Default: $PHASEGATE_DATABASE_URL, then $DATABASE_URL, then "
    "sqlalchemy.url in alembic.ini. postgresql:// URLs use psycopg 3.",
)
@click.option(
    "--config",
    "config_path",
    default="alembic.ini",
    show_default=True,
    metavar="INI",
    help="The Alembic config of the project whose revisions the plans tag.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.version_option(__version__, prog_name="phasegate")
@click.pass_context
def cli(click_ctx: click.Context, database_url: str | None, config_path: str, as_json: bool):
    """phasegate: zero-downtime, multi-stage schema migrations for PostgreSQL apps on
    SQLAlchemy and Alembic, gated on the app code versions that are running right now.

    A plan (YAML) splits one schema change into expand → backfill → switch → contract.
    Each phase runs only when every live app version works with the schema it leaves.

    Exit codes: 0 done/pass, 1 refused (gate, drift), 2 usage or invalid plan,
    3 database or runtime failure, 4 busy (another phasegate holds the lock).
    """
    click_ctx.obj = Context(database_url, config_path, as_json)


def main() -> None:
    """Entry point; click's own usage errors also honour --json and exit 2."""
    try:
        code = cli.main(prog_name="phasegate", standalone_mode=False)
    except click.ClickException as exc:
        if "--json" in sys.argv[1:]:
            error = {"kind": "usage", "message": exc.format_message()}
            click.echo(json.dumps({"ok": False, "exit_code": exc.exit_code, "error": error}))
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        log("phasegate: aborted")
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


# -- validate -------------------------------------------------------------------------------


@cli.command()
@click.argument("plans", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.pass_obj
@handle_errors
def validate(ctx: Context, plans: tuple[str, ...]) -> int:
    """Check PLAN files and their revision tags. Needs no database.

    Reports every problem with its file, line and key, and how to fix it.
    """
    project = ctx.project()
    results, lines, ok = [], [], True
    for path in plans:
        try:
            plan = load_plan(path)
            resolved = project.resolve(plan)
        except PlanError as exc:
            ok = False
            results.append({"source": path, "valid": False, "issues": exc.details["issues"]})
            lines.append(f"invalid: {path}\n" + "\n".join(f"  {i}" for i in exc.issues))
            continue
        phases = {}
        summary = []
        for name in plan.phase_names():
            if name == "backfill":
                jobs = [j.name for j in plan.jobs()]
                phases[name] = {"compatible": plan.phase(name).compatible, "jobs": jobs}
                summary.append(f"backfill: {len(jobs)} job(s) ({', '.join(jobs)})")
            else:
                revs = resolved.of(name)
                phases[name] = {"compatible": plan.phase(name).compatible, "revisions": revs}
                summary.append(f"{name}: {len(revs)} revision(s) ({', '.join(revs) or 'none'})")
        notes = [
            f"{name} also applies {info.revision} of plan {info.plan!r} ({info.phase})"
            for name, infos in resolved.foreign.items()
            for info in infos
        ]
        results.append(
            {"source": path, "valid": True, "plan": plan.name, "phases": phases, "notes": notes}
        )
        lines.append(
            f"ok: {path} — plan {plan.name} (app {plan.app})\n"
            + "\n".join(f"  {s}" for s in summary + [f"note: {n}" for n in notes])
        )
    emit(ctx, {"ok": ok, "valid": ok, "plans": results}, "\n".join(lines))
    if not ok:
        log("phasegate: error: invalid plan(s); fix the lines named above")
    return EXIT_OK if ok else 2


# -- lint -----------------------------------------------------------------------------------


@cli.command("lint")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False), required=False)
@click.option("--phase", type=click.Choice(REVISION_PHASES), help="Only this phase's revisions.")
@click.option("--rules", "list_rules", is_flag=True, help="List the rules and exit.")
@click.pass_obj
@handle_errors
def lint_command(ctx: Context, plan_path: str | None, phase: str | None, list_rules: bool) -> int:
    """Check the SQL of PLAN's revisions against the safety rules of their phase.

    Renders each revision offline (Alembic --sql; no database), parses it with
    PostgreSQL's own parser, and reports each unsafe statement with the lock it takes,
    the table, and the safe rewrite. expand is additive only; switch may validate and
    tighten; contract may drop. A revision waives a rule with a module constant
    `phasegate_allow = {"rule-id": "why"}`. Exit 1 on any error that is not waived.
    """
    if list_rules:
        rules = list(lint.RULES.values())
        text = "\n".join(f"{r.id} ({r.severity}): {r.title}\n    safe: {r.fix}" for r in rules)
        emit(ctx, {"ok": True, "rules": [r.__dict__ for r in rules]}, text)
        return EXIT_OK
    if plan_path is None:
        raise UsageError("name a PLAN to lint (or pass --rules to list the rules)")
    project, plan = ctx.project(), load_plan(plan_path)
    resolved = project.resolve(plan)
    findings = lint_plan(project, resolved, [phase] if phase else None)
    errors = sum(1 for f in findings if f.blocking)
    waived = sum(1 for f in findings if f.waived)
    warnings = sum(1 for f in findings if f.severity == lint.WARNING and not f.waived)
    summary = (
        f"lint {plan.name}{' (' + phase + ')' if phase else ''}: {errors} error(s), "
        f"{warnings} warning(s), {waived} waived"
    )
    text = "\n".join([*(f.describe() for f in findings), summary])
    document = {
        "ok": errors == 0,
        "plan": plan.name,
        "phase": phase,
        "errors": errors,
        "warnings": warnings,
        "waived": waived,
        "findings": [f.to_dict() for f in findings],
    }
    emit(ctx, document, text)
    return EXIT_OK if errors == 0 else EXIT_REFUSED


# -- status and gate ------------------------------------------------------------------------


@cli.command()
@click.argument("plans", nargs=-1, type=click.Path(dir_okay=False))
@click.pass_obj
@handle_errors
def status(ctx: Context, plans: tuple[str, ...]) -> int:
    """Show each plan's phase, next phase, state, job progress and drift.

    With no PLAN, shows every plan in plans/ next to alembic.ini. With one PLAN, --json
    prints that plan's object; otherwise {"plans": [...]}.
    """
    project = ctx.project()
    paths = list(plans) or ctx.plan_paths()
    if not paths:
        raise UsageError("no plans given and none found in plans/; pass PLAN files")
    loaded = [load_plan(p) for p in paths]
    url = ctx.url(project)
    with db.session(url, "phasegate status") as conn:
        statuses = [
            Orchestrator(conn, project, plan, Options(actor=_actor())).status() for plan in loaded
        ]
        with conn.tx():
            known = {s.plan for s in ledger.all_states(conn)}
    others = sorted(known - {p.name for p in loaded}) if not plans else []
    text = "\n\n".join(_status_text(s) for s in statuses)
    if others:
        text += f"\n\nother plans in the ledger: {', '.join(others)}"
    document = statuses[0] if len(plans) == 1 else {"plans": statuses, "other_plans": others}
    emit(ctx, document, text)
    return EXIT_OK


def _status_text(s: dict[str, Any]) -> str:
    lines = [
        f"plan {s['plan']} ({s['source']}, app {s['app']})",
        f"  phase: {s['phase'] or 'not started'}   next: {s['next'] or '-'}   state: {s['state']}",
    ]
    if s["active_phase"]:
        lines.append(f"  {s['direction']} of {s['active_phase']} {s['state']}: {s['error'] or ''}")
    lines.append(f"  alembic heads: {', '.join(s['heads']) or '(none)'}")
    for phase in s["phases"]:
        mark = "x" if phase["done"] else " "
        revs = f" revisions {', '.join(phase['revisions'])}" if phase["revisions"] else ""
        lines.append(f"  [{mark}] {phase['name']:<8} compatible {phase['compatible']!r}{revs}")
    for job in s["jobs"]:
        line = (
            f"  job {job['name']}: {job['status']}, {job['rows_done']:,} rows updated, "
            f"{job['walked']:,} walked, {job['batches']:,} batches"
        )
        if job["rows_per_second"]:
            line += f", {job['rows_per_second']:,} rows/s"
        if job["eta_seconds"] is not None:
            line += f", ETA {dt.timedelta(seconds=job['eta_seconds'])}"
        lines.append(line)
    if s["plan_changed"]:
        lines.append("  note: the plan file changed since the last phase ran")
    for problem in s["drift_details"]:
        lines.append(f"  DRIFT: {problem}")
    return "\n".join(lines)


def live_version_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--live-version",
        "live_versions",
        multiple=True,
        metavar="V",
        help="A version of the app that is running now (repeatable); added to the versions "
        "seen in pg_stat_activity, heartbeats and the configured versions command.",
    )(fn)


def _parse_wait(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def wait_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--wait",
        metavar="DURATION",
        callback=_parse_wait,
        help="Poll a refused gate until it passes or DURATION (e.g. 90s, 10m) is up, "
        "printing what it waits for; then exit 1. Not with --override-gate, which "
        "proceeds at once.",
    )(fn)


def _check_reason(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        flag = param.opts[0] if param.opts else "the option"
        raise click.BadParameter(
            f'{flag} needs a reason for the event log, e.g. {flag} "v1 drained by hand, '
            'ticket OPS-42"'
        )
    return value.strip() if value is not None else None


@cli.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--phase", type=click.Choice(PHASES), help="Phase to enter (default: the next).")
@live_version_option
@wait_option
@click.pass_obj
@handle_errors
def gate(
    ctx: Context,
    plan_path: str,
    phase: str | None,
    live_versions: tuple[str, ...],
    wait: float,
) -> int:
    """Evaluate the gate for entering a phase. Exit 0 pass, 1 refused.

    Moves no schema; the decision and the versions seen go to the event log. With
    --wait, looks again every few seconds until the gate passes or the time is up,
    saying what it still waits for: the step a pipeline runs after rolling out new code
    and before contract.
    """
    project, plan = ctx.project(), load_plan(plan_path)
    options = Options(_actor(), live_versions, wait=wait, config=ctx.settings())
    settings = options.backfill
    with db.session(ctx.url(project), "phasegate gate") as conn, stop_on_signals(settings):
        orchestrator = Orchestrator(conn, project, plan, options, notify=log)
        view, decision = orchestrator.gate(phase)
    document = {**decision.to_dict(), "plan": plan.name, "phase": view.phase, "next": view.next}
    note = "" if view.phase == view.next else f"\nnote: the next phase is {view.next or 'none'}"
    emit(ctx, document, decision.message() + note)
    return EXIT_OK if decision.passed else EXIT_REFUSED


# -- preview --------------------------------------------------------------------------------


@cli.command("preview")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--phase", type=click.Choice(PHASES), help="Only this phase (default: all pending).")
@click.option(
    "--exact", is_flag=True, help="Count each backfill table's rows instead of estimating."
)
@click.option(
    "--offline",
    is_flag=True,
    help="Use no database: SQL, locks and lint only (also when no database is configured).",
)
@click.option(
    "--no-sample",
    "no_sample",
    is_flag=True,
    help="Do not time a sample batch (it runs one real batch and rolls it back).",
)
@live_version_option
@click.pass_obj
@handle_errors
def preview_command(
    ctx: Context,
    plan_path: str,
    phase: str | None,
    exact: bool,
    offline: bool,
    no_sample: bool,
    live_versions: tuple[str, ...],
) -> int:
    """Dry run of PLAN: what each pending phase would do, for review before a deploy.

    Per phase: the gate verdict now (with the live versions), each revision's SQL with the
    lock each statement takes and on which table, the lint findings, the sync triggers
    the backfill installs, and each backfill job's rows (pg_class.reltuples, or --exact),
    batches and duration (timed on one sample batch that is rolled back). Changes
    nothing: not the schema, not a row, not even the ledger.
    """
    project, plan = ctx.project(), load_plan(plan_path)
    resolved = project.resolve(plan)
    options = PreviewOptions(phase, exact, not no_sample, live_versions, ctx.settings())
    url = None
    if not offline:
        try:
            url = ctx.url(project)
        except UsageError:
            log("phasegate: no database configured: previewing SQL, locks and lint only")
    if url is None:
        document = preview(project, plan, resolved, None, options)
    else:
        with db.session(url, "phasegate preview") as conn:
            document = preview(project, plan, resolved, conn, options)
    emit(ctx, {"ok": True, **document}, _preview_text(document))
    return EXIT_OK


def _preview_text(doc: dict[str, Any]) -> str:
    state = doc["state"]
    where = (
        "offline (no database)"
        if doc["offline"]
        else (f"at {state['phase'] or 'the start'} ({state['state']})")
    )
    counts = doc["lint"]
    lines = [
        f"# preview of plan {doc['plan']} (app {doc['app']}), {where}",
        f"lint: {counts['errors']} error(s), {counts['warnings']} warning(s), "
        f"{counts['waived']} waived",
    ]
    if doc["render_error"]:
        lines.append(f"could not render the revisions offline: {doc['render_error']}")
    if not doc["phases"]:
        lines.append("nothing pending: the plan is complete")
    for phase in doc["phases"]:
        lines += ["", f"## {phase['phase']} (compatible {phase['compatible']})"]
        if phase["gate"] is not None:
            lines.append(phase["gate"]["message"])
        for revision in phase.get("revisions", []):
            lines.append(f"### revision {revision['revision']}: {revision['doc']}")
            for statement in revision["statements"]:
                locks = ", ".join(f"{k['mode']} on {k['table']}" for k in statement["locks"])
                tx = "autocommit" if statement["transaction"] is None else "in transaction"
                lines.append(f"  - [{locks or 'no table lock'}; {tx}]")
                lines += [f"      {line}" for line in statement["sql"].splitlines()[:12]]
            for finding in revision["lint"]:
                waived = f" (waived: {finding['waived']})" if finding["waived"] else ""
                lines.append(
                    f"  ! {finding['severity']} {finding['rule']}{waived}: {finding['message']}"
                )
                lines.append(f"    safe: {finding['fix']}")
        for trigger in phase.get("sync_triggers", []):
            lines.append(f"### sync trigger of job {trigger['job']} on {trigger['table']}")
            lines += [f"      {line}" for s in trigger["sql"] for line in s.splitlines()]
        if phase.get("jobs"):
            lines.append("### backfill jobs")
            lines.append(
                f"  {'job':<24} {'rows':>12} {'batches':>8} {'batch':>7} {'time':>10}  from"
            )
            for job in phase["jobs"]:
                if job["kind"] == "sql":
                    lines.append(f"  {job['name']:<24} {'one statement':>12}")
                    continue
                rows = job.get("estimated_rows")
                seconds = job.get("seconds")
                lines.append(
                    f"  {job['name']:<24} {rows if rows is not None else '?':>12} "
                    f"{job.get('batches', '?'):>8} {job.get('batch_size', '?'):>7} "
                    f"{(format_duration(seconds) if seconds is not None else '?'):>10}  "
                    f"{job.get('rows_from', 'no database')}"
                )
                if "sample" in job and "error" in job["sample"]:
                    lines.append(f"      not timed: {job['sample']['error']}")
    return "\n".join(lines)


# -- versions, heartbeats, check-deploy -----------------------------------------------------


@cli.command()
@click.option("--app", required=True, help="The app, as plans name it in `app:`.")
@click.option("--version", "version", metavar="V", help="Its code version (required to report).")
@click.option(
    "--instance",
    metavar="NAME",
    help="Which instance is reporting (default: this host's name); a row per instance and version.",
)
@click.option(
    "--remove",
    is_flag=True,
    help="Delete the instance's heartbeats (of --version only, when given): it has stopped.",
)
@click.pass_obj
@handle_errors
def heartbeat(
    ctx: Context, app: str, version: str | None, instance: str | None, remove: bool
) -> int:
    """Record that an instance of APP runs version V, now.

    For apps that cannot name their connections: run it at start-up and then more often
    than the heartbeat TTL (default 5 min, `heartbeat_ttl` in phasegate.toml), e.g. from
    cron or a sidecar; gates ignore heartbeats older than the TTL. With --remove, the
    row goes at once (on a clean shutdown). Python apps can use
    phasegate.appversion.report_version instead.
    """
    if version is None and not remove:
        raise UsageError("pass --version V (the version this instance runs), or --remove")
    instance = instance or socket.gethostname()
    with db.session(ctx.url(ctx.project()), "phasegate heartbeat") as conn:
        with conn.tx():
            ready = conn.scalar("SELECT to_regclass('phasegate.heartbeat') IS NOT NULL")
        if not ready:  # an app's role may write heartbeats without owning the ledger
            ledger.ensure_schema(conn)
        with conn.tx():
            if remove:
                found = ledger.forget_heartbeat(conn, app, instance, version)
            else:
                ledger.beat(conn, app, instance, version or "")
    ttl = format_duration(ctx.settings().heartbeat_ttl)
    if remove:
        text = f"heartbeats of {app} instance {instance}: {found} removed"
    else:
        text = f"heartbeat: {app} {version} on instance {instance}; counts for {ttl} unless renewed"
        if gates.parse_version(version) is None:
            log(
                f"phasegate: warning: {version!r} is not a PEP 440 version; "
                "every gate of this app will refuse while this heartbeat is fresh"
            )
    document = {"ok": True, "app": app, "version": version, "instance": instance}
    emit(ctx, {**document, "removed": remove}, text)
    return EXIT_OK


@cli.command()
@click.option(
    "--app", help="Only this app (default: every app of the plans, heartbeats and connections)."
)
@live_version_option
@click.pass_obj
@handle_errors
def versions(ctx: Context, app: str | None, live_versions: tuple[str, ...]) -> int:
    """List every live app version, per source, with instance and when it was last seen.

    Sources: connections named '<app>/<version>' (pattern: `application_name` in
    phasegate.toml), fresh heartbeats, the configured `versions_command`, and --live-version.
    Changes nothing. Exit 3 when a source failed (the list is then incomplete).
    """
    settings = ctx.settings()
    with db.session(ctx.url(ctx.project()), "phasegate versions") as conn:
        apps = [app] if app else _known_apps(ctx, conn, settings)
        seen = {name: sources.observe(conn, name, live_versions, settings) for name in apps}
    failed = any(s.failures for s in seen.values())
    document = {
        "ok": not failed,
        "apps": [
            {
                "app": name,
                "versions": sorted({o.version for o in sighting.observations}),
                "observed": [o.to_dict() for o in sighting.observations],
                "failures": [f.to_dict() for f in sighting.failures],
            }
            for name, sighting in seen.items()
        ],
    }
    emit(ctx, document, _versions_text(seen) or "no app known: name one with --app")
    return EXIT_FAILURE if failed else EXIT_OK


def _known_apps(ctx: Context, conn: db.Session, settings: ProjectConfig) -> list[str]:
    names = {load_plan(path).app for path in ctx.plan_paths()}
    with conn.tx():
        names |= {b.app for b in ledger.heartbeats(conn, None, settings.heartbeat_ttl)}
        names |= set(sources.apps_connected(conn, settings.application_name))
    return sorted(names)


def _versions_text(seen: dict[str, sources.Sighting]) -> str:
    blocks = []
    for name, sighting in seen.items():
        live = ", ".join(sorted({o.version for o in sighting.observations}))
        lines = [f"{name}: {live or 'nothing live'}"]
        for o in sighting.observations:
            where = f"  instance {o.instance}" if o.instance else ""
            lines.append(f"  {o.version:<12} {o.source:<18} {o.detail}{'' if o.detail else where}")
        lines += [f"  FAILED {f.source}: {f.message}" for f in sighting.failures]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


@cli.command("check-deploy")
@click.option("--app-version", "version", required=True, metavar="V", help="The version to deploy.")
@click.option("--app", help="The app (default: the one app of the plans).")
@click.argument("plans", nargs=-1, type=click.Path(dir_okay=False))
@click.pass_obj
@handle_errors
def check_deploy(ctx: Context, version: str, app: str | None, plans: tuple[str, ...]) -> int:
    """May app version V be deployed now? Exit 0 yes, 1 no.

    V must be inside the `compatible` range of the current state of every plan of the
    app (every plan in plans/ when none is named); while a phase is running or failed
    half-way, inside the ranges of both ends. Reads the ledger, changes nothing.
    """
    parsed = gates.parse_version(version)
    if parsed is None:
        raise UsageError(f"--app-version {version!r} is not a PEP 440 version, e.g. 2.0.1")
    paths = list(plans) or ctx.plan_paths()
    if not paths:
        raise UsageError("no plans given and none found in plans/; pass PLAN files")
    loaded = [load_plan(p) for p in paths]
    apps = sorted({p.app for p in loaded})
    if app is None and len(apps) > 1:
        raise UsageError(f"the plans belong to several apps ({', '.join(apps)}): pass --app")
    chosen = [p for p in loaded if app is None or p.app == app]
    if not chosen:
        raise UsageError(f"no plan of app {app!r} among {', '.join(paths)}")
    with db.session(ctx.url(ctx.project()), "phasegate check-deploy") as conn, conn.tx():
        checks = [gates.check_deploy(parsed, p, ledger.get_state(conn, p.name)) for p in chosen]
    allowed = all(c.allowed for c in checks)
    lines = [c.message(version) for c in checks]
    verdict = "yes" if allowed else "no"
    lines.append(f"check-deploy {chosen[0].app} {version}: {verdict}")
    document = {
        "ok": allowed,
        "allowed": allowed,
        "app": chosen[0].app,
        "version": version,
        "plans": [c.to_dict() for c in checks],
    }
    emit(ctx, document, "\n".join(lines))
    if not allowed and ctx.as_json:
        refusing = "; ".join(c.message(version) for c in checks if not c.allowed)
        log(f"phasegate: refused: {refusing}")
    return EXIT_OK if allowed else EXIT_REFUSED


# -- mutating commands ----------------------------------------------------------------------


def gated_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--override-gate",
            metavar="REASON",
            callback=_check_reason,
            help="Proceed even if the version gate refuses; the reason, you and the versions "
            "seen go to the event log.",
        ),
        click.option(
            "--lock-timeout",
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
            callback=_parse_wait,
            help="Time budget of those retries, e.g. 2m (the default).",
        ),
        click.option("--actor", help="Who is acting, for the event log (default user@host)."),
        click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
        live_version_option,
        wait_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def unsafe_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--allow-unsafe",
        metavar="REASON",
        callback=_check_reason,
        help="Run although `phasegate lint` finds errors in the plan; the reason and the "
        "findings go to the event log.",
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
            help="Seconds to sleep between batches.",
        ),
        click.option(
            "--pause-ratio",
            type=click.FloatRange(min=0),
            default=0.0,
            help="Sleep this multiple of the last batch's time between batches.",
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
            default=defaults.lock_timeout,
            show_default=True,
            callback=_check_duration,
            help="lock_timeout of each batch; a batch that waits longer is retried smaller.",
        ),
        click.option(
            "--batch-statement-timeout",
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
            help="Retries of one batch after a lock/statement timeout or deadlock.",
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


@contextmanager
def stop_on_signals(settings: BackfillSettings) -> Iterator[None]:
    """SIGINT/SIGTERM: finish the current batch, checkpoint, and stop; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if settings.stop.is_set():
            raise KeyboardInterrupt(f"second {name}")
        log(f"phasegate: {name}: finishing the current step, then stopping (again to abort)")
        settings.stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
        actor=args.actor or _actor(),
        live_versions=args.live_versions,
        override_gate=args.override_gate,
        allow_data_loss=allow_data_loss,
        backfill=args.backfill,
        wait=args.wait,
        config=ctx.settings(),
        allow_unsafe=args.allow_unsafe,
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
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for a job of PLAN to be running before giving up.",
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
    with (
        db.session(ctx.url(project), f"phasegate worker {plan.name}") as conn,
        stop_on_signals(settings),
    ):
        conn.set_timeouts(settings.lock_timeout, settings.statement_timeout)
        results = backfill.assist(conn, plan, settings, progress, log, wait)
    lines = [
        f"job {r.name}: helped with {r.walked:,} rows in {r.batches:,} batches" for r in results
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

    return run_demo(ctx.database_url, rows=rows, keep=keep, as_json=ctx.as_json)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Plan):
        return value.name
    return str(value)
