"""The command line's frame: the group, its context, output as text or JSON, exit codes.

Exit codes (stable for pipelines): 0 done/pass · 1 refused · 2 usage or invalid plan ·
3 database or runtime failure · 4 busy. With `--json`, stdout carries exactly one JSON
document for every command, success or not; logs and progress go to stderr. The
commands live beside this module, one module per kind, and register on `cli`.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import json
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
from psycopg import Error as PsycopgError

from phasegate import __version__, db, timelimit
from phasegate.config import ProjectConfig, load_config
from phasegate.durations import parse_duration
from phasegate.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, PhasegateError
from phasegate.pacing import BackfillSettings
from phasegate.plan import Plan
from phasegate.revisions import AlembicProject
from phasegate.text import one_line, terminal_safe


@dataclass
class Context:
    database_url: str | None
    config_path: str
    as_json: bool
    resolved_url: str | None = None  # whichever URL was used, so errors can scrub it
    document: dict[str, Any] | None = None  # the command's --json answer, printed at its exit

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
    """Print the human text now, or keep the JSON document for `handle_errors` to print
    once the exit code is known: every document carries it, and a command that fails after
    emitting prints only its error document (one document per command, always). The text
    goes through `terminal_safe`: it may carry names and queries from the database."""
    if ctx.as_json:
        ctx.document = document
    elif text:
        click.echo(terminal_safe(text))


def _print_document(ctx: Context, code: int) -> None:
    if ctx.as_json and ctx.document is not None:
        document = {"ok": ctx.document.get("ok", code == EXIT_OK), "exit_code": code}
        click.echo(json.dumps({**document, **ctx.document}, indent=2, default=_json_default))


def log(message: str) -> None:
    """One message on stderr, control characters made visible (see phasegate.text)."""
    click.echo(terminal_safe(message), err=True)


def handle_errors(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn our exceptions (and database errors) into a message and the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx: Context = click.get_current_context().find_object(Context)  # type: ignore[assignment]
        try:
            code = fn(*args, **kwargs) or EXIT_OK
            _print_document(ctx, code)
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
            # the database's words carry values of rows (DETAIL): one line, never a line of
            # their own on the operator's terminal
            message = one_line(ctx.scrub(str(original).strip()))
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
    if error.get("kind") == "interrupted":  # asked for, not a failure (exit 3 all the same)
        prefix = "stopped"
    log(f"phasegate: {prefix}: {error['message']}")


class _Group(click.Group):
    """`--json` anywhere on the line: `phasegate status PLAN --json` as well as
    `phasegate --json status PLAN` (it is the group's option, which click would otherwise
    take only before the command)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        moved = [i for i in range(end) if args[i] == "--json" and not self._takes_value(args, i)]
        if moved:
            args = ["--json", *(a for i, a in enumerate(args) if i not in moved)]
        return super().parse_args(ctx, args)

    def _takes_value(self, args: list[str], i: int) -> bool:
        """Whether args[i] is the value of the option before it (`--actor --json`)."""
        before = args[i - 1] if i else ""
        if not before.startswith("-") or "=" in before:
            return False
        flags = {
            opt
            for command in [self, *self.commands.values()]
            for param in command.params
            if isinstance(param, click.Option) and (param.is_flag or param.count)
            for opt in [*param.opts, *param.secondary_opts]
        }
        return before not in flags and before not in ("-h", "--help")


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document on stdout (before or after the command).",
)
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


def _hard_stop(message: str) -> None:
    """A time limit that a blocked C call outlasted (see timelimit): no exception can end
    the block, so the process ends here, with the error said as any other would be."""
    if "--json" in sys.argv[1:]:
        error = {"kind": "usage", "message": message}
        print(json.dumps({"ok": False, "exit_code": EXIT_USAGE, "error": error}), flush=True)
    print(f"phasegate: error: {terminal_safe(message)}", file=sys.stderr, flush=True)
    os._exit(EXIT_USAGE)


def main() -> None:
    """Entry point; click's own usage errors also honour --json and exit 2."""
    timelimit.hard_stop = _hard_stop  # the CLI owns the process
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


def live_version_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--live-version",
        "live_versions",
        multiple=True,
        metavar="V",
        help="A version of the app that is running now (repeatable); added to the versions "
        "seen in pg_stat_activity, heartbeats and the configured versions command.",
    )(fn)


def parse_wait(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float:
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
        callback=parse_wait,
        help="Poll a refused gate until it passes or DURATION (e.g. 90s, 10m) is up, "
        "printing what it waits for; then exit 1. Not with --override-gate, which "
        "proceeds at once.",
    )(fn)


def check_reason(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        flag = param.opts[0] if param.opts else "the option"
        raise click.BadParameter(
            f'{flag} needs a reason for the event log, e.g. {flag} "v1 drained by hand, '
            'ticket OPS-42"'
        )
    return value.strip() if value is not None else None


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


def actor() -> str:
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
