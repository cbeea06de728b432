"""Sync triggers in plan order, after the table's own BEFORE triggers (issue 18, items 3, 4).

Each test builds its own table `t` in a fresh database. The chain plan has two jobs on it,
`fill-b` (b from a) then `derive-c` (c from b), named so that their names sort against
the plan's order; the single plan has `fill-b` alone. A user trigger `zz_normalize` trims
the old column `a` on every write, as an app's own normalisation would.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.pool import NullPool

from phasegate import backfill, db, keys, ledger, sync
from phasegate.db import libpq_url
from phasegate.pacing import BackfillSettings
from phasegate.plan import load_plan
from phasegate.progress import LogProgress

from .conftest import ALEMBIC_INI, ROOT, Phasegate
from .test_backfill_engine import execute, fetch
from .test_backfill_engine import no_temporary_url as no_temporary_url

pytestmark = pytest.mark.db

ROWS = 600
FILL_B = """\
      - name: {fill}
        table: t
        set:
          b: upper(new.a)
        where: new.b IS NULL AND new.a IS NOT NULL
        sync:
          down:
            a: lower(new.b)
"""
DERIVE_C = """\
      - name: {derive}
        table: t
        set:
          c: new.b || '!'
        where: new.c IS NULL AND new.b IS NOT NULL
        sync:
          down:
            b: rtrim(new.c, '!')
"""
HEADER = """\
plan: sync-order
app: syncorder
baseline_compatible: ">=0"
phases:
"""
BACKFILL = """\
  backfill:
    compatible: ">=0"
    jobs:
"""
SWITCH = """\
  switch:
    compatible: ">=0"
"""
CONTRACT = """\
  contract:
    compatible: ">=0"
"""
NORMALIZE = (
    "CREATE FUNCTION normalize_a() RETURNS trigger LANGUAGE plpgsql AS"
    " $$BEGIN NEW.a := btrim(NEW.a); RETURN NEW; END$$",
    "CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON t FOR EACH ROW"
    " EXECUTE FUNCTION normalize_a()",
)


def chain_jobs(fill: str = "fill-b", derive: str = "derive-c") -> str:
    return FILL_B.format(fill=fill) + DERIVE_C.format(derive=derive)


def write_plan(tmp_path: Path, jobs: str, switch: bool = False, contract: bool = False) -> str:
    """A plan of `jobs`, with a switch and a contract that have no revisions if asked."""
    path = tmp_path / "sync-order.yaml"
    later = (SWITCH if switch else "") + (CONTRACT if contract else "")
    path.write_text(HEADER + BACKFILL + jobs + later)
    return str(path)


def make_table(url: str, padded: bool = False) -> None:
    """t with ROWS rows written by old code (`a` only); `padded`: with blanks around `a`,
    as rows written before the app's normalisation trigger existed."""
    value = "'  r' || g || '  '" if padded else "'r' || g"
    execute(
        url,
        "CREATE TABLE t (k bigint PRIMARY KEY, a text, b text, c text)",
        f"INSERT INTO t (k, a) SELECT g, {value} FROM generate_series(1, {ROWS}) g",
    )


def row(url: str, key: int) -> tuple:
    [found] = fetch(url, f"SELECT a, b, c FROM t WHERE k = {key}")
    return found


def chain_out_of_step(url: str) -> int:
    """Rows whose b or c is not what the chain derives from a."""
    [(count,)] = fetch(
        url,
        "SELECT count(*) FROM t WHERE b IS DISTINCT FROM upper(a)"
        " OR c IS DISTINCT FROM upper(a) || '!'",
    )
    return int(count)


def phasegate_triggers(url: str) -> list[str]:
    """The triggers on t that call a function of phasegate's, by name."""
    return [
        name
        for (name,) in fetch(
            url,
            "SELECT t.tgname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE t.tgrelid = 't'::regclass AND p.pronamespace = 'phasegate'::regnamespace"
            ' ORDER BY t.tgname COLLATE "C"',
        )
    ]


# -- item 3: dependent jobs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "fill, derive",
    [("fill-b", "derive-c"), ("a-fill-b", "b-derive-c")],
    ids=["names-against-plan-order", "names-in-plan-order"],
)
def test_dependent_jobs_sync_in_plan_order_whatever_their_names(
    fill: str, derive: str, database_url: str, tmp_path: Path
) -> None:
    """After the backfill, old code writes `a` (b and c follow, in plan order), new code
    writes `c` (b and a follow, in reverse plan order), code in between writes `b`. Old
    code: with names against the plan's order an UPDATE of a left c stale and an INSERT
    left it NULL; with names in plan order a write of c left a stale."""
    make_table(database_url)
    plan = write_plan(tmp_path, chain_jobs(fill, derive))
    phasegate = Phasegate(database_url)
    result = phasegate("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert chain_out_of_step(database_url) == 0

    execute(
        database_url,
        "UPDATE t SET a = 'moved' WHERE k = 1",  # old code
        "INSERT INTO t (k, a) VALUES (1001, 'fresh')",
        "UPDATE t SET c = 'NEWER!' WHERE k = 2",  # new code
        "INSERT INTO t (k, c) VALUES (1002, 'BORN!')",
        "UPDATE t SET b = 'MID' WHERE k = 3",  # in between
        "INSERT INTO t (k, b) VALUES (1003, 'HALF')",
        "INSERT INTO t (k) VALUES (1004)",  # nothing written: `set` of the empty columns
    )
    assert row(database_url, 1) == ("moved", "MOVED", "MOVED!")
    assert row(database_url, 1001) == ("fresh", "FRESH", "FRESH!")
    assert row(database_url, 2) == ("newer", "NEWER", "NEWER!")
    assert row(database_url, 1002) == ("born", "BORN", "BORN!")
    assert row(database_url, 3) == ("mid", "MID", "MID!")
    assert row(database_url, 1003) == ("half", "HALF", "HALF!")
    assert row(database_url, 1004) == (None, None, None)
    assert chain_out_of_step(database_url) == 0
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["drift"] is False, status["drift_details"]
    # one function runs both jobs: two triggers (INSERT, UPDATE), named after the user's
    names = phasegate_triggers(database_url)
    assert len(names) == 2 and all(name.startswith("~001_sync_sync_order_t_") for name in names)


def test_the_contract_rollback_refills_dependent_old_columns_in_reverse_plan_order(
    database_url: str, tmp_path: Path
) -> None:
    """contract drops a and b (c is the truth from then on) while new code writes c; its
    rollback refills b from c (derive-c's down) and then a from b (fill-b's down). Old code
    refilled in plan order: fill-b's refill found b empty, and a stayed NULL in every row."""
    url = database_url
    ini = chain_project(tmp_path)
    alembic_upgrade(ini, url, "c0000000base")
    execute(url, f"INSERT INTO t (k, a) SELECT g, 'r' || g FROM generate_series(1, {ROWS}) g")
    path = tmp_path / "chain.yaml"
    path.write_text(
        HEADER
        + '  expand:\n    compatible: ">=0"\n'
        + BACKFILL
        + chain_jobs()
        + '  contract:\n    compatible: ">=0"\n'
    )
    phasegate = Phasegate(url, ini)
    result = phasegate("advance", str(path), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    columns = fetch(
        url,
        "SELECT array_agg(attname::text ORDER BY attname) FROM pg_attribute"
        " WHERE attrelid = 't'::regclass AND attnum > 0 AND NOT attisdropped",
    )
    assert columns == [(["c", "k"],)]  # the contract dropped a and b
    execute(
        url,
        "UPDATE t SET c = 'NEWER!' WHERE k = 2",  # new code, with no trigger
        "INSERT INTO t (k, c) VALUES (1002, 'BORN!')",
    )
    result = phasegate("rollback", str(path), "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    refills = re.findall(r"refilling (\w+) of t", result.stderr)
    assert refills == ["b", "a"], result.stderr
    assert chain_out_of_step(url) == 0
    assert row(url, 2) == ("newer", "NEWER", "NEWER!")
    assert row(url, 1002) == ("born", "BORN", "BORN!")
    # the triggers are back, in plan order: old code's writes reach c again
    execute(url, "UPDATE t SET a = 'moved' WHERE k = 1")
    assert row(url, 1) == ("moved", "MOVED", "MOVED!")


def chain_project(tmp_path: Path) -> Path:
    """An Alembic project (the bundled env.py) whose history creates t (a), adds b and c
    (the plan's expand) and drops a and b (its contract); returns its alembic.ini."""
    project = tmp_path / "project"
    (project / "migrations" / "versions").mkdir(parents=True)
    shutil.copy(ROOT / "migrations" / "env.py", project / "migrations" / "env.py")
    shutil.copy(ROOT / "migrations" / "script.py.mako", project / "migrations" / "script.py.mako")
    shutil.copy(ALEMBIC_INI, project / "alembic.ini")
    revisions = [
        (
            "c0000000base",
            None,
            None,
            "CREATE TABLE t (k bigint PRIMARY KEY, a text)",
            "DROP TABLE t",
        ),
        (
            "c000000expnd",
            "c0000000base",
            "expand",
            "ALTER TABLE t ADD COLUMN b text, ADD COLUMN c text",
            "ALTER TABLE t DROP COLUMN c, DROP COLUMN b",
        ),
        (
            "c00000contrc",
            "c000000expnd",
            "contract",
            "ALTER TABLE t DROP COLUMN a, DROP COLUMN b",
            "ALTER TABLE t ADD COLUMN a text, ADD COLUMN b text",
        ),
    ]
    for revision, down, phase, upgrade, downgrade in revisions:
        tags = f'phasegate_plan = "sync-order"\nphasegate_phase = "{phase}"\n' if phase else ""
        (project / "migrations" / "versions" / f"{revision}.py").write_text(
            f'"""{revision}."""\nfrom alembic import op\n\n'
            "from phasegate.guard import guarded\n\n"
            f'revision = "{revision}"\ndown_revision = {down!r}\n'
            f"branch_labels = None\ndepends_on = None\n{tags}\n\n"
            f"{'@guarded' + chr(10) if tags else ''}"
            f"def upgrade():\n    op.execute({upgrade!r})\n\n\n"
            f"def downgrade():\n    op.execute({downgrade!r})\n"
        )
    return project / "alembic.ini"


def alembic_upgrade(ini: Path, url: str, target: str) -> None:
    """`alembic upgrade target` by hand, on a connection handed to env.py."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ini))
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, target)
        connection.commit()
    engine.dispose()


# -- item 4: the table's own BEFORE triggers ---------------------------------------------------


def test_app_writes_stay_in_step_behind_a_user_trigger_that_sorts_after_sync_(
    database_url: str, tmp_path: Path
) -> None:
    """`zz_normalize` sorted after the trigger an older phasegate named `sync_...`, which
    therefore computed b from the untrimmed a: an old-code UPDATE or INSERT left b out of
    step with the a that was stored. Now the sync sees the row as zz_normalize left it."""
    make_table(database_url)
    execute(database_url, *(s.format(name="zz_normalize") for s in NORMALIZE))
    plan = write_plan(tmp_path, FILL_B.format(fill="fill-b"))
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    execute(
        database_url,
        "UPDATE t SET a = '  moved ' WHERE k = 1",
        "INSERT INTO t (k, a) VALUES (1001, ' fresh  ')",
    )
    assert row(database_url, 1) == ("moved", "MOVED", None)
    assert row(database_url, 1001) == ("fresh", "FRESH", None)
    [(out_of_step,)] = fetch(database_url, "SELECT count(*) FROM t WHERE b <> upper(a)")
    assert out_of_step == 0


@pytest.mark.parametrize("form", ["function", "cte"])
def test_rows_a_user_trigger_rewrites_during_the_batches_end_in_step(
    form: str, database_url: str, no_temporary_url: str, tmp_path: Path
) -> None:
    """Every row's a is padded; each batch computes b from the padded a, and zz_normalize
    then trims a in the same UPDATE. The UPDATE trigger, which sees that the batch's row
    changed its old column, runs `set` again. Old code stepped aside for every batch: every
    row ended with b = upper of the padded a, while verification (b IS NULL) said done.
    `cte`: a role without TEMPORARY, whose batches are one statement of CTEs."""
    url = database_url if form == "function" else no_temporary_url
    make_table(url, padded=True)
    execute(url, *(s.format(name="zz_normalize") for s in NORMALIZE))
    plan = write_plan(tmp_path, chain_jobs())
    result = Phasegate(url)("backfill", plan, "--live-version", "1", "--batch-size", "97", "--yes")
    assert result.exit_code == 0, result.output
    [(padded,)] = fetch(url, "SELECT count(*) FROM t WHERE a <> btrim(a)")
    assert padded == 0  # zz_normalize ran on every batch's rows
    assert chain_out_of_step(url) == 0


def test_a_refill_never_runs_set_for_the_job_it_refills(database_url: str, tmp_path: Path) -> None:
    """The contract rollback's refill writes the old columns (`down`); with zz_normalize on
    them the UPDATE trigger sees them change, and must still not run `set`, which here is
    not the inverse of `down` (`set` after `down` appends '+'): the refill marks its
    batches differently from an up walk's."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, a text, b text)",
        f"INSERT INTO t (k, b) SELECT g, ' v' || g FROM generate_series(1, {ROWS}) g",
        *(s.format(name="zz_normalize") for s in NORMALIZE),
    )
    path = tmp_path / "refill.yaml"
    path.write_text(
        HEADER
        + BACKFILL
        + "      - name: plus\n        table: t\n        set:\n          b: new.a || '+'\n"
        "        where: new.b IS NULL\n        sync:\n          down:\n            a: new.b\n"
    )
    plan = load_plan(str(path))
    with db.session(db.normalize_url(database_url), "test refill") as session:
        ledger.ensure_schema(session)
        with session.tx():
            sync.install_all(session, plan.name, plan.jobs())
        [job] = plan.jobs()
        work = backfill.down_work(job, keys.base_types(session, "t"))
        result = backfill.run_batched(
            session, plan.name, work, BackfillSettings(), LogProgress(io.StringIO())
        )
    assert result.rows == ROWS
    assert fetch(database_url, "SELECT a, b FROM t WHERE k = 7") == [("v7", " v7")]
    [(rewritten,)] = fetch(database_url, "SELECT count(*) FROM t WHERE b LIKE '%+'")
    assert rewritten == 0


@pytest.mark.parametrize("name", ["~zz_normalize", "ünormalize"])
def test_a_user_trigger_that_would_fire_after_the_sync_is_refused_with_its_rename(
    name: str, database_url: str, tmp_path: Path
) -> None:
    """A name that sorts after `~sync_...` (later ASCII after `~`, or any non-ASCII byte)
    is refused before anything is installed, as a plan error at the job's `table:` line,
    with the ALTER TRIGGER that puts it first; after that rename the backfill runs. Old
    code installed its trigger and left the pair out of step behind it."""
    make_table(database_url, padded=True)
    quoted = f'"{name}"'
    execute(database_url, *(s.format(name=quoted) for s in NORMALIZE))
    plan = write_plan(tmp_path, chain_jobs())
    phasegate = Phasegate(database_url)
    result = phasegate("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    line = Path(plan).read_text().splitlines().index("        table: t") + 1
    assert f"{plan}:{line}: phases.backfill.jobs[0].table:" in result.stderr
    assert f"table 't' has BEFORE ROW trigger(s) {quoted} that fire after" in result.stderr
    [rename] = re.findall(r"ALTER TRIGGER .* RENAME TO \"?[A-Za-z0-9_]+\"?", result.stderr)
    assert rename.startswith(f"ALTER TRIGGER {quoted} ON t RENAME TO ")
    assert phasegate_triggers(database_url) == []
    [(written,)] = fetch(database_url, "SELECT count(*) FROM t WHERE b IS NOT NULL")
    assert written == 0

    execute(database_url, rename)
    result = phasegate("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert chain_out_of_step(database_url) == 0


def test_a_user_trigger_added_after_the_backfill_that_fires_after_the_sync_is_drift(
    database_url: str, tmp_path: Path
) -> None:
    """status reports it (with the rename) while the sync triggers are expected, and the
    next phase refuses until it is renamed. Old code saw no drift."""
    make_table(database_url)
    plan = write_plan(tmp_path, chain_jobs(), switch=True)
    phasegate = Phasegate(database_url)
    result = phasegate("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    execute(database_url, *(s.format(name='"~zz_late"') for s in NORMALIZE))
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["drift"] is True
    [detail] = status["drift_details"]
    assert 'BEFORE ROW trigger(s) "~zz_late" that fire after' in detail
    assert 'ALTER TRIGGER "~zz_late" ON t RENAME TO "_zz_late"' in detail
    result = phasegate("switch", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 1 and '"~zz_late"' in result.stderr, result.output
    execute(database_url, 'ALTER TRIGGER "~zz_late" ON "t" RENAME TO "_zz_late"')
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["drift"] is False, status["drift_details"]
    assert phasegate("switch", plan, "--live-version", "1", "--yes").exit_code == 0


def test_the_documented_when_clause_keeps_batches_out_of_an_updated_at_trigger(
    database_url: str, tmp_path: Path
) -> None:
    """README: the backfill's own UPDATEs fire the table's triggers; an `updated_at`
    trigger with the documented WHEN clause leaves the batches' rows alone and still
    stamps the app's writes."""
    make_table(database_url)
    execute(
        database_url,
        "ALTER TABLE t ADD COLUMN updated_at timestamptz NOT NULL DEFAULT '2020-01-01'",
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN NEW.updated_at := now(); RETURN NEW; END$$",
        "CREATE TRIGGER set_updated_at BEFORE UPDATE ON t FOR EACH ROW"
        " WHEN (current_setting('phasegate.backfill', true) IS DISTINCT FROM 'on')"
        " EXECUTE FUNCTION touch()",
    )
    plan = write_plan(tmp_path, chain_jobs())
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert chain_out_of_step(database_url) == 0
    execute(database_url, "UPDATE t SET a = 'moved' WHERE k = 1")
    [(stamped,)] = fetch(database_url, "SELECT count(*) FROM t WHERE updated_at > '2020-01-01'")
    assert stamped == 1


# -- upgrading triggers an older phasegate installed -------------------------------------------


def install_legacy_triggers(url: str, jobs: list) -> None:
    """Replace phasegate's triggers on t by what phasegate installed before (one function
    and one trigger per job, both named `sync.object_name`, commented per job)."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for (function,) in conn.execute(
            "SELECT DISTINCT p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE p.pronamespace = 'phasegate'::regnamespace"
        ).fetchall():
            conn.execute(f'DROP FUNCTION phasegate."{function}"() CASCADE')
        for job in jobs:
            name = sync.object_name("sync-order", job.name)
            [(new, expression)] = job.set_.items()
            [(old, down)] = job.sync.down.items()
            conn.execute(
                f'CREATE FUNCTION phasegate."{name}"() RETURNS trigger LANGUAGE plpgsql AS $$'
                f" BEGIN IF TG_OP = 'INSERT' THEN"
                f" IF NEW.{new} IS NULL THEN NEW.{new} := {expression};"
                f" ELSIF NEW.{old} IS NULL THEN NEW.{old} := {down}; END IF;"
                f" ELSIF NEW.{old} IS DISTINCT FROM OLD.{old} AND NOT NEW.{new} IS DISTINCT"
                f" FROM OLD.{new} THEN NEW.{new} := {expression};"
                f" ELSIF NEW.{new} IS DISTINCT FROM OLD.{new} AND NOT NEW.{old} IS DISTINCT"
                f" FROM OLD.{old} THEN NEW.{old} := {down}; END IF; RETURN NEW; END $$"
            )
            comment = (
                f"phasegate sync trigger of plan sync-order, job {job.name}\n"
                f"expressions {sync.expressions_digest(job)}"
            )
            conn.execute(
                sql.SQL("COMMENT ON FUNCTION phasegate.{}() IS {}").format(
                    sql.Identifier(name), sql.Literal(comment)
                )
            )
            conn.execute(
                f'CREATE TRIGGER "{name}" BEFORE INSERT OR UPDATE ON t FOR EACH ROW'
                " WHEN (current_setting('phasegate.backfill', true) IS DISTINCT FROM 'on')"
                f' EXECUTE FUNCTION phasegate."{name}"()'
            )


def test_a_single_trigger_installed_by_an_older_phasegate_is_no_drift_and_is_dropped(
    database_url: str, tmp_path: Path
) -> None:
    """A plan backfilled by an older phasegate (the seed's case: one job) is not drift
    after an upgrade: its trigger is found under its old name, and contract drops it."""
    make_table(database_url)
    plan = write_plan(tmp_path, FILL_B.format(fill="fill-b"), switch=True, contract=True)
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", plan, "--live-version", "1", "--yes").exit_code == 0
    install_legacy_triggers(database_url, load_plan(plan).jobs())
    assert phasegate_triggers(database_url) == [sync.object_name("sync-order", "fill-b")]
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["drift"] is False, status["drift_details"]
    assert status["outdated_triggers"] == []
    result = phasegate("advance", plan, "--live-version", "1", "--yes")  # switch, contract
    assert result.exit_code == 0, result.output
    assert "dropped sync trigger of job 'fill-b'" in result.stderr
    assert phasegate_triggers(database_url) == []
    assert fetch(database_url, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'sync_%'") == [(0,)]


def test_per_job_triggers_of_an_older_phasegate_are_drift_and_replaced_on_reinstall(
    database_url: str, tmp_path: Path
) -> None:
    """Two jobs on one table with a trigger each fire in name order: drift, with the way
    out. A backfill that re-installs them (here: resuming one that failed after its
    triggers went in) leaves exactly the new pair: never two triggers of one job."""
    make_table(database_url)
    failing = write_plan(tmp_path, chain_jobs() + "      - name: boom\n        sql: SELECT 1/0\n")
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", failing, "--live-version", "1", "--yes").exit_code == 3
    install_legacy_triggers(database_url, load_plan(failing).jobs()[:2])
    plan = write_plan(tmp_path, chain_jobs(), switch=True)  # so the plan is not over yet
    # the failing job is gone from the file: the contract takes that on the operator's word
    result = phasegate("backfill", plan, "--live-version", "1", "--yes", "--restart-job", "boom")
    assert result.exit_code == 0, result.output
    names = phasegate_triggers(database_url)
    assert len(names) == 2 and all(n.startswith("~001_sync_") for n in names), names
    [(functions,)] = fetch(
        database_url,
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'phasegate'::regnamespace"
        " AND proname LIKE 'sync_%'",
    )
    assert functions == 1
    execute(database_url, "UPDATE t SET a = 'moved' WHERE k = 1")
    assert row(database_url, 1) == ("moved", "MOVED", "MOVED!")

    install_legacy_triggers(database_url, load_plan(plan).jobs())
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["drift"] is True
    [detail] = status["drift_details"]
    assert "jobs 'fill-b', 'derive-c' on t were installed one per job" in detail
    assert "phasegate rollback PLAN --to expand" in detail


def test_a_partitioned_table_gets_its_triggers_again_and_its_partitions_are_checked(
    database_url: str, tmp_path: Path
) -> None:
    """Re-installing on a partitioned table drops the parent's triggers, never a
    partition's clone alone (PostgreSQL refuses that; the install of a resumed backfill
    failed on it), and a user trigger on a partition that fires after the sync is
    refused like one on the table."""
    execute(
        database_url,
        "CREATE TABLE t (k bigint PRIMARY KEY, a text, b text, c text) PARTITION BY RANGE (k)",
        "CREATE TABLE t_low PARTITION OF t FOR VALUES FROM (0) TO (300)",
        "CREATE TABLE t_high PARTITION OF t FOR VALUES FROM (300) TO (100000)",
        f"INSERT INTO t (k, a) SELECT g, 'r' || g FROM generate_series(1, {ROWS}) g",
    )
    failing = write_plan(tmp_path, chain_jobs() + "      - name: boom\n        sql: SELECT 1/0\n")
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", failing, "--live-version", "1", "--yes").exit_code == 3
    plan = write_plan(tmp_path, chain_jobs())
    result = phasegate("backfill", plan, "--live-version", "1", "--yes", "--restart-job", "boom")
    assert result.exit_code == 0, result.output
    assert chain_out_of_step(database_url) == 0
    execute(database_url, "UPDATE t SET a = 'moved' WHERE k = 400")
    assert row(database_url, 400) == ("moved", "MOVED", "MOVED!")

    execute(
        database_url,
        *(s.format(name='"~zz"').replace("ON t ", "ON t_high ") for s in NORMALIZE),
    )
    result = phasegate("rollback", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    result = phasegate("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 2, result.output
    assert 'ALTER TRIGGER "~zz" ON t_high RENAME TO "_zz"' in result.stderr


def test_a_disabled_sync_trigger_is_drift(database_url: str, tmp_path: Path) -> None:
    """`ALTER TABLE ... DISABLE TRIGGER` leaves the trigger in pg_trigger while old code's
    updates no longer reach the new columns: drift, like a dropped one. Old code looked
    for the name only."""
    make_table(database_url)
    plan = write_plan(tmp_path, chain_jobs(), switch=True)
    phasegate = Phasegate(database_url)
    assert phasegate("backfill", plan, "--live-version", "1", "--yes").exit_code == 0
    [_insert, update] = phasegate_triggers(database_url)
    execute(database_url, f'ALTER TABLE t DISABLE TRIGGER "{update}"')
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["drift"] is True
    assert "sync trigger of job 'fill-b' on t is missing or disabled" in " ".join(
        status["drift_details"]
    )


# -- writers that write both sides -------------------------------------------------------------


@pytest.fixture
def synced_table(database_url: str, tmp_path: Path) -> str:
    """t backfilled by the single plan (`fill-b`: b = upper(a), down a = lower(b)), its
    sync trigger installed: the state in which old and new code write side by side."""
    make_table(database_url)
    plan = write_plan(tmp_path, FILL_B.format(fill="fill-b"))
    result = Phasegate(database_url)("backfill", plan, "--live-version", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert phasegate_triggers(database_url)
    return database_url


def test_an_update_that_writes_both_columns_keeps_what_the_writer_wrote_in_each(
    synced_table: str,
) -> None:
    """New code writes the old and the new column itself; the trigger derives neither from
    the other (`set` would make b 'MIXED', `down` would make a 'other')."""
    execute(synced_table, "UPDATE t SET a = 'mixed', b = 'OTHER' WHERE k = 1")
    assert row(synced_table, 1) == ("mixed", "OTHER", None)
    # a write of one side still derives the other, so the trigger is live
    execute(
        synced_table, "UPDATE t SET a = 'solo' WHERE k = 2", "UPDATE t SET b = 'UP' WHERE k = 3"
    )
    assert row(synced_table, 2) == ("solo", "SOLO", None)
    assert row(synced_table, 3) == ("up", "UP", None)


def test_an_insert_that_writes_both_columns_keeps_what_the_writer_wrote_in_each(
    synced_table: str,
) -> None:
    """An INSERT by new code that fills both sides is stored as written, in either side."""
    execute(synced_table, "INSERT INTO t (k, a, b) VALUES (1001, 'mine', 'YOURS')")
    assert row(synced_table, 1001) == ("mine", "YOURS", None)
    execute(synced_table, "INSERT INTO t (k, a) VALUES (1002, 'one')")
    execute(synced_table, "INSERT INTO t (k, b) VALUES (1003, 'TWO')")
    assert row(synced_table, 1002) == ("one", "ONE", None)
    assert row(synced_table, 1003) == ("two", "TWO", None)
