"""Adversarial cases against the integrity fixes of issue 18: ways a phase could still end
with wrong rows, a wrong exit code or a misleading message, found by a review that tried
to break them. Each failed on the code it was written against and passes since the fix.
They use the engine tests' table `t` (`doubled = val * 2` up, `val = doubled / 2` down) or
the sync-order tests' chain table (`b = upper(a)`, `c = b || '!'`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import ALEMBIC_INI, ROOT, Phasegate
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
from .test_sync_order import DERIVE_C, FILL_B, SWITCH, make_table, row

pytestmark = pytest.mark.db

TRIPLED = engine_plan_text(set_="doubled: new.val * 3", down="val: new.doubled / 3")
TRIPLED_SET = engine_plan_text(set_="doubled: new.val * 3")


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
    # a restart takes a new `set` only (a new `sync.down` is refused: see below)
    Path(plan).write_text(TRIPLED if way_out == "rollback" else TRIPLED_SET)

    owner = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *restart, *SLOW)
    if restart:  # the checkpoint starts over once the restart is recorded
        try:
            wait_until(
                lambda: poll(
                    database_url, "SELECT FROM phasegate.event WHERE kind = 'job.restarted'"
                ),
                what="the restart",
            )
        except AssertionError:
            owner.kill()
            raise AssertionError(owner.communicate()) from None
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


# -- one plan is one contract (item 1): a helper's check and the walk it joins -------------------


def test_a_helper_joins_only_the_walk_whose_contract_it_checked(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`phasegate worker` checks its file against the recorded contract, then reads the
    job's checkpoint and walks for the run that checkpoint names. Between the two, its
    orchestrator died and a new run restarted the job with an edited `set`
    (`--restart-job`): the helper, whose file is the old one, joins the new run's walk (its
    generation is current, its driver lock held) and writes the old expression into the
    slices it claims; its resweep `where` even rewrites rows the new run already fixed.
    The new run's verification counts only `where`: done, with rows of both expressions.

    The pause after the check stands for the scheduler; everything else is real."""
    from phasegate import backfill, db
    from phasegate.pacing import BackfillSettings
    from phasegate.plan import load_plan

    seeded_table(database_url)
    plan = make_plan(tmp_path)
    helper_plan = load_plan(plan)  # the helper's checkout: the file as the phase started
    first = cli(database_url, "backfill", plan, "--live-version", "1", "--yes", *SLOW)
    wait_for_batches(database_url, 3)

    checked, go_on = threading.Event(), threading.Event()
    original = backfill._hold_to_contract

    def check_then_pause(session: db.Session, helper: object) -> None:
        original(session, helper)  # type: ignore[arg-type]
        checked.set()
        go_on.wait(60)

    monkeypatch.setattr(backfill, "_hold_to_contract", check_then_pause)
    failures: list[BaseException] = []

    def helper() -> None:
        settings = BackfillSettings(batch_size=20, pause=0.05)
        try:
            with db.session(db.normalize_url(database_url), "phasegate worker test") as conn:
                backfill.assist(conn, helper_plan, settings, backfill.NoProgress(), print, 30)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=helper, daemon=True)
    thread.start()
    assert checked.wait(30), "the helper never checked the contract"
    first.kill()  # the orchestrator dies; the operator edits the plan and restarts the job
    first.communicate(timeout=60)
    Path(plan).write_text(TRIPLED_SET)
    second = cli(
        database_url,
        "backfill",
        plan,
        "--live-version",
        "1",
        "--yes",
        "--restart-job",
        "fill",
        "--slices",
        "6",
        *SLOW,
    )
    wait_until(
        lambda: poll(database_url, "SELECT FROM phasegate.event WHERE kind = 'job.restarted'"),
        what="the restart",
    )
    wait_for_batches(database_url, 3)
    go_on.set()
    thread.join(120)
    _out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    [(old_result,)] = fetch(database_url, "SELECT count(*) FROM t WHERE doubled = val * 2")
    assert (old_result, tripled(database_url)) == (0, ROWS), (failures, err)


# -- one plan is one contract (item 2): --restart-job of an edited `sync.down` -------------------


def test_a_restart_for_an_edited_down_leaves_no_old_column_with_the_old_result(
    database_url: str, tmp_path: Path
) -> None:
    """`sync.down` of fill-b is edited from lower(b) to initcap(b) (both round-trip through
    `set` = upper(a)) and the job restarted. The re-walk runs `set` only, and its resweep
    finds rows whose new columns differ from `set`: none of the rows new code wrote before
    the restart, whose old column the old `down` filled. Those keep `hello world` while the
    same write now gives `Hello World`: old code reads the old expression's result in some
    rows and the new one's in others, after "restarted ... rewrites every row the old ones
    wrote" and exit 0. A walk cannot tell such a row from one old code wrote; the restart
    should refuse (or say that the old `down` results stay) rather than promise."""
    make_table(database_url)
    path = tmp_path / "chain.yaml"
    path.write_text(TWO_PLANS.format(name="down-edit", jobs=FILL_B.format(fill="fill-b")))
    slow = ("--batch-size", "20", "--pause", "0.1")
    owner = cli(database_url, "backfill", str(path), "--live-version", "1", "--yes", *slow)
    wait_until(
        lambda: poll(database_url, "SELECT FROM phasegate.job_checkpoint WHERE batches >= 2"),
        what="the walk",
    )
    execute(database_url, "UPDATE t SET b = 'HELLO WORLD' WHERE k = 5")  # new code
    owner.terminate()
    _out, err = owner.communicate(timeout=60)
    assert row(database_url, 5) == ("hello world", "HELLO WORLD", None), err
    path.write_text(path.read_text().replace("a: lower(new.b)", "a: initcap(new.b)"))

    result = Phasegate(database_url)(
        "backfill", str(path), "--live-version", "1", "--yes", "--restart-job", "fill-b"
    )
    # refused, with why: the rows the old down wrote cannot be told apart
    assert result.exit_code == 2, result.output
    assert "--restart-job refused" in result.stderr and "sync.down.a" in result.stderr
    execute(database_url, "UPDATE t SET b = 'HELLO WORLD' WHERE k = 6")  # new code, now
    assert row(database_url, 6)[0] == "hello world"  # the trigger still runs the old down
    assert row(database_url, 5)[0] == "hello world"


# -- drift: a sync trigger that no longer fires for the app's writes -----------------------------


@pytest.mark.parametrize("how", ["replica", "partition"])
def test_a_sync_trigger_that_no_longer_fires_for_app_writes_is_drift(
    how: str, database_url: str, tmp_path: Path
) -> None:
    """`is_installed` counts a trigger as there unless pg_trigger says 'D' on the job's
    table itself. `replica`: ENABLE REPLICA TRIGGER ('R') fires it only under
    session_replication_role = replica, never for the app's sessions. `partition`: the
    clone of the trigger on one partition is disabled; writes routed there skip the sync.
    Either way old code's updates leave the new column stale while `status` reports no
    drift, and `switch` would go ahead."""
    if how == "partition":
        execute(
            database_url,
            "CREATE TABLE t (k bigint PRIMARY KEY, a text, b text, c text) PARTITION BY RANGE (k)",
            "CREATE TABLE t_low PARTITION OF t FOR VALUES FROM (0) TO (300)",
            "CREATE TABLE t_high PARTITION OF t FOR VALUES FROM (300) TO (100000)",
            "INSERT INTO t (k, a) SELECT g, 'r' || g FROM generate_series(1, 600) g",
        )
    else:
        make_table(database_url)
    plan = tmp_path / "one.yaml"
    plan.write_text(  # a switch to come: the plan is not over, its triggers are expected
        TWO_PLANS.format(name="drift", jobs=FILL_B.format(fill="fill-b")) + SWITCH
    )
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", str(plan), "--live-version", "1", "--yes").exit_code == 0
    [(update,)] = fetch(
        database_url,
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 't'::regclass AND tgname LIKE '~%_upd'",
    )
    if how == "replica":
        execute(database_url, f'ALTER TABLE t ENABLE REPLICA TRIGGER "{update}"')
    else:
        execute(database_url, f'ALTER TABLE t_high DISABLE TRIGGER "{update}"')
    execute(database_url, "UPDATE t SET a = 'moved' WHERE k = 400")  # old code
    stale = row(database_url, 400) != ("moved", "MOVED", None)
    status = phasegate("status", str(plan), json_output=True)
    assert not stale or '"drift": true' in status.stdout, status.stdout


# -- sync triggers: a table with inheritance children ---------------------------------------------


def test_rows_of_an_inheritance_child_stay_in_step_after_the_backfill(
    database_url: str, tmp_path: Path
) -> None:
    """Half of t's rows live in a child table (INHERITS, the partitioning before
    PostgreSQL 10). The walk's `UPDATE t` and the verification's count reach them, so the
    backfill says done; but the sync triggers are created on t alone, and an UPDATE of t
    fires the row triggers of the table the row is in. Old code's `UPDATE t SET a = ...`
    of a child row leaves b stale (and an INSERT into the child leaves it NULL), with no
    drift reported. Partitions get clones of the triggers; inheritance children do not."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, a text, b text, c text)",
        "CREATE TABLE t_old (PRIMARY KEY (k)) INHERITS (t)",
        "INSERT INTO t (k, a) SELECT g, 'r' || g FROM generate_series(1, 300) g",
        "INSERT INTO t_old (k, a) SELECT g, 'r' || g FROM generate_series(301, 600) g",
    )
    plan = tmp_path / "one.yaml"
    plan.write_text(TWO_PLANS.format(name="inherit", jobs=FILL_B.format(fill="fill-b")) + SWITCH)
    phasegate = Phasegate(database_url)
    result = phasegate("backfill", str(plan), "--live-version", "1", "--yes")
    if result.exit_code != 0:  # refused before anything was touched: also a right answer
        assert result.exit_code == 2 and "t_old" in result.stderr, result.output
        return
    [(filled,)] = fetch(database_url, "SELECT count(*) FROM t WHERE b = upper(a)")
    assert filled == 600  # the walk reached the child's rows
    execute(
        database_url,
        "UPDATE t SET a = 'moved' WHERE k = 400",  # old code
        "INSERT INTO t_old (k, a) VALUES (1001, 'fresh')",
    )
    assert row(database_url, 400) == ("moved", "MOVED", None)
    assert row(database_url, 1001) == ("fresh", "FRESH", None)


# -- fencing (item 5): what `status` says about a run that died ----------------------------------


def test_status_calls_a_dead_run_abandoned_while_another_plan_runs(
    database_url: str, tmp_path: Path
) -> None:
    """A backfill of plan one is killed; plan two's backfill then runs (one orchestrator
    lock per database). `status` of plan one asks whether *any* phasegate holds the lock,
    so while plan two runs it shows plan one as running, not abandoned; its job shows as
    stopped (its own driver lock is asked), so the two disagree."""
    seeded_table(database_url)
    execute(
        database_url,
        "CREATE TABLE t2 (k bigint PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t2 SELECT g, g FROM generate_series(1, {ROWS}) g",
    )
    one = make_plan(tmp_path)
    two = tmp_path / "two.yaml"
    two.write_text(engine_plan_text(table="t2").replace("engine-test", "engine-two"))
    first = cli(database_url, "backfill", one, "--live-version", "1", "--yes", *SLOW)
    wait_for_batches(database_url, 3)
    first.kill()
    first.communicate(timeout=60)
    second = cli(database_url, "backfill", str(two), "--live-version", "1", "--yes", *SLOW)
    try:
        wait_until(
            lambda: poll(
                database_url,
                "SELECT FROM phasegate.job_checkpoint WHERE plan = 'engine-two' AND batches > 2",
            ),
            what="plan two's walk",
        )
        status = json.loads(Phasegate(database_url)("status", one, json_output=True).stdout)
    finally:
        second.kill()
        second.communicate(timeout=60)
    assert status["jobs"][0]["status"] == "stopped"
    assert status["abandoned"] is True, status


# -- one plan is one contract (item 1): what else a helper's session brings ----------------------

DAYS = """\
plan: engine-days
app: enginetest
baseline_compatible: ">=0"
phases:
  backfill:
    compatible: ">=0"
    jobs:
      - name: fill
        table: t
        set:
          day: new.at::date
        where: new.day IS NULL
"""


def test_a_helper_in_another_time_zone_writes_what_the_orchestrator_would(
    database_url: str, tmp_path: Path
) -> None:
    """The helper's plan is the orchestrator's, byte for byte, and it adopts the
    orchestrator's search_path; but its sessions keep the TimeZone its environment gives
    (PGTZ, PGOPTIONS, a role's setting on another machine), and `new.at::date` depends on
    it. Every row is at 23:30 UTC: the slices the helper walks get the next day, the
    orchestrator's get the day in UTC; both exit 0 and verification (day IS NULL) passes.
    search_path is adopted for this very reason; TimeZone, DateStyle, IntervalStyle and
    the like are not."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, at timestamptz NOT NULL, day date)",
        f"INSERT INTO t SELECT g, '2026-01-01 23:30+00'::timestamptz + g * interval '1 day'"
        f" FROM generate_series(1, {ROWS}) g",
    )
    plan = tmp_path / "days.yaml"
    plan.write_text(DAYS)

    def run(zone: str, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PHASEGATE_DATABASE_URL": database_url, "PGTZ": zone}
        return subprocess.Popen(
            [sys.executable, "-m", "phasegate", "--config", str(ALEMBIC_INI), *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    owner = run(
        "UTC", "backfill", str(plan), "--live-version", "1", "--yes", "--slices", "6", *SLOW
    )
    wait_for_batches(database_url, 3)
    helper = run("Pacific/Kiritimati", "worker", str(plan), "--wait", "30", *SLOW)
    helper_out, helper_err = helper.communicate(timeout=120)
    _out, owner_err = owner.communicate(timeout=120)
    assert (owner.returncode, helper.returncode) == (0, 0), (owner_err, helper_err)
    assert "helped" in helper_out, helper_out
    [(other_day,)] = fetch(
        database_url, "SELECT count(*) FROM t WHERE day <> (at AT TIME ZONE 'UTC')::date"
    )
    assert other_day == 0
