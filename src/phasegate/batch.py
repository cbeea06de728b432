"""One backfill batch as one statement: find where it ends, update, checkpoint.

A batch updates the rows of a key range that still match the job's `where`, the range
ending at the `size`-th key after the last one (OFFSET over the key's index; the slice's
end when fewer keys are left). On a walk, the same statement writes the slice's checkpoint
and the job's totals (ledger.checkpoint_ctes), gated on the slice still being this
session's: one round trip a batch, and the checkpoint commits with the rows.

The work itself runs in a PL/pgSQL function that each walk session creates in its own
`pg_temp` (so nothing is left behind, and no two sessions share one): there the UPDATE is
a statement of its own whose bounds are plain parameters, and `GET DIAGNOSTICS` counts its
rows. Counting them in one SQL statement needs `RETURNING` into a CTE, and the bound
found by another CTE reaches the UPDATE only at run time; measured side by side
(interleaved batches on two copies of a 1M-row table), that form costs 2-4 % more per
row. A role that may not create a temporary PL/pgSQL function gets that form
(`_cte_statement`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from phasegate import ledger
from phasegate.db import Session, quote_table
from phasegate.keys import Key, KeyValue
from phasegate.sync import BACKFILL_SETTING, UP_WALK_SETTING


@dataclass(frozen=True)
class BatchedWork:
    """What one batched walk does; the backfill (up) and the contract refill (down)."""

    checkpoint: str  # name in the ledger
    table: str
    key: list[str] | None
    assignments: Mapping[str, str]
    where: sql.Composable  # the rows a batch writes
    batch_size: int | None  # the job's fixed size, if any
    done_unless: sql.Composable | None = None  # what verification counts (default: `where`)
    refill: bool = False  # writes the old columns (sync.down): the triggers never run `set`

    @property
    def unfinished(self) -> sql.Composable:
        """The rows that must be gone when the walk is done."""
        return self.where if self.done_unless is None else self.done_unless


@dataclass(frozen=True)
class BatchOutcome:
    """What one batch statement did."""

    reached: KeyValue  # the batch's last key: the next batch starts after it
    scanned: int  # keys in the batch's range
    updated: int  # rows the UPDATE changed (those that matched `where`)
    done: bool  # the batch reached the end of the range
    owned: bool = True  # the slice was still this worker's (always True without a ledger)


def _mark(work: BatchedWork) -> sql.Composable:
    """The marks for the sync triggers (every batch; an up walk's also lets them run `set`
    where a BEFORE trigger rewrote the old columns, which a refill's must never do) and
    synchronous_commit off. They belong to the batch's own transaction (set_config with
    is_local): they end with it, so a pooled server connection never keeps them."""
    marks = [BACKFILL_SETTING] if work.refill else [BACKFILL_SETTING, UP_WALK_SETTING]
    return sql.SQL(", ").join(
        [sql.SQL("set_config({}, 'on', true)").format(sql.Literal(m)) for m in marks]
        + [sql.SQL("set_config('synchronous_commit', 'off', true)")]
    )


_OUTCOME = ("reached", "scanned", "updated", "done")
# For the session, not the transaction: see BatchSQL.
_KEEP_TO_THE_INDEX = "SELECT set_config('enable_seqscan', 'off', false)"
# pg_stats shows a column's statistics to whoever may read the column.
_KEY_HAS_STATISTICS = (
    "SELECT EXISTS (SELECT FROM pg_stats AS s WHERE s.schemaname = n.nspname"
    " AND s.tablename = c.relname AND s.attname = %(column)s)"
    " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE c.oid = to_regclass(%(table)s)"
)
# A temporary PL/pgSQL function needs TEMPORARY on the database (PUBLIC has it by default)
# and USAGE on plpgsql (hardened clusters may revoke it from PUBLIC).
_CAN_CREATE_FUNCTION = (
    "SELECT has_database_privilege(current_database(), 'TEMPORARY') AND EXISTS"
    " (SELECT FROM pg_language WHERE lanname = 'plpgsql' AND has_language_privilege(oid, 'USAGE'))"
)


class BatchSQL:
    """The batch statements of one session, composed (and its function created) once.

    Key values are typed parameters, so every batch sends the same text and psycopg
    prepares it after a few runs. The text comes in two forms: for a range's first batch
    (no lower bound) and for the others. Construct it inside a transaction (or before
    autocommit): the function is created in the caller's transaction, so a rolled-back
    preview sample leaves nothing.

    `enable_seqscan` is left as it is only where the planner sees each batch's real
    range: the function form (its statements get their bounds as parameters) over a key of
    one column that has statistics. Everywhere else the session turns it off (undone with
    the caller's transaction if that rolls back; `backfill.reset_limits` undoes it when a
    walk session closes), because a misjudged range means a sequential scan over every
    row, for every batch:
    - the one-statement form finds its upper key at run time, so for a slice's first
      batch the planner sees a third of the table (a uuid key picked a sequential scan);
    - PostgreSQL estimates a row comparison, a composite key's bound, from its first
      column and one side at a time: a batch in the middle of the table looks like a
      quarter of it (a two-worker 1M-row walk over a wide text-and-int key took 722 s
      instead of 4.6 s);
    - without statistics a one-sided bound (a first batch) is a one-in-three guess.
    Where it can, it stays: the setting reaches every query a batch runs underneath, the
    author's expressions and the foreign-key checks, and pushes them onto indexes even
    on a table of one page (the seed plan's walk took 3-5% longer with it).
    """

    def __init__(self, db: Session, work: BatchedWork, key: Key, checkpoint: bool) -> None:
        self.key = key
        if db.scalar(_CAN_CREATE_FUNCTION):
            function = _create_function(db, work, key)
            self.statement = {
                first: _function_statement(db, key, function, first, checkpoint)
                for first in (True, False)
            }
            if not _ranges_are_estimated(db, work, key):
                db.execute(_KEEP_TO_THE_INDEX)
        else:
            db.execute(_KEEP_TO_THE_INDEX)
            self.statement = {
                first: _cte_statement(db, work, key, first, checkpoint) for first in (True, False)
            }

    def run(
        self,
        db: Session,
        last: KeyValue | None,
        upper: KeyValue,
        size: int,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> BatchOutcome:
        """One batch of up to `size` keys after `last`, never past `upper`."""
        params: dict[str, Any] = {**self.key.params("upper", upper), "skip": size - 1}
        if last is not None:
            params |= self.key.params("last", last)
        row = db.execute(self.statement[last is None], {**params, **(checkpoint or {})}).fetchone()
        assert row is not None  # the statement always returns its one row
        if row[0] is None:  # the slice was no longer this session's: nothing ran
            return BatchOutcome((), 0, 0, False, owned=False)
        return BatchOutcome(tuple(row[0]), int(row[1]), int(row[2]), bool(row[3]), *row[4:])


def _ranges_are_estimated(db: Session, work: BatchedWork, key: Key) -> bool:
    """Whether the planner can judge a batch's range from its bounds: a key of one
    column that has statistics (see BatchSQL)."""
    if len(key.columns) != 1:
        return False
    return bool(
        db.scalar(
            _KEY_HAS_STATISTICS,
            {"table": quote_table(work.table).as_string(db.raw), "column": key.columns[0]},
        )
    )


def _create_function(db: Session, work: BatchedWork, key: Key) -> sql.Composable:
    """Create this session's batch function for `work`; returns its qualified name.

    Its name carries a hash of its text, so a session that walks two jobs has two, and
    creating the same one again is harmless. Its body names the table and the author's
    expressions exactly as the batch statement would, resolved by the session's
    search_path. `#variable_conflict use_column`: a column of the author's table always
    wins over the function's own (phasegate_-prefixed) names.
    """
    table = quote_table(work.table)
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = ({})").format(sql.Identifier(column), sql.SQL(expression))
        for column, expression in work.assignments.items()
    )
    column, new_column = key.tuple(), key.tuple("new")
    last, upper, reached = (
        key.variables(p) for p in ("phasegate_last", "phasegate_upper", "phasegate_r")
    )
    upper_bound = sql.SQL("{} <= {}").format(column, upper)
    both_bounds = sql.SQL("{} > {} AND {}").format(column, last, upper_bound)
    new_upper = sql.SQL("{} <= {}").format(new_column, reached)
    new_both = sql.SQL("{} > {} AND {}").format(new_column, last, new_upper)

    def hit(bounds: sql.Composable) -> sql.Composable:
        return sql.SQL(
            "SELECT {cols} INTO {reached} FROM {table} WHERE {bounds} ORDER BY {order}"
            " OFFSET phasegate_skip LIMIT 1;"
        ).format(
            cols=key.names(),
            reached=_variable_list(key, "phasegate_r"),
            table=table,
            bounds=bounds,
            order=key.order(),
        )

    def update(bounds: sql.Composable) -> sql.Composable:
        return sql.SQL("UPDATE {} AS new SET {} WHERE {} AND ({});").format(
            table, assignments, bounds, work.where
        )

    def count(bounds: sql.Composable) -> sql.Composable:
        return sql.SQL("SELECT count(*) INTO phasegate_scanned FROM {} WHERE {};").format(
            table, bounds
        )

    def branches(first: sql.Composable, other: sql.Composable) -> sql.Composable:
        return sql.SQL("IF phasegate_first THEN {} ELSE {} END IF;").format(first, other)

    body = (
        sql.SQL("\n")
        .join(
            [
                sql.SQL("#variable_conflict use_column"),
                sql.SQL("DECLARE phasegate_full boolean := true; {};").format(
                    key.declarations("phasegate_r", "; ")
                ),
                sql.SQL("BEGIN"),
                sql.SQL("PERFORM {};").format(_mark(work)),
                branches(hit(upper_bound), hit(both_bounds)),
                sql.SQL(
                    "IF NOT FOUND THEN phasegate_full := false; SELECT {} INTO {}; END IF;"
                ).format(
                    _variable_list(key, "phasegate_upper"), _variable_list(key, "phasegate_r")
                ),
                branches(update(new_upper), update(new_both)),
                sql.SQL("GET DIAGNOSTICS phasegate_updated = ROW_COUNT;"),
                sql.SQL("IF phasegate_full THEN phasegate_scanned := phasegate_skip + 1;"),
                sql.SQL("ELSE {} END IF;").format(branches(count(upper_bound), count(both_bounds))),
                sql.SQL("phasegate_done := NOT phasegate_full OR {} = {};").format(reached, upper),
                sql.SQL("phasegate_reached := {};").format(key.as_text_array(prefix="phasegate_r")),
                sql.SQL("END"),
            ]
        )
        .as_string(db.raw)
    )
    digest = hashlib.sha1(body.encode()).hexdigest()[:16]
    name = sql.SQL("pg_temp.{}").format(sql.Identifier(f"phasegate_batch_{digest}"))
    tag = "phasegate_batch"
    while f"${tag}$" in body:
        tag += "_"
    db.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {name}(phasegate_first boolean, phasegate_skip bigint,"
            " {last}, {upper}, OUT phasegate_reached json, OUT phasegate_scanned bigint,"
            " OUT phasegate_updated bigint, OUT phasegate_done boolean)"
            " LANGUAGE plpgsql AS {tag}{body}{tag}"
        )
        .format(
            name=name,
            last=key.declarations("phasegate_last"),
            upper=key.declarations("phasegate_upper"),
            tag=sql.SQL(f"${tag}$"),
            body=sql.SQL(body),
        )
        .as_string(db.raw)
    )
    return name


def _variable_list(key: Key, prefix: str) -> sql.Composable:
    """`prefix0, prefix1`: a key value's variables as an INTO list or a select list."""
    return sql.SQL(", ").join(sql.Identifier(f"{prefix}{i}") for i in range(len(key.types)))


def _function_statement(
    db: Session, key: Key, function: sql.Composable, first: bool, checkpoint: bool
) -> str:
    """The statement that runs one batch through the function (and its checkpoint)."""
    last = (
        sql.SQL(", ").join(sql.SQL("NULL::{}").format(sql.SQL(t)) for t in key.types)
        if first
        else key.placeholders("last")
    )
    call = sql.SQL("{}({}, %(skip)s::bigint, {}, {})").format(
        function, sql.Literal(first), last, key.placeholders("upper")
    )
    outcome = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.Identifier(f"phasegate_{name}"), sql.Identifier(name))
        for name in _OUTCOME
    )
    if not checkpoint:
        return sql.SQL("SELECT {} FROM {}").format(outcome, call).as_string(db.raw)
    # The function runs only if the slice is still this session's: an uncorrelated
    # EXISTS is a one-time filter, checked before the function scan starts.
    return (
        sql.SQL(
            "WITH {owned}, phasegate_batch AS MATERIALIZED (SELECT {outcome} FROM {call}"
            " WHERE EXISTS (SELECT FROM phasegate_owned)), {checkpoint}"
            " SELECT b.reached, b.scanned, b.updated, b.done, EXISTS (SELECT FROM phasegate_slice)"
            " FROM (SELECT) AS phasegate_one LEFT JOIN phasegate_batch AS b ON true"
        )
        .format(
            owned=ledger.SLICE_OWNED,
            outcome=outcome,
            call=call,
            checkpoint=ledger.checkpoint_ctes(key.stored(sql.SQL("b.reached"))),
        )
        .as_string(db.raw)
    )


def _cte_statement(db: Session, work: BatchedWork, key: Key, first: bool, checkpoint: bool) -> str:
    """The batch as one SQL statement of CTEs, for a role without TEMPORARY."""
    table = quote_table(work.table)
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = ({})").format(sql.Identifier(column), _with_params(expression))
        for column, expression in work.assignments.items()
    )
    where = _with_params(work.where.as_string(db.raw))
    # The UPDATE's one-time filter reads the mark's CTE before its first row, so the
    # trigger's WHEN sees the mark from the first row on.
    gates = sql.SQL(" AND EXISTS (SELECT FROM phasegate_mark)")
    if checkpoint:
        gates = sql.SQL("{} AND EXISTS (SELECT FROM phasegate_owned)").format(gates)
    bounds = _range(key, first)
    # A plain range predicate lets PostgreSQL walk the key's index straight into the
    # update; joining the batch's keys back cost twice that. A row inserted into the range
    # in between is updated too, which is harmless.
    ctes = [
        sql.SQL("phasegate_mark AS (SELECT {})").format(_mark(work)),
        sql.SQL(
            "phasegate_hit AS ("
            "(SELECT {cols}, true AS phasegate_full FROM {table} WHERE {bounds}"
            " ORDER BY {order} OFFSET %(skip)s::bigint LIMIT 1)"
            " UNION ALL SELECT {upper}, false LIMIT 1)"
        ).format(
            cols=key.names(),
            table=table,
            bounds=bounds,
            order=key.order(),
            upper=key.placeholders("upper"),
        ),
        sql.SQL(
            "phasegate_rows AS (UPDATE {table} AS new SET {assignments}"
            " WHERE {lower}{column} <= (SELECT {cols} FROM phasegate_hit)"
            " AND ({where}){gates} RETURNING 1)"
        ).format(
            table=table,
            assignments=assignments,
            lower=sql.SQL("")
            if first
            else sql.SQL("{} > {} AND ").format(key.tuple("new"), key.placeholder("last")),
            column=key.tuple("new"),
            cols=key.names(),
            where=where,
            gates=gates,
        ),
        sql.SQL(
            "phasegate_batch AS (SELECT {reached} AS reached,"
            " CASE WHEN phasegate_full THEN %(skip)s::bigint + 1"
            " ELSE (SELECT count(*) FROM {table} WHERE {bounds}) END AS scanned,"
            " (SELECT count(*) FROM phasegate_rows) AS updated,"
            " NOT phasegate_full OR {column} = {upper} AS done FROM phasegate_hit)"
        ).format(
            reached=key.as_text_array(),
            table=table,
            bounds=bounds,
            column=key.tuple(),
            upper=key.placeholder("upper"),
        ),
    ]
    result = sql.SQL("b.reached, b.scanned, b.updated, b.done")
    if checkpoint:
        ctes.insert(0, ledger.SLICE_OWNED)
        ctes.append(ledger.checkpoint_ctes(key.stored(sql.SQL("b.reached"))))
        result = sql.SQL("{}, EXISTS (SELECT FROM phasegate_slice)").format(result)
    return (
        sql.SQL("WITH {ctes} SELECT {result} FROM phasegate_batch AS b")
        .format(ctes=sql.SQL(", ").join(ctes), result=result)
        .as_string(db.raw)
    )


def _range(key: Key, first: bool) -> sql.Composable:
    """`key > %(last)s AND key <= %(upper)s`, without the lower bound for a first batch."""
    column = key.tuple()
    bounds = [sql.SQL("{} <= {}").format(column, key.placeholder("upper"))]
    if not first:
        bounds.insert(0, sql.SQL("{} > {}").format(column, key.placeholder("last")))
    return sql.SQL(" AND ").join(bounds)


def _with_params(expression: str) -> sql.Composable:
    """Author SQL inside a statement that has parameters: a literal `%` must be doubled."""
    return sql.SQL(expression.replace("%", "%%"))
