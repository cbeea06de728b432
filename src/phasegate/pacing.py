"""How fast a backfill walks: batch sizing, pauses, replica lag, retries.

Sizing follows pt-online-schema-change: aim each batch at a target time using a decaying
average of rows per second. Only the batch statement itself is timed (a wait that does
not depend on the batch size, such as a commit or a pause, would otherwise shrink the
batches to the floor). An explicit batch size turns adaptation off.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import psycopg

from phasegate.db import Session

# SQLSTATEs a batch may hit under load and survive by being retried smaller or later.
RETRYABLE = {
    "55P03": "lock timeout",
    "57014": "statement timeout",
    "40P01": "deadlock",
    "40001": "serialization failure",
}
# What a one-shot `sql` job retries whole: the database cancelled it to break a cycle with
# other transactions. Not a statement timeout (the same statement would run as long again);
# a lock timeout goes by the lock guard's budget, as a revision's transaction does.
CONFLICTS = frozenset({"40P01", "40001"})


@dataclass
class BackfillSettings:
    """Knobs for batched jobs; the CLI fills them, the defaults suit a busy OLTP table."""

    batch_size: int | None = None  # fixed size: turns adaptation off
    target_ms: float = 50.0
    min_batch: int = 100
    max_batch: int = 10_000
    first_batch: int = 1_000
    pause: float = 0.0  # seconds between batches
    pause_ratio: float = 0.0  # sleep this multiple of the last batch's time
    max_replica_lag: float | None = 10.0  # seconds of replay lag before backing off
    statement_timeout: str = "30s"  # per batch statement: set on each walk session
    lock_timeout: str = "1s"
    retries: int = 8
    workers: int = 1
    slices: int | None = None  # default: 1 for one worker, 4 per worker otherwise
    stop: threading.Event = field(default_factory=threading.Event)

    def slice_count(self) -> int:
        if self.slices:
            return self.slices
        return 1 if self.workers <= 1 else 4 * self.workers


class BatchSizer:
    """Next batch size from a decaying average of rows/s, clamped and growing gently."""

    WEIGHT = 0.75  # of the old average, as pt-online-schema-change does
    SLOW = 1.5  # a batch this many times over target resets the average: tails stay short

    def __init__(self, settings: BackfillSettings, fixed: int | None) -> None:
        self.fixed = settings.batch_size or fixed  # the command line wins over the plan
        self.target = settings.target_ms / 1000
        self.floor, self.ceiling = settings.min_batch, settings.max_batch
        self.size = self.fixed or settings.first_batch
        self.rate: float | None = None

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    def observe(self, rows: int, seconds: float) -> None:
        """Feed the time the batch statement took for `rows` keys."""
        if not self.adaptive:
            self.size = self.fixed  # a shrink for a retry lasts one batch
            return
        if rows <= 0:
            return
        sample = rows / max(seconds, 1e-4)
        if self.rate is None or seconds > self.SLOW * self.target:
            self.rate = sample  # a slow batch (load, contention) counts in full, at once
        else:
            self.rate = self.WEIGHT * self.rate + (1 - self.WEIGHT) * sample
        wanted = int(self.rate * self.target)
        self.size = max(self.floor, min(self.ceiling, wanted, self.size * 2))

    def shrink(self) -> None:
        """After a timeout or lock wait: try again with half the rows."""
        self.size = max(self.floor if self.adaptive else 1, self.size // 2)


class Throttle:
    """Pauses between batches and backs off while replicas lag."""

    LAG_CHECK_EVERY = 1.0  # seconds: replica lag moves slowly, a query per batch is waste

    def __init__(self, settings: BackfillSettings) -> None:
        self.settings = settings
        self.lag_checked = float("-inf")
        self.lag_hidden_said = False

    def after_batch(self, db: Session, batch_seconds: float, notify) -> float:
        """Pause as --pause and --pause-ratio ask, then wait out replica lag; the pause asked
        for is returned, for the job's summary (`paused_seconds`)."""
        pause = self.settings.pause + self.settings.pause_ratio * batch_seconds
        if pause > 0 and self.settings.stop.wait(pause):
            return pause
        limit = self.settings.max_replica_lag
        now = time.monotonic()
        if limit is None or now - self.lag_checked < self.LAG_CHECK_EVERY:
            return pause
        self.lag_checked = now
        delay = 0.5
        while not self.settings.stop.is_set():
            lag = replica_lag(db)
            if lag.hidden_from is not None and not self.lag_hidden_said:
                self.lag_hidden_said = True  # the replicas it can see still count
                notify(
                    f"replica replay lag is hidden from role {lag.hidden_from} "
                    f"(pg_stat_replication shows a replica's details only to members of "
                    f"pg_read_all_stats): the walk cannot back off on --max-replica-lag. "
                    f"GRANT pg_read_all_stats (or pg_monitor) TO {lag.hidden_from}, or "
                    f"pass --max-replica-lag 0 to say that is intended"
                )
            if lag.seconds is None or lag.seconds <= limit:
                return pause
            notify(f"replica replay lag {lag.seconds:.1f}s > {limit:.1f}s: pausing {delay:.1f}s")
            self.settings.stop.wait(delay)
            delay = min(delay * 2, 30.0)
        return pause


@dataclass(frozen=True)
class ReplicaLag:
    seconds: float | None  # the worst replay lag; None: no replica reports one
    hidden_from: str | None = None  # this role, when a replica's details are hidden from it


def replica_lag(db: Session) -> ReplicaLag:
    """The worst replay lag among streaming replicas, as this role may see it.

    A role outside pg_read_all_stats sees another role's walsender as a row with only its
    pid: every other column NULL, so the lag would read as "no replica" and the walk would
    never back off. That case is told apart (state IS NULL) and reported.
    """
    with db.tx():
        row = db.execute(
            "SELECT bool_or(state IS NULL), extract(epoch FROM max(replay_lag))::float8,"
            " current_user::text FROM pg_stat_replication"
        ).fetchone()
    hidden, seconds, role = row if row else (None, None, None)
    return ReplicaLag(seconds, role if hidden else None)


def retry_reason(exc: BaseException, retryable: Collection[str] = RETRYABLE.keys()) -> str | None:
    """Why a failed batch (or, with `retryable`, another step) may be retried, or None if it
    must not be."""
    cause = exc
    while cause is not None and not isinstance(cause, psycopg.Error):
        cause = cause.__cause__ or getattr(cause, "orig", None)
    sqlstate = getattr(cause, "sqlstate", None) or ""
    return RETRYABLE.get(sqlstate) if sqlstate in retryable else None


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter: 0.1 s, 0.2 s, 0.4 s ... capped."""
    return random.uniform(0, min(cap, base * 2**attempt))
