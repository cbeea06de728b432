"""Version sources: which app code versions are running now, and where each was seen.

Four sources, unioned: connections in `pg_stat_activity` whose application_name follows
the project's pattern (default `<app>/<version>`), fresh rows of the ledger's heartbeat
table, the pipeline's `--live-version`, and a configured command (e.g. one that asks the
cluster scheduler). A source that cannot answer is a failure, never an empty answer: the
gate fails closed on it.

Connections and heartbeats carry the role that made them, and anyone who may connect can
choose an application_name: each is judged trusted or not (see `trust`). The pipeline and
the versions command are the operator's own, so always trusted.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from phasegate import ledger
from phasegate.config import ProjectConfig
from phasegate.db import URL_ENV_VARS, Session, quote_table, scrub
from phasegate.durations import format_duration
from phasegate.text import one_line
from phasegate.trust import PlanTables

SOURCE_PG_STAT_ACTIVITY = "pg_stat_activity"
SOURCE_HEARTBEAT = "heartbeat"
SOURCE_COMMAND_LINE = "--live-version"
SOURCE_COMMAND = "versions_command"
_STDERR_TAIL = 800


@dataclass(frozen=True)
class Observation:
    """One live version seen by one source, with where exactly it was seen."""

    version: str
    source: str
    detail: str = ""
    instance: str | None = None
    last_seen: dt.datetime | None = None
    role: str | None = None  # who connected or wrote the heartbeat; None for the operator's
    trusted: bool = True  # may count toward passing a gate (every one counts toward refusing)

    def describe(self) -> str:
        """One line: version and detail come from the database and may hold anything."""
        detail = f": {one_line(self.detail)}" if self.detail else ""
        return f"{one_line(self.version)} ({self.source}{detail})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "detail": self.detail,
            "instance": self.instance,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "role": self.role,
            "trusted": self.trusted,
        }


@dataclass(frozen=True)
class SourceFailure:
    """A source that could not say what runs: the gate must not pass on its silence."""

    source: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "message": self.message}


@dataclass
class Sighting:
    observations: list[Observation] = field(default_factory=list)
    failures: list[SourceFailure] = field(default_factory=list)
    trust_rule: str = ""  # which roles counted toward passing, in words


def observe(
    db: Session,
    app: str,
    cli_versions: Iterable[str],
    config: ProjectConfig,
    tables: PlanTables | None = None,
) -> Sighting:
    """Every source's answer for `app`; connections and heartbeats judged by `tables`."""
    sighting = Sighting([Observation(v, SOURCE_COMMAND_LINE) for v in dict.fromkeys(cli_versions)])
    with db.tx():
        seen = connections(db, app, config.application_name)
        seen += heartbeat_observations(db, app, config.heartbeat_ttl)
        roles = {o.role for o in seen if o.role is not None}
        trusted, sighting.trust_rule = judge_roles(
            db, roles, tables or PlanTables(), config.trusted_roles
        )
    sighting.observations += [replace(o, trusted=o.role in trusted) for o in seen]
    if config.versions_command is not None:
        found, failure = run_command(app, config, secrets=(db.url,))
        sighting.observations += found
        if failure is not None:
            sighting.failures.append(failure)
    return sighting


# -- trust -----------------------------------------------------------------------------------


def judge_roles(
    db: Session, roles: Collection[str], tables: PlanTables, trusted_roles: Iterable[str]
) -> tuple[set[str], str]:
    """The roles among `roles` whose connections and heartbeats may pass a gate, and the
    rule in words: superusers, roles that may write one of the plan's tables that exist
    (INSERT, UPDATE or DELETE; a column grant or a grant to PUBLIC counts: such a role
    could change those rows anyway), and `trusted_roles` and their members. A role that may
    only read them is not trusted: reading gives no say over what the plan does to the
    rows. Every role may read the catalogs this asks."""
    quoted = [quote_table(name).as_string(db.raw) for name in tables.names]
    present = db.all(
        "SELECT to_regclass(q) IS NOT NULL FROM unnest(%(t)s::text[]) WITH ORDINALITY AS t(q, n) "
        "ORDER BY n",
        {"t": quoted},
    )
    existing = [name for name, (found,) in zip(tables.names, present, strict=True) if found]
    listed = list(dict.fromkeys(trusted_roles))
    rule = _trust_rule(tables, existing, listed)
    if not roles:
        return set(), rule
    trusted = {
        name
        for (name,) in db.all(
            """
            SELECT r.rolname
            FROM pg_roles AS r
            WHERE r.rolname = ANY(%(roles)s)
              AND (r.rolsuper
                   OR EXISTS (SELECT FROM pg_roles AS t
                              WHERE t.rolname = ANY(%(listed)s)
                                AND pg_has_role(r.oid, t.oid, 'MEMBER'))
                   OR EXISTS (SELECT FROM unnest(%(tables)s::text[]) AS p(q)
                              CROSS JOIN LATERAL (SELECT to_regclass(p.q) AS rel) AS t
                              WHERE t.rel IS NOT NULL
                                AND (has_table_privilege(r.oid, t.rel, 'DELETE')
                                     OR has_any_column_privilege(
                                            r.oid, t.rel, 'INSERT, UPDATE'))))
            """,
            {"roles": sorted(set(roles)), "listed": listed, "tables": quoted},
        )
    }
    return trusted, rule


def _trust_rule(tables: PlanTables, existing: list[str], listed: list[str]) -> str:
    absent = [name for name in tables.names if name not in existing]
    if existing:
        later = f"; {', '.join(absent)}: not there yet" if absent else ""
        may_use = f"may write {', '.join(existing)} ({tables.origin}{later})"
    elif tables.names:
        may_use = f"may write the plan's tables, but {', '.join(absent)} do not exist yet"
    else:
        may_use = f"may write the plan's tables, but {tables.describe()}"
    named = f"({', '.join(listed)})" if listed else "(none set)"
    return (
        f"a connection or heartbeat counts toward passing only when its role {may_use}, "
        f"is a superuser, or is (a member of) a role in trusted_roles {named}"
    )


# -- pg_stat_activity ------------------------------------------------------------------------


def name_pattern(pattern: str, app: str | None) -> re.Pattern[str]:
    """The application_name pattern as a regex; `{app}` matches anything when app is None."""
    fields = {
        "app": re.escape(app) if app is not None else r"(?P<app>.+?)",
        "version": r"(?P<version>\S+?)",
        "instance": r"(?P<instance>.+?)",
    }
    parts = re.split(r"(\{app\}|\{version\}|\{instance\})", pattern)
    return re.compile(
        "".join(
            fields[p[1:-1]] if p in ("{app}", "{version}", "{instance}") else re.escape(p)
            for p in parts
        )
    )


def claims(pattern: str, app: str) -> re.Pattern[str] | None:
    """Names that claim to be `app` (the pattern's text before {version}, or the bare app
    name); such a name that does not match the whole pattern counts, as an unreadable
    version, instead of being ignored."""
    prefix = pattern.split("{version}", 1)[0]
    prefix = re.escape(prefix.replace("{app}", app)) if "{instance}" not in prefix else ""
    alternatives = [re.escape(app)] + ([prefix + ".*"] if prefix else [])
    return re.compile("|".join(alternatives), re.DOTALL)


def connections(db: Session, app: str | None, pattern: str) -> list[Observation]:
    """Connections to this database whose application_name names a version of `app`."""
    regex = name_pattern(pattern, app)
    claimed = claims(pattern, app) if app is not None else None
    rows = db.dicts(
        """
        SELECT application_name AS name, pid, usename AS role,
               coalesce(host(client_addr), 'local socket') AS client
        FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND application_name <> ''
        ORDER BY pid
        """
    )
    # one observation per version, instance and role: each role is judged on its own
    groups: dict[tuple[str, str | None, str | None], list[dict[str, Any]]] = {}
    for row in rows:
        match = regex.fullmatch(row["name"])
        if match:
            key = (match.group("version"), match.groupdict().get("instance"), row["role"])
            groups.setdefault(key, []).append(row)
        elif claimed is not None and claimed.fullmatch(row["name"]):
            unreadable = f"{row['name']!r} (not {pattern!r})"
            groups.setdefault((unreadable, None, row["role"]), []).append(row)
    found = []
    for (version, instance, role), members in sorted(
        groups.items(), key=lambda g: (g[0][0], g[0][1] or "", g[0][2] or "")
    ):
        pids = ", ".join(str(m["pid"]) for m in members[:5])
        more = f" and {len(members) - 5} more" if len(members) > 5 else ""
        clients = ", ".join(dict.fromkeys(m["client"] for m in members))
        count = len(members)
        detail = (
            f"{count} connection{'s' if count > 1 else ''} as {members[0]['name']} "
            f"by role {role if role is not None else '(unknown)'}, pid {pids}{more}, "
            f"from {clients}"
        )
        found.append(Observation(version, SOURCE_PG_STAT_ACTIVITY, detail, instance, role=role))
    return found


def apps_connected(db: Session, pattern: str) -> list[str]:
    """Apps named by any connection's application_name (for `versions` with no --app)."""
    if "{app}" not in pattern:
        return []
    regex = name_pattern(pattern, None)
    names = db.dicts(
        "SELECT DISTINCT application_name AS name FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND application_name NOT LIKE 'phasegate%'"  # phasegate's own sessions
    )
    return sorted({m.group("app") for r in names if (m := regex.fullmatch(r["name"] or ""))})


# -- heartbeats ------------------------------------------------------------------------------


def heartbeat_observations(db: Session, app: str, ttl: float) -> list[Observation]:
    return [
        Observation(
            beat.version,
            SOURCE_HEARTBEAT,
            f"instance {beat.instance}, last seen {format_duration(beat.age_seconds)} ago, "
            f"written by role {beat.role or '(unknown: an old row)'}"
            + (_KEPT.format(app=beat.app, instance=beat.instance) if beat.kept else ""),
            beat.instance,
            beat.last_seen,
            role=beat.role or None,
        )
        for beat in ledger.heartbeats(db, app, ttl)
    ]


_KEPT = (
    "; written by an older phasegate helper before the ledger's upgrade, which that helper "
    "cannot write through: kept as fresh, since its instance may still run, until it is "
    "gone or runs this phasegate's helper and the row is removed: `phasegate heartbeat "
    "--app {app} --instance {instance} --remove` as the ledger's owner"
)


# -- the configured command ------------------------------------------------------------------


def run_command(
    app: str, config: ProjectConfig, secrets: Iterable[str | None] = ()
) -> tuple[list[Observation], SourceFailure | None]:
    """Run the versions command for `app` (as $PHASEGATE_APP) and read what it prints.

    Printing nothing is a failure too: a pipe can hide a command that was not found.
    It and what it prints are scrubbed of database passwords before anyone sees them.
    """
    secrets = [*secrets, *(os.environ.get(name) for name in URL_ENV_VARS)]

    def clean(text: str) -> str:
        for secret in secrets:
            text = scrub(text, secret)
        return text

    command = config.versions_command
    shown = clean(command if isinstance(command, str) else " ".join(command or []))
    label = f"{SOURCE_COMMAND} `{shown}`"
    try:
        done = subprocess.run(
            command or [],
            shell=isinstance(command, str),
            capture_output=True,
            text=True,
            timeout=config.versions_command_timeout,
            env={**os.environ, "PHASEGATE_APP": app},
            cwd=config.root,
            check=False,
        )
    except subprocess.TimeoutExpired:
        timeout = format_duration(config.versions_command_timeout)
        return [], SourceFailure(SOURCE_COMMAND, f"{label} did not finish within {timeout}")
    except OSError as exc:
        return [], SourceFailure(SOURCE_COMMAND, f"{label} could not run: {exc.strerror}")
    stderr = clean(done.stderr.strip()[-_STDERR_TAIL:]) or "(nothing on stderr)"
    if done.returncode != 0:
        return [], SourceFailure(
            SOURCE_COMMAND, f"{label} exited with {done.returncode}; its stderr: {stderr}"
        )
    try:
        entries = parse_command_output(done.stdout)
    except ValueError as exc:
        message = clean(f"{label} printed something unreadable: {exc}")
        return [], SourceFailure(SOURCE_COMMAND, message)
    if not entries:
        return [], SourceFailure(
            SOURCE_COMMAND, f"{label} printed no version; its stderr: {stderr}"
        )
    return [
        Observation(
            version, SOURCE_COMMAND, f"instance {instance}" if instance else shown, instance
        )
        for version, instance in entries
    ], None


def parse_command_output(text: str) -> list[tuple[str, str | None]]:
    """(version, instance) pairs from JSON or from lines of `VERSION [INSTANCE]`.

    JSON may be a list of versions, a list of objects with `version` (and optionally
    `instance`), or an object holding such a list under `versions`. Lines that are blank
    or start with `#` are skipped.
    """
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc})") from exc
        return _json_entries(document)
    entries = []
    for line in stripped.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            version, _, instance = line.partition(" ")
            entries.append((version, instance.strip() or None))
    return entries


def _json_entries(document: Any) -> list[tuple[str, str | None]]:
    if isinstance(document, dict):
        if "versions" not in document:
            raise ValueError('a JSON object must hold the list under "versions"')
        document = document["versions"]
    if not isinstance(document, list):
        raise ValueError("expected a JSON list of versions")
    entries = []
    for item in document:
        if isinstance(item, str):
            entries.append((item, None))
        elif isinstance(item, dict) and isinstance(item.get("version"), str):
            instance = item.get("instance")
            entries.append((item["version"], str(instance) if instance is not None else None))
        else:
            raise ValueError(f'{json.dumps(item)} is neither a version nor {{"version": ...}}')
    return entries
