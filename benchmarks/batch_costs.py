"""Per-batch costs of a backfill walk, measured side by side on identical tables.

Why. A one-worker walk runs its batches one after another, each its own statement and
its own transaction, and waits for each result before it sends the next. Between two
batches the server sits idle while the result travels back, the client decides the next
size, and the commit runs. Is that worth attacking (pipelining the next batch, several
batches per transaction, bigger statements)? This answers it with numbers instead of
guesses: the seeded ``bug`` table is copied once per variant (as in ``row_costs.py``),
and every copy walks the same key range group after group (``--group`` batches of
``--chunk`` rows), the variants' order reversed every other group so a slow spell of the
machine falls on all of them alike. Summed times, each against the walk's own shape:

* ``one batch, one transaction``: what a walk does (autocommit, result read each time);
* ``pipelined``: the same statements sent without waiting (psycopg pipeline mode, a Sync
  after each, so each is still its own transaction): the client's part hidden;
* ``group in one transaction``: the same statements, one COMMIT per group: the commits'
  part amortized;
* ``group as one statement``: one UPDATE over the group's whole range: every per-statement
  cost paid once per group, the way a set-based UPDATE pays it once.

Every UPDATE runs with ``synchronous_commit = off``, as batches do.

Run (a benchmark, never a timed test):

    .venv/bin/python benchmarks/batch_costs.py --rows 300000 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import psycopg
from row_costs import UPDATE, variant_tables

Walk = Callable[[psycopg.Connection, str, list[tuple[int, int]]], None]


def one_by_one(conn: psycopg.Connection, table: str, chunks: list[tuple[int, int]]) -> None:
    for low, high in chunks:
        conn.execute(UPDATE.format(table=table), {"low": low, "high": high}, prepare=True)


def pipelined(conn: psycopg.Connection, table: str, chunks: list[tuple[int, int]]) -> None:
    with conn.pipeline() as pipeline:
        for low, high in chunks:
            conn.execute(UPDATE.format(table=table), {"low": low, "high": high}, prepare=True)
            pipeline.sync()  # ends the implicit transaction: one per batch, as in a walk


def one_transaction(conn: psycopg.Connection, table: str, chunks: list[tuple[int, int]]) -> None:
    with conn.transaction():
        one_by_one(conn, table, chunks)


def one_statement(conn: psycopg.Connection, table: str, chunks: list[tuple[int, int]]) -> None:
    one_by_one(conn, table, [(chunks[0][0], chunks[-1][1])])


VARIANTS: dict[str, Walk] = {
    "one batch, one transaction": one_by_one,
    "pipelined": pipelined,
    "group in one transaction": one_transaction,
    "group as one statement": one_statement,
}


def measure(
    conn: psycopg.Connection, tables: dict[str, str], rows: int, chunk: int, group: int
) -> dict[str, float]:
    """Summed seconds per variant over interleaved groups of batches."""
    conn.execute("SET synchronous_commit = off")  # as the batches run
    seconds = dict.fromkeys(tables, 0.0)
    order = list(tables)
    span = chunk * group
    for number, start in enumerate(range(0, rows, span)):
        chunks = [(low, low + chunk) for low in range(start, min(start + span, rows), chunk)]
        for name in order if number % 2 == 0 else reversed(order):
            started = time.perf_counter()
            VARIANTS[name](conn, tables[name], chunks)
            seconds[name] += time.perf_counter() - started
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="rows per copy (300000)")
    parser.add_argument("--chunk", type=int, default=3_200, help="rows per batch (3200)")
    parser.add_argument("--group", type=int, default=10, help="batches per group (10)")
    parser.add_argument("--database-url", help="server (default: $PHASEGATE_TEST_DATABASE_URL)")
    args = parser.parse_args(argv)
    whens = dict.fromkeys(VARIANTS)  # no trigger on any copy
    with variant_tables(args.database_url, args.rows, "bench_batchcost", whens) as (conn, tables):
        seconds = measure(conn, tables, args.rows, args.chunk, args.group)
    base = seconds["one batch, one transaction"]
    print(
        f"per-batch costs: {args.rows:,} rows per table, groups of {args.group} "
        f"{args.chunk:,}-row batches interleaved"
    )
    for name, value in seconds.items():
        print(f"{name:<28}{value:8.3f} s  {value / base:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
