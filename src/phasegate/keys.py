"""The key a batched job walks: which columns, their types, and the SQL to compare them.

A key is the table's primary key (one column or several), else a UNIQUE index whose
columns are all NOT NULL, else the job's explicit `key:` if a unique index backs it. Any
btree-orderable type works (integer, bigint, uuid, text, timestamp, ...): key values
travel as text and are cast back with the column's own type, and several columns compare
as a row, `(a, b) > (x, y)`, which PostgreSQL answers from the index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from psycopg import sql

from phasegate.db import Session, quote_table
from phasegate.errors import RuntimeFailure

KeyValue = tuple[str, ...]
_DATETIME = ("timestamp", "date", "time")
# text forms that need not round-trip exactly (extra_float_digits): not walkable keys
_INEXACT = ("real", "double precision")


@dataclass(frozen=True)
class Key:
    columns: tuple[str, ...]
    types: tuple[str, ...]  # format_type() of each (a domain's base) type, quoted by PostgreSQL
    source: str  # where it came from, for messages

    def tuple(self, alias: str | None = None) -> sql.Composable:
        """`a` or `(a, b)`, optionally qualified with a table alias."""
        parts = [
            sql.Identifier(alias, column) if alias else sql.Identifier(column)
            for column in self.columns
        ]
        if len(parts) == 1:
            return parts[0]
        return sql.SQL("({})").format(sql.SQL(", ").join(parts))

    @property
    def signature(self) -> str:
        """`a bigint, b text`: what the saved bounds of a walk are values of."""
        return ", ".join(f"{c} {t}" for c, t in zip(self.columns, self.types, strict=True))

    def names(self) -> sql.Composable:
        """`a, b`: the key's columns as a select list."""
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)

    def literal(self, value: KeyValue) -> sql.Composable:
        """The key value as typed SQL: `'42'::bigint` or `ROW('a'::text, '1'::integer)`."""
        parts = [
            sql.SQL("{}::{}").format(sql.Literal(text), sql.SQL(type_))
            for text, type_ in zip(value, self.types, strict=True)
        ]
        if len(parts) == 1:
            return parts[0]
        return sql.SQL("ROW({})").format(sql.SQL(", ").join(parts))

    def placeholder(self, name: str) -> sql.Composable:
        """The key value as typed parameters, so repeated batches share one prepared plan."""
        if len(self.columns) == 1:
            return self.placeholders(name)
        return sql.SQL("ROW({})").format(self.placeholders(name))

    def placeholders(self, name: str) -> sql.Composable:
        """`%(name0)s::bigint, %(name1)s::text`: the key value as a select list."""
        return sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Placeholder(f"{name}{i}"), sql.SQL(type_))
            for i, type_ in enumerate(self.types)
        )

    def params(self, name: str, value: KeyValue) -> dict[str, str]:
        return {f"{name}{i}": text for i, text in enumerate(value)}

    def order(self, descending: bool = False, alias: str | None = None) -> sql.Composable:
        direction = sql.SQL(" DESC" if descending else "")
        return sql.SQL(", ").join(
            sql.SQL("{}{}").format(
                sql.Identifier(alias, c) if alias else sql.Identifier(c), direction
            )
            for c in self.columns
        )

    def variables(self, prefix: str) -> sql.Composable:
        """`prefix0` or `(prefix0, prefix1)`: a key value held in PL/pgSQL variables."""
        parts = [sql.Identifier(f"{prefix}{i}") for i in range(len(self.columns))]
        if len(parts) == 1:
            return parts[0]
        return sql.SQL("({})").format(sql.SQL(", ").join(parts))

    def declarations(self, prefix: str, separator: str = ", ") -> sql.Composable:
        """`prefix0 bigint, prefix1 text`: arguments' (or, with "; ", variables')
        declarations."""
        return sql.SQL(separator).join(
            sql.SQL("{} {}").format(sql.Identifier(f"{prefix}{i}"), sql.SQL(type_))
            for i, type_ in enumerate(self.types)
        )

    def as_text_array(self, alias: str | None = None, prefix: str | None = None) -> sql.Composable:
        """A json array of the key's columns (or of `prefix` variables) as text: how a key
        value reaches Python.

        Dates and times go through to_json, which writes ISO 8601 whatever the session's
        DateStyle, so a worker with other settings reads the stored key back exactly.
        """
        parts = []
        for i, (column, type_) in enumerate(zip(self.columns, self.types, strict=True)):
            if prefix is not None:
                ref = sql.Identifier(f"{prefix}{i}")
            else:
                ref = sql.Identifier(alias, column) if alias else sql.Identifier(column)
            if type_.startswith(_DATETIME):
                parts.append(sql.SQL("to_json({}) #>> '{{}}'").format(ref))
            else:
                parts.append(sql.SQL("{}::text").format(ref))
        return sql.SQL("json_build_array({})").format(sql.SQL(", ").join(parts))

    def stored(self, text_array: sql.Composable) -> sql.Composable:
        """SQL that turns an `as_text_array()` value into the ledger's text, as `encode` does."""
        if len(self.columns) == 1:
            return sql.SQL("({} ->> 0)").format(text_array)
        return sql.SQL("({})::text").format(text_array)

    def describe(self) -> str:
        return f"{', '.join(self.columns)} ({self.source})"


def encode(value: KeyValue | None) -> str | None:
    """How a key value is stored in the ledger: plain text for one column, JSON for more.

    The JSON is written as PostgreSQL's `json_build_array(...)::text` writes it (see
    `Key.stored`), so a key stored by a batch's statement reads the same as one from here.
    """
    if value is None:
        return None
    return value[0] if len(value) == 1 else json.dumps(list(value), ensure_ascii=False)


def decode(stored: str | None, key: Key) -> KeyValue | None:
    if stored is None:
        return None
    if len(key.columns) == 1:
        return (stored,)
    return tuple(json.loads(stored))


# Every column's type, a domain as its base type (with the domain's typmod), however deep:
# key values are cast to it and held in PL/pgSQL variables, where a NOT NULL domain would
# refuse the NULL a variable starts with, and its floating-point or date/time nature is
# what decides how the value travels as text.
_BASE_TYPES = """
WITH RECURSIVE t(name, type_oid, typmod, not_null, depth) AS (
    SELECT attname::text, atttypid, atttypmod, attnotnull, 0 FROM pg_attribute
    WHERE attrelid = %(rel)s AND attnum > 0 AND NOT attisdropped
  UNION ALL
    SELECT t.name, d.typbasetype, d.typtypmod, t.not_null, t.depth + 1
    FROM t JOIN pg_type d ON d.oid = t.type_oid WHERE d.typtype = 'd'
)
SELECT DISTINCT ON (name) name, format_type(type_oid, typmod) AS type, not_null
FROM t ORDER BY name, depth DESC
"""


def base_types(db: Session, table: str) -> dict[str, str]:
    """Every column of `table` and its type, a domain as its base type."""
    with db.tx():
        rel = db.scalar(
            "SELECT to_regclass(%(t)s)::oid", {"t": quote_table(table).as_string(db.raw)}
        )
        rows = db.dicts(_BASE_TYPES, {"rel": rel}) if rel is not None else []
    return {row["name"]: row["type"] for row in rows}


def index_hint(db: Session, table: str, key: Key) -> str | None:
    """What to create when no btree index starts with the key's first column, else None.

    A batch finds its end key with `ORDER BY key OFFSET n LIMIT 1` over what is left of its
    range; without such an index that is a sort of the rest of the table, every batch.
    Only an explicit `key:` can lack one (a primary key or unique index is its own).
    """
    with db.tx():
        found = db.scalar(
            """
            SELECT EXISTS (
                SELECT FROM pg_index i
                JOIN pg_class ic ON ic.oid = i.indexrelid
                JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                WHERE i.indrelid = to_regclass(%(t)s) AND i.indisvalid AND i.indpred IS NULL
                  AND a.attname = %(first)s)
            """,
            {"t": quote_table(table).as_string(db.raw), "first": key.columns[0]},
        )
    if found:
        return None
    columns = ", ".join(sql.Identifier(c).as_string(db.raw) for c in key.columns)
    return (
        f"no index of {table} starts with {key.columns[0]}, so every batch sorts the rest of "
        f"the table to find where it ends; CREATE INDEX CONCURRENTLY ON "
        f"{quote_table(table).as_string(db.raw)} ({columns}) (in an expand revision) makes "
        "each batch a walk of that index"
    )


def resolve(db: Session, table: str, explicit: list[str] | None) -> Key:
    """The job's key: explicit, else the primary key, else a UNIQUE NOT NULL index."""
    with db.tx():
        rel = db.scalar(
            "SELECT to_regclass(%(t)s)::oid", {"t": quote_table(table).as_string(db.raw)}
        )
        if rel is None:
            raise RuntimeFailure(f"table {table!r} does not exist")
        candidates = db.dicts(
            """
            SELECT i.indisprimary AS primary,
                   ic.relname AS index_name,
                   array_agg(a.attname::text ORDER BY k.n) AS columns,
                   bool_and(a.attnotnull) AS not_null
            FROM pg_index i
            JOIN pg_class ic ON ic.oid = i.indexrelid
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = %(rel)s AND i.indisunique AND i.indisvalid
              AND i.indpred IS NULL AND i.indexprs IS NULL
              AND k.n <= i.indnkeyatts  -- INCLUDE columns are not part of the key
            GROUP BY i.indexrelid, i.indisprimary, ic.relname
            ORDER BY i.indisprimary DESC, count(*), ic.relname
            """,
            {"rel": rel},
        )
        types = {t["name"]: t for t in db.dicts(_BASE_TYPES, {"rel": rel})}
    for candidate in candidates:
        candidate["types"] = [types[c]["type"] for c in candidate["columns"]]
    usable = [c for c in candidates if c["not_null"] and not _inexact(c["types"])]
    if explicit:
        key = _explicit(table, explicit, types, candidates)
        if _inexact(key.types):
            raise RuntimeFailure(
                f"key ({', '.join(key.columns)}) of {table!r} is floating point, whose text "
                "form may not reproduce it exactly; name another unique NOT NULL key"
            )
        return key
    primary = next((c for c in usable if c["primary"]), None)
    if primary:
        return Key(tuple(primary["columns"]), tuple(primary["types"]), "primary key")
    if usable:
        best = usable[0]
        source = f"unique index {best['index_name']} on NOT NULL columns"
        return Key(tuple(best["columns"]), tuple(best["types"]), source)
    floating = [c for c in candidates if c["not_null"] and _inexact(c["types"])]
    if floating:
        raise RuntimeFailure(
            f"the only unique key of {table!r} ({', '.join(floating[0]['columns'])}) is "
            "floating point, whose text form may not reproduce it exactly, so a backfill "
            "could skip rows. Add a unique NOT NULL key of another type and name it in `key:`"
        )
    raise RuntimeFailure(
        f"table {table!r} has no primary key and no UNIQUE index on NOT NULL columns, so a "
        "backfill cannot walk it in order and resume exactly. Add one, e.g. "
        f"ALTER TABLE {quote_table(table).as_string(None)} ADD COLUMN id bigint GENERATED BY "
        "DEFAULT AS IDENTITY PRIMARY KEY "
        "(in an expand revision), or CREATE UNIQUE INDEX CONCURRENTLY on NOT NULL column(s) "
        "and name them in the job's `key:`"
    )


def _inexact(types: list[str] | tuple[str, ...]) -> bool:
    return any(t in _INEXACT for t in types)


def _explicit(
    table: str, names: list[str], columns: dict[str, dict], candidates: list[dict]
) -> Key:
    missing = [n for n in names if n not in columns]
    if missing:
        raise RuntimeFailure(f"key column(s) {', '.join(missing)} do not exist in {table!r}")
    nullable = [n for n in names if not columns[n]["not_null"]]
    unique = any(set(c["columns"]) <= set(names) for c in candidates)  # a unique key, or more
    if nullable or not unique:
        problem = (
            f"column(s) {', '.join(nullable)} may be NULL"
            if nullable
            else "no unique index has its key among these columns"
        )
        raise RuntimeFailure(
            f"key ({', '.join(names)}) of {table!r} cannot be walked safely: {problem}. A "
            "backfill key must be unique and NOT NULL, or batches could skip rows"
        )
    return Key(tuple(names), tuple(columns[n]["type"] for n in names), "job key")
