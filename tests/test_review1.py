"""Adversarial review of issue 18's integrity fixes: ways a phase still ends with wrong rows.

Every test here is expected to FAIL on the code it was written against: each shows a wrong
row, a wrong exit code or a misleading message, against real PostgreSQL and the real CLI.
They use the engine tests' table `t` (`doubled = val * 2` up, `val = doubled / 2` down) or
the sync-order tests' chain table (`b = upper(a)`, `c = b || '!'`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from .conftest import Phasegate
from .test_backfill_engine import (
    ROWS,
    cli,
    engine_plan_text,
    execute,
    fetch,
    make_plan,
    poll,
    seeded_table,
    wait_for_batches,
)
from .test_integrity import SLOW, own_connection, wait_until
from .test_sync_order import DERIVE_C, FILL_B, make_table, row

pytestmark = pytest.mark.db

TRIPLED = engine_plan_text(set_="doubled: new.val * 3", down="val: new.doubled / 3")


def tripled(url: str) -> int:
    [(count,)] = fetch(url, "SELECT count(*) FROM t WHERE doubled = val * 3")
    return int(count)


# -- catch-up walks (item 17) under a resweep (items 1, 2) -------------------------------------


@pytest.mark.parametrize("way_out", ["rollback", "restart-job"])
def test_a_resweep_walks_again_the_stale_rows_whose_key_moved_behind_it(
    way_out: str, database_url: str, tmp_path: Path
) -> None:
    """The two honest ways out of an edited `set` (rollback and start over; --restart-job)
    re-walk the job with `where OR <new columns differ from set>`, but the catch-up walks
    and verification count only the author's `where`. A row that still holds the old
    result and whose key the app moves behind the re-walk is never reached and never
    counted: the phase ends done with 50 rows carrying the old expression's result."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    phasegate = Phasegate(database_url)
    restart: tuple[str, ...] = ()
    if way_out == "rollback":
        assert phasegate("backfill", plan, "--live-version", "1", "--yes").exit_code == 0
        assert phasegate("rollback", plan, "--live-version", "1", "--yes").exit_code == 0
    else:  # a backfill stopped part way; the rows it wrote are moved to the top of the range
        owner = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *SLOW)
        wait_for_batches(database_url, 5)
        owner.terminate()
        owner.communicate(timeout=60)
        execute(database_url, "UPDATE t SET k = k + 100000 WHERE doubled IS NOT NULL")
        restart = ("--restart-job", "fill")
    [(stale,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 2")
    assert stale >= 50
    Path(plan).write_text(TRIPLED)

    owner = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *restart, *SLOW)
    if restart:  # the checkpoint starts over once the restart is recorded
        wait_until(
            lambda: poll(database_url, "SELECT FROM phasegate.event WHERE kind = 'job.restarted'"),
            what="the restart",
        )
    wait_for_batches(database_url, 3)
    with own_connection(database_url) as app:  # the 50 topmost rows, still stale, moved down
        app.execute(
            "UPDATE t SET k = -k WHERE k IN (SELECT k FROM t ORDER BY k DESC LIMIT 50)"
            " AND doubled = val * 2"
        )
    _out, err = owner.communicate(timeout=120)
    assert owner.returncode == 0, err
    [(old_result,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 2")
    assert (old_result, tripled(database_url)) == (0, ROWS), err


# -- catch-up walks (item 17): keys that keep moving ---------------------------------------------


def test_rows_that_keep_moving_out_of_reach_are_not_blamed_on_set(
    database_url: str, tmp_path: Path
) -> None:
    """The app keeps moving 50 unwalked rows past the walk's upper bound, so neither the
    walk nor its catch-up reaches them. The job cannot finish (exit 3 is right), but the
    message says a walk over the whole range "left them as they are: `set` leaves them
    matching (does an expression in `set` return NULL for them?)", which sends the operator
    to the plan: `set` is `val * 2` and never NULL. Item 17 asks to say what happened."""
    seeded_table(database_url)
    plan = make_plan(tmp_path)
    stop = threading.Event()

    def mover() -> None:
        with own_connection(database_url) as app:
            while not stop.wait(0.1):
                app.execute(
                    f"UPDATE t SET k = k + 1000000 WHERE doubled IS NULL AND k > {ROWS - 50}"
                )

    owner = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *SLOW)
    wait_for_batches(database_url, 1)
    moving = threading.Thread(target=mover, daemon=True)
    moving.start()
    try:
        _out, err = owner.communicate(timeout=180)
    finally:
        stop.set()
        moving.join()
    assert owner.returncode == 3, err
    assert "50 row(s) of t still match `where`" in err
    assert "return NULL" not in err and "`set` leaves them matching" not in err, err


# -- sync triggers in plan order (item 3): two plans on one table --------------------------------

TWO_PLANS = """\
plan: {name}
app: syncorder
baseline_compatible: ">=0"
phases:
  backfill:
    compatible: ">=0"
    jobs:
{jobs}"""


@pytest.mark.parametrize(
    "first, second",
    [("zz-fill", "aa-derive"), ("aa-fill", "zz-derive")],
    ids=["names-against-start-order", "names-in-start-order"],
)
def test_a_second_plan_on_the_table_syncs_after_the_first_whatever_their_names(
    first: str, second: str, database_url: str, tmp_path: Path
) -> None:
    """Plan one fills b from a; plan two, started once plan one's backfill is done, derives
    c from b. Each plan's sync runs in its own trigger, and PostgreSQL fires them in name
    order: when plan two's name sorts first, an old-code UPDATE of a leaves c stale and an
    INSERT leaves it NULL, after both backfills said done. Item 3's rule (correctness must
    not depend on names) holds within a plan only; the order check of item 4 ignores
    phasegate's own triggers."""
    make_table(database_url)
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(TWO_PLANS.format(name=first, jobs=FILL_B.format(fill="fill-b")))
    two.write_text(TWO_PLANS.format(name=second, jobs=DERIVE_C.format(derive="derive-c")))
    phasegate = Phasegate(database_url)
    for path in (one, two):
        result = phasegate("backfill", str(path), "--live-version", "1", "--yes")
        assert result.exit_code == 0, result.output
    execute(
        database_url,
        "UPDATE t SET a = 'moved' WHERE k = 1",  # old code
        "INSERT INTO t (k, a) VALUES (1001, 'fresh')",
    )
    assert row(database_url, 1) == ("moved", "MOVED", "MOVED!")
    assert row(database_url, 1001) == ("fresh", "FRESH", "FRESH!")


# -- the INSERT path (items 3, 4): a column default ----------------------------------------------


@pytest.mark.parametrize("column", ["new", "old"])
def test_an_insert_that_leaves_a_column_to_its_default_is_synced(
    column: str, database_url: str, tmp_path: Path
) -> None:
    """The trigger tells an old-code INSERT by "the new columns are all NULL" and a
    new-code INSERT by "the old columns are all NULL". A column DEFAULT defeats both:
    the README's lint advice is to add a column "nullable (or with a constant default)"
    or to "SET DEFAULT separately". `new`: old code inserts (k, val) and doubled keeps its
    default 0; `old`: new code inserts (k, doubled) and val keeps its default 0. Either
    way the pair disagrees after the backfill said done, and stays so."""
    seeded_table(database_url)
    defaulted = "val" if column == "old" else "doubled"
    execute(database_url, f"ALTER TABLE t ALTER COLUMN {defaulted} SET DEFAULT 0")
    plan = make_plan(tmp_path)
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    if column == "new":
        execute(database_url, "INSERT INTO t (k, val) VALUES (100000, 7)")  # old code
    else:
        execute(database_url, "INSERT INTO t (k, doubled) VALUES (100000, 14)")  # new code
    assert fetch(database_url, "SELECT val, doubled FROM t WHERE k = 100000") == [(7, 14)]
