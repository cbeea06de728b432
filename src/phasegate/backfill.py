"""Backfill jobs: one-shot `sql` jobs and batched keyset `update` jobs.

A batched job fixes its upper bound (the largest key present when it starts: rows
inserted later go through the sync trigger, so the walk finishes under any insert rate),
cuts the key range into slices, and lets workers claim slices from the ledger. A worker
walks its slice in ascending keyset batches, one short transaction per batch, each under
its own statement_timeout and lock_timeout and retried smaller on a timeout; the slice's
checkpoint is written in the batch's transaction, so a crash loses nothing and a restart
resumes exactly where the database is. No row ever travels to Python, only the batch's
last key. A job is done only when its `where` matches no row (verification).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import sql

from phasegate import contract, keys, ledger, sync
from phasegate import db as dbmod
from phasegate.batch import BatchedWork, BatchSQL
from phasegate.db import Session, quote_table
from phasegate.errors import Fenced, Interrupted, RuntimeFailure, UsageError
from phasegate.keys import Key, KeyValue
from phasegate.lockguard import client_check
from phasegate.pacing import (
    CONFLICTS,
    BackfillSettings,
    BatchSizer,
    Throttle,
    backoff,
    retry_reason,
)
from phasegate.plan import Job, Loc, Plan, PlanError, PlanIssue

SAMPLE_ROWS = 20_000  # rows sampled to cut a job into slices

Notify = Callable[[str], None]


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
    walked: int = 0
    workers: int = 1
    batch_ms: dict[str, float] = field(default_factory=dict)
    # The whole job's totals, earlier runs and helpers included: `rows` and `batches` are
    # this run's (they go with `seconds` and `batch_ms`); None when they are the same.
    job_rows: int | None = None
    job_batches: int | None = None
    paused: float = 0.0  # seconds --pause / --pause-ratio asked for between batches

    @property
    def rate(self) -> float:
        return (self.walked or self.rows) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "rows": self.rows,
            "batches": self.batches,
            "walked": self.walked,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rate),
            "workers": self.workers,
            "batch_ms": self.batch_ms,
            "job_rows": self.rows if self.job_rows is None else self.job_rows,
            "job_batches": self.batches if self.job_batches is None else self.job_batches,
            "paused_seconds": round(self.paused, 3),
        }


def up_work(job: Job, stale: Mapping[str, str] | None = None) -> BatchedWork:
    """The job's walk: the rows its `where` matches.

    `stale` (the table's column types): also the rows whose new columns differ from what
    `set` gives for their old columns. After a rollback of backfill the old columns are
    the truth again and no trigger runs, so an old-code write leaves the new columns it
    derived from stale, and the author's `where` (new columns empty) does not see them.
    Verification still counts the author's `where`: the trigger keeps later writes in step.
    """
    where = sql.SQL(job.where or "FALSE")
    return BatchedWork(
        checkpoint=job.name,
        table=job.table or "",
        key=job.key_columns,
        assignments=job.set_ or {},
        where=where if stale is None else sql.SQL("({}) OR {}").format(where, _differs(job, stale)),
        batch_size=job.batch_size,
        done_unless=None if stale is None else where,
    )


def forward_work(db: Session, plan: str, job: Job) -> BatchedWork:
    """`up_work`, with the stale rows when the job was flagged: by a rollback of backfill,
    or restarted with other expressions (`--restart-job`)."""
    with db.tx():
        resweep = ledger.get_checkpoint(db, plan, job.name).resweep
    if not resweep:
        return up_work(job)
    return up_work(job, keys.base_types(db, job.table or ""))


def _differs(job: Job, types: Mapping[str, str]) -> sql.Composed:
    """A row whose new columns are not what `set` gives for its old ones (each expression
    cast to its column's base type, `types`: every column of the table, as the assignment
    would).

    Only where `set` applies: the author's `where` guards it (`raw ~ '^[0-9]+$'` before
    `raw::int`), so it is asked of the row with the new columns taken as empty, and CASE
    keeps `set` from being evaluated on a row it does not apply to; a walk that raised
    on one row would fail on every run. Compared as text: json, xml, point and other
    types have no `=` for IS DISTINCT FROM; equal values whose text differs
    ('{"a":1}' and '{"a": 1}') are rewritten with what they already hold. Floats print
    exactly in walk sessions (`extra_float_digits = 3`, `set_limits`), so a change in
    the last bits is not hidden.
    """
    new_columns = set(job.new_columns)
    row_with_empty_new_columns = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(
            sql.SQL("NULL::{}").format(sql.SQL(kind))
            if column in new_columns
            else sql.SQL("new.{}").format(sql.Identifier(column)),
            sql.Identifier(column),
        )
        for column, kind in types.items()
    )
    applies = sql.SQL("(SELECT ({}) FROM (SELECT {}) AS new)").format(
        sql.SQL(job.where or "FALSE"), row_with_empty_new_columns
    )
    compared = sql.SQL(" OR ").join(
        sql.SQL("new.{c}::text IS DISTINCT FROM CAST(({e}) AS {t})::text").format(
            c=sql.Identifier(column), e=sql.SQL(expression), t=sql.SQL(types[column])
        )
        for column, expression in (job.set_ or {}).items()
    )
    return sql.SQL("(CASE WHEN {} THEN ({}) ELSE false END)").format(applies, compared)


def down_name(job: Job) -> str:
    """The checkpoint of a job's refill (rollback of contract)."""
    return f"{job.name}@down"


def down_work(job: Job, types: Mapping[str, str]) -> BatchedWork:
    """Refill the old columns from the new ones (rollback of contract).

    Rows whose old columns are empty (the contract dropped them, the downgrade added them
    back), and rows whose new columns new code changed while no trigger synced them:
    contract drops the sync triggers before its revisions, so one that stopped part way
    (a lock timeout, a kill), or one that keeps the old columns, leaves old columns stale.
    Those are told by the forward direction: a new column that differs from what the job's
    `set` gives for the row's old columns (cast to the column's base type, `types`, as the
    assignment would). A lossy `set` (lower-casing, say) does not make a row stale, nor does
    an old-code write during the refill (the trigger keeps the pair in step). Verification
    still counts only rows with empty old columns: a lossy pair need not round-trip.
    """
    old_null = sql.SQL(" AND ").join(
        sql.SQL("new.{} IS NULL").format(sql.Identifier(c)) for c in job.old_columns
    )
    new_set = sql.SQL(" OR ").join(
        sql.SQL("new.{} IS NOT NULL").format(sql.Identifier(c)) for c in job.new_columns
    )
    missing = [c for c in job.new_columns if c not in types]
    if missing:
        raise RuntimeFailure(
            f"job {job.name!r}: column(s) {', '.join(missing)} of {job.table!r} are gone, so "
            "the old columns cannot be refilled from them"
        )
    return BatchedWork(
        checkpoint=down_name(job),
        table=job.table or "",
        key=job.key_columns,
        assignments=job.sync.down if job.sync else {},
        where=sql.SQL("({}) AND (({}) OR {})").format(new_set, old_null, _differs(job, types)),
        batch_size=job.batch_size,
        done_unless=sql.SQL("({}) AND ({})").format(old_null, new_set),
        refill=True,
    )


def check_columns(db: Session, plan: Plan) -> None:
    """Every table and column a job names must exist before any trigger is installed.

    The walk's key is checked here too, except for a job already done (its walk is over);
    a job after an `sql` job is refused only when its walk starts (that job may create
    the key).
    """
    issues = []
    after_sql = False
    for index, job in enumerate(plan.jobs()):
        if not job.is_batched:
            after_sql = True
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
        named += [(c, (*loc, "key")) for c in job.key_columns or []]
        missing = [(c, where) for c, where in named if c not in columns]
        for column, where in missing:
            issues.append(
                plan.issue(
                    where,
                    f"column {column!r} does not exist in table {job.table!r}",
                    f"columns there: {', '.join(sorted(columns))}",
                )
            )
        if not missing:
            issues += _expression_issues(db, plan, job, loc)
        with db.tx():
            done = ledger.get_checkpoint(db, plan.name, job.name).status == "done"
        if not (done or any(where == (*loc, "key") for _, where in missing)):
            try:  # the walk's key, checked now: refused before any trigger is installed
                keys.resolve(db, job.table or "", job.key_columns)
            except RuntimeFailure as exc:
                if not after_sql:
                    where = (*loc, "key" if job.key_columns else "table")
                    issues.append(plan.issue(where, str(exc)))
        rules = update_rules(db, job.table or "")
        if rules:
            message, hint = rules_refusal(job.table or "", rules)
            issues.append(plan.issue((*loc, "table"), message, hint))
    with db.tx():  # a BEFORE trigger that would fire after the sync triggers
        late = sync.trigger_order_issues(db, plan.name, plan.jobs())
    for job, message, hint in late:
        where = ("phases", "backfill", "jobs", plan.jobs().index(job), "table")
        issues.append(plan.issue(where, message, hint))
    issues += default_issues(db, plan)
    issues += inheritance_issues(db, plan)
    if issues:
        raise PlanError(issues)


def default_issues(db: Session, plan: Plan) -> list[PlanIssue]:
    """A synced column whose DEFAULT is not a constant, at its line (see
    `sync.default_issues`)."""
    with db.tx():
        found = sync.default_issues(db, plan.jobs())
    issues = []
    for job, column, expression in found:
        part = ("set", column) if column in job.new_columns else ("sync", "down", column)
        where = ("phases", "backfill", "jobs", plan.jobs().index(job), *part)
        table = quote_table(job.table or "").as_string(db.raw)
        issues.append(
            plan.issue(
                where,
                f"column {column!r} of {job.table} has DEFAULT {expression}, which is not a "
                "constant: the sync trigger tells which code version inserted a row by the "
                "columns it left out, and such a default fills them with a value no trigger "
                "can tell from a written one",
                f"drop it while the plan syncs the column (ALTER TABLE {table} ALTER COLUMN "
                f"{sql.Identifier(column).as_string(db.raw)} DROP DEFAULT) and set it again "
                "in a contract revision, or make it a constant",
            )
        )
    return issues


def inheritance_issues(db: Session, plan: Plan) -> list[PlanIssue]:
    """A synced job's table with inheritance children (not partitions): the walk and its
    count reach their rows, but triggers are not inherited, so after the backfill the app's
    writes to those rows would never be synced."""
    issues = []
    for index, job in enumerate(plan.jobs()):
        if not job.is_batched or job.sync is None:
            continue
        with db.tx():
            children = [
                row[0]
                for row in db.all(
                    "SELECT i.inhrelid::regclass::text FROM pg_inherits i"
                    " JOIN pg_class c ON c.oid = i.inhparent"
                    " WHERE i.inhparent = to_regclass(%(t)s) AND c.relkind <> 'p'"
                    " ORDER BY 1",
                    {"t": _regclass_text(db, job.table or "")},
                )
            ]
        if children:
            issues.append(
                plan.issue(
                    ("phases", "backfill", "jobs", index, "table"),
                    f"table {job.table!r} has inheritance children ({', '.join(children)}): "
                    "a walk of it reaches their rows, but its sync triggers would not fire "
                    "for the app's writes to them (triggers are not inherited)",
                    "give each child a job of its own, or make the table a partitioned one "
                    "(partitions get the triggers)",
                )
            )
    return issues


def check_expressions(db: Session, plan: Plan) -> None:
    """Every synced job's expressions, planned against its table (see `_expression_issues`):
    for the rollback of contract, which installs the triggers again after its downgrade."""
    issues = []
    for index, job in enumerate(plan.jobs()):
        if job.is_batched and job.sync is not None:
            issues += _expression_issues(db, plan, job, ("phases", "backfill", "jobs", index))
    if issues:
        raise PlanError(issues)


def _expression_issues(db: Session, plan: Plan, job: Job, loc: Loc) -> list[PlanIssue]:
    """Each of the job's expressions, planned (never run) against its table.

    The sync trigger is installed before any job runs and evaluates `set` and `sync.down`
    on every app write: a typo there (a misspelt column or function, a text expression for
    a bigint column) would make the app's own inserts and updates fail, while the walk
    might not notice (a `sync.down` typo: batches never run `down`). So each expression
    is planned as the batch runs it (`UPDATE ... AS new SET column = (expression)`, so a
    type the assignment cannot take fails too; `where` as a WHERE clause), under EXPLAIN:
    nothing executes, no row is locked. PostgreSQL's own error becomes a plan error at
    the expression's line. Lock and connection errors are not the plan's and propagate.
    """
    table = quote_table(job.table or "")
    probes: list[tuple[Loc, sql.Composed]] = [
        (
            (*loc, "where"),
            sql.SQL("EXPLAIN SELECT FROM {} AS new WHERE ({})").format(table, sql.SQL(job.where)),
        )
    ]
    down = job.sync.down if job.sync else {}
    for part, columns in (("set",), job.set_ or {}), (("sync", "down"), down):
        probes += [
            (
                (*loc, *part, column),
                sql.SQL("EXPLAIN UPDATE {} AS new SET {} = ({})").format(
                    table, sql.Identifier(column), sql.SQL(expression)
                ),
            )
            for column, expression in columns.items()
        ]
    issues = []
    for where, probe in probes:
        try:
            with db.tx():
                db.execute(probe)
        except psycopg.Error as exc:
            state = exc.sqlstate or ""
            # syntax, names, types, values; not a missing privilege (42501): that is the
            # role's, and the batch would fail on it with PostgreSQL's own words
            if not state.startswith(("42", "22")) or state == "42501":
                raise
            issues.append(
                plan.issue(
                    where,
                    str(exc).strip().splitlines()[0],
                    "the expression is SQL against the row alias `new` of "
                    f"{job.table}; the sync trigger runs it on every app write from the start "
                    "of the phase, so it must work before any job runs",
                )
            )
    return issues


def update_rules(db: Session, table: str) -> list[str]:
    """The table's ON UPDATE rules (pg_rewrite.ev_type '2'), by name.

    A rule rewrites the batch's UPDATE: DO INSTEAD would run its action in place of the
    batch (which then leaves rows behind or writes elsewhere), DO ALSO adds the app's
    action to every batch, and PostgreSQL refuses either on an UPDATE inside WITH, the
    form a batch takes for a role that may not create a temporary PL/pgSQL function. So
    such a table is refused before anything is installed.
    """
    with db.tx():
        rows = db.all(
            "SELECT rulename FROM pg_rewrite WHERE ev_class = to_regclass(%(t)s)"
            " AND ev_type = '2' ORDER BY rulename",
            {"t": _regclass_text(db, table)},
        )
    return [r[0] for r in rows]


def rules_refusal(table: str, rules: list[str]) -> tuple[str, str]:
    """What to say about a table with ON UPDATE rules, and what to do about it."""
    names = ", ".join(rules)
    return (
        f"table {table!r} has ON UPDATE rule(s) {names}: a rule rewrites every backfill "
        f"batch's UPDATE (DO INSTEAD replaces it, DO ALSO adds to it, and PostgreSQL "
        f"refuses either inside WITH, a batch's form where no temporary function may be "
        f"created)",
        f"replace the rule(s) with a trigger, or drop them for the backfill and recreate "
        f"them after it: DROP RULE {sql.Identifier(rules[0]).as_string(None)} ON "
        f"{quote_table(table).as_string(None)}",
    )


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


def run_sql_job(
    db: Session,
    plan: str,
    job: Job,
    progress: Progress,
    settings: BackfillSettings | None = None,
    notify: Notify | None = None,
) -> JobResult:
    """Run a one-shot statement once; its checkpoint commits with it.

    Unmarked: for the sync triggers it is a writer like the app, so what it writes to an
    old or a new column is synced. The mark is for the batches, which write exactly what
    the trigger would.

    One transaction: an attempt that failed left nothing, so it may run again. A lock
    timeout is retried as a revision's transaction is (the lock guard's budget, blockers
    named when it is spent); a serialization failure or a deadlock, where the database
    cancelled it to let others go on, as a batch is (`settings.retries`, with backoff, each
    retry told through `notify`). A stop request ends the wait between attempts.
    """
    settings = settings or BackfillSettings()
    notify = notify or (lambda message: None)
    cp = ledger.get_checkpoint(db, plan, job.name)
    if cp.status == "done":
        result = JobResult(job.name, "sql", "skipped", rows=cp.rows_done)
        progress.job_finished(result)
        return result
    progress.job_started(job.name, None, 0)
    started = time.monotonic()

    def once() -> int:
        with db.tx():
            rows = max(db.execute(job.sql or "").rowcount, 0)
            cp.status, cp.rows_done, cp.batches = "done", rows, 1
            ledger.save_checkpoint(db, cp)
        return rows

    attempt = 0
    while True:
        committed = db.guard.autocommit_statements if db.guard else 0
        try:
            rows = db.retrying(f"job {job.name!r}", once)
            break
        except Exception as exc:
            reason = retry_reason(exc, CONFLICTS)
            if reason is None or (db.guard and db.guard.autocommit_statements != committed):
                raise  # not a conflict, or the statement committed part of itself
            db.reset()
            if attempt >= settings.retries:
                raise RuntimeFailure(
                    f"job {job.name!r} hit a {reason} {attempt + 1} time(s) in a row; nothing "
                    "of it is committed. Run the same command again when the writes it "
                    "conflicts with are fewer (or raise --retries)",
                    job=job.name,
                ) from exc
            attempt += 1
            pause = backoff(attempt)
            notify(
                f"job {job.name}: {reason}; nothing of it is committed; retry {attempt} of "
                f"{settings.retries} in {pause:.2f}s"
            )
            if settings.stop.wait(pause):
                raise Interrupted(
                    f"job {job.name!r} stopped on request while it waited to retry after a "
                    f"{reason}; nothing of it is committed. Resume with the same command",
                    job=job.name,
                ) from exc
    result = JobResult(job.name, "sql", "done", rows, 1, time.monotonic() - started)
    progress.job_finished(result)
    return result


def run_batched(
    db: Session,
    plan: str,
    work: BatchedWork,
    settings: BackfillSettings,
    progress: Progress,
    notify: Notify | None = None,
) -> JobResult:
    """Walk the job's key range with `settings.workers` workers, then verify."""
    notify = notify or (lambda message: None)
    if db.generation is None:  # called outside an orchestrator's run: this walk is one
        ledger.begin_run(db)
    with db.tx():
        cp = ledger.get_checkpoint(db, plan, work.checkpoint)
    if cp.status == "done":
        result = JobResult(work.checkpoint, "update", "skipped", cp.rows_done, cp.batches)
        progress.job_finished(result)
        return result
    with _driving(db, plan, work.checkpoint):
        return _run_driven(db, plan, work, settings, progress, notify)


@contextlib.contextmanager
def _driving(db: Session, plan: str, job: str) -> Iterator[None]:
    """Hold the job's driver lock (`ledger.hold_driver`) while walking and verifying it."""
    ledger.hold_driver(db, plan, job)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a lost session has released it already
            ledger.release_driver(db, plan, job)


CATCH_UP_WALKS = 3  # walks after the first one for rows whose key moved behind it


def _run_driven(
    db: Session,
    plan: str,
    work: BatchedWork,
    settings: BackfillSettings,
    progress: Progress,
    notify: Notify,
) -> JobResult:
    """Walk, then count what still matches; walk again while that finds rows to do.

    A row whose key the app changes while the walk runs (from ahead of the walk to behind
    it, or past its upper bound) is never reached, and the sync trigger does not fill it
    either: only its key changed. Such rows show as rows still matching `where` after the
    walk; a catch-up walk over the whole range takes them. When one finds nothing more to
    do, what is left is what `set` leaves matching, and verification fails on it.
    """
    key = keys.resolve(db, work.table, work.key)
    hint = keys.index_hint(db, work.table, key) if work.key else None
    if hint:
        notify(f"job {work.checkpoint}: warning: {hint}")
    walks: list[_Walk] = []
    seconds, moved, moving = 0.0, 0, False
    before: tuple[int, int] | None = None
    for attempt in range(1 + CATCH_UP_WALKS):
        walk, took = _walk_once(db, plan, work, key, settings, progress, notify, attempt > 0)
        walks.append(walk)
        seconds += took
        left = _leftover(db, work, key)
        if before is not None:
            moved += max(before[0] - left[0], 0)
            moving = left != before  # other rows than before: keys are still moving
            if not moving:  # the same rows: the walk leaves them, which is `set`'s doing
                break
        if not left[0] or attempt == CATCH_UP_WALKS:
            break
        notify(
            f"job {work.checkpoint}: {left[0]:,} row(s) still to do after the walk; walking "
            "the range again for rows whose key changed while it ran (moved behind it, out "
            "of its reach)"
        )
        before = left
    if moved:
        notify(
            f"job {work.checkpoint}: {moved:,} row(s) had moved behind the walk (their key "
            "changed while it ran) and were walked again"
        )
    # verification counts its own rows unless the catch-up counted exactly those
    remaining = left[0] if _catch_up_where(work) is work.unfinished else None
    totals = verify(
        db, plan, work, remaining=remaining, moved=moved, moving=moving and bool(left[0])
    )
    result = JobResult(
        work.checkpoint,
        "update",
        "done",
        sum(w.rows for w in walks),
        sum(w.batches for w in walks),
        seconds,
        sum(w.walked for w in walks),
        settings.workers,
        _Walk.percentiles_of(walks),
        totals.rows_done,
        totals.batches,
        sum(w.paused for w in walks),
    )
    progress.job_finished(result)
    return result


def _leftover(db: Session, work: BatchedWork, key: Key) -> tuple[int, int]:
    """The rows the walk's own `where` still selects: how many, and an order-independent
    fingerprint of their keys (a sum of hashes), so a catch-up walk can tell the same rows
    left behind again (`set` leaves them) from other rows (keys still moving). The walk's
    `where`, not what verification counts: a resweep also selects rows whose new columns
    differ from `set`, and those can move out of reach as well."""
    query = sql.SQL(
        "SELECT count(*), coalesce(sum(hashtextextended(ROW({keys})::text, 0)), 0)"
        " FROM {table} AS new WHERE {where}"
    ).format(keys=key.names(), table=quote_table(work.table), where=_catch_up_where(work))
    with _row_security_refusal(work.table), db.tx():
        whole_table(db)
        row = db.execute(query).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _catch_up_where(work: BatchedWork) -> sql.Composable:
    """What a catch-up walk looks for: a resweep's whole selection (stale rows can move out
    of reach too); for a refill, only its empty old columns: its stale-row test keeps
    matching a pair whose `set` does not undo `down`, which no walk changes."""
    return work.unfinished if work.refill else work.where


def _walk_once(
    db: Session,
    plan: str,
    work: BatchedWork,
    key: Key,
    settings: BackfillSettings,
    progress: Progress,
    notify: Notify,
    again: bool,
) -> tuple[_Walk, float]:
    """One walk of the job's range (`again`: a catch-up walk over a new range), to its
    end or a stop; returns it and how long it took."""
    with _row_security_refusal(work.table):
        cp = _prepare(db, plan, work, key, settings, notify, again)
        progress.job_started(work.checkpoint, cp.total, cp.walked)
        walk = _Walk.of(cp, plan, work, key, settings, progress, notify)
        started = time.monotonic()
        walk.run(db)
        seconds = time.monotonic() - started
        if walk.error is not None:
            raise walk.error
    if settings.stop.is_set():
        with db.tx():
            left = ledger.unfinished_slices(db, plan, work.checkpoint)
        if left:
            raise Interrupted(
                f"job {work.checkpoint!r} stopped on request after {walk.batches:,} batch(es) "
                f"this run; every batch up to there is committed and checkpointed "
                f"({left} slice(s) left). Resume with the same command",
                job=work.checkpoint,
            )
    return walk, seconds


def assist(
    db: Session,
    plan: Plan,
    settings: BackfillSettings,
    progress: Progress,
    notify: Notify,
    wait: float,
) -> list[JobResult]:
    """Join running batched jobs of `plan` as an extra worker (another process or machine).

    Claims slices until none is left, then returns; the orchestrator that started the
    job verifies it. Waits up to `wait` seconds for a job to be running.
    """
    # by checkpoint name; a refill's work is made when it runs (it reads the table's types,
    # which need not exist yet while a helper waits before the plan's expand)
    batched = [j for j in plan.jobs() if j.is_batched]
    makers: dict[str, Callable[[], BatchedWork]] = {
        j.name: functools.partial(forward_work, db, plan.name, j) for j in batched
    }
    for j in batched:
        if j.sync is not None:
            makers[down_name(j)] = lambda j=j: down_work(j, keys.base_types(db, j.table or ""))
    deadline = time.monotonic() + wait
    results: list[JobResult] = []
    while not settings.stop.is_set():
        with db.tx():
            ready = ledger.exists(db)  # the orchestrator creates the ledger, never a helper
        with db.tx():
            ledger.check_version(ledger.schema_version(db))
            running = ready and [
                (name, make)
                for name, make in makers.items()
                if ledger.get_checkpoint(db, plan.name, name).status == "running"
                and ledger.unfinished_slices(db, plan.name, name)
                and ledger.driven(db, plan.name, name)  # not one its orchestrator left
            ]
        for name, make in running or []:
            with db.tx():
                cp = ledger.get_checkpoint(db, plan.name, name)
                adopt_session(db, cp.search_path, cp.settings)  # the orchestrator's
            # after the run (cp.generation) is read: a run that began since with another
            # contract has recorded it by now, and one that begins later fences this walk
            _hold_to_contract(db, plan)
            work = make()
            key = keys.resolve(db, work.table, work.key)
            if cp.walk_key not in (None, key.signature):
                notify(
                    f"job {work.checkpoint}: not joined: its walk is over {cp.walk_key}, but "
                    f"its key is {key.signature} now; the next run of the phase walks it again"
                )
                continue
            progress.job_started(work.checkpoint, None, 0)
            walk = _Walk.of(cp, plan.name, work, key, settings, progress, notify, assisting=True)
            started = time.monotonic()
            with _row_security_refusal(work.table):
                walk.run(db)
                if walk.error is not None:
                    raise walk.error
            if walk.undriven.is_set():
                notify(
                    f"job {work.checkpoint}: its orchestrator stopped, so this worker stopped "
                    "too; its batches are committed, and the next run of the phase goes on"
                )
            results.append(
                JobResult(
                    work.checkpoint,
                    "update",
                    "assisted",
                    walk.rows,
                    walk.batches,
                    time.monotonic() - started,
                    walk.walked,
                    settings.workers,
                    walk.percentiles(),
                    paused=walk.paused,
                )
            )
        if settings.stop.is_set():
            break
        if running or time.monotonic() >= deadline:
            return results
        settings.stop.wait(0.5)
    raise Interrupted(
        f"stopped on request; every batch this worker committed is checkpointed. Start "
        f"`phasegate worker` again to keep helping with {plan.name!r}"
    )


def _hold_to_contract(db: Session, plan: Plan) -> None:
    """A helper joins only a walk of the jobs as the phase started them: one started from
    a checkout whose plan was edited would write its own expressions into the slices it
    claims (exit 2 at once, naming the job and the key that differs)."""
    with db.tx():
        recorded = ledger.contract(db, plan.name)
    changes = contract.differences(plan, recorded) if recorded else []
    if changes:
        listed = "; ".join(d.describe(plan.source) for d in changes)
        raise UsageError(
            f"this worker's plan file is not the one the backfill of {plan.name!r} started "
            f"with: {listed}. It joined nothing and wrote nothing; start it from the same "
            f"version of {plan.source} as the orchestrator's",
            changes=[d.describe(plan.source) for d in changes],
        )


def count_remaining(db: Session, table: str, where: sql.Composable) -> int:
    """Rows that still match `where`: a whole-table scan however it ends.

    A plain count, not one capped with LIMIT: the cap made the planner expect an early
    stop and scan with one process, while this count may use parallel workers, which
    halves the scan that ends every batched job (1M rows: 0.32 s to 0.16 s on 2 cores).
    """
    with db.tx():
        whole_table(db)
        return int(
            db.scalar(
                sql.SQL("SELECT count(*) FROM {} AS new WHERE {}").format(quote_table(table), where)
            )
        )


def whole_table(db: Session) -> None:
    """row_security off for this transaction: see every row or fail.

    Under a row-level security policy a role would walk, count and verify only the rows
    the policy shows it, and call the job done. With the setting off, PostgreSQL raises
    an error instead (`_row_security_refusal` says what to do), unless the role owns the
    table or has BYPASSRLS, which see every row anyway.
    """
    db.execute("SELECT set_config('row_security', 'off', true)")


@contextlib.contextmanager
def _row_security_refusal(table: str) -> Iterator[None]:
    """PostgreSQL's refusal under `row_security = off`, with what to run the job as."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        if "row-level security" not in str(exc):
            raise
        raise RuntimeFailure(
            f"{exc}: a backfill must see every row of {table}, and row-level security "
            "would hide some from this role. Run it as the table's owner or as a role with "
            "BYPASSRLS"
        ) from exc


# -- preparing a walk -------------------------------------------------------------------------


def _prepare(
    db: Session,
    plan: str,
    work: BatchedWork,
    key: Key,
    settings: BackfillSettings,
    notify: Notify,
    again: bool = False,
) -> ledger.Checkpoint:
    """Fix the bound and cut the slices for a new walk; on a resume, keep both. `again`:
    a catch-up walk of the same run (a new bound and slices, the job's totals kept).

    The checkpoint is read here, locked: workers of other processes may have added to its
    counters since the caller first looked at it, and the row is written back whole.
    """
    table = quote_table(work.table)
    with db.tx():
        whole_table(db)
        cp = ledger.get_checkpoint(db, plan, work.checkpoint, lock=True)
        existing = ledger.slices(db, plan, work.checkpoint)
        fresh = again or cp.status in ("pending", "failed") or cp.upper_key is None
        fresh = fresh or not existing
        if not fresh and cp.walk_key not in (None, key.signature):
            notify(
                f"job {work.checkpoint}: its key changed since its walk started "
                f"({cp.walk_key}, now {key.signature}); the saved bounds belong to the old "
                "one, so it walks again from the start"
            )
            fresh = True
        if fresh:
            cp.walk_key = key.signature
            row = db.execute(
                sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
                    key.as_text_array(), table, key.order(descending=True)
                )
            ).fetchone()
            upper = tuple(row[0]) if row else None
            cp.upper_key, cp.last_key = keys.encode(upper), None
            estimate = _estimate(db, work.table)
            if again:  # the job's totals go on; the estimate grows by this walk
                cp.total = None if estimate is None else cp.walked + estimate
            else:
                cp.rows_done = cp.batches = cp.walked = 0
                cp.total = estimate
            bounds = _slice_bounds(db, work.table, key, upper, settings.slice_count())
            ledger.replace_slices(db, plan, work.checkpoint, bounds)
            cp.remaining = cp.verified_at = None
            notify(
                f"job {work.checkpoint}: walking {key.describe()} up to "
                f"{cp.upper_key or '(empty table)'} in {max(len(bounds), 1)} slice(s)"
            )
        elif (settings.slices or settings.workers > 1) and settings.slice_count() != len(existing):
            left = sum(1 for s in existing if s.status != "done")
            notify(  # the cut may have given fewer slices than asked for: a small table
                f"job {work.checkpoint}: resuming in the {len(existing)} slice(s) it was cut "
                f"into when its walk started ({left} unfinished, so at most {left} worker(s) "
                f"can share it); the slices of a walk are fixed when it starts"
            )
        cp.status = "running"
        # the schemas the path resolves to here ("$user" is this role's, not a worker's)
        cp.search_path = db.scalar(
            "SELECT coalesce(string_agg(quote_ident(s), ', ' ORDER BY o), '')"
            " FROM unnest(current_schemas(false)) WITH ORDINALITY AS u(s, o)"
            " WHERE s NOT LIKE 'pg\\_temp\\_%'"  # this session's own: no other may use it
        )
        cp.run_started_at = db.scalar("SELECT now()")
        cp.run_walked = cp.walked
        cp.generation = db.generation  # this run: its workers, and helpers, walk for it
        cp.settings = expression_settings(db)  # and with this session's settings
        ledger.save_checkpoint(db, cp)
    return cp


def _estimate(db: Session, table: str) -> int | None:
    """The table's rows: `pg_class.reltuples`, or the planner's guess from the table's size
    and row width when it says nothing (-1: never analysed; 0: analysed while empty, or
    never analysed on PostgreSQL 13 and older, and the table may have filled since).

    `reltuples` is -1 until the first ANALYZE (a table filled by an expand revision before
    autovacuum got to it): no ETA, and a 100% "sample" of the keys to cut slices, a sort of
    the whole key column before the first batch. The planner's estimate is not used when
    `reltuples` is known: it scales it by the table's pages now, and right after a walk
    (the refill of a contract rollback follows the backfill's) half of those are dead rows.
    """
    reltuples = db.scalar(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%(t)s)",
        {"t": _regclass_text(db, table)},
    )
    if reltuples is None or reltuples > 0:  # 0: analysed while empty (or PG <= 13's unknown)
        return None if reltuples is None else int(reltuples)
    query = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}").format(quote_table(table))
    [plan] = db.scalar(query)
    return int(plan["Plan"]["Plan Rows"])


def _slice_bounds(
    db: Session, table: str, key: Key, upper: KeyValue | None, count: int
) -> list[tuple[str | None, str]]:
    """Key ranges of roughly equal size from a sample: (exclusive lower, inclusive upper)."""
    if upper is None:
        return []
    cuts: list[KeyValue] = []
    if count > 1:
        estimate = _estimate(db, table) or SAMPLE_ROWS
        percent = min(100.0, 100.0 * SAMPLE_ROWS / max(estimate, 1))
        rows = db.all(
            sql.SQL(
                "SELECT DISTINCT ON (tile) {arr} FROM ("
                " SELECT {cols}, ntile({n}) OVER (ORDER BY {order}) AS tile"
                " FROM {table} TABLESAMPLE BERNOULLI ({pct}) WHERE {k} <= {upper}"
                ") AS s ORDER BY tile, {desc}"
            ).format(
                arr=key.as_text_array(),
                cols=key.names(),
                n=sql.Literal(count),
                order=key.order(),
                table=quote_table(table),
                pct=sql.Literal(percent),
                k=key.tuple(),
                upper=key.literal(upper),
                desc=key.order(descending=True),
            )
        )
        cuts = [tuple(r[0]) for r in rows[:-1]]
        cuts = [c for i, c in enumerate(cuts) if c != upper and (i == 0 or c != cuts[i - 1])]
    edges: list[KeyValue | None] = [None, *cuts, upper]
    return [(keys.encode(edges[i]), keys.encode(edges[i + 1]) or "") for i in range(len(edges) - 1)]


# -- walking ----------------------------------------------------------------------------------


class _Locked:
    """Serialises progress calls from several worker threads."""

    def __init__(self, inner: Progress) -> None:
        self.inner = inner
        self.lock = threading.Lock()

    def batch_done(self, job: str, scanned: int, updated: int) -> None:
        with self.lock:
            self.inner.batch_done(job, scanned, updated)


class _Walk:
    """The workers of one job in this process, each on a session of its own."""

    def __init__(
        self,
        plan: str,
        work: BatchedWork,
        key: Key,
        settings: BackfillSettings,
        progress: _Locked,
        notify: Notify,
        search_path: str | None,
        generation: int | None,
        assisting: bool = False,
        expression_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.plan, self.work, self.key, self.settings = plan, work, key, settings
        self.progress, self.notify, self.assisting = progress, notify, assisting
        self.search_path = search_path
        self.expression_settings = expression_settings or {}
        self.generation = generation  # the run that prepared the walk: see ledger.begin_run
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.undriven = threading.Event()  # a helper found no orchestrator running the job
        self._driver_checked: dict[int, float] = {}  # per worker thread: when it last asked
        self.rows = self.batches = self.walked = 0
        self.durations: list[float] = []
        self.paused = 0.0  # what the throttle's pauses asked for, all workers together

    @classmethod
    def of(
        cls,
        cp: ledger.Checkpoint,
        plan: str,
        work: BatchedWork,
        key: Key,
        settings: BackfillSettings,
        progress: Progress,
        notify: Notify,
        assisting: bool = False,
    ) -> _Walk:
        """The walk the checkpoint `cp` prepared: its run, search_path and settings."""
        return cls(
            plan,
            work,
            key,
            settings,
            _Locked(progress),
            notify,
            cp.search_path,
            cp.generation,
            assisting=assisting,
            expression_settings=cp.settings,
        )

    KEEPALIVE_EVERY = 30.0  # seconds between pings of the caller's session during a walk

    def run(self, db: Session) -> None:
        """Walk with every worker in a thread on a session of its own.

        Meanwhile the caller's session (the orchestrator's, holding its lock) would sit idle
        for the whole walk, long enough for a load balancer's or NAT's idle timeout to drop
        it; so it is pinged every `KEEPALIVE_EVERY` seconds. A signal still reaches this
        thread at once: joins with a timeout are interruptible.
        """
        self._url = db.url
        threads = [
            threading.Thread(target=self._own_session, args=(n,), daemon=True)
            for n in range(max(self.settings.workers, 1))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.KEEPALIVE_EVERY)
            while thread.is_alive():
                self._keep_alive(db)
                thread.join(self.KEEPALIVE_EVERY)

    def _keep_alive(self, db: Session) -> None:
        try:
            with db.tx():
                db.scalar("SELECT 1")
        except Exception as exc:  # the orchestrator's session is gone: stop the walk
            self._fail(exc)

    def percentiles(self) -> dict[str, float]:
        return _Walk.percentiles_of([self])

    @staticmethod
    def percentiles_of(walks: list[_Walk]) -> dict[str, float]:
        """Batch durations of one or more walks of a job: p50, p99 and max in ms."""
        ordered = sorted(d for walk in walks for d in walk.durations)
        if not ordered:
            return {}

        def pick(q: float) -> float:
            return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

        return {"p50": pick(0.5), "p99": pick(0.99), "max": round(1000 * ordered[-1], 1)}

    def _halted(self) -> bool:
        return self.settings.stop.is_set() or self.abort.is_set()

    DRIVER_CHECK_EVERY = 1.0  # seconds between a helper's checks that the job is still run

    def _driven(self, db: Session) -> bool:
        """A helper's walk goes on only while an orchestrator runs the job (checked about
        once a second); the orchestrator's own workers need not ask."""
        if not self.assisting:
            return True
        if self.undriven.is_set():
            return False
        now = time.monotonic()
        if now - self._driver_checked.get(threading.get_ident(), 0.0) >= self.DRIVER_CHECK_EVERY:
            self._driver_checked[threading.get_ident()] = now
            with db.tx():
                if not ledger.driven(db, self.plan, self.work.checkpoint):
                    self.undriven.set()
        return not self.undriven.is_set()

    def _own_session(self, number: int) -> None:
        """A walk session: it runs nothing but this worker's claims and batches, so the
        batch timeouts hold for its whole life (the trigger's mark is each batch's own)."""
        try:
            with dbmod.session(self._url, f"phasegate backfill worker {number}") as session:
                with session.tx():
                    set_limits(session, self.settings, local=False)
                    adopt_session(session, self.search_path, self.expression_settings)
                try:
                    self._worker(session, number)
                finally:
                    reset_limits(session)
        except BaseException as exc:  # surfaced by run_batched
            self._fail(exc)

    def _worker(self, db: Session, number: int) -> None:
        owner = f"{'assist' if self.assisting else 'worker'} {number}"
        with db.tx():  # its function is created for this session
            statements = BatchSQL(db, self.work, self.key, checkpoint=True)
        sizer = BatchSizer(self.settings, self.work.batch_size)
        throttle = Throttle(self.settings)
        reported = time.monotonic()
        try:
            while not self._halted() and self._driven(db):
                piece = ledger.claim_slice(
                    db, self.plan, self.work.checkpoint, owner, self.generation
                )
                if piece is None:
                    with db.tx():
                        left = ledger.unfinished_slices(db, self.plan, self.work.checkpoint)
                    if not left or self.assisting:
                        return
                    if time.monotonic() - reported >= self.HOLDER_REPORT_EVERY:
                        reported = time.monotonic()
                        self._report_holders(db)
                    self.settings.stop.wait(0.5)  # others hold the rest; a crash frees it
                    continue
                try:
                    self._walk_slice(db, statements, piece, sizer, throttle)
                finally:
                    ledger.release_slice(db, piece)
        except Fenced as exc:
            if self.assisting:  # for a helper, the orchestrator stopping is how walks end
                self.undriven.set()
            else:
                self._fail(exc)
        except BaseException as exc:
            self._fail(exc)

    HOLDER_REPORT_EVERY = 30.0

    def _report_holders(self, db: Session) -> None:
        """Waiting on slices other sessions hold: say who, and how to unblock a stuck one."""
        for held in ledger.slice_holders(db, self.plan, self.work.checkpoint):
            self.notify(
                f"job {self.work.checkpoint}: waiting for slice {held['slice']}, held by "
                f"{held['owner']} (backend pid {held['owner_pid']}), last batch "
                f"{held['idle']} ago; if that worker is stuck or its host is gone, stop it "
                f"or run SELECT pg_terminate_backend({held['owner_pid']}) and its slice is "
                f"taken over"
            )

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.abort.set()

    def _walk_slice(
        self,
        db: Session,
        statements: BatchSQL,
        piece: ledger.Slice,
        sizer: BatchSizer,
        throttle: Throttle,
    ) -> None:
        upper = keys.decode(piece.upper_key, self.key)
        last = keys.decode(piece.last_key or piece.lower_key, self.key)
        while not self._halted() and self._driven(db):
            elapsed, scanned, updated, last, done = self._batch(
                db, statements, piece, sizer, last, upper
            )
            sizer.observe(scanned, elapsed)
            with self.lock:
                self.rows += updated
                self.batches += 1 if scanned else 0
                self.walked += scanned
                self.durations.append(elapsed)
            if scanned:
                self.progress.batch_done(self.work.checkpoint, scanned, updated)
            if done:
                return
            paused = throttle.after_batch(db, elapsed, self.notify)
            with self.lock:
                self.paused += paused

    def _batch(
        self,
        db: Session,
        statements: BatchSQL,
        piece: ledger.Slice,
        sizer: BatchSizer,
        last: KeyValue | None,
        upper: KeyValue | None,
    ) -> tuple[float, int, int, KeyValue | None, bool]:
        """One batch, one statement in its own transaction (autocommit), retried smaller on
        timeouts, deadlocks and the like.

        An attempt that failed still ran for a while, holding its row locks: its time goes
        into the batch durations the percentiles are taken from (not into the sizing).
        """
        checkpoint = ledger.checkpoint_params(piece, self.generation)
        attempt = 0
        while True:
            started = None
            try:
                assert upper is not None  # a slice always has an upper key
                with db.autocommit():
                    started = time.perf_counter()
                    outcome = statements.run(db, last, upper, sizer.size, checkpoint)
                    elapsed = time.perf_counter() - started
                if not outcome.owned:
                    with db.tx():
                        current = ledger.run_is_current(
                            db, self.plan, self.work.checkpoint, self.generation
                        )
                    if not current:
                        raise ledger.walk_fenced(self.work.checkpoint, self.generation)
                    raise RuntimeFailure(
                        f"slice {piece.slice} of job {piece.job!r} is no longer this worker's "
                        "(the job was restarted or cleared meanwhile); its last batch wrote "
                        "nothing"
                    )
                piece.last_key = keys.encode(outcome.reached)
                piece.rows_done += outcome.updated
                piece.batches += 1 if outcome.scanned else 0
                piece.status = "done" if outcome.done else "running"
                return elapsed, outcome.scanned, outcome.updated, outcome.reached, outcome.done
            except Exception as exc:
                reason = retry_reason(exc)
                if reason is not None and started is not None:
                    with self.lock:
                        self.durations.append(time.perf_counter() - started)
                if reason is not None and self.settings.stop.is_set():
                    raise Interrupted(
                        f"job {self.work.checkpoint!r} stopped on request while a batch waited "
                        f"({reason}); that batch was rolled back, every one before it is "
                        "committed. Resume with the same command",
                        job=self.work.checkpoint,
                    ) from exc
                if reason is None or attempt >= self.settings.retries or self._halted():
                    if reason is not None:
                        raise RuntimeFailure(
                            f"job {self.work.checkpoint!r}: a batch hit {reason} "
                            f"{attempt + 1} times in a row (last at key {keys.encode(last)}); "
                            "something holds locks on its rows for long. Everything before "
                            "is committed: run the same command again once it is released",
                            job=self.work.checkpoint,
                        ) from exc
                    raise
                sizer.shrink()
                pause = backoff(attempt)
                self.notify(
                    f"job {self.work.checkpoint}: batch hit {reason}; retrying with "
                    f"{sizer.size} rows in {pause:.2f}s"
                )
                attempt += 1
                self.settings.stop.wait(pause)


def verify(
    db: Session,
    plan: str,
    work: BatchedWork,
    after: str | None = None,
    remaining: int | None = None,
    moved: int = 0,
    moving: bool = False,
) -> ledger.Checkpoint:
    """Count what still matches, record it (done, or failed so the next run walks again);
    returns the checkpoint as saved.

    `after`: the `sql` job that ran later in the phase, when a done job is checked once
    more because that job may have written the table where no trigger saw it.
    `remaining`: already counted by the caller. `moved`: rows catch-up walks found.
    `moving`: the last catch-up walk still found other rows out of reach than the one
    before it: keys keep changing, nothing says `set` is at fault.
    """
    if remaining is None:
        with _row_security_refusal(work.table):
            remaining = count_remaining(db, work.table, work.unfinished)
    with db.tx():
        current = ledger.get_checkpoint(db, plan, work.checkpoint, lock=True)
        current.remaining = remaining
        if remaining:
            current.status = "failed"
        else:
            current.status, current.resweep = "done", False
            current.verified_at = db.scalar("SELECT now()")
        ledger.save_checkpoint(db, current)
    if remaining:
        if after is not None:
            cause = f"after job {after!r} ran (did it write {work.table} behind the sync trigger?)"
        elif moving:
            cause = (
                f"after the walk and {CATCH_UP_WALKS} catch-up walks, each of which found other "
                "rows out of its reach than the one before: the app keeps changing their keys "
                "while the walk runs (moving them behind it or past its end). Run the same "
                "command again once those key updates calm down"
            )
        else:
            caught = (
                f" ({moved:,} other(s) had moved behind the walk, their key changed while it "
                "ran, and were walked again)"
                if moved
                else ""
            )
            cause = (
                "after the walk, and a walk over the whole range again left them as they are: "
                "`set` leaves them matching (does an expression in `set` return NULL for "
                f"them?){caught}"
            )
        raise RuntimeFailure(
            f"verification failed: {remaining:,} row(s) of {work.table} still match `where` "
            f"of job {work.checkpoint!r} {cause}. Inspect them with: SELECT * FROM "
            f"{quote_table(work.table).as_string(db.raw)} AS new "
            f"WHERE {work.unfinished.as_string(db.raw)} LIMIT 10; fix the data and run the same "
            f"command again (the job sweeps the whole table once more), or fix the plan and run "
            f"it with --restart-job {work.checkpoint.split('@')[0]} (which also rewrites the "
            "rows the old expressions wrote)",
            job=work.checkpoint,
            remaining=remaining,
        )
    return current


def set_limits(db: Session, settings: BackfillSettings, local: bool) -> None:
    """A batch's timeouts and the settings its statement is read under.

    `local`: for the current transaction only (preview's sample); otherwise for the
    session's life (a walk session, which runs nothing but its claims and batches). Set
    before the batch statement: a `set_config` inside a statement governs neither its
    planning (the locks it takes then, so a batch must wait no longer than its
    lock_timeout) nor its statement_timeout, armed when it starts.

    No `enable_seqscan`: `batch.BatchSQL` turns it off only where the planner would
    misjudge a batch's range, since it reaches every query a batch runs underneath.

    row_security off: see `whole_table`. extra_float_digits 3: see `_differs`.
    """
    flag = "true" if local else "false"
    psycopg.Cursor(db.raw).execute(
        f"SELECT set_config('statement_timeout', %(s)s, {flag}),"
        f" set_config('lock_timeout', %(l)s, {flag}),"
        f" set_config('row_security', 'off', {flag}),"
        f" set_config('extra_float_digits', '3', {flag})" + client_check(db.raw, local=local),
        {"s": settings.statement_timeout, "l": settings.lock_timeout},
    )


# Session settings that change what an expression gives (a date from a timestamptz, how
# a literal or a number prints or parses): a walk session runs with the values of the
# session that prepared the walk, so every worker, here or elsewhere, writes what the
# orchestrator's own batches would.
EXPRESSION_SETTINGS = (
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "bytea_output",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "standard_conforming_strings",
    "default_text_search_config",
    "xmloption",
    "xmlbinary",
)


def expression_settings(db: Session) -> dict[str, str]:
    """This session's `EXPRESSION_SETTINGS`, to record with a walk."""
    rows = db.all(
        "SELECT name, current_setting(name) FROM unnest(%(n)s::text[]) AS name",
        {"n": list(EXPRESSION_SETTINGS)},
    )
    return {name: value for name, value in rows}


def adopt_session(db: Session, search_path: str | None, settings: Mapping[str, str] | None) -> None:
    """The search_path (`adopt_search_path`) and the expression settings of the session
    that prepared the walk, for this session's life."""
    adopt_search_path(db, search_path)
    for name, value in (settings or {}).items():
        if name in EXPRESSION_SETTINGS:  # recorded by us; never a name from elsewhere
            db.execute("SELECT set_config(%(n)s, %(v)s, false)", {"n": name, "v": value})


def adopt_search_path(db: Session, search_path: str | None) -> None:
    """The search_path of the session that prepared the walk, for this session's life.

    The orchestrator's session is the one the project's env.py ran on, and env.py may set
    search_path (an app whose tables live in their own schema). That session installs the
    sync trigger (whose function keeps the path it was created under), prepares the walk
    and verifies it; a walk session on a fresh connection would otherwise resolve the
    job's table and the functions in its expressions elsewhere, or not at all.
    """
    if search_path is not None:
        db.execute("SELECT set_config('search_path', %(p)s, false)", {"p": search_path})


def reset_limits(db: Session) -> None:
    """Undo `set_limits(local=False)`, `batch.BatchSQL`'s `enable_seqscan` and `db.settle`
    before a walk session closes (a pooler may keep the server connection); best effort: a lost
    connection has nothing left to undo."""
    with contextlib.suppress(Exception):
        db.reset()
        with db.autocommit():
            for name in (
                "statement_timeout",
                "lock_timeout",
                "enable_seqscan",
                "row_security",
                "extra_float_digits",
                "search_path",
                "default_transaction_isolation",
                *EXPRESSION_SETTINGS,
            ):
                psycopg.Cursor(db.raw).execute(f"RESET {name}")
            if client_check(db.raw, local=False):  # set only where the server knows them
                psycopg.Cursor(db.raw).execute("RESET client_connection_check_interval")
                psycopg.Cursor(db.raw).execute("RESET idle_session_timeout")


def _regclass_text(db: Session, table: str) -> str:
    return quote_table(table).as_string(db.raw)


# -- preview: a measured sample, rolled back ---------------------------------------------------


@dataclass
class Sample:
    rows: int  # keys walked by the sample batch
    seconds: float  # the batch statements' time

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def sample_batch(db: Session, work: BatchedWork, rows: int = 1000) -> Sample:
    """Time one real batch of `work` at the start of its key range, then roll it back.

    Nothing it wrote survives (sequences that its expressions advance excepted: PostgreSQL
    never rolls those back); it holds row locks on `rows` rows for the batch's duration,
    under a short lock_timeout and statement_timeout, and any sync trigger steps aside.
    """
    key = keys.resolve(db, work.table, work.key)
    settings = BackfillSettings(lock_timeout="500ms", statement_timeout="5s")
    db.ensure_idle()
    transaction = db.connection.begin()
    try:
        statements = BatchSQL(db, work, key, checkpoint=False)
        set_limits(db, settings, local=True)  # before the first read of the table: it may be locked
        row = db.execute(
            sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
                key.as_text_array(), quote_table(work.table), key.order(descending=True)
            )
        ).fetchone()
        if row is None:
            return Sample(0, 0.0)
        started = time.perf_counter()
        outcome = statements.run(db, None, tuple(row[0]), rows)
        return Sample(outcome.scanned, time.perf_counter() - started)
    finally:
        transaction.rollback()
