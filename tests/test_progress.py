"""Progress output: where a resumed job starts, and the time left in log lines (no database)."""

from __future__ import annotations

import io

from phasegate.backfill import JobResult
from phasegate.progress import BarProgress, LogProgress, summary


def test_log_lines_count_rows_walked_before_a_resume_and_say_the_time_left() -> None:
    stream = io.StringIO()
    progress = LogProgress(stream, interval=0.0)
    progress.job_started("fill", 1_000, 600)
    progress.batch_done("fill", 100, 90)
    started, batch = stream.getvalue().splitlines()
    assert started == "job fill: started (~1,000 rows), resuming after 600 rows walked before"
    assert batch.startswith("job fill: 700 rows walked, 90 updated, ")
    assert batch.endswith(" left")


def test_log_lines_of_a_fresh_job_without_an_estimate_say_no_time_left() -> None:
    stream = io.StringIO()
    progress = LogProgress(stream, interval=0.0)
    progress.job_started("fill", None, 0)
    progress.batch_done("fill", 100, 100)
    started, batch = stream.getvalue().splitlines()
    assert started == "job fill: started"
    assert batch.startswith("job fill: 100 rows walked, 100 updated, ")
    assert batch.endswith(" rows/s")


def test_the_bar_of_a_resumed_job_starts_where_the_job_is() -> None:
    from rich.console import Console

    progress = BarProgress(Console(file=io.StringIO(), force_terminal=True))
    progress.job_started("fill", 1_000, 600)
    try:
        task = progress.bar.tasks[0]
        assert (task.completed, task.total) == (600, 1_000)
        progress.batch_done("fill", 100, 100)
        assert progress.bar.tasks[0].completed == 700
    finally:
        progress.bar.stop()


def test_an_sql_jobs_summary_claims_no_batches_and_no_verification() -> None:
    result = JobResult("root-causes", "sql", "done", rows=12, batches=1, seconds=0.004)
    assert summary(result) == "job root-causes: 12 rows written, one statement, 0.00s"
    one = JobResult("fill", "update", "done", rows=1, batches=1, seconds=0.5, walked=1)
    assert summary(one).startswith("job fill: 1 row walked, 1 written, in 1 batch, 0.50s")
