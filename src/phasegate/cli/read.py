"""Commands that only read: validate, lint, status, gate, preview."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from phasegate import db, ledger, lint
from phasegate.cli.app import (
    Context,
    actor,
    cli,
    emit,
    handle_errors,
    live_version_option,
    log,
    stop_on_signals,
    wait_option,
)
from phasegate.durations import format_duration
from phasegate.errors import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, UsageError
from phasegate.orchestrator import Options, Orchestrator
from phasegate.plan import PHASES, REVISION_PHASES, PlanError, load_plan
from phasegate.plan_lint import lint_plan
from phasegate.preview import PreviewOptions, preview
from phasegate.text import one_line

# the `error` of an exit-2 document that lists invalid plans (validate, status): the issues
# themselves are in the command's own fields
INVALID_PLANS = {
    "kind": PlanError.kind,
    "message": "invalid plan(s); fix the lines named above",
}

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
        unguarded = project.unguarded(plan, resolved)  # `alembic upgrade` would run them
        results.append(
            {
                "source": path,
                "valid": True,
                "plan": plan.name,
                "phases": phases,
                "notes": notes,
                "warnings": [issue.to_dict() for issue in unguarded],
            }
        )
        lines.append(
            f"ok: {path} — plan {plan.name} (app {plan.app})\n"
            + "\n".join(
                f"  {s}"
                for s in summary
                + [f"note: {n}" for n in notes]
                + [f"warning: {issue}" for issue in unguarded]
            )
        )
    document: dict[str, Any] = {"ok": ok, "valid": ok, "plans": results}
    if not ok:  # an exit 2 document carries `error`, as every error document does
        document["error"] = INVALID_PLANS
    emit(ctx, document, "\n".join(lines))
    if not ok:
        log(f"phasegate: error: {INVALID_PLANS['message']}")
    return EXIT_OK if ok else EXIT_USAGE


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

    With no PLAN, shows every plan in plans/ next to alembic.ini; an invalid one there is
    listed with its errors after the others (exit 2). With one PLAN, --json prints that
    plan's object; otherwise {"plans": [...]}.
    """
    project = ctx.project()
    paths = list(plans) or ctx.plan_paths()
    if not paths:
        raise UsageError("no plans given and none found in plans/; pass PLAN files")
    loaded, invalid = [], []  # invalid: PlanError, or UsageError from its status
    for path in paths:
        try:
            loaded.append(load_plan(path))
        except PlanError as exc:
            if plans:  # named on the command line: the error is the answer
                raise
            invalid.append(exc)
    url = ctx.url(project)
    statuses = []
    with db.session(url, "phasegate status") as conn:
        for plan in loaded:
            try:  # revisions resolve, and the phases the ledger recorded are in the file
                statuses.append(Orchestrator(conn, project, plan, Options(actor=actor())).status())
            except UsageError as exc:
                if plans:
                    raise
                exc.details.setdefault("issues", [{"file": plan.source, "message": exc.message}])
                invalid.append(exc)
        with conn.tx():
            known = {s.plan for s in ledger.all_states(conn)}
    others = sorted(known - {p.name for p in loaded}) if not plans else []
    text = "\n\n".join(_status_text(s) for s in statuses)
    if others:
        text += f"\n\nother plans in the ledger: {', '.join(others)}"
    if invalid:
        text += "\n\ninvalid plan files (fix them, see `phasegate validate`):\n" + "\n".join(
            exc.message for exc in invalid
        )
    document = statuses[0] if len(plans) == 1 else {"plans": statuses, "other_plans": others}
    if invalid:
        document["invalid_plans"] = [issue for exc in invalid for issue in exc.details["issues"]]
        document["error"] = INVALID_PLANS
    emit(ctx, document, text)
    return EXIT_USAGE if invalid else EXIT_OK


def _status_text(s: dict[str, Any]) -> str:
    lines = [
        f"plan {s['plan']} ({s['source']}, app {s['app']})",
        f"  phase: {s['phase'] or 'not started'}   next: {s['next'] or '-'}   state: {s['state']}"
        + (
            " (abandoned: no phasegate is running it; the next advance or rollback resumes it)"
            if s["abandoned"]
            else ""
        ),
    ]
    if s["active_phase"]:
        error = f": {one_line(s['error'])}" if s["error"] else ""
        lines.append(f"  {s['direction']} of {s['active_phase']} {s['state']}{error}")
    lines.append(f"  alembic heads: {', '.join(s['heads']) or '(none)'}")
    for phase in s["phases"]:
        mark = "x" if phase["done"] else " "
        revs = f" revisions {', '.join(phase['revisions'])}" if phase["revisions"] else ""
        lines.append(f"  [{mark}] {phase['name']:<8} compatible {phase['compatible']!r}{revs}")
    for job in s["jobs"]:
        line = (
            f"  job {job['name']}: {job['status']}, {job['rows_done']:,} rows written, "
            f"{job['walked']:,} walked, {job['batches']:,} batches"
        )
        if job["rows_per_second"]:
            line += f", {job['rows_per_second']:,} rows/s"
        if job["eta_seconds"] is not None:
            line += f", ETA {dt.timedelta(seconds=job['eta_seconds'])}"
        lines.append(line)
    if s["plan_changed"]:
        lines.append("  note: the plan file changed since the last phase ran")
    for job in s["outdated_triggers"]:
        lines.append(f"  note: `set` or `sync.down` of job {job!r} {Orchestrator.OUTDATED_HINT}")
    for problem in s["drift_details"]:
        lines.append(f"  DRIFT: {problem}")
    for problem in s.get("emptied", []):
        lines.append(f"  EMPTIED: {problem}")
    for change in s.get("contract_changes", []):
        lines.append(f"  note: not the jobs the backfill started with: {change}")
    return "\n".join(lines)


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
    options = Options(actor(), live_versions, wait=wait, config=ctx.settings())
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
            # a preview must never queue behind a lock (nor make others queue behind it)
            conn.set_timeouts(ctx.settings().lock_timeout or db.DEFAULT_LOCK_TIMEOUT)
            document = preview(project, plan, resolved, conn, options)
    emit(ctx, {"ok": True, **document}, _preview_text(document))
    return EXIT_OK


STATEMENT_LINES = 12  # of each revision statement in preview's text (JSON has them all)


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
                text = statement["sql"].splitlines()
                lines += [f"      {line}" for line in text[:STATEMENT_LINES]]
                if len(text) > STATEMENT_LINES:
                    more = len(text) - STATEMENT_LINES
                    lines.append(f"      … {more} more line(s); --json shows the whole statement")
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
                elif "sample" in job and "skipped" in job["sample"]:
                    lines.append(f"      not timed: {job['sample']['skipped']}")
    return "\n".join(lines)
