"""Lock-aware execution: every statement under a short lock_timeout, retried on 55P03.

While phasegate waits for a lock, every query that arrives after it queues behind it, so
the wait must be short: `lock_timeout` (default 2 s) on every transaction, set with
`SET LOCAL` at its first statement, so it holds behind a transaction-mode pooler and is
back after every rollback. A statement whose lock blocks the app's writes (SHARE or
stronger) also gets a short statement_timeout; the others (CONCURRENTLY, VALIDATE, data
work) get the long one. Which lock a statement takes comes from PostgreSQL's parser.

A concurrent statement (CREATE/DROP INDEX CONCURRENTLY, REINDEX ... CONCURRENTLY, DETACH
PARTITION ... CONCURRENTLY) is the exception: it waits for every older transaction in the
database, that wait counts against lock_timeout, and its lock blocks no read or write, so
nobody queues behind it. It gets a long wait of its own (`concurrent_lock_timeout`,
default 30 min), says every half minute whom it waits for, and a stop request cancels
the wait instead of sitting it out.

A lock timeout is retried with exponential backoff and jitter, within a budget of
attempts and time: a single statement of an autocommit block in place (after dropping the
INVALID index a failed CREATE INDEX CONCURRENTLY leaves), a whole revision transaction by
`retry_on_lock`. When the budget is spent, the error names who blocked us, as
`pg_blocking_pids()` saw them while we waited.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from pglast import ast, parse_sql
from pglast.enums import AlterTableType
from pglast.parser import ParseError
from psycopg import sql
from psycopg.pq import TransactionStatus

from phasegate.errors import Interrupted, RuntimeFailure
from phasegate.locks import locks_of
from phasegate.redact import without_literals
from phasegate.text import one_line

T = TypeVar("T")
_DDL_VERBS = {"ALTER", "CREATE", "DROP", "REINDEX", "VACUUM", "CLUSTER", "TRUNCATE", "LOCK"}
WATCH_INTERVAL = 0.1  # seconds between looks at pg_blocking_pids() while we may wait


@dataclass
class LockPolicy:
    lock_timeout: str = "2s"
    concurrent_lock_timeout: str = "30min"  # CONCURRENTLY statements: their wait blocks no one
    ddl_statement_timeout: str = "5s"  # statements whose lock blocks writes
    statement_timeout: str = "0"  # everything else (0: none)
    retries: int = 8
    retry_time: float = 120.0  # seconds, all attempts of one step together
    notify: Callable[[str], None] = field(default=lambda message: None)
    stop: threading.Event | None = None  # set by SIGINT/SIGTERM: stop waiting for locks

    def pause(self, seconds: float, what: str) -> None:
        """Sleep before the next attempt, unless asked to stop (then the step fails as a
        whole: a rolled-back revision, or a statement that never ran)."""
        if self.stop is not None and self.stop.wait(seconds):
            raise Interrupted(
                f"stopped on request while {what} waited for a lock; nothing of it is "
                "applied. Run the same command again to continue"
            )
        if self.stop is None:
            time.sleep(seconds)

    def backoff(self, attempt: int) -> float:
        """0.25 s, 0.5 s, 1 s ... capped at 8 s, each with equal jitter."""
        ceiling = min(8.0, 0.25 * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)


class LockBudgetSpent(RuntimeFailure):
    """Every attempt timed out waiting for a lock (exit 3), with the blockers named."""


class Guard:
    """The policy and the bookkeeping of one connection."""

    def __init__(self, policy: LockPolicy, url: str) -> None:
        self.policy = policy
        self.url = url
        self.autocommit_statements = 0
        self.watch: BlockerWatch | None = None

    # -- called by GuardedCursor -------------------------------------------------------------

    def execute(
        self, cursor: psycopg.Cursor, run: Callable[[Any, Any], Any], query: Any, params: Any
    ) -> Any:
        connection = cursor.connection
        parsed = _parse(connection, query, params)
        timeout = self._timeout_for(parsed)
        aux = psycopg.Cursor(connection)  # our own statements must not replace the results
        if connection.autocommit:
            return self._autocommit(aux, run, query, params, parsed, timeout)
        if connection.info.transaction_status == TransactionStatus.IDLE:
            aux.execute(
                "SELECT set_config('lock_timeout', %s, true), "
                "set_config('statement_timeout', %s, true)" + client_check(connection, True),
                (self.policy.lock_timeout, self.policy.statement_timeout),
            )
        if timeout != self.policy.statement_timeout:
            aux.execute("SELECT set_config('statement_timeout', %s, true)", (timeout,))
        result = run(query, params)
        if connection.info.transaction_status == TransactionStatus.IDLE:
            # the statement ended the transaction itself (op.execute("COMMIT")): what came
            # before it is committed, so the step must never be retried whole
            self.autocommit_statements += 1
        elif timeout != self.policy.statement_timeout:
            aux.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (self.policy.statement_timeout,),
            )
        return result

    def _timeout_for(self, parsed: list[ast.Node] | None) -> str:
        if concurrent(parsed):  # DETACH ... CONCURRENTLY ends with a brief ACCESS EXCLUSIVE
            return self.policy.statement_timeout
        if parsed and any(lock.blocks_writes for node in parsed for lock in locks_of(node)):
            return self.policy.ddl_statement_timeout
        return self.policy.statement_timeout

    def _lock_timeout_for(self, parsed: list[ast.Node] | None) -> str:
        if concurrent(parsed):
            return self.policy.concurrent_lock_timeout
        return self.policy.lock_timeout

    def _autocommit(
        self,
        aux: psycopg.Cursor,
        run: Callable[[Any, Any], Any],
        query: Any,
        params: Any,
        parsed: list[ast.Node] | None,
        timeout: str,
    ) -> Any:
        """Outside a transaction (Alembic's autocommit_block): session settings, and a
        retry of this one statement, which nothing else shares a transaction with.

        A concurrent statement waits under `concurrent_lock_timeout`, its INVALID leftover
        dropped under the same (that drop waits for the same transactions), watched by a
        `LongWait`."""
        lock_timeout = self._lock_timeout_for(parsed)
        aux.execute(
            "SELECT set_config('lock_timeout', %s, false), "
            "set_config('statement_timeout', %s, false)" + client_check(aux.connection, False),
            (lock_timeout, timeout),
        )
        what = _describe(aux.connection, query)
        started, attempt = time.monotonic(), 0
        with self.watching(aux.connection):
            while True:
                long_wait = LongWait(self, aux.connection, what) if concurrent(parsed) else None
                try:
                    # also a leftover of an earlier run, which IF NOT EXISTS would keep
                    self._drop_invalid_leftover(aux, parsed)
                    result = run(query, params)
                    self.autocommit_statements += 1  # committed: never retried whole again
                    return result
                except psycopg.errors.QueryCanceled:
                    if long_wait is None or not long_wait.cancelled:
                        raise
                    raise Interrupted(
                        f"stopped on request while {what} waited for older transactions; "
                        f"nothing of it is applied.{self._leave_nothing(aux, parsed)} Run the "
                        "same command again to continue"
                    ) from None
                except psycopg.errors.LockNotAvailable:
                    attempt += 1
                    if self._budget_spent(attempt, started):
                        note = self._leave_nothing(aux, parsed)
                        if long_wait is not None:
                            note += (
                                " A concurrent statement waits for every older transaction "
                                "in the database: end the long ones, or raise "
                                "concurrent_lock_timeout in phasegate.toml."
                            )
                        raise self._spent(what, attempt, started, note, lock_timeout) from None
                    pause = self.policy.backoff(attempt)
                    self.policy.notify(
                        f"lock timeout ({lock_timeout}) on {what}; "
                        f"retry {attempt} of {self.policy.retries} in {pause:.1f}s"
                        f"{self._blocked_by()}"
                    )
                    self.policy.pause(pause, what)
                finally:
                    if long_wait is not None:
                        long_wait.stop()

    def _leave_nothing(self, aux: psycopg.Cursor, parsed: list[ast.Node] | None) -> str:
        """After a failed build: drop its INVALID index if the blocker lets us within the
        short lock_timeout (a courtesy; the next run drops it anyway); a note if not."""
        try:
            aux.execute("SELECT set_config('lock_timeout', %s, false)", (self.policy.lock_timeout,))
            self._drop_invalid_leftover(aux, parsed)
        except psycopg.Error:
            return (
                " The INVALID index the build left could not be dropped while blocked; the "
                "next run drops it before building again."
            )
        return ""

    def _drop_invalid_leftover(self, aux: psycopg.Cursor, parsed: list[ast.Node] | None) -> None:
        """A CREATE INDEX CONCURRENTLY that timed out may leave an INVALID index behind,
        which IF NOT EXISTS would keep and a plain retry would collide with. Dropping it
        waits for the same transactions, so its own lock timeout counts as an attempt."""
        for node in parsed or ():
            if not (isinstance(node, ast.IndexStmt) and node.concurrent and node.idxname):
                continue
            schema = node.relation.schemaname if node.relation is not None else None
            name = sql.Identifier(schema, node.idxname) if schema else sql.Identifier(node.idxname)
            invalid = aux.execute(
                "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                (name.as_string(aux.connection),),
            ).fetchone()
            if invalid and invalid[0]:
                self.policy.notify(
                    f"dropping the INVALID index {node.idxname} a failed concurrent build left"
                )
                aux.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(name))

    # -- budget, blockers ----------------------------------------------------------------------

    def _budget_spent(self, attempt: int, started: float) -> bool:
        spent = time.monotonic() - started
        return attempt > self.policy.retries or spent >= self.policy.retry_time

    def _spent(
        self,
        what: str,
        attempt: int,
        started: float,
        note: str = "",
        lock_timeout: str | None = None,
    ) -> LockBudgetSpent:
        spent = time.monotonic() - started
        return LockBudgetSpent(
            f"{what} could not get its lock in {attempt} attempt(s) over {spent:.0f}s "
            f"(lock_timeout {lock_timeout or self.policy.lock_timeout} each)"
            f"{self._blocked_by()}. Nothing "
            "of this step is half-done; run the same command again once the blocker is gone "
            f"(or raise --lock-retries / --lock-retry-time).{note}",
            blockers=self.watch.blockers if self.watch else [],
        )

    def _blocked_by(self) -> str:
        blockers = self.watch.blockers if self.watch else []
        if not blockers:
            return ""
        return "; blocked by " + "; ".join(describe_blocker(b) for b in blockers)

    @contextmanager
    def watching(self, connection: psycopg.Connection) -> Iterator[None]:
        """Keep an eye on pg_blocking_pids() of this connection (nested scopes share it)."""
        if self.watch is not None:
            yield
            return
        self.watch = BlockerWatch(self.url, connection.info.backend_pid)
        try:
            yield
        finally:
            self.watch.stop()
            self.watch = None


class GuardedCursor(psycopg.Cursor):
    """The cursor of phasegate's orchestrator connection: every execute goes by the guard."""

    def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:  # type: ignore[override]
        guard: Guard | None = getattr(self.connection, "_phasegate_guard", None)
        if guard is None:
            return super().execute(query, params, **kw)

        def run(q: Any, p: Any) -> Any:
            return psycopg.Cursor.execute(self, q, p, **kw)

        return guard.execute(self, run, query, params)

    def executemany(self, query: Any, params_seq: Any, **kw: Any) -> Any:  # type: ignore[override]
        guard: Guard | None = getattr(self.connection, "_phasegate_guard", None)
        if guard is None:
            return super().executemany(query, params_seq, **kw)

        def run(q: Any, p: Any) -> Any:
            return psycopg.Cursor.executemany(self, q, p, **kw)

        return guard.execute(self, run, query, params_seq)


class LongWait:
    """Company for a concurrent statement while it may wait out its long lock budget.

    A thread that, while the statement waits for a lock (asked on a connection of its own,
    only when it matters), says whom it waits for after REPORT_AFTER seconds and every
    REPORT_EVERY after, and on a stop request cancels it: a first SIGINT/SIGTERM finishes
    the current step, and this step's wait could last the whole budget. A statement that is
    building, not waiting, is left to finish.
    """

    REPORT_AFTER = 5.0
    REPORT_EVERY = 30.0
    POLL = 0.2  # seconds between looks at the stop request

    def __init__(self, guard: Guard, connection: psycopg.Connection, what: str) -> None:
        self.guard, self.connection, self.what = guard, connection, what
        self.pid = connection.info.backend_pid
        self.cancelled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phasegate-long-wait", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        policy = self.guard.policy
        started = time.monotonic()
        report_at = started + self.REPORT_AFTER
        try:
            while not self._done.wait(self.POLL):
                asked_to_stop = policy.stop is not None and policy.stop.is_set()
                if not (asked_to_stop or time.monotonic() >= report_at):
                    continue
                waiting = self._waiting()
                if asked_to_stop and waiting and not self._done.is_set():
                    self.cancelled = True
                    # cancel_safe (psycopg 3.2+) uses libpq 17's cancel API where available
                    getattr(self.connection, "cancel_safe", self.connection.cancel)()
                    return
                if time.monotonic() >= report_at:
                    report_at += self.REPORT_EVERY
                    if waiting:
                        policy.notify(
                            f"{self.what} has waited {time.monotonic() - started:.0f}s for "
                            "older transactions (this blocks no reads or writes; it waits up "
                            f"to concurrent_lock_timeout {policy.concurrent_lock_timeout})"
                            f"{self.guard._blocked_by()}"
                        )
        except psycopg.Error:
            return  # a courtesy: without it the statement waits out its budget

    def _waiting(self) -> bool:
        """Whether the statement waits for a lock now. A connection per look: one kept open
        between looks half a minute apart would meet the server's idle_session_timeout."""
        from phasegate.db import libpq_url  # late: db imports this module

        with psycopg.connect(
            libpq_url(self.guard.url), autocommit=True, application_name="phasegate long wait"
        ) as watcher:
            row = watcher.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                (self.pid,),
            ).fetchone()
        return bool(row and row[0])


def concurrent(parsed: list[ast.Node] | None) -> bool:
    """Statements that run outside a transaction and wait for other transactions while
    their lock blocks no read or write: CREATE/DROP INDEX CONCURRENTLY, REINDEX ...
    CONCURRENTLY, ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY."""

    def one(node: ast.Node) -> bool:
        if isinstance(node, ast.IndexStmt | ast.DropStmt):
            return bool(node.concurrent)
        if isinstance(node, ast.ReindexStmt):
            return any(p.defname == "concurrently" for p in node.params or ())
        if isinstance(node, ast.AlterTableStmt):
            return bool(node.cmds) and all(
                cmd.subtype == AlterTableType.AT_DetachPartition
                and isinstance(cmd.def_, ast.PartitionCmd)
                and cmd.def_.concurrent
                for cmd in node.cmds
            )
        return False

    return bool(parsed) and all(one(node) for node in parsed or ())


def install(connection: psycopg.Connection, policy: LockPolicy, url: str) -> Guard:
    """Guard the connection; session-level lock_timeout too, as a backstop for what starts a
    transaction without passing the cursor's execute (COPY, server-side cursors)."""
    guard = Guard(policy, url)
    psycopg.Cursor(connection).execute(
        "SELECT set_config('lock_timeout', %s, false)", (policy.lock_timeout,)
    )
    connection.commit()
    connection._phasegate_guard = guard  # type: ignore[attr-defined]
    return guard


def guard_of(connection: psycopg.Connection) -> Guard | None:
    return getattr(connection, "_phasegate_guard", None)


def is_lock_timeout(exc: BaseException | None) -> bool:
    """55P03 anywhere in the chain (SQLAlchemy wraps psycopg's error as .orig)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, RuntimeFailure):  # ours, e.g. a spent budget: already decided
            return False
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_on_lock(
    guard: Guard | None,
    connection: psycopg.Connection,
    what: str,
    step: Callable[[], T],
    reset: Callable[[], None],
) -> T:
    """Run `step` (one transaction: a revision, a trigger install) until it gets its locks.

    `reset` brings the connection back to idle after a failed attempt. A step that
    committed part of its work outside a transaction (an autocommit block) before the
    timeout cannot be retried whole: that fails at once, blockers named.
    """
    if guard is None:
        return step()
    started, attempt = time.monotonic(), 0
    with guard.watching(connection):
        while True:
            committed = guard.autocommit_statements
            try:
                return step()
            except Exception as exc:
                if not is_lock_timeout(exc):
                    raise
                reset()
                attempt += 1
                if guard.autocommit_statements != committed:
                    raise LockBudgetSpent(
                        f"{what} timed out waiting for a lock after it had committed "
                        "statements of an autocommit block, so it cannot be retried whole"
                        f"{guard._blocked_by()}. Finish it by hand or downgrade it, then run "
                        "the same command again"
                    ) from exc
                if guard._budget_spent(attempt, started):
                    raise guard._spent(what, attempt, started) from None
                pause = guard.policy.backoff(attempt)
                guard.policy.notify(
                    f"lock timeout ({guard.policy.lock_timeout}) in {what}; retry {attempt} of "
                    f"{guard.policy.retries} in {pause:.1f}s{guard._blocked_by()}"
                )
                guard.policy.pause(pause, what)


class BlockerWatch:
    """A thread with its own connection that records who blocks `pid`, while it waits.

    A blocker's query is another session's text, and it ends up in the error, the ledger
    and the event log: it is kept without its literals (phasegate.redact), which may be
    that session's secrets.
    """

    QUERY = """
        SELECT pid, application_name, state, usename,
               extract(epoch FROM now() - xact_start)::int AS xact_seconds,
               left(query, 4096) AS query
        FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids(%s)) ORDER BY pid
    """

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.blockers: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phasegate-blockers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from phasegate.db import libpq_url  # late: db imports this module

        try:
            with psycopg.connect(
                libpq_url(self.url), autocommit=True, application_name="phasegate blocker watch"
            ) as conn:
                while not self._stop.wait(WATCH_INTERVAL):
                    cursor = conn.execute(self.QUERY, (self.pid,))
                    rows = cursor.fetchall()
                    if rows:  # keep the last blockers seen: after a timeout there are none
                        names = [c.name for c in cursor.description or ()]
                        blockers = [dict(zip(names, r, strict=True)) for r in rows]
                        for blocker in blockers:
                            blocker["query"] = without_literals(blocker["query"])
                        self.blockers = blockers
        except psycopg.Error:
            return  # the watch is a courtesy: without it the error names no blocker

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def describe_blocker(b: dict[str, Any]) -> str:
    """One line per blocker: names and query are other sessions' text (see phasegate.text)."""
    age = f", transaction open {b['xact_seconds']}s" if b.get("xact_seconds") is not None else ""
    return (
        f"pid {b['pid']} (application {one_line(b['application_name'] or '-')!r}, "
        f"user {one_line(b['usename'] or '-')}, state {b['state']!r}{age}): "
        f"{one_line(b['query'] or '-')}"
    )


def client_check(connection: psycopg.Connection, local: bool) -> str:
    """PostgreSQL 14+ notices within a second that our process died mid-statement (kill -9)
    and ends the statement, so its locks, the orchestrator's among them, go at once."""
    if connection.info.server_version < 140000:
        return ""
    return f", set_config('client_connection_check_interval', '1s', {str(local).lower()})"


def _text(connection: psycopg.Connection, query: Any) -> str:
    if isinstance(query, sql.Composable):
        return query.as_string(connection)
    if isinstance(query, bytes):
        return query.decode(errors="replace")
    return str(query)


def _parse(connection: psycopg.Connection, query: Any, params: Any) -> list[ast.Node] | None:
    """The parse trees of a DDL statement, or None for everything else (and on doubt)."""
    text = _text(connection, query)
    head = text.lstrip().split(None, 1)
    if not head or head[0].upper() not in _DDL_VERBS or params:
        return None
    try:
        return [raw.stmt for raw in parse_sql(text)]
    except ParseError:
        return None


def _describe(connection: psycopg.Connection, query: Any) -> str:
    text = " ".join(_text(connection, query).split())
    return f"`{text[:117]}...`" if len(text) > 120 else f"`{text}`"
