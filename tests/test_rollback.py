"""Rollback of every phase, gated on the earlier state's range, with the schema checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate
from .test_failures import hold
from .test_seed_story import columns, fetch, scalar

P = str(PLAN)


def run_to_done(phasegate: Phasegate) -> None:
    result = phasegate("advance", P, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    result = phasegate("contract", P, "--live-version", "2.0", "--yes")
    assert result.exit_code == 0, result.output


def sync_triggers(engine: sa.Engine) -> int:
    """phasegate's triggers on bug: the plan's INSERT and UPDATE trigger, or none."""
    return scalar(
        engine,
        "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
        " WHERE t.tgrelid = 'bug'::regclass AND p.pronamespace = 'phasegate'::regnamespace",
    )


def pairs_out_of_step(engine: sa.Engine) -> int:
    """Bugs whose root_cause_id does not name their root_cause text (NULL with a text too)."""
    return int(
        scalar(
            engine,
            "SELECT count(*) FROM bug b LEFT JOIN root_cause r ON r.id = b.root_cause_id "
            "WHERE r.name IS DISTINCT FROM b.root_cause",
        )
    )


def nullable(engine: sa.Engine, column: str) -> bool:
    return (
        scalar(
            engine,
            "SELECT is_nullable FROM information_schema.columns "
            "WHERE table_name = 'bug' AND column_name = :c",
            c=column,
        )
        == "YES"
    )


def test_each_phase_rolls_back_newest_first_then_the_plan_runs_again(phasegate, engine) -> None:
    original = dict(fetch(engine, "SELECT id, root_cause FROM bug"))
    run_to_done(phasegate)
    assert sync_triggers(engine) == 0

    def rollback() -> None:
        result = phasegate("rollback", P, "--live-version", "1.0", "--yes")
        assert result.exit_code == 0, result.output

    rollback()  # contract: old column back, refilled, trigger back
    assert "root_cause" in columns(engine) and sync_triggers(engine) == 2
    assert dict(fetch(engine, "SELECT id, root_cause FROM bug")) == original

    rollback()  # switch: constraints loosened again
    assert nullable(engine, "root_cause_id") and not nullable(engine, "root_cause")
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "8f3a2d1c9b7e"

    rollback()  # backfill: triggers and checkpoints gone, copied data kept
    assert sync_triggers(engine) == 0
    # the synced job alone keeps a checkpoint: pending, flagged to sweep stale rows
    assert fetch(engine, "SELECT job, status, resweep FROM phasegate.job_checkpoint") == [
        ("bug-root-cause-id", "pending", True)
    ]

    rollback()  # expand: back to the baseline schema, and no job progress left
    assert "root_cause_id" not in columns(engine)
    assert scalar(engine, "SELECT count(*) FROM phasegate.job_checkpoint") == 0
    assert scalar(engine, "SELECT to_regclass('root_cause')") is None
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "bc25b5f8939f"
    status = json.loads(phasegate("status", P, json_output=True).stdout)
    assert (status["phase"], status["next"], status["drift"]) == (None, "expand", False)

    result = phasegate("rollback", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0 and "nothing to roll back" in result.stdout

    run_to_done(phasegate)
    assert scalar(engine, "SELECT count(*) FROM bug WHERE root_cause_id IS NULL") == 0


def test_old_code_writes_after_a_backfill_rollback_reach_the_new_column(phasegate, engine) -> None:
    """Rollback of backfill keeps the copied root_cause_id but drops the trigger, and old code
    (the only code the expanded state admits) keeps writing root_cause. The next backfill
    must recompute those rows too, though its `where` (root_cause_id IS NULL) skips them;
    else contract drops the only copy of what old code wrote."""
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    result = phasegate("rollback", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert "also rewrites every row whose new columns no longer match" in result.stderr
    [(kept,)] = fetch(engine, "SELECT root_cause_id FROM bug WHERE id = 3")
    with engine.begin() as connection:  # old code, no trigger
        for statement in (
            "UPDATE bug SET root_cause = 'named after the rollback' WHERE id = 1",
            "UPDATE bug SET root_cause = (SELECT root_cause FROM bug WHERE id = 5) WHERE id = 2",
            "INSERT INTO bug (bug_tracker_url, root_cause) VALUES ('https://x.test/1', 'new')",
        ):
            connection.execute(sa.text(statement))

    result = phasegate("backfill", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert pairs_out_of_step(engine) == 0
    assert fetch(engine, "SELECT root_cause_id FROM bug WHERE id = 3") == [(kept,)]  # untouched
    assert fetch(
        engine,
        "SELECT status, resweep FROM phasegate.job_checkpoint WHERE job = :j",
        j="bug-root-cause-id",
    ) == [("done", False)]


def edited_plan(tmp_path: Path, old: str, new: str) -> str:
    text = PLAN.read_text()
    assert text.count(old) == 1
    path = tmp_path / "edited.yaml"
    path.write_text(text.replace(old, new))
    return str(path)


def plan_without_sync(tmp_path: Path) -> str:
    """The seed plan with its job's `sync` (and so its `down`) removed."""
    text = PLAN.read_text()
    start = text.index("        sync:\n")
    end = text.index("\n", text.index("root_cause: (SELECT name FROM root_cause")) + 1
    return edited_plan(tmp_path, text[start:end], "")


def test_contract_drops_a_trigger_whose_sync_left_the_plan(phasegate, engine, tmp_path) -> None:
    """The file changed after switch: the job lost its `sync`. Contract must still drop the
    trigger it installed, or every write fails once root_cause is gone."""
    result = phasegate("advance", P, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    plan = plan_without_sync(tmp_path)
    result = phasegate("contract", plan, "--live-version", "2.0", "--yes")
    assert result.exit_code == 0, result.output
    assert "dropped sync trigger of job 'bug-root-cause-id'" in result.stderr
    assert sync_triggers(engine) == 0
    assert scalar(engine, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'sync_%'") == 0
    with engine.begin() as connection:  # new code writes, and nothing stands in its way
        connection.execute(
            sa.text(
                "INSERT INTO bug (bug_tracker_url, root_cause_id) VALUES ('https://x.test/2', 1)"
            )
        )


def test_a_renamed_job_leaves_no_trigger_behind(phasegate, engine, tmp_path) -> None:
    renamed = edited_plan(tmp_path, "- name: bug-root-cause-id", "- name: bug-root-cause-ref")
    # rollback of backfill, with the job renamed since: both names' triggers go
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    result = phasegate("rollback", renamed, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert sync_triggers(engine) == 0

    # a backfill that failed after installing its trigger, run again with the job renamed:
    # the old name's trigger goes before the new one is installed
    failing = tmp_path / "failing.yaml"
    failing.write_text(PLAN.read_text().replace("ON CONFLICT (name) DO NOTHING", "AND 1/0 = 1"))
    result = phasegate("backfill", str(failing), "--live-version", "1.0", "--yes")
    assert result.exit_code == 3 and "division by zero" in result.stderr, result.output
    assert sync_triggers(engine) == 2
    # the phase started with the failing file's jobs: the renamed one runs on the operator's
    # word, restarting the changed jobs and forgetting the one the file lost
    result = phasegate("backfill", renamed, "--live-version", "1.0", "--yes")
    assert result.exit_code == 2 and "job 'bug-root-cause-id' is not in the file" in result.stderr
    assert sync_triggers(engine) == 2
    restarts = [
        arg
        for job in ("root-causes", "bug-root-cause-id", "bug-root-cause-ref")
        for arg in ("--restart-job", job)
    ]
    result = phasegate("backfill", renamed, "--live-version", "1.0", "--yes", *restarts)
    assert result.exit_code == 0, result.output
    assert "dropped the sync trigger of job 'bug-root-cause-id'" in result.stderr
    [(comment,)] = fetch(
        engine,
        "SELECT DISTINCT obj_description(tgfoid, 'pg_proc') FROM pg_trigger"
        " WHERE tgname LIKE '~%sync_%'",
    )
    assert comment.startswith(
        "phasegate sync trigger of plan bug-root-cause, jobs bug-root-cause-ref\n"
    )


def test_an_expression_edited_after_backfill_is_flagged_until_backfill_reinstalls_it(
    phasegate, engine, tmp_path
) -> None:
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert json.loads(phasegate("status", P, json_output=True).stdout)["outdated_triggers"] == []
    edited = edited_plan(
        tmp_path, "root_cause_id_for(new.root_cause)", "root_cause_id_for(btrim(new.root_cause))"
    )
    status = json.loads(phasegate("status", edited, json_output=True).stdout)
    assert status["outdated_triggers"] == ["bug-root-cause-id"]
    result = phasegate("switch", edited, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert "warning: `set` or `sync.down` of job 'bug-root-cause-id' edited" in result.stderr

    for args in (("rollback", edited, "--to", "expand"), ("backfill", edited)):
        result = phasegate(*args, "--live-version", "1.0", "--yes")
        assert result.exit_code == 0, result.output
    status = json.loads(phasegate("status", edited, json_output=True).stdout)
    assert status["outdated_triggers"] == []


def test_a_job_whose_walk_never_started_is_swept_after_a_backfill_rollback(
    phasegate, engine, tmp_path
) -> None:
    """Triggers go in before the first job: one fills root_cause_id though the job's walk
    never starts (the sql job before it fails). After the rollback old code edits the
    row with no trigger, and the next backfill must still see it."""
    failing = tmp_path / "failing.yaml"
    failing.write_text(PLAN.read_text().replace("ON CONFLICT (name) DO NOTHING", "AND 1/0 = 1"))
    assert phasegate("expand", P, "--live-version", "1.0", "--yes").exit_code == 0
    assert phasegate("backfill", str(failing), "--live-version", "1.0", "--yes").exit_code == 3
    with engine.begin() as connection:  # through the trigger
        connection.execute(sa.text("UPDATE bug SET root_cause = 'alpha-cause' WHERE id = 1"))
    result = phasegate("rollback", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    with engine.begin() as connection:  # no trigger now
        connection.execute(sa.text("UPDATE bug SET root_cause = 'beta-cause' WHERE id = 1"))
    result = phasegate("backfill", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert fetch(
        engine,
        "SELECT r.name FROM bug b JOIN root_cause r ON r.id = b.root_cause_id WHERE b.id = 1",
    ) == [("beta-cause",)]


def test_contract_rollback_checks_the_expressions_before_reinstalling_triggers(
    phasegate, engine, tmp_path
) -> None:
    run_to_done(phasegate)
    typo = edited_plan(tmp_path, "(SELECT name FROM root_cause", "(SELECT nam FROM root_cause")
    result = phasegate("rollback", typo, "--live-version", "2.0", "--yes")
    assert result.exit_code == 2, result.output
    # the file is not the contract the backfill started with: refused before anything
    assert "`sync.down.root_cause` was `(SELECT name FROM root_cause" in result.stderr
    assert "nam FROM root_cause" in result.stderr
    assert sync_triggers(engine) == 0  # no trigger that would fail every write
    result = phasegate("rollback", P, "--live-version", "2.0", "--yes")  # the file fixed
    assert result.exit_code == 0, result.output
    assert sync_triggers(engine) == 2


def test_rollback_is_gated_on_the_earlier_state(phasegate, engine) -> None:
    result = phasegate("advance", P, "--to", "backfill", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    # going back to "expanded" needs every live version < 2: a live 2.0 must refuse
    result = phasegate("rollback", P, "--live-version", "1.0", "--live-version", "2.0", "--yes")
    assert result.exit_code == 1, result.output
    assert "2.0 (--live-version)" in result.stdout and "'<2'" in result.stdout
    assert sync_triggers(engine) == 2
    refused = scalar(engine, "SELECT count(*) FROM phasegate.event WHERE kind = 'gate.refused'")
    assert refused == 1


def test_rollback_to_start_undoes_every_phase(phasegate, engine) -> None:
    result = phasegate("advance", P, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    result = phasegate("rollback", P, "--to", "start", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert [line.split(" ")[0] for line in result.stdout.splitlines()[:3]] == [
        "switch",
        "backfill",
        "expand",
    ]
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "bc25b5f8939f"


def test_rollback_to_a_phase_not_reached_yet_says_where_the_plan_is(phasegate) -> None:
    assert phasegate("expand", P, "--live-version", "1.0", "--yes").exit_code == 0
    result = phasegate("rollback", P, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    assert "bug-root-cause is at expand, before switch: nothing after switch to undo" in (
        result.stdout
    )
    result = phasegate("rollback", P, "--to", "expand", "--live-version", "1.0", "--yes")
    assert "bug-root-cause is already at expand" in result.stdout


def project_with_foreign_revision(
    tmp_path: Path, revision: str, down_revision: str, table: str
) -> Path:
    """A copy of the bug tracker's project with one more revision, another team's, that
    creates `table`; returns its alembic.ini."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "migrations", project / "migrations")
    shutil.copy(ALEMBIC_INI, project / "alembic.ini")
    (project / "migrations" / "versions" / f"{revision}_foreign.py").write_text(
        '"""another team\'s change."""\nfrom alembic import op\n\n'
        f'revision = "{revision}"\ndown_revision = "{down_revision}"\n'
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade():\n    op.execute('CREATE TABLE {table} (id int)')\n\n\n"
        f"def downgrade():\n    op.execute('DROP TABLE {table}')\n"
    )
    return project / "alembic.ini"


def alembic_upgrade(ini: Path, url: str, target: str) -> None:
    """`alembic upgrade target` by hand, on a connection handed to env.py."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ini))
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, target)
        connection.commit()
    engine.dispose()


def test_rollback_refuses_when_another_revision_sits_above(tmp_path: Path, seeded_url) -> None:
    ini = project_with_foreign_revision(tmp_path, "f00000000001", "e59b1f0c3d82", "unrelated")
    phasegate = Phasegate(seeded_url, ini)
    run_to_done(phasegate)
    alembic_upgrade(ini, seeded_url, "head")
    result = phasegate("rollback", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 1, result.output
    assert "would also undo f00000000001" in result.stdout
    assert scalar(sa.create_engine(seeded_url), "SELECT to_regclass('unrelated')") is not None


def test_a_branch_beside_the_plan_does_not_block_its_rollback(tmp_path: Path, seeded_url) -> None:
    """Another team's revision on its own branch off the baseline: downgrading switch
    leaves it, as Alembic does, so nothing foreign is undone and the rollback runs."""
    ini = project_with_foreign_revision(tmp_path, "f00000000002", "bc25b5f8939f", "other_team")
    phasegate = Phasegate(seeded_url, ini)
    result = phasegate("advance", P, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    alembic_upgrade(ini, seeded_url, "f00000000002")
    result = phasegate("rollback", P, "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    engine = sa.create_engine(seeded_url)
    heads = {r[0] for r in fetch(engine, "SELECT version_num FROM alembic_version")}
    assert heads == {"8f3a2d1c9b7e", "f00000000002"}
    assert scalar(engine, "SELECT to_regclass('other_team')") is not None
    engine.dispose()


def test_contract_rollback_refuses_an_update_rule_before_downgrading(phasegate, engine) -> None:
    """The refill after contract's downgrade runs backfill batches, which a rule rewrites:
    refused while the schema is still whole, and it runs once the rule is gone."""
    original = dict(fetch(engine, "SELECT id, root_cause FROM bug"))
    run_to_done(phasegate)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE bug_audit (id bigint)")
        connection.exec_driver_sql(
            "CREATE RULE audit AS ON UPDATE TO bug DO ALSO INSERT INTO bug_audit VALUES (new.id)"
        )
    result = phasegate("rollback", P, "--live-version", "2.0", "--yes")
    assert result.exit_code == 1, result.output
    assert "rollback of contract refused: its refill of root_cause" in result.stdout
    assert "has ON UPDATE rule(s) audit" in result.stdout
    assert 'DROP RULE "audit" ON "bug"' in result.stdout
    assert "root_cause" not in columns(engine) and sync_triggers(engine) == 0
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "e59b1f0c3d82"

    with engine.begin() as connection:
        connection.exec_driver_sql("DROP RULE audit ON bug")
    result = phasegate("rollback", P, "--live-version", "2.0", "--yes")
    assert result.exit_code == 0, result.output
    assert dict(fetch(engine, "SELECT id, root_cause FROM bug")) == original
    assert scalar(engine, "SELECT count(*) FROM bug_audit") == 0


def test_a_contract_stopped_after_its_triggers_went_is_rolled_back_with_new_code_writes(
    phasegate, engine, seeded_url
) -> None:
    """Contract drops the sync triggers, then its revision times out on a lock: the old
    column is still there, and a v2 write afterwards changes only the new one. The
    rollback's refill must bring the old column in line with it (it used to fill only
    empty old columns, and verification passed)."""
    result = phasegate("advance", P, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    # Paused before its revision (5 s: the window to take the lock in, polled for), the
    # contract's revision then times out on it. Its trigger drop needs ACCESS EXCLUSIVE too,
    # so the lock cannot be taken before.
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env["PHASEGATE_DATABASE_URL"] = seeded_url
    env["PHASEGATE_FAILPOINTS"] = "before-revision:e59b1f0c3d82=5"
    contract = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "phasegate",
            "--config",
            str(ALEMBIC_INI),
            "contract",
            P,
            "--live-version",
            "2.0",
            "--lock-timeout",
            "100ms",
            "--lock-retries",
            "1",
            "--yes",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while sync_triggers(engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    blocker = hold(seeded_url, "BEGIN; LOCK TABLE bug IN ACCESS SHARE MODE")
    try:
        _out, err = contract.communicate(timeout=120)
    finally:
        blocker.close()
    assert contract.returncode == 3, err
    assert "root_cause" in columns(engine) and sync_triggers(engine) == 0
    with engine.begin() as connection:  # v2 moves bug 1 to another root cause
        connection.exec_driver_sql(
            "UPDATE bug SET root_cause_id = (SELECT min(id) FROM root_cause"
            " WHERE name <> (SELECT root_cause FROM bug WHERE id = 1)) WHERE id = 1"
        )

    result = phasegate("rollback", P, "--live-version", "2.0", "--yes")
    assert result.exit_code == 0, result.output
    assert pairs_out_of_step(engine) == 0
    assert sync_triggers(engine) == 2


def test_contract_rollback_without_sync_down_is_refused_unless_data_loss_is_allowed(
    phasegate, engine, tmp_path
) -> None:
    """A job with no `sync.down` cannot rebuild the old column the contract dropped: the
    rollback exits 1 (refused) and touches nothing; `--allow-data-loss` downgrades anyway
    and leaves the re-added old column empty, the new one intact."""
    plan = plan_without_sync(tmp_path)
    result = phasegate("advance", plan, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    result = phasegate("contract", plan, "--live-version", "2.0", "--yes")
    assert result.exit_code == 0, result.output
    ids = dict(fetch(engine, "SELECT id, root_cause_id FROM bug"))

    result = phasegate("rollback", plan, "--live-version", "2.0", "--yes")
    assert result.exit_code == 1, result.output
    assert (
        "rollback of contract refused: job(s) bug-root-cause-id have no `sync` with `down`"
        in result.output
    )
    assert "--allow-data-loss" in result.output
    assert "root_cause" not in columns(engine)
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "e59b1f0c3d82"
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert (status["phase"], status["state"]) == ("contract", "done")

    result = phasegate("rollback", plan, "--live-version", "2.0", "--allow-data-loss", "--yes")
    assert result.exit_code == 0, result.output
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "d7e2b9f4a613"
    assert "root_cause" in columns(engine) and sync_triggers(engine) == 0
    assert scalar(engine, "SELECT count(*) FROM bug WHERE root_cause IS NOT NULL") == 0
    assert dict(fetch(engine, "SELECT id, root_cause_id FROM bug")) == ids
    status = json.loads(phasegate("status", plan, json_output=True).stdout)
    assert status["phase"] == "switch"
