"""Batch sizing, pauses, retry backoff and the status view of a job: pure logic, no database."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from phasegate.ledger import Checkpoint
from phasegate.lockguard import LockPolicy
from phasegate.orchestrator import _job_status
from phasegate.pacing import BackfillSettings, BatchSizer, Throttle, backoff


def sizer(**settings: object) -> BatchSizer:
    return BatchSizer(BackfillSettings(**settings), fixed=None)  # type: ignore[arg-type]


def test_a_steady_rate_settles_on_the_rows_that_fill_the_target_time() -> None:
    s = sizer(target_ms=50.0, first_batch=100)
    for _ in range(30):
        s.observe(s.size, s.size / 10_000)  # 10,000 rows/s whatever the size
    assert s.size == 500  # 10,000 rows/s x 50 ms


def test_a_batch_grows_at_most_twofold_per_step() -> None:
    s = sizer(target_ms=50.0, first_batch=100)
    sizes = [s.size]
    for _ in range(6):
        s.observe(s.size, s.size / 1_000_000)  # very fast: wants 50,000 rows
        sizes.append(s.size)
    assert sizes == [100, 200, 400, 800, 1600, 3200, 6400]


def test_the_size_stays_between_the_floor_and_the_ceiling() -> None:
    s = sizer(target_ms=50.0, first_batch=1000, min_batch=100, max_batch=2000)
    for _ in range(10):
        s.observe(s.size, s.size / 1_000_000)
    assert s.size == 2000
    s.observe(s.size, 10.0)  # 200 rows/s: wants 10 rows
    assert s.size == 100


def test_a_slow_batch_resets_the_average_at_once() -> None:
    s = sizer(target_ms=50.0, first_batch=1000)
    for _ in range(10):
        s.observe(s.size, s.size / 20_000)  # settles at 1,000 rows
    assert s.size == 1000
    s.observe(1000, 1.0)  # 20x the target: 1,000 rows/s from now on, not an average
    assert s.size == 100  # the floor; 1,000 rows/s x 50 ms = 50 rows


def test_a_fixed_size_ignores_timings_and_a_shrink_lasts_one_batch() -> None:
    s = BatchSizer(BackfillSettings(), fixed=300)
    assert not s.adaptive and s.size == 300
    s.observe(300, 5.0)
    assert s.size == 300
    s.shrink()
    s.shrink()
    assert s.size == 75
    s.observe(75, 0.01)
    assert s.size == 300


def test_the_command_line_size_wins_over_the_plan() -> None:
    assert BatchSizer(BackfillSettings(batch_size=40), fixed=300).size == 40


@pytest.mark.parametrize(
    "pause, ratio, batch_seconds, expected",
    [(0.25, 0.0, 0.05, 0.25), (0.0, 4.0, 0.05, 0.2), (0.1, 2.0, 0.05, 0.2), (0.0, 0.0, 0.05, 0.0)],
)
def test_the_pause_is_fixed_plus_a_ratio_of_the_last_batch(
    pause: float, ratio: float, batch_seconds: float, expected: float
) -> None:
    waits: list[float] = []

    class Recording(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            return False

    settings = BackfillSettings(
        pause=pause, pause_ratio=ratio, max_replica_lag=None, stop=Recording()
    )
    Throttle(settings).after_batch(None, batch_seconds, print)  # type: ignore[arg-type]
    assert waits == ([pytest.approx(expected)] if expected else [])


def test_status_rate_counts_this_run_and_eta_the_rows_left() -> None:
    """Rate: keys walked since this run started over its seconds (a resume's earlier rows
    are not this run's); ETA: the estimate's rows not walked yet at that rate."""
    now = dt.datetime(2026, 11, 24, 12, 0, 10, tzinfo=dt.timezone.utc)
    cp = Checkpoint(
        "p",
        "fill",
        status="running",
        walked=4000,
        run_walked=1000,
        total=10_000,
        run_started_at=now - dt.timedelta(seconds=10),
    )
    view = _job_status(cp, now)
    assert (view["rows_per_second"], view["eta_seconds"]) == (300, 20)
    cp.status = "done"
    assert _job_status(cp, now)["eta_seconds"] is None


def test_lock_retry_delays_grow_exponentially_with_jitter_inside_their_bounds() -> None:
    """Equal jitter: retry n waits between half and all of min(8 s, 0.25 s x 2**n), and the
    delays vary, so two blocked orchestrators (or a revision and the app's retry loop) do
    not keep colliding in step."""
    policy = LockPolicy()
    for attempt in range(1, 8):
        ceiling = min(8.0, 0.25 * 2**attempt)
        delays = [policy.backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays))
        assert len(set(delays)) > 100, attempt  # jitter: not one fixed delay
        assert max(delays) - min(delays) > ceiling / 4  # spread over the range
    assert policy.backoff(20) <= 8.0  # capped


def test_batch_retry_delays_have_full_jitter_under_their_exponential_cap() -> None:
    """A retried batch waits a random share of min(5 s, 0.1 s x 2**n): never longer, and
    not the same each time (workers retrying together would collide again)."""
    for attempt in range(1, 8):
        ceiling = min(5.0, 0.1 * 2**attempt)
        delays = [backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100 and max(delays) - min(delays) > ceiling / 2
