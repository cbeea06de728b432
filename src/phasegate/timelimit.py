"""A time limit on code that may block for ever, such as a revision's module-level code.

Alembic imports every revision file to read the graph, so a file that sleeps, connects or
queries at import would hang `validate`, `status` and `advance` with no word. SIGALRM
(an interval timer) interrupts the main thread: Python runs the handler between bytecodes
and when a blocking call (sleep, connect, recv) is interrupted, and the exception it
raises ends that call instead of letting it resume.

Only the main thread can receive signals, and the process has only one real-time timer:
elsewhere, or while someone else's timer is armed, the code runs without a limit rather
than take that timer away.
"""

from __future__ import annotations

import os
import signal
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from phasegate.durations import format_duration, parse_duration
from phasegate.errors import UsageError


class TimeLimitExceeded(BaseException):
    """The time ran out. A BaseException, like KeyboardInterrupt, so that code under the
    limit (a retry loop with `except Exception`) cannot swallow it and keep blocking."""

    def __init__(self, seconds: float, stack: list[traceback.FrameSummary]) -> None:
        super().__init__(f"still running after {format_duration(seconds)}")
        self.seconds = seconds
        self.stack = stack  # what was running when the time ran out, outermost first


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimitExceeded in the block after `seconds` (0 or less: no limit)."""
    usable = (
        seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def expire(_signum: int, frame: FrameType | None) -> None:
        raise TimeLimitExceeded(seconds, traceback.extract_stack(frame) if frame else [])

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def seconds_from_env(name: str, default: float) -> float:
    """A duration from environment variable `name` (90, 90s, 2m; 0 turns the limit off)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"${name}: {exc} (0 turns the limit off)") from None
