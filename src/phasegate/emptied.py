"""Columns that came back empty: dropped and added again behind phasegate's back.

The drift check compares Alembic's version table with the ledger; it cannot see that a
column was dropped and added back in between (an out-of-band `alembic upgrade` of the
contract revision, then the `alembic downgrade` that undoes it). The column is there
again, every value in it gone, the version table and the ledger agree, and old code reads
NULL. What gives it away is its identity: PostgreSQL never reuses an attnum, so a column
added again has a new one. The attnums of each job's old and new columns (and its table's
oid) are recorded when the backfill checks them; a column whose attnum changed since was
re-created, and a count tells whether rows lost values. Old columns are then refilled with
`sync.down`, new columns walked again with `set`, by the next `advance` or `rollback`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from phasegate import backfill, keys, ledger
from phasegate.db import Session, quote_table
from phasegate.plan import Job

OLD, NEW = "old", "new"


@dataclass(frozen=True)
class Emptied:
    """A job's old or new columns, re-created since the backfill checked them, and the
    rows that lost their values."""

    job: Job
    side: str  # OLD: refill with sync.down; NEW: walk again with set
    columns: list[str]
    rows: int

    def describe(self) -> str:
        table = self.job.table
        names = ", ".join(f"{table}.{c}" for c in self.columns)
        if self.side == OLD:
            if self.job.sync is None:
                fix = (
                    f"job {self.job.name!r} has no sync.down, so phasegate cannot rebuild them: "
                    "restore the values from a backup; phasegate moves the plan again once no "
                    "row is left without them"
                )
            else:
                fix = (
                    "the next `phasegate advance` or `phasegate rollback` refills them from "
                    f"{', '.join(self.job.new_columns)} with sync.down before anything else"
                )
            return (
                f"column(s) {names} were dropped and added back since the backfill checked them "
                f"(an `alembic downgrade` by hand?): {self.rows:,} row(s) have them empty while "
                f"old code reads them; {fix}"
            )
        return (
            f"column(s) {names} were dropped and added back since the backfill filled them: "
            f"{self.rows:,} row(s) match `where` of job {self.job.name!r} again; the next "
            "`phasegate advance` or `phasegate rollback` walks the job again first"
        )


def identity(db: Session, job: Job) -> dict[str, Any] | None:
    """The job's table oid and the attnum of each of its old and new columns, as now."""
    with db.tx():
        rows = db.all(
            "SELECT c.oid, a.attname, a.attnum FROM pg_class c"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE c.oid = to_regclass(%(t)s) AND a.attname = ANY(%(c)s)",
            {"t": _table(db, job), "c": job.old_columns + job.new_columns},
        )
    if not rows:
        return None
    attnums = {name: attnum for _oid, name, attnum in rows}
    return {
        "table": int(rows[0][0]),
        OLD: {c: attnums[c] for c in job.old_columns if c in attnums},
        NEW: {c: attnums[c] for c in job.new_columns if c in attnums},
    }


def record(db: Session, plan: str, jobs: Iterable[Job], only_missing: bool = False) -> None:
    """Record the jobs' column identities (`only_missing`: where none is recorded yet)."""
    with db.tx():
        recorded = ledger.contract_columns(db, plan)
    for job in jobs:
        if not job.is_batched or (only_missing and job.name in recorded):
            continue
        found = identity(db, job)
        if found is not None:
            with db.tx():
                ledger.save_contract_columns(db, plan, job.name, found)


def find(db: Session, plan: str, jobs: Iterable[Job], old: bool, new: bool) -> list[Emptied]:
    """The jobs' columns re-created since they were recorded that lost values: old ones
    when `old` (they must hold old code's values), new ones when `new`."""
    with db.tx():
        recorded = ledger.contract_columns(db, plan)
    found: list[Emptied] = []
    for job in jobs:
        before = recorded.get(job.name)
        now = identity(db, job) if before is not None else None
        if before is None or now is None:
            continue  # nothing recorded, or the table is gone: the drift check says so
        moved_table = before["table"] != now["table"]
        for side, wanted in ((OLD, old), (NEW, new)):
            columns = [
                c
                for c, attnum in now[side].items()
                if wanted and (moved_table or before[side].get(c) != attnum)
            ]
            if not columns:
                continue
            rows = _lost(db, job, side)
            if rows:
                found.append(Emptied(job, side, columns, rows))
    return found


def repaired(db: Session, plan: str, emptied: Emptied) -> None:
    """After the refill or the walk: the columns as they are now are the ones checked."""
    record(db, plan, [emptied.job])


def _lost(db: Session, job: Job, side: str) -> int:
    """Rows whose `side` columns are empty where the other side says they should not be."""
    types = keys.base_types(db, job.table or "")
    if side == OLD:
        if job.sync is None:
            condition: sql.Composable = sql.SQL("({}) AND ({})").format(
                _all(job.old_columns, "IS NULL", " AND "),
                _all(job.new_columns, "IS NOT NULL", " OR "),
            )
        else:
            condition = backfill.down_work(job, types).unfinished
    else:
        condition = backfill.up_work(job).unfinished
    return backfill.count_remaining(db, job.table or "", condition)


def _all(columns: list[str], test: str, joiner: str) -> sql.Composable:
    return sql.SQL(joiner).join(
        sql.SQL("new.{} {}").format(sql.Identifier(c), sql.SQL(test)) for c in columns
    )


def _table(db: Session, job: Job) -> str:
    return quote_table(job.table or "").as_string(db.raw)
