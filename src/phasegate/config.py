"""Project settings: `phasegate.toml`, or `[tool.phasegate]` in `pyproject.toml`.

Both are looked for next to the Alembic config (the project's root); `phasegate.toml`
wins when both exist. Every key is optional; an unknown key or a wrong type is an error
that names the file and the key, so a typo never silently turns a setting off.
"""

from __future__ import annotations

import math
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phasegate.durations import parse_duration
from phasegate.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI, before it joined the standard library
    import tomli as tomllib

DEFAULT_APPLICATION_NAME = "{app}/{version}"
DEFAULT_HEARTBEAT_TTL = 300.0
DEFAULT_COMMAND_TIMEOUT = 30.0
PG_DURATION = re.compile(r"\d+(\.\d+)?\s*(us|ms|s|min|h|d)?")

_KEYS = {
    "plans": "directory of the project's plans, for check-deploy and versions (default plans)",
    "application_name": "pg_stat_activity pattern with {app} and {version}, optional "
    "{instance} (default '{app}/{version}')",
    "heartbeat_ttl": "heartbeats older than this are ignored, e.g. '5m' (the default)",
    "versions_command": "a command whose stdout lists the live versions (one per line, or JSON)",
    "versions_command_timeout": "how long the command may run, e.g. '30s' (the default)",
    "lock_timeout": "lock_timeout of every statement, PostgreSQL syntax (default '2s')",
    "concurrent_lock_timeout": "lock wait of CONCURRENTLY statements, which wait for every "
    "older transaction and block no reads or writes (default '30min')",
    "ddl_statement_timeout": "statement_timeout of statements that block writes (default '5s')",
    "statement_timeout": "statement_timeout of the rest, '0' for none (the default)",
    "lock_retries": "retries of a step that timed out waiting for a lock (default 8)",
    "lock_retry_time": "time budget of those retries, e.g. '2m' (the default)",
    "trusted_roles": "roles whose connections and heartbeats count toward passing a gate "
    "though they may not use the plan's tables (members of a listed role too), e.g. "
    "['app_pooler']; by default only roles that may use them and superusers count",
}


@dataclass(frozen=True)
class ProjectConfig:
    """The settings, with where they came from (for messages)."""

    source: str | None = None
    root: Path = Path(".")
    plans_dir: Path = Path("plans")
    application_name: str = DEFAULT_APPLICATION_NAME
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL
    versions_command: str | list[str] | None = None
    versions_command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    lock_timeout: str | None = None  # None: the built-in default (or the command line's)
    concurrent_lock_timeout: str | None = None
    ddl_statement_timeout: str | None = None
    statement_timeout: str | None = None
    lock_retries: int | None = None
    lock_retry_time: float | None = None
    trusted_roles: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)


def load_config(project_dir: str | Path) -> ProjectConfig:
    """The project's settings; defaults when neither file has any."""
    root = Path(project_dir)
    dedicated = root / "phasegate.toml"
    if dedicated.is_file():
        return _parse(_read(dedicated), str(dedicated), root)
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        table = _read(pyproject).get("tool", {}).get("phasegate")
        if table is not None:
            return _parse(table, f"{pyproject} [tool.phasegate]", root)
    return ProjectConfig(root=root, plans_dir=root / "plans")


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it: {exc.strerror}") from exc


def _parse(table: Any, source: str, root: Path) -> ProjectConfig:
    if not isinstance(table, dict):
        raise UsageError(f"{source}: expected a table of settings")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in _KEYS.items())
        raise UsageError(f"{source}: unknown setting(s) {', '.join(unknown)}. Known: {known}")
    plans = _text(table, "plans", source, "plans")
    pattern = _text(table, "application_name", source, DEFAULT_APPLICATION_NAME)
    _check_pattern(pattern, source)
    command = table.get("versions_command")
    valid_list = isinstance(command, list) and command and all(isinstance(a, str) for a in command)
    if (
        command is not None
        and not (isinstance(command, str) and command.strip())
        and not valid_list
    ):
        raise UsageError(
            f"{source}: versions_command must be a non-empty string (run by the shell) or "
            "a list of strings (run directly)"
        )
    return ProjectConfig(
        source=source,
        root=root,
        plans_dir=root / plans,
        application_name=pattern,
        heartbeat_ttl=_duration(table, "heartbeat_ttl", source, DEFAULT_HEARTBEAT_TTL),
        versions_command=command,
        versions_command_timeout=_duration(
            table, "versions_command_timeout", source, DEFAULT_COMMAND_TIMEOUT
        ),
        lock_timeout=_pg_duration(table, "lock_timeout", source),
        concurrent_lock_timeout=_bounded_pg_duration(table, "concurrent_lock_timeout", source),
        ddl_statement_timeout=_pg_duration(table, "ddl_statement_timeout", source),
        statement_timeout=_pg_duration(table, "statement_timeout", source),
        lock_retries=_count(table, "lock_retries", source),
        lock_retry_time=_duration(table, "lock_retry_time", source, 0) or None,
        trusted_roles=_names(table, "trusted_roles", source),
        raw=dict(table),
    )


def _text(table: dict[str, Any], key: str, source: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{source}: {key} must be a non-empty string")
    return value


def _duration(table: dict[str, Any], key: str, source: str, default: float) -> float:
    value = table.get(key)
    if value is None:
        return default
    try:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        seconds = float(value) if number else parse_duration(str(value))
    except ValueError as exc:
        raise UsageError(f"{source}: {key}: {exc}") from exc
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"{source}: {key} must be a finite duration above zero, e.g. '5m'")
    return seconds


def _pg_duration(table: dict[str, Any], key: str, source: str) -> str | None:
    """A PostgreSQL duration setting ('500ms', '2s', '1min', '0'), passed through as text."""
    value = table.get(key)
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not PG_DURATION.fullmatch(text):
        raise UsageError(f"{source}: {key} = {value!r} is not a duration; write e.g. '2s'")
    return text


def _bounded_pg_duration(table: dict[str, Any], key: str, source: str) -> str | None:
    """A PostgreSQL duration that must end: '0' (wait for ever) is refused."""
    text = _pg_duration(table, key, source)
    if text is not None and not re.search(r"[1-9]", text):
        raise UsageError(f"{source}: {key} = {text!r} would wait for ever; write e.g. '30min'")
    return text


def _count(table: dict[str, Any], key: str, source: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{source}: {key} must be a whole number, 0 or more")
    return value


def _names(table: dict[str, Any], key: str, source: str) -> tuple[str, ...]:
    """A list of role names, exactly as in the catalog (case and all)."""
    value = table.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UsageError(
            f'{source}: {key} must be a list of role names, e.g. {key} = ["app_pooler"]'
        )
    return tuple(dict.fromkeys(value))


def _check_pattern(pattern: str, source: str) -> None:
    """{version} once; {app} and {instance} at most once; nothing else in braces."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(pattern) if f is not None]
        plain = all(
            spec == "" and conv is None
            for _, f, spec, conv in string.Formatter().parse(pattern)
            if f is not None
        )
    except ValueError as exc:
        raise UsageError(f"{source}: application_name {pattern!r}: {exc}") from None
    allowed = {"app", "version", "instance"}
    if (
        fields.count("version") != 1
        or any(fields.count(f) > 1 for f in allowed)
        or set(fields) - allowed
        or not plain
    ):
        raise UsageError(
            f"{source}: application_name {pattern!r} must hold {{version}} once and may "
            "hold {app} and {instance} once each, nothing else in braces; e.g. "
            "'{app}/{version}'"
        )
