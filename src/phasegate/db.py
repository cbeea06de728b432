"""Connections, transactions, timeouts, the orchestrator lock and URL masking.

One SQLAlchemy connection serves a whole command: Alembic needs a SQLAlchemy
`Connection`, and phasegate's own SQL runs on the same physical connection so ledger
rows can share a transaction with the work they record. Our statements go through the
raw psycopg cursor: identifiers are composed with `psycopg.sql`, and author expressions
from plans pass through untouched (SQLAlchemy's driver-level execution would treat a
`%` in them as a placeholder).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import NullPool

from phasegate import lockguard
from phasegate.errors import Busy, RuntimeFailure, SessionLost, UsageError
from phasegate.lockguard import LockPolicy
from phasegate.text import one_line

URL_ENV_VARS = ("PHASEGATE_DATABASE_URL", "DATABASE_URL")
DEFAULT_LOCK_TIMEOUT = "2s"

# Session advisory lock held by the one orchestrator allowed to run DDL in a database.
# Two int4 keys: a namespace ("pgat") and the lock number.
LOCK_NAMESPACE = 0x70676174
LOCK_ORCHESTRATOR = 1

Query = str | sql.Composable
T = TypeVar("T")


def connection_lost(exc: BaseException) -> bool:
    """The server went away (restart, failover, pg_terminate_backend), not a bad query."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    original = getattr(exc, "orig", None) or exc
    if not isinstance(original, psycopg.OperationalError):
        return False
    text = str(original).lower()
    return any(
        sign in text
        for sign in (
            "connection is lost",
            "server closed the connection",
            "terminating connection",
            "connection is closed",
            "consuming input failed",
            "connection refused",
            "the database system is shutting down",
            "the database system is starting up",
            "the database system is in recovery mode",
        )
    )


def resolve_url(explicit: str | None, ini_url: str | None = None) -> str:
    """--database-url > PHASEGATE_DATABASE_URL > DATABASE_URL > sqlalchemy.url of alembic.ini."""
    candidates = [
        ("--database-url", explicit),
        *((f"${name}", os.environ.get(name)) for name in URL_ENV_VARS),
        ("sqlalchemy.url in alembic.ini", ini_url),
    ]
    for source, candidate in candidates:
        if candidate:
            try:
                return normalize_url(candidate)
            except UsageError as exc:
                raise UsageError(f"the database URL from {source}: {exc.message}") from None
    raise UsageError(
        "no database configured: pass --database-url, set PHASEGATE_DATABASE_URL, "
        "or set sqlalchemy.url in alembic.ini"
    )


def normalize_url(url: str | URL) -> str:
    """Map postgres:// and postgresql:// to the psycopg 3 driver SQLAlchemy should use."""
    try:
        parsed = make_url(url)
    except _UNPARSABLE:
        raise UsageError("it does not parse; expected postgresql://user@host:port/dbname") from None
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if not parsed.drivername.startswith("postgresql"):
        raise UsageError(
            f"phasegate works with PostgreSQL only, not {parsed.drivername!r}; "
            "use postgresql://user@host:port/dbname"
        )
    return parsed.render_as_string(hide_password=False)


# make_url raises ArgumentError for a bad shape and ValueError for a bad port ("[::1:5432")
_UNPARSABLE = (sa.exc.ArgumentError, ValueError)


# libpq connection parameters whose value is a secret (a URL's query or a conninfo string)
SECRET_PARAMETERS = ("password", "sslpassword")
# names phasegate itself renders in URLs (normalize_url), beside what the URL spells
_RENDERED = "postgresql+psycopg postgresql"


def mask_url(url: str | URL) -> str:
    """The URL as it may appear in output and logs: never with a password or sslpassword."""
    try:
        parsed = make_url(url)
    except _UNPARSABLE:
        return "<unparsable database URL>"
    hidden = {name: "***" for name in SECRET_PARAMETERS if name in parsed.query}
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def scrub(text: str, url: str | None) -> str:
    """Remove the URL's secrets (its password, ?password=, ?sslpassword=) from a message.

    Wherever a secret stands as a password (`user:PW@`, `password=PW`, `"password": "PW"`)
    it goes. Elsewhere it goes wherever it stands as a word of its own, in the URL-encoded
    form too, since a message may quote it in ways no pattern foresees; but not inside a
    longer word when it is short (`pass` leaves `password`) or the longer word is the URL's
    own (the password `Postgres` leaves `PostgreSQL` be), and not at all if it is also a
    word of the URL (the password `postgres` of user `postgres` on database `postgres`):
    there it is the user's or the database's name.
    """
    if not url:
        return text
    secrets, rest = _secrets_of(url)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first
        quoted = re.escape(secret)
        text = re.sub(rf"(?<=:){quoted}(?=@)", "***", text)
        text = re.sub(
            rf"""(\b(?:ssl)?password["']?\s*[:=]\s*["']?){quoted}""", r"\1***", text, flags=re.I
        )
        alone = _standing_alone(secret)
        if not alone.search(rest):
            text = alone.sub("***", text)
        if len(secret) >= _GLUED_MINIMUM:
            text = _glued(secret).sub(_mask_unless_the_urls_word(secret, rest), text)
    return text


_GLUED_MINIMUM = 6  # a shorter password inside a longer word is likelier chance (pass/password)


def _glued(secret: str) -> re.Pattern[str]:
    """`secret` with whatever word characters are glued to either end of it."""
    return re.compile(rf"\w*{re.escape(secret)}\w*")


def _mask_unless_the_urls_word(secret: str, rest: str) -> Callable[[re.Match[str]], str]:
    """Mask `secret` inside a longer word unless that word is one the URL itself says
    (its user, database or driver: `postgresql_admin`, `PostgreSQL`)."""
    words = {word.lower() for word in re.findall(r"\w+", rest)}

    def mask(found: re.Match[str]) -> str:
        word = found.group(0)
        return word if word.lower() in words else word.replace(secret, "***")

    return mask


def _standing_alone(secret: str) -> re.Pattern[str]:
    """`secret` where it is not part of a longer word: no letter, digit or `_` glued to
    an end of it that is one itself (a non-word end needs no boundary)."""
    before = r"(?<!\w)" if re.match(r"\w", secret[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
    return re.compile(before + re.escape(secret) + after)


def _secrets_of(url: str) -> tuple[set[str], str]:
    """The URL's secrets, as written and decoded, and what else the URL says (the URL
    with the secrets cut out, plus the driver names phasegate renders)."""
    positions = _password_positions(url)
    secrets = [url[begin:end] for begin, end in positions]  # by shape: also unparsable URLs
    rest, last = [], 0
    for begin, end in sorted(positions):
        rest.append(url[last:begin])
        last = end
    rest += [url[last:], _RENDERED]
    try:
        parsed = make_url(url)
    except _UNPARSABLE:
        parsed = None
    if parsed is not None:
        values = [parsed.password]
        for name in SECRET_PARAMETERS:
            found = parsed.query.get(name)
            values += [found] if isinstance(found, str) else list(found or ())
        for found in (str(v) for v in values if v):
            longer = [s for s in secrets if s.startswith(found) and len(s) > len(found)]
            # SQLAlchemy cut the password at its first '@' and renders the rest as host
            # ("app:***@cret@host"): mask that rest, and not the short head everywhere
            secrets += [s[len(found) :] for s in longer] or [found]
    plain = {v for s in secrets for v in (s, unquote(s), quote(s, safe=""))}
    # and as a message may carry them escaped: in JSON (phasegate scrubs its --json error
    # as JSON text), a Python repr, a libpq conninfo value
    variants = plain | {
        form for v in plain for form in (json.dumps(v)[1:-1], repr(v)[1:-1], _conninfo_escaped(v))
    }
    return {v for v in variants if v}, "\n".join(rest)


def _conninfo_escaped(value: str) -> str:
    """`value` inside a quoted libpq conninfo value: backslash and quote escaped."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _password_spans(url: str) -> list[str]:
    """The password parts of a URL SQLAlchemy cannot parse, found by shape alone."""
    return [url[begin:end] for begin, end in _password_positions(url)]


def _password_positions(url: str) -> list[tuple[int, int]]:
    """Where a URL's secrets stand, by shape alone: from the user's ':' to the last '@'
    before any '?' (a password may hold '@' or '/'), and every `password=` and
    `sslpassword=` parameter."""
    found = [m.span(1) for m in re.finditer(r"[?&](?:ssl)?password=([^&]*)", url)]
    scheme, sep, rest = url.partition("://")
    userinfo = rest.split("?", 1)[0].rpartition("@")[0] if sep else ""
    user, colon, password = userinfo.partition(":")
    if colon and not any(c in user for c in "@/"):  # "user@host:5432/my@db" has none
        begin = len(scheme) + len(sep) + len(user) + 1
        found.append((begin, begin + len(password)))
    return [(begin, end) for begin, end in found if end > begin]


def libpq_url(url: str) -> str:
    """A libpq connection string for psycopg, for the database `url` names.

    Built with psycopg's `make_conninfo` (key=value, each value quoted as libpq wants),
    not by rendering the URL again: SQLAlchemy leaves a space in a password as it is,
    which libpq then refuses, and every helper connection (the blocker watch, the long
    wait's watch) failed silently."""
    parsed = make_url(url)
    params: dict[str, Any] = {
        key: value[-1] if isinstance(value, tuple) else value for key, value in parsed.query.items()
    }
    for key, value in (
        ("user", parsed.username),
        ("password", parsed.password),
        ("host", parsed.host),
        ("port", parsed.port),
        ("dbname", parsed.database),
    ):
        if value is not None and key not in params:
            params[key] = str(value)
    return psycopg.conninfo.make_conninfo(**params)


class Session:
    """A SQLAlchemy connection plus helpers that run our SQL on its psycopg cursor."""

    def __init__(self, connection: Connection, url: str) -> None:
        self.connection = connection
        self.url = url
        # the run this session's orchestrator began (ledger.begin_run); None: it began none
        self.generation: int | None = None

    def masked_url(self) -> str:
        """This session's database as output may show it (no password)."""
        return mask_url(self.url)

    @property
    def raw(self) -> psycopg.Connection:
        return self.connection.connection.driver_connection  # type: ignore[return-value]

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction; commits on success, rolls back on any exception."""
        self.ensure_idle()
        with self.connection.begin():
            yield self

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        """Each statement its own transaction: one round trip, no BEGIN and no COMMIT."""
        self.ensure_idle()
        self.raw.autocommit = True
        try:
            yield self
        finally:
            with contextlib.suppress(psycopg.Error):  # a lost connection keeps its error
                self.raw.autocommit = False

    def execute(self, query: Query, params: Mapping[str, Any] | None = None) -> psycopg.Cursor:
        cursor = self.raw.cursor()
        cursor.execute(query, params)
        return cursor

    def scalar(self, query: Query, params: Mapping[str, Any] | None = None) -> Any:
        row = self.execute(query, params).fetchone()
        return row[0] if row else None

    def all(self, query: Query, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return self.execute(query, params).fetchall()

    def dicts(self, query: Query, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        cursor = self.execute(query, params)
        names = [c.name for c in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def ensure_idle(self) -> None:
        """Commit anything left open, so Alembic and `tx()` start from a clean slate."""
        if self.connection.in_transaction():
            self.connection.commit()
        if self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.raw.commit()

    @property
    def guard(self) -> lockguard.Guard | None:
        return lockguard.guard_of(self.raw)

    def retrying(self, what: str, step: Callable[[], T]) -> T:
        """Run one transactional step again while it times out waiting for locks."""
        return lockguard.retry_on_lock(self.guard, self.raw, what, step, self.reset)

    def reset(self) -> None:
        """Roll back whatever a failed step left open."""
        if self.connection.in_transaction():
            self.connection.rollback()
        if self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.raw.rollback()

    def set_timeouts(self, lock_timeout: str, statement_timeout: str | None = None) -> None:
        """Session-level, committed: survives later rolled-back transactions."""
        with self.tx():
            self.execute("SELECT set_config('lock_timeout', %(v)s, false)", {"v": lock_timeout})
            if statement_timeout is not None:
                self.execute(
                    "SELECT set_config('statement_timeout', %(v)s, false)",
                    {"v": statement_timeout},
                )


@contextmanager
def session(
    url: str, application_name: str = "phasegate", policy: LockPolicy | None = None
) -> Iterator[Session]:
    """Open one connection; raise RuntimeFailure (exit 3) with a masked URL if it fails.

    With a `policy`, every statement on it runs by the lock guard (see lockguard).
    """
    connect_args: dict[str, Any] = {"application_name": application_name[:63]}
    if policy is not None:
        connect_args["cursor_factory"] = lockguard.GuardedCursor
    engine = sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    sa.event.listen(engine, "connect", _only_once(url))
    try:
        connection = engine.connect()
    except sa.exc.OperationalError as exc:
        lines = (str(exc.orig) if exc.orig else str(exc)).strip().splitlines()
        reason = scrub(" ".join(line.strip() for line in lines if line.strip()), url)
        raise RuntimeFailure(
            f"cannot connect to {mask_url(url)}: {reason}",
            database=mask_url(url),
        ) from None
    session = Session(connection, url)
    settle(session.raw)
    if policy is not None:
        lockguard.install(session.raw, policy, url)
    try:
        yield session
    finally:
        connection.close()
        engine.dispose()


def _only_once(url: str) -> Callable[[Any, Any], None]:
    """A session is one server connection for its whole life. SQLAlchemy would open a new
    one after the old one was lost (terminated, a failover), and a command carrying on
    there would have lost its session's locks without noticing: the orchestrator lock,
    the job driver locks, a worker's slice locks. So a second connect refuses: the command
    ends with the loss, and the next one starts from what the ledger says."""
    connected = False

    def refuse_again(_dbapi_connection: Any, _record: Any) -> None:
        nonlocal connected
        if connected:
            raise SessionLost(
                f"lost the connection to the database ({mask_url(url)}): the server "
                "restarted, failed over, or ended this session. Everything committed is kept "
                "and the ledger records where to resume; this command does not reconnect, as "
                "its locks went with the connection: run the same command again"
            )
        connected = True

    return refuse_again


def settle(connection: psycopg.Connection) -> None:
    """The session settings every phasegate session states for its whole life, in one
    round trip, committed:

    - READ COMMITTED, for transactions and autocommit statements alike. phasegate's SQL is
      written for it: a batch re-reads a row the app changed meanwhile instead of failing,
      a slice claim skips what others lock, `root_cause_id_for`-style upserts loop on a
      fresh snapshot. A database or role may default to REPEATABLE READ or SERIALIZABLE
      (managed services let one set it per database), and the app's traffic would then
      make such statements fail with 40001 now and then. The app's transactions keep
      theirs: SSI tracks only serializable ones.
    - No idle_session_timeout (PostgreSQL 14+; managed services often set it under a
      minute): an orchestrator's session sits idle while its workers walk and between lock
      retries, and ending it would end the run.
    """
    settings = "set_config('default_transaction_isolation', 'read committed', false)"
    if connection.info.server_version >= 140000:
        settings += ", set_config('idle_session_timeout', '0', false)"
    psycopg.Cursor(connection).execute(f"SELECT {settings}")
    connection.commit()


def acquire_orchestrator_lock(db: Session) -> None:
    """Take the session advisory lock or raise Busy naming whoever holds it."""
    with db.tx():
        got = db.scalar(
            "SELECT pg_try_advisory_lock(%(ns)s, %(key)s)",
            {"ns": LOCK_NAMESPACE, "key": LOCK_ORCHESTRATOR},
        )
    if got:
        return
    with db.tx():
        holders = db.dicts(
            """
            SELECT a.pid, a.application_name, a.usename, a.client_addr::text AS client,
                   a.backend_start, now() - a.backend_start AS held_for
            FROM pg_locks l JOIN pg_stat_activity a USING (pid)
            WHERE l.locktype = 'advisory' AND l.granted
              AND l.classid = %(ns)s AND l.objid = %(key)s AND l.objsubid = 2
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            """,
            {"ns": LOCK_NAMESPACE, "key": LOCK_ORCHESTRATOR},
        )
    holder = holders[0] if holders else {}
    who = (
        f"backend pid {holder['pid']} "
        f"({one_line(holder['application_name'] or 'no application_name')}, "
        f"user {one_line(str(holder['usename']))}, from {holder['client'] or 'local socket'}, "
        f"connected {holder['backend_start']:%Y-%m-%d %H:%M:%S %Z})"
        if holder
        else "a session that has just released it"
    )
    raise Busy(
        f"another phasegate is running in this database: {who}; wait for it to finish, "
        "then run this command again",
        holder={k: str(v) for k, v in holder.items()},
    )


def orchestrator_running(db: Session) -> bool:
    """Whether some phasegate holds the orchestrator lock in this database right now."""
    return bool(
        db.scalar(
            """
            SELECT EXISTS (
                SELECT FROM pg_locks
                WHERE locktype = 'advisory' AND granted
                  AND classid = %(ns)s AND objid = %(key)s AND objsubid = 2
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
            """,
            {"ns": LOCK_NAMESPACE, "key": LOCK_ORCHESTRATOR},
        )
    )


def release_orchestrator_lock(db: Session) -> None:
    with db.tx():
        db.execute(
            "SELECT pg_advisory_unlock(%(ns)s, %(key)s)",
            {"ns": LOCK_NAMESPACE, "key": LOCK_ORCHESTRATOR},
        )


def quote_table(name: str) -> sql.Composable:
    """`bug` or `public.bug` as a quoted identifier; names are exact, as in the catalog."""
    return sql.Identifier(*name.split(".", 1))


@contextmanager
def locked_session(url: str, what: str, policy: LockPolicy | None = None) -> Iterator[Session]:
    """A session that holds the orchestrator lock, every statement under the lock guard."""
    with session(url, f"phasegate {what}", policy or LockPolicy()) as db:
        acquire_orchestrator_lock(db)
        try:
            yield db
        finally:
            # a lost session took its session-level lock with it: nothing to release then
            with contextlib.suppress(sa.exc.SQLAlchemyError, psycopg.Error):
                release_orchestrator_lock(db)
