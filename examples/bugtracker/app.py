"""Simulated bug tracker instances (v1 or v2 code) writing to the database while a plan runs.

Each ``AppInstance`` is one running deployment: its own connection, tagged
``application_name=bugtracker/<version>`` so phasegate's gates see it in pg_stat_activity, and a
steady stream of short write transactions. It records every outcome (failures, latencies) and the
final state each of its writes should leave behind, so ``check_writes`` can prove afterwards,
row by row, that a migration lost or garbled nothing.

The demo and the benchmarks load this file by path, so it imports its siblings by putting its
own directory on ``sys.path`` (no package-relative imports).
"""

# No `from __future__ import annotations`: with it, @dataclass fails in a module loaded by path
# that is not in sys.modules, which is how the demo and the benchmarks load this file.
import math
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sqlalchemy import Engine, create_engine, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from phasegate.appversion import connect_args

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import models_v1  # noqa: E402
import models_v2  # noqa: E402
from sample_data import PEOPLE, ROOT_CAUSE_NAMES, ROOT_CAUSE_WEIGHTS  # noqa: E402

MAX_ERRORS_KEPT = 5
URL_PREFIX = "https://bugs.example.com/"


def psycopg_url(url: str) -> str:
    """Map a plain postgresql:// or postgres:// URL to SQLAlchemy's psycopg 3 driver."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def major_version(version: str) -> int:
    """The major number of a version string such as "1.4.2" (the only part the app acts on)."""
    head = version.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"version {version!r} does not start with a major number")
    return int(head)


@dataclass(frozen=True)
class AppStats:
    """What one instance saw: the numbers a zero-downtime claim is judged by."""

    ok: int
    failed: int
    p99_latency: float
    max_latency: float
    errors: list[str] = field(default_factory=list)


def _p99(latencies: Sequence[float]) -> float:
    """Nearest-rank 99th percentile; 0.0 for no samples."""
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class AppInstance(threading.Thread):
    """One app deployment of a given version, writing bugs at a steady rate until stopped.

    Major version 1 writes ``bug.root_cause`` text; major version 2 upserts ``root_cause`` by
    name and writes ``bug.root_cause_id``. Inserts use URLs unique to this instance
    (``{app}-{version}-{seed}-{n}``, so give concurrent instances distinct seeds), and updates
    touch only bugs this instance inserted, plus, if given, ``update_ids``: existing (seeded)
    ids that the caller guarantees no other instance updates. So every expectation is exact:
    the last write to a row is always this instance's own.

    ``ops_per_second`` <= 0 means as fast as the database allows.
    """

    def __init__(
        self,
        database_url: str,
        version: str,
        app: str = "bugtracker",
        ops_per_second: float = 20.0,
        seed: int = 0,
        update_ids: Sequence[int] | None = None,
    ) -> None:
        major = major_version(version)
        if major not in (1, 2):
            raise ValueError(f"the example app has versions 1.x and 2.x, not {version!r}")
        super().__init__(name=f"{app}/{version}#{seed}", daemon=True)
        self.version = version
        self.app = app
        self.major = major
        self.seed = seed
        self.ops_per_second = ops_per_second
        self.update_ids: Sequence[int] = update_ids if update_ids is not None else ()
        self.engine: Engine = create_engine(
            psycopg_url(database_url),
            pool_size=1,
            max_overflow=0,
            connect_args=connect_args(app, version),  # application_name=<app>/<version>
        )
        self._rng = random.Random(seed)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._counter = 0
        self._own_ids: list[int] = []
        self._ok = 0
        self._failed = 0
        self._latencies: list[float] = []
        self._scheduled: list[float] = []  # when each op was due (time.monotonic())
        self._errors: list[str] = []
        self._expected: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect first (so pg_stat_activity shows this version at once), then start writing."""
        with self.engine.connect():
            pass  # the pool (size 1) keeps this connection open for the thread
        super().start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop writing, wait for the last op, and close the connection (it leaves pg_stat)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
            if self.is_alive():
                raise TimeoutError(f"{self.name} did not stop within {timeout} s")
        self.engine.dispose()

    def run(self) -> None:
        """Issue ops at the configured rate; a failed op is recorded, never raised.

        An op's latency runs from when it was due, not from when it started: an op that
        could only start late, because the one before it was blocked, waited too
        (otherwise a blocked writer's backlog would vanish from the numbers). A backlog of
        more than a second is dropped, not replayed: the blocked op counts that wait once.
        """
        interval = 1.0 / self.ops_per_second if self.ops_per_second > 0 else 0.0
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            self._one_op(next_at if interval else time.monotonic())
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop_event.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # fell far behind (blocked): do not burst

    # -- results ---------------------------------------------------------------------------

    def stats(self) -> AppStats:
        """A snapshot of the counters; safe to call while running."""
        with self._lock:
            return AppStats(
                ok=self._ok,
                failed=self._failed,
                p99_latency=_p99(self._latencies),
                max_latency=max(self._latencies, default=0.0),
                errors=list(self._errors),
            )

    @property
    def latencies(self) -> list[float]:
        """Every op's latency in seconds (from when it was due), failed ones included."""
        with self._lock:
            return list(self._latencies)

    @property
    def op_due(self) -> list[float]:
        """When each op was due (time.monotonic()), in the order of `latencies`."""
        with self._lock:
            return list(self._scheduled)

    @property
    def expectations(self) -> dict[str, str]:
        """bug_tracker_url -> root cause name that the row must end up with."""
        with self._lock:
            return dict(self._expected)

    # -- one op ----------------------------------------------------------------------------

    def _one_op(self, due: float) -> None:
        """Pick an insert or an update, run it in its own transaction, record the outcome.

        An update that matches no row failed: every id it picks exists (nothing deletes
        bugs), so a row the UPDATE did not reach means a write was silently dropped (a
        trigger returning NULL, say), and it must not count as done.
        """
        can_update = bool(self._own_ids or self.update_ids)
        cause = self._rng.choices(ROOT_CAUSE_NAMES, weights=ROOT_CAUSE_WEIGHTS)[0]
        try:
            if can_update and self._rng.random() < 0.5:
                bug_id = self._pick_update_id()
                url = (
                    self._update_v1(bug_id, cause)
                    if self.major == 1
                    else self._update_v2(bug_id, cause)
                )
                if url is None:
                    raise LookupError(f"UPDATE of bug {bug_id} changed no row")
            else:
                self._counter += 1
                url = f"{URL_PREFIX}{self.app}-{self.version}-{self.seed}-{self._counter}"
                who = self._rng.choice(PEOPLE)
                if self.major == 1:
                    bug_id = self._insert_v1(url, cause, who)
                else:
                    bug_id = self._insert_v2(url, cause, who)
                self._own_ids.append(bug_id)
        except Exception as exc:  # a failed app query is data for the report, never a crash
            elapsed = time.monotonic() - due
            first_line = (str(exc).strip().splitlines() or [""])[0]
            with self._lock:
                self._failed += 1
                self._latencies.append(elapsed)
                self._scheduled.append(due)
                if len(self._errors) < MAX_ERRORS_KEPT:
                    self._errors.append(f"{type(exc).__name__}: {first_line}")
            return
        elapsed = time.monotonic() - due
        with self._lock:
            self._ok += 1
            self._latencies.append(elapsed)
            self._scheduled.append(due)
            self._expected[url] = cause

    def _pick_update_id(self) -> int:
        """One of this instance's own bugs, or one of the ids it was given to update."""
        if self._own_ids and (not self.update_ids or self._rng.random() < 0.5):
            return self._rng.choice(self._own_ids)
        return self.update_ids[self._rng.randrange(len(self.update_ids))]

    def _insert_v1(self, url: str, cause: str, who: str) -> int:
        """v1: a bug with its root cause as text."""
        with Session(self.engine) as session, session.begin():
            bug = models_v1.Bug(bug_tracker_url=url, root_cause=cause, who=who)
            session.add(bug)
            session.flush()
            return bug.id

    def _update_v1(self, bug_id: int, cause: str) -> str | None:
        """v1: rewrite a bug's root cause text; returns its URL (None if no row changed)."""
        Bug = models_v1.Bug
        with Session(self.engine) as session, session.begin():
            return session.scalar(
                update(Bug)
                .where(Bug.id == bug_id)
                .values(root_cause=cause)
                .returning(Bug.bug_tracker_url),
                execution_options={"synchronize_session": False},
            )

    @staticmethod
    def _root_cause_id(session: Session, cause: str) -> int:
        """v2: upsert the root cause by name, then read its id (race-safe under READ COMMITTED)."""
        RootCause = models_v2.RootCause
        session.execute(
            pg_insert(RootCause)
            .values(name=cause)
            .on_conflict_do_nothing(index_elements=[RootCause.name])
        )
        return session.execute(select(RootCause.id).where(RootCause.name == cause)).scalar_one()

    def _insert_v2(self, url: str, cause: str, who: str) -> int:
        """v2: a bug pointing at its curated root cause."""
        with Session(self.engine) as session, session.begin():
            bug = models_v2.Bug(
                bug_tracker_url=url, root_cause_id=self._root_cause_id(session, cause), who=who
            )
            session.add(bug)
            session.flush()
            return bug.id

    def _update_v2(self, bug_id: int, cause: str) -> str | None:
        """v2: point a bug at another root cause; returns its URL (None if no row changed)."""
        Bug = models_v2.Bug
        with Session(self.engine) as session, session.begin():
            return session.scalar(
                update(Bug)
                .where(Bug.id == bug_id)
                .values(root_cause_id=self._root_cause_id(session, cause))
                .returning(Bug.bug_tracker_url),
                execution_options={"synchronize_session": False},
            )


_CHECK_SQL = {
    "v1": (
        "SELECT b.bug_tracker_url, b.root_cause FROM bug AS b WHERE b.bug_tracker_url = ANY(:urls)"
    ),
    "v2": (
        "SELECT b.bug_tracker_url, rc.name FROM bug AS b "
        "LEFT JOIN root_cause AS rc ON rc.id = b.root_cause_id "
        "WHERE b.bug_tracker_url = ANY(:urls)"
    ),
}


def check_writes(
    database_url: str,
    expectations: dict[str, str],
    schema: Literal["v1", "v2"],
    chunk_size: int = 10_000,
) -> list[str]:
    """List every row that is missing or holds another root cause than expected ([] = all good).

    ``schema`` says how to read the root cause: "v1" from bug.root_cause, "v2" from
    root_cause.name through bug.root_cause_id. While a plan keeps both in sync, both must pass.
    """
    if schema not in _CHECK_SQL:
        raise ValueError(f"schema must be 'v1' or 'v2', not {schema!r}")
    engine = create_engine(
        psycopg_url(database_url),
        poolclass=NullPool,
        connect_args={"application_name": "phasegate-example-check"},
    )
    urls = sorted(expectations)
    found: dict[str, str | None] = {}
    try:
        with engine.connect() as connection:
            for start in range(0, len(urls), chunk_size):
                rows = connection.execute(
                    text(_CHECK_SQL[schema]), {"urls": urls[start : start + chunk_size]}
                )
                found.update({url: cause for url, cause in rows})
    finally:
        engine.dispose()
    problems: list[str] = []
    for url in urls:
        expected = expectations[url]
        if url not in found:
            problems.append(f"{url}: missing (expected root cause {expected!r})")
        elif found[url] != expected:
            problems.append(f"{url}: root cause {found[url]!r}, expected {expected!r}")
    return problems
