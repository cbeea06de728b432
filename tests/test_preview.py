"""`phasegate preview`: with a seeded database, after expand, and with no database at all."""

from __future__ import annotations

import json
import time

import psycopg
import sqlalchemy as sa
from click.testing import CliRunner

from phasegate.cli import cli
from phasegate.db import libpq_url

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate

P = str(PLAN)

SNAPSHOT = """
SELECT json_build_object(
  'relations', (SELECT json_agg(n.nspname || '.' || c.relname || ':' || c.relkind::text
                                ORDER BY n.nspname, c.relname)
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                  AND c.relkind <> 'S'),
  'columns', (SELECT json_agg(table_name || '.' || column_name || ':' || data_type || ':'
                              || is_nullable ORDER BY table_name, column_name)
              FROM information_schema.columns WHERE table_schema NOT IN
                ('pg_catalog', 'information_schema')),
  'constraints', (SELECT json_agg(conname || ':' || convalidated ORDER BY conname)
                  FROM pg_constraint WHERE connamespace = 'public'::regnamespace),
  'triggers', (SELECT json_agg(tgname ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal),
  'functions', (SELECT json_agg(proname ORDER BY proname) FROM pg_proc
                WHERE pronamespace NOT IN ('pg_catalog'::regnamespace,
                                           'information_schema'::regnamespace)),
  'schemas', (SELECT json_agg(nspname ORDER BY nspname) FROM pg_namespace),
  'bug', (SELECT md5(string_agg(b::text, ',' ORDER BY b.id)) FROM bug b)
)
"""


def snapshot(url: str) -> dict:
    """Schema, rows and ledger presence. Not sequences: a rolled-back sample may advance
    one (PostgreSQL never rolls sequences back); the README says so."""
    with psycopg.connect(libpq_url(url)) as conn:
        shot = conn.execute(SNAPSHOT).fetchone()[0]
        if conn.execute("SELECT to_regclass('root_cause')").fetchone()[0] is not None:
            shot["root_cause"] = conn.execute(
                "SELECT md5(string_agg(r::text, ',' ORDER BY r.id)) FROM root_cause r"
            ).fetchone()[0]
        return shot


def preview(url: str, *args: str) -> dict:
    result = CliRunner().invoke(
        cli,
        ["--database-url", url, "--config", str(ALEMBIC_INI), "--json", "preview", P, *args],
        env={"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_preview_of_a_seeded_database_estimates_and_changes_nothing(phasegate, seeded_url) -> None:
    before = snapshot(seeded_url)
    app = psycopg.connect(libpq_url(seeded_url), application_name="bugtracker/1.4")
    try:
        document = preview(seeded_url)
    finally:
        app.close()
    assert snapshot(seeded_url) == before
    assert "phasegate" not in before["schemas"]  # and preview did not create the ledger
    phases = {p["phase"]: p for p in document["phases"]}
    assert list(phases) == ["expand", "backfill", "switch", "contract"]
    assert phases["expand"]["gate"]["passed"] is True
    assert phases["contract"]["gate"]["passed"] is False
    assert "1.4 (pg_stat_activity" in phases["contract"]["gate"]["message"]
    job = next(j for j in phases["backfill"]["jobs"] if j["kind"] == "batched")
    with psycopg.connect(libpq_url(seeded_url)) as conn:
        real = conn.execute("SELECT count(*) FROM bug").fetchone()[0]
    assert abs(job["estimated_rows"] - real) <= 0.2 * real
    # root_cause_id is added by expand: nothing to time yet, and preview says why
    assert job["sample"]["error"].endswith("(expand not applied yet: timed once it is)")
    statements = phases["expand"]["revisions"][0]["statements"]
    add_column = next(s for s in statements if "ADD COLUMN root_cause_id" in s["sql"])
    assert add_column["locks"] == [{"mode": "ACCESS EXCLUSIVE", "table": "bug"}]
    index = phases["expand"]["revisions"][1]["statements"][0]
    assert index["transaction"] is None and index["locks"][0]["mode"] == "SHARE UPDATE EXCLUSIVE"
    assert phases["backfill"]["sync_triggers"][0]["table"] == "bug"


def test_preview_after_expand_times_a_sample_and_rolls_it_back(phasegate, seeded_url) -> None:
    assert phasegate("expand", P, "--live-version", "1.0", "--yes").exit_code == 0
    before = snapshot(seeded_url)
    document = preview(seeded_url, "--exact")
    assert snapshot(seeded_url) == before
    assert [p["phase"] for p in document["phases"]] == ["backfill", "switch", "contract"]
    job = next(j for j in document["phases"][0]["jobs"] if j["kind"] == "batched")
    assert job["rows_from"] == "count" and job["estimated_rows"] == 3000
    assert job["sample"]["rows"] == 1000 and job["seconds"] > 0
    assert job["batches"] == -(-3000 // job["batch_size"])
    with psycopg.connect(libpq_url(seeded_url)) as conn:
        assert (
            conn.execute("SELECT count(*) FROM bug WHERE root_cause_id IS NOT NULL").fetchone()[0]
            == 0
        )


ROOT_CAUSE_IDS = "SELECT last_value FROM pg_sequences WHERE sequencename = 'root_cause_id_seq'"


def test_preview_no_sample_runs_nothing_on_the_rows_and_says_so(phasegate, seeded_url) -> None:
    """`--no-sample` skips the sample batch: the plan's `set` never runs (root_cause_id_for()
    would take ids from root_cause's sequence, which no rollback returns), the job has no
    timing, and both outputs say why. The default, on the same database, does sample."""
    assert phasegate("expand", P, "--live-version", "1.0", "--yes").exit_code == 0
    with psycopg.connect(libpq_url(seeded_url), autocommit=True) as conn:
        ids = conn.execute(ROOT_CAUSE_IDS).fetchone()
        document = preview(seeded_url, "--no-sample")
        assert conn.execute(ROOT_CAUSE_IDS).fetchone() == ids
        job = next(j for j in document["phases"][0]["jobs"] if j["kind"] == "batched")
        assert job["sample"] == {"skipped": "--no-sample"}
        assert job["estimated_rows"] > 0 and "seconds" not in job and "batches" not in job
        text = Phasegate(seeded_url)("preview", P, "--no-sample")
        assert text.exit_code == 0, text.output
        assert "not timed: --no-sample" in text.stdout
        assert conn.execute(ROOT_CAUSE_IDS).fetchone() == ids
        sampled = preview(seeded_url)  # the default times one batch: the sequence moves
        assert next(j for j in sampled["phases"][0]["jobs"] if j["kind"] == "batched")["seconds"]
        assert conn.execute(ROOT_CAUSE_IDS).fetchone() != ids


def test_preview_without_a_database_shows_sql_locks_and_lint() -> None:
    config = ROOT / "tests" / "external_project" / "alembic.ini"  # its URL is a placeholder
    plan = ROOT / "tests" / "external_project" / "plans" / "customer_email.yaml"
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "--json", "preview", str(plan)],
        env={"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "no database configured" in result.stderr
    document = json.loads(result.stdout)
    assert document["offline"] is True and document["lint"]["errors"] == 0
    expand = document["phases"][0]
    assert expand["gate"] is None
    assert expand["revisions"][0]["statements"], expand
    text = CliRunner().invoke(cli, ["--config", str(config), "preview", str(plan), "--offline"])
    assert "## expand" in text.stdout and "ACCESS EXCLUSIVE on" in text.stdout


def test_preview_of_one_phase_in_text(seeded_url) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "--database-url",
            seeded_url,
            "--config",
            str(ALEMBIC_INI),
            "preview",
            P,
            "--phase",
            "switch",
            "--live-version",
            "2.0",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "## switch (compatible >=1)" in result.stdout
    assert "## expand" not in result.stdout
    assert "[SHARE UPDATE EXCLUSIVE on bug; in transaction]" in result.stdout
    backfill = Phasegate(seeded_url)("preview", P, "--phase", "backfill", json_output=True)
    [phase] = json.loads(backfill.stdout)["phases"]
    job = next(j for j in phase["jobs"] if j["kind"] == "batched")
    assert job["sample"]["error"].endswith("(expand not applied yet: timed once it is)")
    engine = sa.create_engine(seeded_url)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT to_regnamespace('phasegate')")).scalar() is None
    engine.dispose()


def test_a_locked_table_stops_preview_at_its_lock_timeout(phasegate, seeded_url) -> None:
    """preview reads the table's size and times a sample batch: behind an ACCESS EXCLUSIVE
    lock it gives up at its lock_timeout (exit 3, saying so) instead of waiting forever."""
    assert phasegate("expand", P, "--live-version", "1.0", "--yes").exit_code == 0
    with psycopg.connect(libpq_url(seeded_url)) as blocker:
        blocker.execute("LOCK TABLE bug IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        result = CliRunner().invoke(
            cli,
            ["--database-url", seeded_url, "--config", str(ALEMBIC_INI), "preview", P],
            env={"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None},
        )
        waited = time.monotonic() - started
        blocker.rollback()
    assert result.exit_code == 3, result.output
    assert "lock timeout" in result.stderr
    assert waited < 15


def test_preview_text_marks_a_statement_it_cuts_short() -> None:
    """The text shows each statement's first lines; a longer one (root_cause_id_for's body)
    says how much is left out and where to see it, instead of stopping mid-statement."""
    args = ["--config", str(ALEMBIC_INI), "preview", P, "--phase", "expand", "--offline"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "CREATE FUNCTION root_cause_id_for" in result.stdout
    assert "more line(s); --json shows the whole statement" in result.stdout
