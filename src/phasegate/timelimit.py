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
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
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


# How the process ends when the block still runs `HARD_STOP_AFTER` seconds past its limit
# (a C call that retries through the signal: libpq's connect): set by the CLI, which owns
# the process; a library caller keeps its process and only gets the exception.
hard_stop: Callable[[str], None] | None = None
HARD_STOP_AFTER = 10.0
REPEAT_EVERY = 0.5  # the timer fires again until the block ends: a bare `except:` swallows one


@contextmanager
def time_limit(
    seconds: float, explain: Callable[[list[traceback.FrameSummary]], str] | None = None
) -> Iterator[None]:
    """Raise TimeLimitExceeded in the block after `seconds` (0 or less: no limit), again
    every `REPEAT_EVERY` seconds until it ends; with `hard_stop` set and `explain` given, end
    the process `HARD_STOP_AFTER` seconds later, saying `explain(the main thread's stack)`."""
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

    done = threading.Event()
    main = threading.main_thread().ident

    def watchdog() -> None:
        if done.wait(seconds + HARD_STOP_AFTER) or hard_stop is None or explain is None:
            return
        frame = sys._current_frames().get(main) if main is not None else None
        hard_stop(explain(traceback.extract_stack(frame) if frame else []))

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT_EVERY)
    threading.Thread(target=watchdog, name="phasegate-time-limit", daemon=True).start()
    try:
        yield
    finally:
        done.set()
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
