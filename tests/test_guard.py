"""Nothing goes around a plan: the revision guard and `phasegate upgrade` (issue 18, item 6).

A deploy's own `alembic upgrade head` (the real alembic command, in a subprocess) must stop
before a plan revision whose phase phasegate has not run, in both env.py shapes: the
bundled example's one transaction per revision (what comes before stays applied) and
`alembic init`'s single transaction (nothing applied). `phasegate upgrade` is what a
deploy runs instead: every revision that is safe now, on every branch, exit 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from phasegate import db, guard
from phasegate.cli import cli
from phasegate.db import LOCK_NAMESPACE, LOCK_ORCHESTRATOR, libpq_url, normalize_url
from phasegate.plan import PHASES
from phasegate.revisions import AlembicProject

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate
from .test_failures import alembic as alembic_by_hand
from .test_failures import hold
from .test_seed_story import columns, fetch, scalar

P = str(PLAN)
BASELINE, EXPAND, SWITCH, CONTRACT = (
    "bc25b5f8939f",
    ["6c55e0560fd4", "8f3a2d1c9b7e"],
    ["a41c7e9d2b58", "d7e2b9f4a613"],
    ["e59b1f0c3d82"],
)


def alembic_cli(
    cwd: Path, url: str | None, *args: str, guard_setting: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `alembic` command line, as a deploy script runs it."""
    environment = dict(os.environ)
    for name in ("DATABASE_URL", "PHASEGATE_DATABASE_URL", guard.ESCAPE):
        environment.pop(name, None)
    if url is not None:
        environment["PHASEGATE_DATABASE_URL"] = url  # the bundled env.py reads it
    if guard_setting is not None:
        environment[guard.ESCAPE] = guard_setting
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def heads(url: str) -> set[str]:
    with psycopg.connect(libpq_url(normalize_url(url))) as connection:
        if connection.execute("SELECT to_regclass('alembic_version')").fetchone()[0] is None:
            return set()
        return {r[0] for r in connection.execute("SELECT version_num FROM alembic_version")}


def execute(url: str, *statements: str) -> None:
    with psycopg.connect(libpq_url(normalize_url(url)), autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)


# -- pure parts ------------------------------------------------------------------------------


def test_the_guard_knows_the_phases_in_the_plan_model_s_order() -> None:
    assert guard.PHASE_ORDER == PHASES


@pytest.mark.parametrize(
    ("ledger", "phase", "allowed"),
    [
        (None, "expand", False),  # no row: the plan has not started
        (("pending", None, None, None), "expand", False),
        (("pending", "expand", None, "advance"), "expand", True),
        (("pending", "expand", None, "advance"), "switch", False),
        (("pending", "switch", None, "advance"), "expand", True),  # an earlier phase: done
        (("done", "contract", None, "advance"), "contract", True),
        (("running", "expand", "backfill", "advance"), "switch", False),
        (("failed", "backfill", "switch", "advance"), "switch", False),  # phasegate resumes it
        (("failed", "backfill", "switch", "advance"), "expand", True),
        (("failed", "contract", "contract", "rollback"), "contract", False),  # mid-rollback
        (("running", "switch", "switch", "rollback"), "expand", True),
        (("pending", "switch", None, "rollback"), "contract", False),  # rolled back
    ],
)
def test_a_phase_may_run_outside_phasegate_only_once_the_ledger_has_it_done(
    ledger: tuple[str, str | None, str | None, str | None] | None, phase: str, allowed: bool
) -> None:
    row = None
    if ledger is not None:
        state, done, active, direction = ledger
        row = guard.LedgerRow(done, state, active, direction)
    assert guard.phase_done(row, phase) is allowed


def test_validate_warns_about_a_tagged_revision_without_the_guard(tmp_path: Path) -> None:
    env = {"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None}
    bundled = CliRunner().invoke(cli, ["--json", "--config", str(ALEMBIC_INI), "validate", P])
    assert bundled.exit_code == 0, bundled.output
    assert json.loads(bundled.stdout)["plans"][0]["warnings"] == []

    shutil.copytree(ROOT / "migrations", tmp_path / "migrations")
    shutil.copy(ALEMBIC_INI, tmp_path / "alembic.ini")
    contract = tmp_path / "migrations" / "versions" / "e59b1f0c3d82_bug_root_cause_contract.py"
    contract.write_text(contract.read_text().replace("@guarded\n", ""))
    line = contract.read_text().splitlines().index("def upgrade() -> None:") + 1
    config = str(tmp_path / "alembic.ini")

    result = CliRunner().invoke(cli, ["--config", config, "validate", P], env=env)
    assert result.exit_code == 0, result.output  # a warning, not an invalid plan
    (warning,) = [s for s in result.stdout.splitlines() if "warning:" in s]
    assert f"{contract}:{line}: revision e59b1f0c3d82: tagged for phase 'contract'" in warning
    assert "@guarded" in warning and "from phasegate.guard import guarded" in warning

    document = CliRunner().invoke(cli, ["--json", "--config", config, "validate", P], env=env)
    (issue,) = json.loads(document.stdout)["plans"][0]["warnings"]
    assert (issue["file"], issue["line"]) == (str(contract), line)


def test_rendering_sql_offline_is_not_guarded(tmp_path: Path) -> None:
    """`alembic upgrade --sql` (and phasegate's lint and preview, which render the same
    way) touch no database: the guard steps aside."""
    nowhere = "postgresql://nobody@127.0.0.1:1/nothing"
    result = alembic_cli(ROOT, nowhere, "upgrade", f"{BASELINE}:head", "--sql")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALTER TABLE bug DROP COLUMN root_cause" in result.stdout
    lint = CliRunner().invoke(cli, ["--config", str(ALEMBIC_INI), "lint", P])
    assert lint.exit_code == 0, lint.output


# -- plain `alembic upgrade head` --------------------------------------------------------------


@pytest.mark.db
def test_alembic_upgrade_head_mid_plan_refuses_the_contract_revision(
    phasegate: Phasegate, seeded_url: str, engine: sa.Engine
) -> None:
    """The issue's story: v1 still writes root_cause, the deploy's own `alembic upgrade
    head` starts. Before the guard it applied the contract revision and the sync
    trigger failed every write to bug."""
    result = phasegate("advance", P, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output

    upgrade = alembic_cli(ROOT, seeded_url, "upgrade", "head")
    assert upgrade.returncode != 0, upgrade.stdout + upgrade.stderr
    failed = upgrade.stdout
    assert "FAILED: revision e59b1f0c3d82 belongs to phase 'contract' of plan 'bug-root-cause'" in (
        failed
    )
    assert "the last phase done is switch, so contract has not run yet" in failed
    assert "Nothing of e59b1f0c3d82 was applied" in failed
    assert "`phasegate advance plans/bug_root_cause.yaml --to contract`" in failed
    assert "`phasegate upgrade --yes`" in failed and "PHASEGATE_GUARD=off" in failed
    assert "Traceback" not in upgrade.stdout + upgrade.stderr

    assert heads(seeded_url) == {SWITCH[-1]}
    assert "root_cause" in columns(engine)
    with engine.begin() as connection:  # an old-code write still goes through the trigger
        connection.execute(
            sa.text("INSERT INTO bug (bug_tracker_url, root_cause) VALUES ('v1://1', 'disk')")
        )
    assert fetch(
        engine,
        "SELECT r.name FROM bug b JOIN root_cause r ON r.id = b.root_cause_id "
        "WHERE b.bug_tracker_url = 'v1://1'",
    ) == [("disk",)]
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert (status["phase"], status["drift"]) == ("switch", False)


@pytest.mark.db
def test_alembic_upgrade_head_applies_what_comes_before_the_plan(database_url: str) -> None:
    """The bundled env.py runs one transaction per revision: the baseline stays applied,
    the plan's first revision is refused (there is no ledger yet: fail closed)."""
    upgrade = alembic_cli(ROOT, database_url, "upgrade", "head")
    assert upgrade.returncode != 0, upgrade.stdout + upgrade.stderr
    assert "FAILED: revision 6c55e0560fd4 belongs to phase 'expand'" in upgrade.stdout
    assert "this database has no phasegate ledger" in upgrade.stdout
    assert heads(database_url) == {BASELINE}
    engine = sa.create_engine(normalize_url(database_url), poolclass=NullPool)
    assert scalar(engine, "SELECT to_regclass('bug') IS NOT NULL") is True
    assert scalar(engine, "SELECT to_regclass('root_cause')") is None
    engine.dispose()


@pytest.mark.db
def test_a_failed_phase_is_left_for_phasegate_to_resume(
    phasegate: Phasegate, seeded_url: str
) -> None:
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    execute(  # as a switch that failed part way leaves the ledger
        seeded_url,
        "UPDATE phasegate.plan_state SET state = 'failed', active_phase = 'switch', "
        "direction = 'advance'",
    )
    upgrade = alembic_cli(ROOT, seeded_url, "upgrade", "head")
    assert upgrade.returncode != 0
    assert "revision a41c7e9d2b58 belongs to phase 'switch'" in upgrade.stdout
    assert "the advance of switch failed part way; phasegate resumes it" in upgrade.stdout
    assert heads(seeded_url) == {EXPAND[-1]}

    result = phasegate("upgrade", "--yes", json_output=True)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["applied"] == []
    assert [(e["phase"], e["why"]) for e in document["left"]] == [
        ("switch", "the advance of switch failed part way; phasegate resumes it"),
        ("contract", "the advance of switch failed part way; phasegate resumes it"),
    ]


@pytest.mark.db
def test_the_guard_fails_closed_when_its_role_cannot_read_the_ledger(
    phasegate: Phasegate, seeded_url: str
) -> None:
    assert phasegate("expand", P, "--live-version", "1.0", "--yes").exit_code == 0
    # a role name carrying a terminal control sequence reaches the message escaped
    role = f"deployer\x1b[2K_{uuid.uuid4().hex[:10]}"
    shown = role.replace("\x1b", "\\x1b")
    execute(
        seeded_url,
        f'CREATE ROLE "{role}" LOGIN',
        f'GRANT SELECT ON alembic_version TO "{role}"',
        f'REVOKE ALL ON SCHEMA phasegate FROM PUBLIC, "{role}"',
    )
    as_role = make_url(seeded_url).set(username=role).render_as_string(hide_password=False)
    try:
        upgrade = alembic_cli(ROOT, as_role, "upgrade", "head")
        assert upgrade.returncode != 0, upgrade.stdout + upgrade.stderr
        assert f"role {shown} may not read the phasegate ledger" in upgrade.stdout
        assert f'GRANT USAGE ON SCHEMA phasegate TO "{shown}"' in upgrade.stdout
        assert f'GRANT SELECT ON phasegate.plan_state TO "{shown}"' in upgrade.stdout
        assert "\x1b" not in upgrade.stdout
        assert heads(seeded_url) == {EXPAND[-1]}

        execute(
            seeded_url,
            f'GRANT USAGE ON SCHEMA phasegate TO "{role}"',
            f'GRANT SELECT ON phasegate.plan_state TO "{role}"',
        )
        upgrade = alembic_cli(ROOT, as_role, "upgrade", "head")
        assert "the last phase done is expand, so switch has not run yet" in upgrade.stdout
        assert heads(seeded_url) == {EXPAND[-1]}
    finally:
        execute(seeded_url, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


@pytest.mark.db
def test_the_escape_builds_a_new_database_from_the_whole_history(database_url: str) -> None:
    upgrade = alembic_cli(ROOT, database_url, "upgrade", "head", guard_setting="off")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert heads(database_url) == {CONTRACT[-1]}
    warnings = [line for line in upgrade.stderr.splitlines() if "phasegate guard:" in line]
    assert len(warnings) == 5  # one per plan revision
    assert (
        "PHASEGATE_GUARD=off, so revision e59b1f0c3d82 of plan 'bug-root-cause'" in (warnings[-1])
    )

    # a new database again, and a setting the guard does not know: it refuses
    execute(database_url, "DROP TABLE alembic_version", "DROP TABLE bug", "DROP TABLE root_cause")
    upgrade = alembic_cli(ROOT, database_url, "upgrade", "head", guard_setting="maybe")
    assert upgrade.returncode != 0
    assert "PHASEGATE_GUARD='maybe' is not 'on' or 'off'" in upgrade.stdout
    assert heads(database_url) == {BASELINE}


# -- an `alembic init` project: one transaction for the whole upgrade --------------------------

ITEM_PLAN = """\
plan: item-label
app: shop
baseline_compatible: "<2"
phases:
  expand:
    compatible: "<2"
"""

COOKBOOK = """\
    connectable = config.attributes.get("connection", None)
    if connectable is not None:  # the cookbook recipe: phasegate hands its connection over
        context.configure(connection=connectable, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
"""


def revision_file(
    revision: str, down: str | None, statement: str, tag: tuple[str, str] | None
) -> str:
    guarded = tag is not None
    return textwrap.dedent(
        f'''\
        """{revision}"""
        from alembic import op
        {"from phasegate.guard import guarded" if guarded else ""}

        revision = {revision!r}
        down_revision = {down!r}
        branch_labels = None
        depends_on = None
        phasegate_plan = {tag[0] if tag else None!r}
        phasegate_phase = {tag[1] if tag else None!r}


        {"@guarded" if guarded else ""}
        def upgrade():
            op.execute({statement!r})


        def downgrade():
            pass
        '''
    )


def init_project(root: Path, url: str) -> Path:
    """`alembic init` as a new user runs it; env.py gets only the cookbook's shared
    connection (which phasegate needs) and keeps Alembic's single transaction."""
    made = subprocess.run(
        [sys.executable, "-m", "alembic", "init", "migrations"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    ini = root / "alembic.ini"
    # configparser interpolates `%`: the embedded server's URL carries %2F (its socket path)
    ini.write_text(
        ini.read_text().replace("driver://user:pass@localhost/dbname", url.replace("%", "%%"))
    )
    env = root / "migrations" / "env.py"
    text = env.read_text()
    assert "transaction_per_migration" not in text
    marker = "    connectable = engine_from_config("
    env.write_text(text.replace(marker, COOKBOOK + marker, 1))
    versions = root / "migrations" / "versions"
    files = {
        "a1": revision_file("a1", None, "CREATE TABLE item (id int PRIMARY KEY)", None),
        "a2": revision_file(
            "a2", "a1", "ALTER TABLE item ADD COLUMN label text", ("item-label", "expand")
        ),
        "a3": revision_file("a3", "a2", "CREATE TABLE note (id int)", None),
    }
    for name, source in files.items():
        (versions / f"{name}.py").write_text(source)
    (root / "plans").mkdir()
    (root / "plans" / "item_label.yaml").write_text(ITEM_PLAN)
    return ini


@pytest.mark.db
def test_an_alembic_init_project_applies_nothing_then_phasegate_upgrade_leads_the_way(
    tmp_path: Path, database_url: str
) -> None:
    url = normalize_url(database_url)
    ini = init_project(tmp_path, url)
    engine = sa.create_engine(url, poolclass=NullPool)

    # Alembic's default env.py: one transaction, so the refusal undoes a1 as well
    upgrade = alembic_cli(tmp_path, None, "upgrade", "head")
    assert upgrade.returncode != 0, upgrade.stdout + upgrade.stderr
    assert "FAILED: revision a2 belongs to phase 'expand' of plan 'item-label'" in upgrade.stdout
    assert "`phasegate advance plans/item_label.yaml --to expand`" in upgrade.stdout
    assert heads(url) == set()
    assert scalar(engine, "SELECT to_regclass('item')") is None

    # what a deploy runs instead: a1, then it names what it leaves
    phasegate = Phasegate(url, ini)
    result = phasegate("upgrade", "--yes")
    assert result.exit_code == 0, result.output
    assert "applied 1 revision(s):\n  a1" in result.stdout
    assert re.search(
        r"plan item-label, phase expand \(the plan has not started\): a2; "
        r"run `phasegate advance \S*item_label.yaml --to expand`",
        result.stdout,
    )
    assert "waiting behind them: 1 revision(s) (a3)" in result.stdout
    assert heads(url) == {"a1"}

    # phasegate's own phase runs its guarded revision
    result = phasegate(
        "advance", str(tmp_path / "plans" / "item_label.yaml"), "--live-version", "1.0", "--yes"
    )
    assert result.exit_code == 0, result.output
    assert heads(url) == {"a2"}
    assert "label" in columns(engine, "item")

    # now the phase is done: a plain `alembic upgrade head` goes on as it always did
    upgrade = alembic_cli(tmp_path, None, "upgrade", "head")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert heads(url) == {"a3"}
    engine.dispose()


# -- phasegate upgrade ------------------------------------------------------------------------


@pytest.mark.db
def test_phasegate_upgrade_restores_a_done_phase_and_stops_before_the_next(
    phasegate: Phasegate, seeded_url: str, engine: sa.Engine
) -> None:
    assert phasegate("expand", P, "--live-version", "1.0", "--yes").exit_code == 0
    alembic_by_hand(seeded_url, "downgrade", BASELINE)  # an out-of-band downgrade: drift
    assert json.loads(phasegate("status", P, json_output=True).stdout)["drift"] is True

    refused = CliRunner().invoke(
        cli, ["--database-url", seeded_url, "--config", str(ALEMBIC_INI), "upgrade"], input=""
    )
    assert refused.exit_code == 2 and "without confirmation: pass --yes" in refused.stderr
    assert heads(seeded_url) == {BASELINE}

    result = phasegate("upgrade", "--yes")
    assert result.exit_code == 0, result.output
    assert "applied 2 revision(s):\n  6c55e0560fd4" in result.stdout
    assert (
        "  plan bug-root-cause, phase switch (the last phase done is expand, so switch has not "
        "run yet): a41c7e9d2b58, d7e2b9f4a613; run `phasegate advance "
    ) in result.stdout
    assert "bug_root_cause.yaml --to switch`" in result.stdout
    assert "phase contract (the last phase done is expand, so contract has not run yet)" in (
        result.stdout
    )
    assert heads(seeded_url) == {EXPAND[-1]}
    assert "root_cause_id" in columns(engine)
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert (status["phase"], status["drift"]) == ("expand", False)
    events = fetch(
        engine,
        "SELECT plan, phase, kind, detail->>'revision' FROM phasegate.event "
        "WHERE detail->>'by' = 'upgrade' OR kind LIKE 'upgrade.%' ORDER BY id",
    )
    assert events == [
        ("bug-root-cause", "expand", "revision.applied", EXPAND[0]),
        ("bug-root-cause", "expand", "revision.applied", EXPAND[1]),
        (None, None, "upgrade.completed", None),
    ]

    again = phasegate("upgrade", "--yes", json_output=True)
    assert again.exit_code == 0, again.output
    document = json.loads(again.stdout)
    assert (document["ok"], document["exit_code"], document["applied"]) == (True, 0, [])
    assert [(e["plan"], e["phase"]) for e in document["left"]] == [
        ("bug-root-cause", "switch"),
        ("bug-root-cause", "contract"),
    ]
    assert document["left"][0]["command"].endswith("bug_root_cause.yaml --to switch")


def project_with_branches(root: Path) -> Path:
    """The bundled project plus another team's branch off the baseline (two revisions)
    and a revision after the plan's contract."""
    shutil.copytree(ROOT / "migrations", root / "migrations")
    shutil.copytree(ROOT / "plans", root / "plans")
    shutil.copy(ALEMBIC_INI, root / "alembic.ini")
    versions = root / "migrations" / "versions"
    for revision, down, statement in [
        ("b0000000001a", BASELINE, "ALTER TABLE bug ADD COLUMN team text"),
        ("b0000000001b", "b0000000001a", "CREATE TABLE team (id int, name text)"),
        ("c0000000001a", CONTRACT[-1], "CREATE TABLE later (id int)"),
    ]:
        (versions / f"{revision}.py").write_text(revision_file(revision, down, statement, None))
    return root / "alembic.ini"


@pytest.mark.db
def test_phasegate_upgrade_follows_every_branch_to_its_first_blocked_revision(
    tmp_path: Path, seeded_url: str, engine: sa.Engine
) -> None:
    ini = project_with_branches(tmp_path)
    phasegate = Phasegate(seeded_url, ini)
    result = phasegate("upgrade", "--yes", json_output=True)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [a["revision"] for a in document["applied"]] == ["b0000000001a", "b0000000001b"]
    assert [(e["phase"], e["revisions"]) for e in document["left"]] == [
        ("expand", EXPAND),
        ("switch", SWITCH),
        ("contract", CONTRACT),
    ]
    assert [w["revision"] for w in document["waiting"]] == ["c0000000001a"]
    assert document["heads"] == ["b0000000001b"]
    assert heads(seeded_url) == {"b0000000001b"}  # the baseline is below it
    assert "team" in columns(engine) and "name" in columns(engine, "team")

    # the plan done, the same command takes the rest
    run = ["--live-version", "1.0", "--yes"]
    assert phasegate("advance", P, "--to", "switch", *run).exit_code == 0
    assert phasegate("contract", P, "--live-version", "2.0", "--yes").exit_code == 0
    result = phasegate("upgrade", "--yes")
    assert result.exit_code == 0, result.output
    assert "applied 1 revision(s):\n  c0000000001a" in result.stdout
    assert "left for phasegate" not in result.stdout
    assert heads(seeded_url) == {"c0000000001a", "b0000000001b"}


@pytest.mark.db
def test_a_tagged_revision_of_a_plan_without_a_file_counts_as_not_started(
    tmp_path: Path, seeded_url: str
) -> None:
    ini = project_with_branches(tmp_path)
    (tmp_path / "plans" / "bug_root_cause.yaml").unlink()
    result = Phasegate(seeded_url, ini)("upgrade", "--yes")
    assert result.exit_code == 0, result.output
    assert (
        "plan bug-root-cause, phase expand (no plan file in the plans directory: add it there): "
        "6c55e0560fd4, 8f3a2d1c9b7e; run `phasegate advance <plan file of bug-root-cause> "
        "--to expand`"
    ) in result.stdout
    assert heads(seeded_url) == {"b0000000001b"}  # the baseline is below it


@pytest.mark.db
def test_the_marker_holds_only_while_phasegate_runs_the_phase(seeded_url: str) -> None:
    project = AlembicProject(ALEMBIC_INI)
    with db.session(seeded_url, "test") as session:
        project.upgrade(session, EXPAND[0], phase_of=("bug-root-cause", "expand"))
        with session.tx():
            assert session.scalar("SELECT current_setting(%(m)s, true)", {"m": guard.MARKER}) == ""
        with pytest.raises(Exception, match="belongs to phase 'expand'"):
            project.upgrade(session, EXPAND[1])  # no marker, no ledger: refused
    assert heads(seeded_url) == {EXPAND[0]}


@pytest.mark.db
def test_an_invalid_plan_file_stops_phasegate_upgrade_before_it_connects(
    tmp_path: Path, seeded_url: str
) -> None:
    ini = project_with_branches(tmp_path)
    broken = tmp_path / "plans" / "broken.yaml"
    broken.write_text("plan: broken\napp: shop\nbaseline_compatible: '<2'\nphases:\n  expnad: {}\n")
    result = Phasegate(seeded_url, ini)("upgrade", "--yes")
    assert result.exit_code == 2, result.output
    assert f"{broken}:5" in result.stderr
    assert heads(seeded_url) == {BASELINE}


@pytest.mark.db
def test_phasegate_upgrade_takes_the_lock_and_runs_under_the_lock_guard(
    tmp_path: Path, seeded_url: str
) -> None:
    phasegate = Phasegate(seeded_url, project_with_branches(tmp_path))
    holder = hold(
        seeded_url,
        f"SELECT pg_advisory_lock({LOCK_NAMESPACE}, {LOCK_ORCHESTRATOR})",
        application_name="phasegate backfill bug_root_cause.yaml",
    )
    try:
        busy = phasegate("upgrade", "--yes")
    finally:
        holder.close()
    assert busy.exit_code == 4, busy.output
    assert "phasegate backfill bug_root_cause.yaml" in busy.stderr

    blocker = hold(seeded_url, "BEGIN; LOCK TABLE bug IN ACCESS SHARE MODE")
    try:
        blocked = phasegate("upgrade", "--lock-timeout", "200ms", "--lock-retries", "1", "--yes")
    finally:
        blocker.close()
    assert blocked.exit_code == 3, blocked.output
    assert "lock timeout (200ms) in the upgrade to b0000000001b" in blocked.stderr
    assert heads(seeded_url) == {BASELINE}
    engine = sa.create_engine(seeded_url, poolclass=NullPool)
    assert fetch(
        engine, "SELECT kind FROM phasegate.event WHERE kind LIKE 'upgrade.%' ORDER BY id"
    ) == [("upgrade.failed",)]
    engine.dispose()


@pytest.mark.db
def test_phasegate_upgrade_with_revisions_to_apply_needs_yes(database_url: str) -> None:
    """README: upgrade, like the other commands that change the database, asks for
    confirmation or --yes; without a terminal and without --yes it applies nothing."""
    phasegate = Phasegate(database_url)
    refused = phasegate("upgrade", json_output=True)
    assert refused.exit_code == 2, refused.output
    assert "pass --yes" in json.loads(refused.stdout)["error"]["message"]
    with psycopg.connect(libpq_url(database_url)) as conn:
        assert conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,)
    applied = phasegate("upgrade", "--yes", json_output=True)
    assert applied.exit_code == 0, applied.output
    assert heads(database_url) == {BASELINE}


@pytest.mark.db
def test_phasegate_upgrade_refuses_a_database_ahead_of_its_code(
    phasegate: Phasegate, seeded_url: str
) -> None:
    execute(seeded_url, "UPDATE alembic_version SET version_num = '0123456789ab'")
    result = phasegate("upgrade", "--yes")
    assert result.exit_code == 3, result.output
    assert "the database is at revision(s) 0123456789ab, which" in result.stderr
    assert heads(seeded_url) == {"0123456789ab"}


@pytest.mark.parametrize("project", [ROOT, ROOT / "tests" / "external_project"])
def test_script_py_mako_puts_the_guard_on_tagged_revisions_only(
    project: Path, tmp_path: Path
) -> None:
    shutil.copytree(project / "migrations", tmp_path / "migrations")
    shutil.copy(project / "alembic.ini", tmp_path / "alembic.ini")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PHASEGATE_")}
    for rev_id, tags in [
        ("dddddddd0001", {"PHASEGATE_PLAN": "p", "PHASEGATE_PHASE": "contract"}),
        ("dddddddd0002", {}),
    ]:
        made = subprocess.run(
            [sys.executable, "-m", "alembic", "revision", "-m", "x", "--rev-id", rev_id],
            cwd=tmp_path,
            env={**environment, **tags},
            capture_output=True,
            text=True,
            check=False,
        )
        assert made.returncode == 0, made.stdout + made.stderr
    revisions = AlembicProject(tmp_path / "alembic.ini").revisions
    tagged, plain = revisions["dddddddd0001"], revisions["dddddddd0002"]
    assert (tagged.plan, tagged.phase, tagged.guarded) == ("p", "contract", True)
    assert (plain.plan, plain.guarded) == (None, False)
    assert "guard" not in Path(plain.path).read_text()


@pytest.mark.db
def test_phasegate_upgrade_with_nothing_to_apply_does_not_wait_for_a_running_phase(
    phasegate: Phasegate, seeded_url: str
) -> None:
    """A deploy during a long backfill: nothing new is safe to apply, so `phasegate
    upgrade` needs no lock and must not fail on the one the backfill holds (exit 4)."""
    holder = hold(
        seeded_url,
        f"SELECT pg_advisory_lock({LOCK_NAMESPACE}, {LOCK_ORCHESTRATOR})",
        application_name="phasegate backfill bug_root_cause.yaml",
    )
    try:
        result = phasegate("upgrade", "--yes")
    finally:
        holder.close()
    assert result.exit_code == 0, result.output
    assert "nothing to apply" in result.stdout
    assert "plan bug-root-cause, phase expand" in result.stdout
