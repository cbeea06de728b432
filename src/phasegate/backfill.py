"""Backfill jobs: one-shot `sql` jobs and batched keyset `update` jobs.

A batched job walks the key in ascending order, one short transaction per batch; the
checkpoint (last key, rows, batches) is written in the same transaction as the batch, so
a crash loses nothing and a restart resumes exactly where the database is. The walk ends
at the largest key present when the job started: rows inserted later go through the sync
trigger. No row ever travels to Python; only the batch's last key does. A job is done
only when its `where` predicate matches no row (verification).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg import sql

from phasegate import ledger
from phasegate.db import Session, quote_table
from phasegate.errors import RuntimeFailure
from phasegate.plan import Job, Plan, PlanError
from phasegate.sync import BACKFILL_SETTING

DEFAULT_BATCH_SIZE = 2000
VERIFY_SAMPLE = 1000


class Progress(Protocol):
    """What the backfill tells whoever shows progress (the CLI; nothing in tests)."""

    def job_started(self, job: str, total: int | None, done: int) -> None: ...
    def batch_done(self, job: str, scanned: int, updated: int) -> None: ...
    def job_finished(self, result: JobResult) -> None: ...


class NoProgress:
    def job_started(self, job: str, total: int | None, done: int) -> None:
        pass

    def batch_done(self, job: str, scanned: int, updated: int) -> None:
        pass

    def job_finished(self, result: JobResult) -> None:
        pass


@dataclass
class JobResult:
    name: str
    kind: str  # "sql" | "update"
    status: str  # "done" | "skipped" (already done)
    rows: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "rows": self.rows,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rate),
        }


@dataclass(frozen=True)
class KeyColumn:
    name: str
    type: str  # format_type() output, already quoted by PostgreSQL where needed


@dataclass(frozen=True)
class BatchedWork:
    """What one batched walk does; the backfill (up) and the contract refill (down)."""

    checkpoint: str  # name in the ledger
    table: str
    key: str | None
    assignments: Mapping[str, str]
    where: sql.Composable
    batch_size: int


def check_columns(db: Session, plan: Plan) -> None:
    """Every table and column a job names must exist before any trigger is installed."""
    issues = []
    for index, job in enumerate(plan.jobs()):
        if not job.is_batched:
            continue
        loc = ("phases", "backfill", "jobs", index)
        columns = table_columns(db, job.table or "")
        if columns is None:
            issues.append(
                plan.issue(
                    (*loc, "table"),
                    f"table {job.table!r} does not exist",
                    "names are exact (case-sensitive); did the expand phase create it?",
                )
            )
            continue
        named = [(c, (*loc, "set", c)) for c in job.new_columns]
        named += [(c, (*loc, "sync", "down", c)) for c in job.old_columns]
        if job.key:
            named.append((job.key, (*loc, "key")))
        for column, where in named:
            if column not in columns:
                issues.append(
                    plan.issue(
                        where,
                        f"column {column!r} does not exist in table {job.table!r}",
                        f"columns there: {', '.join(sorted(columns))}",
                    )
                )
    if issues:
        raise PlanError(issues)


def table_columns(db: Session, table: str) -> set[str] | None:
    with db.tx():
        rel = db.scalar("SELECT to_regclass(%(t)s)::oid", {"t": _regclass_text(db, table)})
        if rel is None:
            return None
        rows = db.all(
            "SELECT attname FROM pg_attribute WHERE attrelid = %(r)s AND attnum > 0 "
            "AND NOT attisdropped",
            {"r": rel},
        )
    return {r[0] for r in rows}


def run_sql_job(db: Session, plan: str, job: Job, progress: Progress) -> JobResult:
    """Run a one-shot statement once; its checkpoint commits with it."""
    cp = ledger.get_checkpoint(db, plan, job.name)
    if cp.status == "done":
        result = JobResult(job.name, "sql", "skipped", rows=cp.rows_done)
        progress.job_finished(result)
        return result
    progress.job_started(job.name, None, 0)
    started = time.monotonic()
    with db.tx():
        _mark_backfill_session(db)
        rows = max(db.execute(job.sql or "").rowcount, 0)
        cp.status, cp.rows_done, cp.batches = "done", rows, 1
        cp.verified_at = None
        ledger.save_checkpoint(db, cp)
    result = JobResult(job.name, "sql", "done", rows, 1, time.monotonic() - started)
    progress.job_finished(result)
    return result


def up_work(job: Job, batch_size: int | None) -> BatchedWork:
    return BatchedWork(
        checkpoint=job.name,
        table=job.table or "",
        key=job.key,
        assignments=job.set_ or {},
        where=sql.SQL(job.where or "FALSE"),
        batch_size=batch_size or job.batch_size or DEFAULT_BATCH_SIZE,
    )


def down_name(job: Job) -> str:
    """The checkpoint of a job's refill (rollback of contract)."""
    return f"{job.name}@down"


def down_work(job: Job, batch_size: int | None) -> BatchedWork:
    """Refill the old columns from the new ones (rollback of contract)."""
    old_null = sql.SQL(" AND ").join(
        sql.SQL("new.{} IS NULL").format(sql.Identifier(c)) for c in job.old_columns
    )
    new_set = sql.SQL(" OR ").join(
        sql.SQL("new.{} IS NOT NULL").format(sql.Identifier(c)) for c in job.new_columns
    )
    return BatchedWork(
        checkpoint=down_name(job),
        table=job.table or "",
        key=job.key,
        assignments=job.sync.down if job.sync else {},
        where=sql.SQL("({}) AND ({})").format(old_null, new_set),
        batch_size=batch_size or job.batch_size or DEFAULT_BATCH_SIZE,
    )


def run_batched(db: Session, plan: str, work: BatchedWork, progress: Progress) -> JobResult:
    """Walk the key in batches from the checkpoint to the bound fixed at the start."""
    cp = ledger.get_checkpoint(db, plan, work.checkpoint)
    if cp.status == "done":
        result = JobResult(work.checkpoint, "update", "skipped", cp.rows_done, cp.batches)
        progress.job_finished(result)
        return result
    key = resolve_key(db, work.table, work.key)
    table = quote_table(work.table)
    with db.tx():
        if cp.status in ("pending", "failed") or cp.upper_key is None:
            # a new walk (or a sweep after failed verification) covers every row there now
            cp.upper_key = db.scalar(
                sql.SQL("SELECT max({})::text FROM {}").format(sql.Identifier(key.name), table)
            )
            cp.last_key = None
        cp.status = "running"
        ledger.save_checkpoint(db, cp)
        total = db.scalar(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%(t)s)",
            {"t": table.as_string(db.raw)},
        )
    progress.job_started(work.checkpoint, total or None, cp.rows_done)
    started = time.monotonic()
    rows_before, batches_before = cp.rows_done, cp.batches
    finished = cp.upper_key is None  # empty table: nothing to walk
    while not finished:
        statement = _batch_statement(work, key, cp.last_key, cp.upper_key or "")
        with db.tx():
            _mark_backfill_session(db)
            last, updated, scanned = db.execute(statement).fetchone() or (None, 0, 0)
            if scanned:
                cp.last_key = last
                cp.rows_done += updated
                cp.batches += 1
            finished = not scanned or last == cp.upper_key
            ledger.save_checkpoint(db, cp)
        if scanned:
            progress.batch_done(work.checkpoint, scanned, updated)
    remaining = count_remaining(db, work.table, work.where)
    with db.tx():
        if remaining:
            cp.status, cp.last_key, cp.remaining = "failed", None, remaining
            ledger.save_checkpoint(db, cp)
        else:
            cp.status, cp.remaining = "done", 0
            cp.verified_at = db.scalar("SELECT now()")
            ledger.save_checkpoint(db, cp)
    if remaining:
        more = "at least " if remaining >= VERIFY_SAMPLE else ""
        raise RuntimeFailure(
            f"job {work.checkpoint!r}: verification failed, {more}{remaining} row(s) of "
            f"{work.table} still match `where` after the walk (does an expression in `set` "
            f"return NULL for them?). Inspect them with: SELECT * FROM {work.table} AS new "
            f"WHERE {work.where.as_string(db.raw)} LIMIT 10; fix the data or the plan, then "
            f"run the same command again: the job sweeps the whole table once more",
            job=work.checkpoint,
            remaining=remaining,
        )
    result = JobResult(
        work.checkpoint,
        "update",
        "done",
        cp.rows_done - rows_before,
        cp.batches - batches_before,
        time.monotonic() - started,
    )
    progress.job_finished(result)
    return result


def count_remaining(db: Session, table: str, where: sql.Composable) -> int:
    """Rows that still match `where` (counted up to VERIFY_SAMPLE: zero is what matters)."""
    with db.tx():
        return int(
            db.scalar(
                sql.SQL(
                    "SELECT count(*) FROM (SELECT 1 FROM {} AS new WHERE {} LIMIT {}) AS pending"
                ).format(quote_table(table), where, sql.Literal(VERIFY_SAMPLE))
            )
        )


def resolve_key(db: Session, table: str, key: str | None) -> KeyColumn:
    """The job's `key`, or the table's single-column primary key."""
    with db.tx():
        rel = db.scalar("SELECT to_regclass(%(t)s)::oid", {"t": _regclass_text(db, table)})
        if rel is None:
            raise RuntimeFailure(f"table {table!r} does not exist")
        if key:
            rows = db.all(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %(r)s AND attname = %(k)s AND NOT attisdropped",
                {"r": rel, "k": key},
            )
        else:
            rows = db.all(
                """
                SELECT a.attname, format_type(a.atttypid, a.atttypmod)
                FROM pg_index i
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                WHERE i.indrelid = %(r)s AND i.indisprimary
                """,
                {"r": rel},
            )
    if not rows:
        raise RuntimeFailure(
            f"table {table!r} has no column {key!r}"
            if key
            else f"table {table!r} has no primary key; set `key:` in the job to a unique, "
            "NOT NULL column so the backfill can walk it in order"
        )
    if len(rows) > 1:
        names = ", ".join(r[0] for r in rows)
        raise RuntimeFailure(
            f"table {table!r} has a composite primary key ({names}); this version walks "
            "single-column keys: set `key:` in the job to a unique, NOT NULL column"
        )
    return KeyColumn(rows[0][0], rows[0][1])


def _batch_statement(
    work: BatchedWork, key: KeyColumn, last: str | None, upper: str
) -> sql.Composed:
    """One keyset batch: pick the next keys, update the rows among them that need it."""
    k = sql.Identifier(key.name)
    bounds = [sql.SQL("{} <= {}::{}").format(k, sql.Literal(upper), sql.SQL(key.type))]
    if last is not None:
        bounds.insert(0, sql.SQL("{} > {}::{}").format(k, sql.Literal(last), sql.SQL(key.type)))
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = ({})").format(sql.Identifier(column), sql.SQL(expression))
        for column, expression in work.assignments.items()
    )
    return sql.SQL(
        """
        WITH phasegate_batch AS (
            SELECT {k} AS k FROM {table} WHERE {bounds} ORDER BY {k} LIMIT {limit}
        ), phasegate_done AS (
            UPDATE {table} AS new SET {assignments}
            FROM phasegate_batch WHERE new.{k} = phasegate_batch.k AND ({where})
            RETURNING 1
        )
        SELECT (SELECT max(k)::text FROM phasegate_batch),
               (SELECT count(*) FROM phasegate_done),
               (SELECT count(*) FROM phasegate_batch)
        """
    ).format(
        k=k,
        table=quote_table(work.table),
        bounds=sql.SQL(" AND ").join(bounds),
        limit=sql.Literal(work.batch_size),
        assignments=assignments,
        where=work.where,
    )


def _mark_backfill_session(db: Session) -> None:
    """Tell the sync trigger to step aside for this transaction only."""
    db.execute("SELECT set_config(%(k)s, 'on', true)", {"k": BACKFILL_SETTING})


def _regclass_text(db: Session, table: str) -> str:
    return quote_table(table).as_string(db.raw)
