"""Commands about live app versions: heartbeat, versions, check-deploy."""

from __future__ import annotations

import socket

import click
from psycopg.errors import InsufficientPrivilege

from phasegate import db, gates, ledger, sources, trust
from phasegate.cli.app import Context, cli, emit, handle_errors, live_version_option, log
from phasegate.config import ProjectConfig
from phasegate.durations import format_duration
from phasegate.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    PhasegateError,
    RuntimeFailure,
    UsageError,
)
from phasegate.plan import load_plan
from phasegate.revisions import AlembicProject
from phasegate.text import one_line

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
    phasegate.appversion.report_version instead. The row is stamped with the server's
    time and this connection's role, and only that role can renew or remove it.
    """
    if version is None and not remove:
        raise UsageError("pass --version V (the version this instance runs), or --remove")
    instance = instance or socket.gethostname()
    with db.session(ctx.url(ctx.project()), "phasegate heartbeat") as conn:
        with conn.tx():
            ready = ledger.exists(conn) and ledger.heartbeat_functions_exist(conn)
        if not ready:  # no ledger yet, or one older than the heartbeat functions
            _create_ledger(conn)
        with conn.tx():
            if remove:
                found = ledger.forget_heartbeat(conn, app, instance, version)
            else:
                ledger.beat(conn, app, instance, version or "")
        if remove:
            found += _forget_legacy(conn, app, instance, version)
    ttl = format_duration(ctx.settings().heartbeat_ttl)
    if remove:
        text = f"heartbeats of {app} instance {one_line(instance)}: {found} removed"
    else:
        text = (
            f"heartbeat: {app} {version} on instance {one_line(instance)}; "
            f"counts for {ttl} unless renewed"
        )
        if gates.parse_version(version) is None:
            log(
                f"phasegate: warning: {version!r} is not a PEP 440 version; "
                "every gate of this app will refuse while this heartbeat is fresh"
            )
    document = {"ok": True, "app": app, "version": version, "instance": instance}
    emit(ctx, {**document, "removed": remove}, text)
    return EXIT_OK


def _forget_legacy(conn: db.Session, app: str, instance: str, version: str | None) -> int:
    """Rows an older helper wrote before the ledger's upgrade (they never expire): removed
    when this role may (the ledger's owner); an app role's --remove leaves them."""
    try:
        with conn.tx():
            return ledger.forget_legacy_heartbeat(conn, app, instance, version)
    except InsufficientPrivilege:
        return 0


def _create_ledger(conn: db.Session) -> None:
    """Create (or upgrade) the ledger for a heartbeat; a role that does not own it cannot."""
    try:
        ledger.ensure_schema(conn)
    except InsufficientPrivilege as exc:
        raise RuntimeFailure(
            "the ledger (schema phasegate) is missing or older than this phasegate, and this "
            f"role may not create or upgrade it ({str(exc).strip()}). Run any phase command "
            "or `phasegate gate PLAN` once as the role that owns the ledger, then heartbeat "
            "again (see Trust model in the README for the grants an app role needs)"
        ) from exc


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
        seen = {
            name: sources.observe(conn, name, live_versions, settings, _app_tables(ctx, name))
            for name in apps
        }
    failed = any(s.failures for s in seen.values())
    document = {
        "ok": not failed,
        "apps": [
            {
                "app": name,
                "versions": sorted({o.version for o in sighting.observations}),
                "observed": [o.to_dict() for o in sighting.observations],
                "failures": [f.to_dict() for f in sighting.failures],
                "trust_rule": sighting.trust_rule,
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


def _app_tables(ctx: Context, app: str) -> trust.PlanTables:
    """The tables of every plan of `app`: a role that may use one of them is trusted."""
    names: list[str] = []
    origins: list[str] = []
    project: AlembicProject | None = None
    for path in ctx.plan_paths():
        plan = load_plan(path)
        if plan.app != app:
            continue
        tables = trust.plan_tables(plan)
        if not tables.names:  # judged by its revisions: needs the Alembic project
            project = project or ctx.project()
            try:
                tables = trust.plan_tables(plan, project, project.resolve(plan))
            except PhasegateError as exc:  # `validate` reports it; here it trusts no table
                tables = trust.PlanTables(missing=exc.message)
        names += tables.names
        origins.append(f"{plan.name}: {tables.describe()}")
    if not origins:
        return trust.PlanTables(missing=f"no plan of {app} in the plans directory")
    if not names:
        return trust.PlanTables(missing="; ".join(origins))
    return trust.PlanTables(tuple(dict.fromkeys(names)), "the tables of its plans")


def _versions_text(seen: dict[str, sources.Sighting]) -> str:
    blocks = []
    for name, sighting in seen.items():
        live = ", ".join(sorted({one_line(o.version) for o in sighting.observations}))
        lines = [f"{one_line(name)}: {live or 'nothing live'}"]
        for o in sighting.observations:
            where = f"  instance {one_line(o.instance)}" if o.instance else ""
            detail = one_line(o.detail) or where
            mark = "" if o.trusted else "  [not trusted]"
            lines.append(f"  {one_line(o.version):<12} {o.source:<18} {detail}{mark}")
        if any(not o.trusted for o in sighting.observations):
            lines.append(f"  ({one_line(sighting.trust_rule)})")
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
