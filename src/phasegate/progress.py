"""Showing backfill progress: a rich bar on a terminal, periodic log lines elsewhere.

Everything goes to stderr so `--json` output on stdout stays one clean document. Text
passes `terminal_safe`, and for rich also `rich.markup.escape` (rich reads `[...]` as
markup): names come from plans, and nothing shown may steer the terminal.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from phasegate.backfill import JobResult
from phasegate.durations import format_duration
from phasegate.text import terminal_safe

if TYPE_CHECKING:  # rich loads only when a terminal shows a bar: it costs ~80 ms at start
    from rich.console import Console


class BarProgress:
    """A rich progress bar per job: rows walked, rate, ETA from pg_class.reltuples."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def job_started(self, job: str, total: int | None, done: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10} rows/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.bar.start()
        self.tasks[job] = self.bar.add_task(_rich_safe(job), total=total, completed=done, rate="-")
        self._started = time.monotonic()
        self._scanned = 0

    def batch_done(self, job: str, scanned: int, updated: int) -> None:
        if self.bar is None:
            return
        self._scanned += scanned
        rate = self._scanned / max(time.monotonic() - self._started, 1e-6)
        self.bar.update(self.tasks[job], advance=scanned, rate=f"{rate:,.0f}")

    def job_finished(self, result: JobResult) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.console.print(_rich_safe(summary(result)))


class LogProgress:
    """One line every `interval` seconds, for CI logs and pipes."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._started = self._last = time.monotonic()
        self._scanned = self._updated = self._done = 0
        self._total: int | None = None

    def job_started(self, job: str, total: int | None, done: int) -> None:
        """`done`: rows an earlier run of the job already walked (a resume goes on from it)."""
        self._started = self._last = time.monotonic()
        self._scanned, self._updated, self._total, self._done = 0, 0, total, done
        estimate = f" (~{total:,} rows)" if total else ""
        resumed = f", resuming after {done:,} rows walked before" if done else ""
        self._write(f"job {job}: started{estimate}{resumed}")

    def batch_done(self, job: str, scanned: int, updated: int) -> None:
        self._scanned += scanned
        self._updated += updated
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            rate = self._scanned / max(now - self._started, 1e-6)
            walked = self._done + self._scanned
            left = (
                f", about {format_duration((self._total - walked) / rate)} left"
                if (self._total and rate > 0 and walked < self._total)
                else ""
            )
            self._write(
                f"job {job}: {walked:,} rows walked, {self._updated:,} updated, "
                f"{rate:,.0f} rows/s{left}"
            )

    def job_finished(self, result: JobResult) -> None:
        self._write(summary(result))

    def _write(self, line: str) -> None:
        print(terminal_safe(line), file=self.stream, flush=True)


def _rich_safe(text: str) -> str:
    from rich.markup import escape

    return escape(terminal_safe(text))


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 batch`, `2 batches`, `1,000 rows`."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def summary(result: JobResult) -> str:
    """The job's closing line: rows walked (what the rate counts) and rows written differ
    on a resumed or partly done job, so both are said."""
    if result.status == "skipped":
        return f"job {result.name}: already done ({counted(result.rows, 'row')}), skipped"
    if result.kind == "sql":  # one statement, and no `where` to verify
        return (
            f"job {result.name}: {counted(result.rows, 'row')} written, one statement, "
            f"{result.seconds:.2f}s"
        )
    totals = (result.job_rows, result.job_batches)
    in_all = (
        f" this run ({counted(totals[0], 'row')} written in "
        f"{counted(totals[1], 'batch', 'batches')} in all, earlier runs and helpers included)"
        if totals[0] is not None
        and totals[1] is not None
        and totals != (result.rows, result.batches)
        else ""
    )
    return (
        f"job {result.name}: {counted(result.walked, 'row')} walked, {result.rows:,} written, "
        f"in {counted(result.batches, 'batch', 'batches')}{in_all}, {result.seconds:.2f}s "
        f"({result.rate:,.0f} rows/s), verified"
    )
