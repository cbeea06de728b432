"""Per-row costs of a backfill batch, measured side by side on identical tables.

Why. The backfill benchmark times whole processes, and this machine's speed moves 10-20%
from one run to the next, more than the costs it would have to tell apart. Here the
variants run interleaved in one session: the seeded ``bug`` table is copied once per
variant (same rows, indexes and NOT VALID foreign key), then every copy gets the same
range UPDATE chunk after chunk (``--chunk`` rows, the batch's own statement shape), the
order of the variants reversed every other chunk, so a slow spell of the machine falls on
all of them alike. Each variant's summed time is printed against the plain UPDATE on a
table without a trigger:

* ``trigger, WHEN false``: a BEFORE INSERT OR UPDATE row trigger that never fires: the
  price of PostgreSQL locking the old row for any BEFORE UPDATE trigger;
* ``trigger, WHEN mark``: the sync trigger's WHEN before issue 18 (a ``current_setting``
  per row), with the backfill's mark set, as a batch sees it;
* ``UPDATE trigger, WHEN``: the sync UPDATE trigger's WHEN now (`sync.update_condition`:
  the mark, then whether the row's old column changed under the batch, and the up walk's
  mark), with both marks set, as an up walk's batch sees it;
* ``RETURNING count``: the UPDATE inside a CTE, its rows counted through ``RETURNING``, as
  the batch statement counts them.

Run (a benchmark, never a timed test):

    .venv/bin/python benchmarks/row_costs.py --rows 200000 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from _common import drop_all, make_template, note
from backfill import expand

from phasegate import provision
from phasegate.db import libpq_url
from phasegate.sync import BACKFILL_SETTING, UP_WALK_SETTING, update_condition

UPDATE = (
    "UPDATE {table} AS new SET root_cause_id = root_cause_id_for(new.root_cause)"
    " WHERE id > %(low)s AND id <= %(high)s"
    " AND new.root_cause IS NOT NULL AND new.root_cause_id IS NULL"
)
TRIGGER = (
    "CREATE TRIGGER row_cost BEFORE {events} ON {table} FOR EACH ROW"
    " WHEN ({when}) EXECUTE FUNCTION row_cost_noop()"
)
MARK_WHEN = f"current_setting('{BACKFILL_SETTING}', true) IS DISTINCT FROM 'on'"
UPDATE_WHEN = update_condition(["root_cause"]).as_string(None)

# name: (trigger WHEN or None, statement)
VARIANTS: dict[str, tuple[str | None, str]] = {
    "plain UPDATE, no trigger": (None, UPDATE),
    "trigger, WHEN false": ("false", UPDATE),
    "trigger, WHEN mark": (MARK_WHEN, UPDATE),
    "UPDATE trigger, WHEN": (UPDATE_WHEN, UPDATE),
    "RETURNING count": (None, f"WITH done AS ({UPDATE} RETURNING 1) SELECT count(*) FROM done"),
}


def build(conn: psycopg.Connection, rows: int, whens: dict[str, str | None]) -> dict[str, str]:
    """One copy of bug per variant, with a no-op trigger where ``whens`` gives a WHEN;
    returns variant name -> table name."""
    conn.execute(
        "CREATE FUNCTION row_cost_noop() RETURNS trigger LANGUAGE plpgsql"
        " AS $$BEGIN RETURN NEW; END$$"
    )
    conn.execute(
        "INSERT INTO root_cause (name) SELECT DISTINCT root_cause FROM bug"
        " ON CONFLICT (name) DO NOTHING"
    )
    tables = {}
    for number, (name, when) in enumerate(whens.items()):
        table = f"bug_variant_{number}"
        conn.execute(f"CREATE TABLE {table} (LIKE bug INCLUDING ALL)")
        conn.execute(f"INSERT INTO {table} SELECT * FROM bug WHERE id <= %(n)s", {"n": rows})
        conn.execute(f"CREATE INDEX ON {table} (root_cause_id)")
        conn.execute(
            f"ALTER TABLE {table} ADD FOREIGN KEY (root_cause_id)"
            " REFERENCES root_cause (id) NOT VALID"
        )
        if when is not None:
            events = "UPDATE" if "OLD." in when else "INSERT OR UPDATE"  # INSERT: no OLD
            conn.execute(TRIGGER.format(events=events, table=table, when=when))
        conn.execute(f"VACUUM ANALYZE {table}")
        tables[name] = table
    conn.execute("CHECKPOINT")
    return tables


@contextmanager
def variant_tables(
    database_url: str | None, rows: int, prefix: str, whens: dict[str, str | None]
) -> Iterator[tuple[psycopg.Connection, dict[str, str]]]:
    """A seeded template on the server with one copy of bug per variant (see `build`); the
    connection and the variants' tables for the time of the block, then dropped."""
    server = provision.start(database_url)
    created: list[str] = []
    try:
        note(f"template: seeding {rows:,} bugs, expand …")
        url = make_template(server, rows, prefix=prefix, prepare=expand)
        created.append(url)
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            yield conn, build(conn, rows, whens)
    finally:
        drop_all(server, created)
        server.close()


def measure(conn: psycopg.Connection, tables: dict[str, str], rows: int, chunk: int) -> dict:
    """Summed seconds per variant over interleaved chunks."""
    conn.execute("SET synchronous_commit = off")  # as the batches run
    conn.execute(f"SET {BACKFILL_SETTING} = 'on'")  # the batches' marks
    conn.execute(f"SET {UP_WALK_SETTING} = 'on'")
    seconds = dict.fromkeys(tables, 0.0)
    order = list(tables)
    for number, low in enumerate(range(0, rows, chunk)):
        for name in order if number % 2 == 0 else reversed(order):
            statement = VARIANTS[name][1].format(table=tables[name])
            started = time.perf_counter()
            conn.execute(statement, {"low": low, "high": low + chunk})
            seconds[name] += time.perf_counter() - started
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per copy (200000)")
    parser.add_argument("--chunk", type=int, default=4_000, help="rows per UPDATE (4000)")
    parser.add_argument("--database-url", help="server (default: $PHASEGATE_TEST_DATABASE_URL)")
    args = parser.parse_args(argv)
    whens = {name: when for name, (when, _) in VARIANTS.items()}
    with variant_tables(args.database_url, args.rows, "bench_rowcost", whens) as (conn, tables):
        seconds = measure(conn, tables, args.rows, args.chunk)
    base = seconds["plain UPDATE, no trigger"]
    print(f"per-row costs: {args.rows:,} rows per table, {args.chunk:,}-row UPDATEs interleaved")
    for name, value in seconds.items():
        print(f"{name:<26}{value:8.3f} s  {value / base:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
