"""Every version source against a real database, check-deploy, --wait and overrides."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from phasegate.appversion import connect_args, report_version
from phasegate.db import libpq_url

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate
from .test_failures import hold
from .test_seed_story import scalar

SECOND_PLAN = """\
plan: bug-notes
app: bugtracker
baseline_compatible: ">=1"
phases:
  backfill:
    compatible: ">=1.5"
    jobs:
      - name: touch
        sql: SELECT 1
"""


class Project:
    """A project directory of its own: alembic.ini (the example's revisions), plans/,
    and whatever phasegate.toml a test writes."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        (root / "plans").mkdir()
        (root / "plans" / "bug_root_cause.yaml").write_text(PLAN.read_text())
        ini = ALEMBIC_INI.read_text().replace("%(here)s/migrations", str(ROOT / "migrations"))
        (root / "alembic.ini").write_text(ini)
        self.plan = str(root / "plans" / "bug_root_cause.yaml")
        self.run = Phasegate(url, root / "alembic.ini")

    def settings(self, text: str) -> None:
        (self.root / "phasegate.toml").write_text(text)


@pytest.fixture
def project(tmp_path: Path, seeded_url: str) -> Project:
    return Project(tmp_path, seeded_url)


def connect_as(url: str, name: str) -> psycopg.Connection:
    return psycopg.connect(libpq_url(url), application_name=name)


def versions(project: Project, *args: str, exit_code: int = 0) -> dict:
    result = project.run("versions", "--app", "bugtracker", *args, json_output=True)
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)["apps"][0]


DECOY_PLAN = """\
plan: decoy
app: otherapp
baseline_compatible: ">=1"
phases:
  backfill:
    compatible: ">=1"
    jobs:
      - name: touch
        sql: SELECT 1
"""


def test_the_plans_setting_names_the_directory_every_plan_less_command_reads(project) -> None:
    """`plans` in phasegate.toml: status, versions, check-deploy and upgrade, given no PLAN,
    read the plans there and not plans/ (here a decoy of another app), so a project that
    keeps its plans elsewhere is still gated by them."""
    moved = project.root / "deploy" / "plans" / "bug_root_cause.yaml"
    moved.parent.mkdir(parents=True)
    moved.write_text(PLAN.read_text())
    (project.root / "plans" / "bug_root_cause.yaml").write_text(DECOY_PLAN)
    project.settings('plans = "deploy/plans"\n')

    status = project.run("status", json_output=True)
    assert status.exit_code == 0, status.output
    assert [p["plan"] for p in json.loads(status.stdout)["plans"]] == ["bug-root-cause"]
    apps = project.run("versions", "--live-version", "1", json_output=True)
    assert [a["app"] for a in json.loads(apps.stdout)["apps"]] == ["bugtracker"]
    deploy = project.run("check-deploy", "--app-version", "2", json_output=True)
    assert deploy.exit_code == 1, deploy.output  # bug-root-cause has not started: "<2"
    assert [p["plan"] for p in json.loads(deploy.stdout)["plans"]] == ["bug-root-cause"]
    upgrade = project.run("upgrade", "--yes", json_output=True)
    assert upgrade.exit_code == 0, upgrade.output
    left = json.loads(upgrade.stdout)["left"]
    assert [(p["plan"], p["phase"]) for p in left][:1] == [("bug-root-cause", "expand")]
    assert {p["source"] for p in left} == {str(moved)}  # the file there, with its command
    assert left[0]["command"] == f"phasegate advance {moved} --to expand"


# -- pg_stat_activity ------------------------------------------------------------------------


def test_connections_are_read_with_the_configured_pattern(project, seeded_url) -> None:
    project.settings('application_name = "{app}:{instance}:v{version}"\n')
    first = connect_as(seeded_url, "bugtracker:web-1:v1.4")
    second = connect_as(seeded_url, "bugtracker/2.0")  # the default form no longer counts
    try:
        seen = versions(project)
    finally:
        first.close()
        second.close()
    assert [(o["version"], o["source"], o["instance"]) for o in seen["observed"]] == [
        ("1.4", "pg_stat_activity", "web-1")
    ]
    assert "1 connection as bugtracker:web-1:v1.4" in seen["observed"][0]["detail"]


def test_connect_args_name_the_connection(project, seeded_url) -> None:
    engine = sa.create_engine(
        seeded_url, poolclass=NullPool, connect_args=connect_args("bugtracker", "2.1.0")
    )
    with engine.connect():
        seen = versions(project)
    engine.dispose()
    assert seen["versions"] == ["2.1.0"]
    with pytest.raises(ValueError, match="longer than 63 bytes"):
        connect_args("bugtracker", "1." * 40)


# -- heartbeats ------------------------------------------------------------------------------


def test_heartbeats_count_while_fresh_and_expire_after_the_ttl(project, engine) -> None:
    result = project.run(
        "heartbeat", "--app", "bugtracker", "--version", "1.2", "--instance", "web-1"
    )
    assert result.exit_code == 0, result.output
    project.run("heartbeat", "--app", "bugtracker", "--version", "2.0", "--instance", "web-2")
    project.run("heartbeat", "--app", "other-app", "--version", "9", "--instance", "x")
    seen = versions(project)
    assert [(o["version"], o["instance"]) for o in seen["observed"]] == [
        ("1.2", "web-1"),
        ("2.0", "web-2"),
    ]
    assert seen["observed"][0]["source"] == "heartbeat" and seen["observed"][0]["last_seen"]
    with engine.begin() as c:  # web-1 went quiet 4 minutes ago: still inside the 5 min TTL
        c.execute(
            sa.text(
                "UPDATE phasegate.heartbeat SET last_seen = now() - interval '4 minutes' "
                "WHERE instance = 'web-1'"
            )
        )
    assert versions(project)["versions"] == ["1.2", "2.0"]
    project.settings('heartbeat_ttl = "3m"\n')
    assert versions(project)["versions"] == ["2.0"]
    result = project.run(
        "heartbeat", "--app", "bugtracker", "--version", "2.0", "--instance", "web-2", "--remove"
    )
    assert result.exit_code == 0 and "removed" in result.stdout
    assert versions(project)["observed"] == []


def test_report_version_beats_on_connect_and_forgets_on_stop(project, seeded_url, engine) -> None:
    project.run("heartbeat", "--app", "bootstrap", "--version", "0")  # creates the ledger
    app_engine = sa.create_engine(seeded_url, poolclass=NullPool)
    reporter = report_version(app_engine, "bugtracker", "2.0", instance="api-7", interval=3600)
    try:
        seen = versions(project)
        assert [(o["version"], o["instance"]) for o in seen["observed"]] == [("2.0", "api-7")]
        with engine.begin() as c:
            c.execute(
                sa.text("UPDATE phasegate.heartbeat SET last_seen = now() - interval '1 hour'")
            )
        assert versions(project)["observed"] == []
        with app_engine.connect():  # a new connection of the app beats again
            pass
        assert versions(project)["versions"] == ["2.0"]
    finally:
        reporter.stop()
    assert versions(project)["observed"] == []
    app_engine.dispose()


APP_PROCESS = """\
import sys
import sqlalchemy as sa
from sqlalchemy.pool import NullPool
from phasegate.appversion import report_version

engine = sa.create_engine(sys.argv[1], poolclass=NullPool)
report_version(engine, "bugtracker", "2.0", instance="exiting-1", interval=3600)
print("ready", flush=True)
sys.stdin.readline()  # the test has seen the row: end normally, never calling stop()
"""


def test_report_version_removes_its_heartbeat_when_the_process_exits(project, seeded_url) -> None:
    """README: "removed at exit". An app that never calls stop() must not keep counting as
    live for the heartbeat TTL after it exited (it would hold contract shut for minutes)."""
    project.run("heartbeat", "--app", "bootstrap", "--version", "0")  # creates the ledger
    child = subprocess.Popen(
        [sys.executable, "-c", APP_PROCESS, seeded_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read() if child.stderr else ""
        engine = sa.create_engine(seeded_url, poolclass=NullPool)
        rows = "SELECT count(*) FROM phasegate.heartbeat WHERE instance = 'exiting-1'"
        assert scalar(engine, rows) == 1
        assert versions(project)["versions"] == ["2.0"]
        _out, err = child.communicate("\n", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    assert scalar(engine, rows) == 0
    assert versions(project)["observed"] == []
    engine.dispose()


def test_report_version_never_raises_into_the_app(seeded_url, caplog) -> None:
    """No ledger yet (phasegate never ran here): the app still starts and works."""
    # an in-process Alembic run (env.py's fileConfig) disables loggers that already exist
    logging.getLogger("phasegate.appversion").disabled = False
    app_engine = sa.create_engine(seeded_url, poolclass=NullPool)
    reporter = report_version(app_engine, "bugtracker", "2.0", interval=3600)
    try:
        with app_engine.connect() as c:
            assert c.execute(sa.text("SELECT count(*) FROM bug")).scalar() > 0
    finally:
        reporter.stop()
        app_engine.dispose()
    assert "phasegate heartbeat for bugtracker/2.0 failed" in caplog.text


def test_gate_names_the_heartbeat_instance(project) -> None:
    """The issue's acceptance: a v1.2 heartbeat from web-1 refuses contract."""
    assert project.run("expand", project.plan, "--live-version", "1.0", "--yes").exit_code == 0
    project.run("heartbeat", "--app", "bugtracker", "--version", "1.2", "--instance", "web-1")
    result = project.run("gate", project.plan, "--phase", "contract", "--live-version", "2.0")
    assert result.exit_code == 1
    assert "1.2 (heartbeat: instance web-1, last seen" in result.stdout


def test_an_unparsable_heartbeat_version_fails_closed(project) -> None:
    result = project.run("heartbeat", "--app", "bugtracker", "--version", "latest")
    assert result.exit_code == 0 and "not a PEP 440 version" in result.stderr
    result = project.run("gate", project.plan, "--phase", "switch", "--live-version", "2.0")
    assert result.exit_code == 1
    assert "versions that are not PEP 440 count as outside" in result.stdout


# -- the versions command --------------------------------------------------------------------


def command_setting(script: str) -> str:
    return f"versions_command = {json.dumps([sys.executable, '-c', script])}\n"


def test_a_versions_command_is_a_source(project) -> None:
    script = (
        "import json, os; print(json.dumps({'versions': [{'version': '2.0', "
        "'instance': os.environ['PHASEGATE_APP'] + '-pod-a'}]}))"
    )
    project.settings(command_setting(script))
    seen = versions(project)
    assert [(o["version"], o["source"], o["instance"]) for o in seen["observed"]] == [
        ("2.0", "versions_command", "bugtracker-pod-a")
    ]
    result = project.run("gate", project.plan, "--phase", "expand")
    assert (
        result.exit_code == 1
        and "2.0 (versions_command: instance bugtracker-pod-a)" in result.stdout
    )


def test_a_failing_versions_command_fails_the_gate_with_its_stderr(project) -> None:
    script = "import sys; sys.stderr.write('scheduler unreachable\\n'); sys.exit(3)"
    project.settings(command_setting(script))
    result = project.run("gate", project.plan, "--phase", "expand", "--live-version", "1.0")
    assert result.exit_code == 1
    assert "exited with 3; its stderr: scheduler unreachable" in result.stdout
    seen = versions(project, exit_code=3)
    assert "scheduler unreachable" in seen["failures"][0]["message"]


def test_a_versions_command_that_prints_nothing_fails(project) -> None:
    """`kubectl ... | cat` without kubectl prints nothing and exits 0: not an answer."""
    script = "import sys; sys.stderr.write('kubectl: command not found')"
    project.settings(command_setting(script))
    result = project.run("gate", project.plan, "--phase", "expand", "--live-version", "1.0")
    assert result.exit_code == 1
    assert "printed no version; its stderr: kubectl: command not found" in result.stdout


def test_the_versions_command_output_is_scrubbed_of_the_password(tmp_path, seeded_url) -> None:
    """A command that echoes the database URL (set -x, say) must not leak its password."""
    secret_url = sa.engine.make_url(seeded_url).set(password="hunter2-secret")
    secret = secret_url.render_as_string(hide_password=False)  # trust auth ignores it
    project = Project(tmp_path, secret)
    script = f"import sys; sys.stderr.write('connecting to {secret}'); sys.exit(1)"
    project.settings(command_setting(script))
    result = project.run("gate", project.plan, "--phase", "expand", json_output=True)
    assert result.exit_code == 1, result.output
    assert "hunter2-secret" not in result.output and ":***@" in result.stdout
    with psycopg.connect(libpq_url(seeded_url)) as check:
        leaked = check.execute(
            "SELECT count(*) FROM phasegate.event WHERE detail::text LIKE '%hunter2%'"
        ).fetchone()[0]
    assert leaked == 0


def test_a_hanging_versions_command_times_out(project) -> None:
    script = "import time; time.sleep(30)"
    project.settings(command_setting(script) + 'versions_command_timeout = "1s"\n')
    started = time.monotonic()
    result = project.run("gate", project.plan, "--phase", "expand", "--live-version", "1.0")
    assert result.exit_code == 1 and "did not finish within 1.0 s" in result.stdout
    assert time.monotonic() - started < 20


# -- check-deploy ----------------------------------------------------------------------------


def test_check_deploy_follows_the_plan_through_its_phases(project) -> None:
    """The issue's acceptance, with the seed plan expanded, then backfilled."""
    assert project.run("expand", project.plan, "--live-version", "1.0", "--yes").exit_code == 0
    result = project.run("check-deploy", "--app-version", "2.0")
    assert result.exit_code == 1
    assert "bug-root-cause: expand done; bugtracker 2.0 may NOT be deployed" in result.stdout
    assert project.run("backfill", project.plan, "--live-version", "1.0", "--yes").exit_code == 0
    assert project.run("check-deploy", "--app-version", "2.0").exit_code == 0
    result = project.run("check-deploy", "--app-version", "3.0", json_output=True)
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["allowed"] is False
    assert document["plans"][0]["ranges"][0]["compatible"] == ">=1,<3"


def test_check_deploy_during_a_failed_phase_needs_both_of_its_ends(project, seeded_url) -> None:
    """README: V must be inside "both ends of a phase that is running or failed". A contract
    that failed part way may be done or not: 1.5 fits switch's ">=1" but not contract's
    ">=2", so it may not roll out; 2.0 fits both."""
    assert (
        project.run("advance", project.plan, "--to", "switch", "--live-version", "1.0", "--yes")
    ).exit_code == 0
    blocker = hold(seeded_url, "BEGIN; LOCK TABLE bug IN ACCESS SHARE MODE")
    try:
        failed = project.run(
            "contract",
            project.plan,
            "--live-version",
            "2.0",
            "--lock-timeout",
            "200ms",
            "--lock-retries",
            "0",
            "--yes",
        )
    finally:
        blocker.close()
    assert failed.exit_code == 3, failed.output
    status = json.loads(project.run("status", project.plan, json_output=True).stdout)
    assert (status["phase"], status["active_phase"], status["state"]) == (
        "switch",
        "contract",
        "failed",
    )
    refused = project.run("check-deploy", "--app-version", "1.5", json_output=True)
    assert refused.exit_code == 1, refused.output
    ranges = [r["compatible"] for r in json.loads(refused.stdout)["plans"][0]["ranges"]]
    assert ranges == [">=1", ">=2"], ranges
    assert project.run("check-deploy", "--app-version", "2.0").exit_code == 0


def test_check_deploy_across_several_plans_of_one_app(project) -> None:
    second = project.root / "plans" / "bug_notes.yaml"
    second.write_text(SECOND_PLAN)
    # both plans at their start: "<2" and ">=1" -> 1.2 fits both, 0.9 fails the second
    assert project.run("check-deploy", "--app-version", "1.2").exit_code == 0
    result = project.run("check-deploy", "--app-version", "0.9")
    assert (
        result.exit_code == 1 and "bug-notes: not started; bugtracker 0.9 may NOT" in result.stdout
    )
    assert project.run("backfill", str(second), "--live-version", "1.5", "--yes").exit_code == 0
    result = project.run("check-deploy", "--app-version", "1.2")
    assert result.exit_code == 1
    assert "bug-notes: backfill done; bugtracker 1.2 may NOT be deployed" in result.stdout
    assert "bug-root-cause: not started; bugtracker 1.2 may be deployed" in result.stdout
    # naming one plan checks that one only
    assert project.run("check-deploy", "--app-version", "1.2", project.plan).exit_code == 0
    assert project.run("check-deploy", "--app-version", "1.7").exit_code == 0


def test_check_deploy_usage_errors(project) -> None:
    result = project.run("check-deploy", "--app-version", "newest")
    assert result.exit_code == 2 and "not a PEP 440 version" in result.stderr
    (project.root / "plans" / "crm.yaml").write_text(SECOND_PLAN.replace("bugtracker", "crm"))
    result = project.run("check-deploy", "--app-version", "1.0")
    assert result.exit_code == 2 and "several apps (bugtracker, crm): pass --app" in result.stderr
    assert project.run("check-deploy", "--app-version", "1.0", "--app", "crm").exit_code == 0


# -- waiting, overrides, the event log -------------------------------------------------------


def test_wait_passes_once_the_old_connection_closes(project, seeded_url) -> None:
    old = connect_as(seeded_url, "bugtracker/1.4")
    closer = threading.Timer(3.0, old.close)
    closer.start()
    started = time.monotonic()
    result = project.run(
        "gate", project.plan, "--phase", "contract", "--live-version", "2.0", "--wait", "60s"
    )
    closer.join()
    assert result.exit_code == 0, result.output
    assert "waiting" in result.stderr and "1.4 (pg_stat_activity" in result.stderr
    assert "pass after waiting" in result.stdout
    assert 2.5 < time.monotonic() - started < 30


def test_wait_times_out_while_the_old_version_stays(project, seeded_url, engine) -> None:
    old = connect_as(seeded_url, "bugtracker/1.4")
    try:
        result = project.run(
            "gate", project.plan, "--phase", "contract", "--live-version", "2.0", "--wait", "2s"
        )
    finally:
        old.close()
    assert result.exit_code == 1
    assert "refused — after waiting 2." in result.stdout
    detail = scalar(
        engine, "SELECT detail FROM phasegate.event WHERE kind = 'gate.refused' ORDER BY id DESC"
    )
    assert detail["waited_seconds"] >= 2 and detail["observed"][1]["version"] == "1.4"


def test_advance_waits_for_its_gate_too(project, seeded_url) -> None:
    lingering = connect_as(seeded_url, "bugtracker/2.0")  # outside expand's "<2"
    closer = threading.Timer(2.0, lingering.close)
    closer.start()
    result = project.run("expand", project.plan, "--live-version", "1.0", "--wait", "1m", "--yes")
    closer.join()
    assert result.exit_code == 0, result.output
    assert "expand (advance): done" in result.stdout


def test_override_needs_a_reason_and_records_actor_and_versions(
    project, seeded_url, engine
) -> None:
    result = project.run("expand", project.plan, "--override-gate", "  ", "--yes")
    assert result.exit_code == 2 and "needs a reason" in result.output
    app = connect_as(seeded_url, "bugtracker/2.0")
    try:
        result = project.run(
            "expand",
            project.plan,
            "--override-gate",
            "v2 canary, OPS-42",
            "--actor",
            "ci-bot",
            "--wait",
            "1h",
            "--yes",
        )  # an override does not wait
    finally:
        app.close()
    assert result.exit_code == 0, result.output
    with engine.connect() as c:
        actor, detail = c.execute(
            sa.text("SELECT actor, detail FROM phasegate.event WHERE kind = 'gate.overridden'")
        ).one()
    assert actor == "ci-bot" and detail["override_reason"] == "v2 canary, OPS-42"
    assert [(o["version"], o["source"]) for o in detail["observed"]] == [
        ("2.0", "pg_stat_activity")
    ]


def test_every_gate_decision_lands_in_the_event_log(project, engine) -> None:
    assert project.run("gate", project.plan, "--live-version", "1.0").exit_code == 0
    assert project.run("gate", project.plan, "--phase", "contract").exit_code == 1
    with engine.connect() as c:
        rows = c.execute(
            sa.text("SELECT kind, phase, detail->>'direction' FROM phasegate.event ORDER BY id")
        ).all()
    assert [tuple(r) for r in rows] == [
        ("gate.passed", "expand", "gate"),
        ("gate.refused", "contract", "gate"),
    ]


def test_a_name_that_claims_the_app_but_breaks_the_pattern_refuses(project, seeded_url) -> None:
    odd = connect_as(seeded_url, "bugtracker/2.0 celery-worker")
    bare = connect_as(seeded_url, "bugtracker")
    other = connect_as(seeded_url, "bugtracker-admin/1.0")  # another app: not counted
    try:
        result = project.run("gate", project.plan, "--phase", "contract", "--live-version", "2.0")
    finally:
        for conn in (odd, bare, other):
            conn.close()
    assert result.exit_code == 1
    assert "'bugtracker/2.0 celery-worker' (not '{app}/{version}')" in result.stdout
    assert "'bugtracker' (not" in result.stdout and "bugtracker-admin" not in result.stdout


def test_two_versions_on_one_host_are_both_live(project) -> None:
    """Blue/green on one machine: the second heartbeat must not hide the first."""
    for version in ("1.4", "2.0"):
        result = project.run("heartbeat", "--app", "bugtracker", "--version", version)
        assert result.exit_code == 0, result.output
    assert versions(project)["versions"] == ["1.4", "2.0"]
    assert project.run("gate", project.plan, "--phase", "contract").exit_code == 1
    result = project.run("heartbeat", "--app", "bugtracker", "--version", "1.4", "--remove")
    assert result.exit_code == 0 and "1 removed" in result.stdout
    assert versions(project)["versions"] == ["2.0"]
    result = project.run("heartbeat", "--app", "bugtracker", "--remove")  # no version needed
    assert result.exit_code == 0 and "1 removed" in result.stdout
    assert project.run("heartbeat", "--app", "bugtracker").exit_code == 2


def test_a_waiting_gate_says_what_it_waits_for_once(project, seeded_url) -> None:
    old = connect_as(seeded_url, "bugtracker/1.4")
    try:
        result = project.run(
            "gate", project.plan, "--phase", "contract", "--live-version", "2.0", "--wait", "5s"
        )
    finally:
        old.close()
    assert result.exit_code == 1
    assert result.stderr.count("waiting") == 1, result.stderr


def test_reporters_come_and_go_while_the_app_connects(project, seeded_url) -> None:
    """Starting and stopping reporters never disturbs threads that are connecting."""
    project.run("heartbeat", "--app", "bootstrap", "--version", "0")  # creates the ledger
    app_engine = sa.create_engine(seeded_url, pool_size=4, max_overflow=8)
    errors: list[BaseException] = []
    done = threading.Event()

    def connect_in_a_loop() -> None:
        while not done.is_set():
            try:
                with app_engine.connect() as c:
                    c.execute(sa.text("SELECT 1"))
                app_engine.dispose(close=False)  # the next connect is a new connection
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=connect_in_a_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for n in range(30):
            report_version(app_engine, "bugtracker", "2.0", instance=f"i{n}", interval=3600).stop()
    finally:
        done.set()
        for thread in threads:
            thread.join()
        app_engine.dispose()
    assert errors == []
    assert versions(project)["observed"] == []  # every stopped reporter removed its row
