"""The CLI contract: exit codes, --json documents, masking, confirmation, the gate, the demo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from phasegate.cli import cli
from phasegate.db import libpq_url, mask_url, scrub

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate, load_example
from .test_safety import run_phasegate

P = str(PLAN)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["--config", str(ALEMBIC_INI), *args])


def test_validate_ok_needs_no_database() -> None:
    result = invoke("--database-url", "postgresql://nobody@127.0.0.1:1/none", "validate", P)
    assert result.exit_code == 0, result.output
    assert "expand: 2 revision(s) (6c55e0560fd4, 8f3a2d1c9b7e)" in result.stdout


def test_validate_invalid_plan_exits_2_with_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(PLAN.read_text().replace("  switch:\n", "  swtich:\n"))
    result = invoke("validate", P, str(bad))
    assert result.exit_code == 2
    assert f"{bad}:" in result.stdout and "unknown key 'swtich'" in result.stdout
    document = json.loads(invoke("--json", "validate", str(bad)).stdout)
    assert document["ok"] is False and document["exit_code"] == 2  # as every document says
    [issue] = document["plans"][0]["issues"]
    assert issue["key"] == "phases.swtich" and issue["line"] > 1
    assert document["error"]["kind"] == "invalid-plan"  # an exit 2 document, as README says


def test_unreachable_database_exits_3_without_the_password() -> None:
    url = "postgresql://postgres:s3cret-pw@127.0.0.1:1/nothing"
    result = invoke("--json", "--database-url", url, "status", P)
    assert result.exit_code == 3
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 3
    assert "cannot connect to postgresql+psycopg://postgres:***@127.0.0.1:1" in result.stderr
    assert "s3cret-pw" not in result.output


def test_mutating_commands_need_yes_when_not_interactive(seeded_url) -> None:
    result = Phasegate(seeded_url)("expand", P, "--live-version", "1")
    assert result.exit_code == 2
    assert "pass --yes" in result.stderr


def test_gate_names_a_live_connection_outside_the_range(seeded_url) -> None:
    app = psycopg.connect(libpq_url(seeded_url), application_name="bugtracker/1.4.2")
    try:
        result = Phasegate(seeded_url)("gate", P, "--phase", "contract", "--live-version", "2.0")
    finally:
        app.close()
    assert result.exit_code == 1
    assert "1.4.2 (pg_stat_activity: 1 connection as bugtracker/1.4.2" in result.stdout
    result = Phasegate(seeded_url)("gate", P, "--phase", "contract", "--live-version", "2.0")
    assert result.exit_code == 0, result.output


def test_gate_with_nothing_observed_fails_closed(seeded_url) -> None:
    result = Phasegate(seeded_url)("gate", P, "--phase", "contract", json_output=True)
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 1
    assert document["passed"] is False and document["observed"] == []
    assert "fails closed" in document["message"]


def test_python_dash_m_and_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "phasegate", "rollback", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "--allow-data-loss" in result.stdout and "--live-version" in result.stdout


def run_demo(url: str, *options: str, keep: bool = False) -> subprocess.CompletedProcess[str]:
    """`phasegate demo` as a new user runs it, on a fresh database of the test server
    (kept with `keep`, for the test to read)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "phasegate",
            "--database-url",
            url,
            *options,
            "demo",
            "--rows",
            "3000",
            *(["--keep"] if keep else []),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def kept_demo_database(pg_server, shown: str) -> str:
    """The URL of the database a `demo --keep` kept, from the (masked) URL it shows."""
    return pg_server.url_for(make_url(shown.strip()).database)


def demo_rows(url: str) -> dict[str, str | None]:
    """Every bug of a demo's database: its URL, and its root cause as v2 reads it."""
    with psycopg.connect(libpq_url(url)) as conn:
        return dict(
            conn.execute(
                "SELECT b.bug_tracker_url, r.name FROM bug b "
                "LEFT JOIN root_cause r ON r.id = b.root_cause_id"
            ).fetchall()
        )


def assert_demo_rows(pg_server, seeded_template: str, rows: dict[str, str | None]) -> None:
    """The demo's database, checked by SQL against what was written, not what the demo
    says: the seeded rows as the tests' own seed has them (the demo's app updates only the
    rows it inserted), and the app's inserts with no number missing."""
    with psycopg.connect(libpq_url(pg_server.url_for(seeded_template))) as conn:
        seeded = dict(conn.execute("SELECT bug_tracker_url, root_cause FROM bug").fetchall())
    assert len(seeded) == 3000
    assert {url: rows.get(url) for url in seeded} == seeded
    inserted = {url: cause for url, cause in rows.items() if url not in seeded}
    numbers: dict[str, set[int]] = {}  # each app instance numbers its inserts 1, 2, 3 ...
    for url in inserted:
        instance, _, number = url.rpartition("-")
        numbers.setdefault(instance, set()).add(int(number))
    assert len(numbers) == 3, sorted(numbers)  # two v1 instances, one v2
    for instance, found in numbers.items():  # a gap: an insert lost (or failed)
        assert found == set(range(1, max(found) + 1)), instance
    names = set(load_example("sample_data").ROOT_CAUSE_NAMES)
    assert set(inserted.values()) <= names


def test_demo_runs_the_whole_story(pg_server, seeded_template) -> None:
    result = run_demo(pg_server.url, keep=True)
    kept = result.stdout.rpartition("kept the demo database:")[2]
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "contract refused, as it must be" in result.stdout
        assert "0 lost or wrong" in result.stdout and "(0 failed)" in result.stdout
        assert "with SIGKILL after" in result.stdout and "backfill, resumed after the crash" in (
            result.stdout
        )
        assert "time per step" in result.stdout and "summary" in result.stdout
        assert_demo_rows(pg_server, seeded_template, demo_rows(kept_demo_database(pg_server, kept)))
    finally:
        if kept.strip():
            pg_server.drop_database(kept_demo_database(pg_server, kept))


def test_demo_json_reports_the_crash_and_the_summary(
    pg_server, seeded_template, monkeypatch
) -> None:
    """In this process, so the test sees the app instances themselves: every write they
    were told succeeded is checked in the database by SQL of its own."""
    from phasegate import demo

    instances: list = []
    load = demo.load_example

    def recording(root: Path, name: str):
        module = load(root, name)
        if name == "app":

            class Recorded(module.AppInstance):
                def __init__(self, *args, **kwargs) -> None:
                    super().__init__(*args, **kwargs)
                    instances.append(self)

            module.AppInstance = Recorded
        return module

    monkeypatch.setattr(demo, "load_example", recording)
    result = CliRunner().invoke(
        cli,
        ["--database-url", pg_server.url, "--json", "demo", "--rows", "3000", "--keep"],
        catch_exceptions=False,
    )
    report = json.loads(result.stdout)
    url = kept_demo_database(pg_server, report["database"])
    try:
        assert result.exit_code == 0, result.output
        assert report["ok"] is True and report["exit_code"] == 0
        assert report["crash"]["killed"] is True
        assert 0 < report["crash"]["rows_done_at_kill"] < 3000
        assert (report["app_failures"], report["lost_or_wrong_writes"]) == (0, 0)
        steps = [t["step"] for t in report["timings"]]
        assert steps[:3] == ["expand", "backfill until killed", "backfill, resumed after the crash"]
        assert ("contract while v1 is still connected", "refused") in [
            (t["step"], t["result"]) for t in report["timings"]
        ]
        # what the app instances saw and wrote, against the rows
        assert len(instances) == 3 and sum(i.stats().failed for i in instances) == 0
        acknowledged: dict[str, str] = {}
        for instance in instances:
            acknowledged.update(instance.expectations)
        rows = demo_rows(url)
        assert acknowledged and {u: rows.get(u) for u in acknowledged} == acknowledged
        assert_demo_rows(pg_server, seeded_template, rows)
    finally:
        pg_server.drop_database(url)


def test_click_usage_errors_honour_json() -> None:
    for args in (
        ["advance", P, "--to", "bogus"],
        ["frobnicate"],
        ["advance", P, "--lock-timeout", "x"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "phasegate", "--json", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2, args
        document = json.loads(result.stdout)
        assert document["ok"] is False and document["error"]["kind"] == "usage"


def test_status_of_all_plans_shows_the_valid_ones_and_lists_an_invalid_one(
    database_url, tmp_path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "migrations", project / "migrations")
    shutil.copytree(ROOT / "plans", project / "plans")
    shutil.copy(ALEMBIC_INI, project / "alembic.ini")
    (project / "plans" / "broken.yaml").write_text("plan: broken\napp: x\nphases: {}\n")
    ghost = PLAN.read_text().replace("plan: bug-root-cause", "plan: ghost")
    ghost = ghost.replace(
        '  expand:\n    compatible: "<2"',
        '  expand:\n    compatible: "<2"\n    revisions: [deadbeef0000]',
    )
    assert "deadbeef0000" in ghost
    (project / "plans" / "ghost.yaml").write_text(ghost)  # valid YAML, unknown revision
    result = Phasegate(database_url, project / "alembic.ini")("status")
    assert result.exit_code == 2, result.output
    assert "plan bug-root-cause (" in result.stdout  # the valid plan is shown
    assert "invalid plan files" in result.stdout and "broken.yaml:" in result.stdout
    assert "ghost.yaml:" in result.stdout and "deadbeef0000" in result.stdout
    document = json.loads(
        Phasegate(database_url, project / "alembic.ini")("status", json_output=True).stdout
    )
    assert [p["plan"] for p in document["plans"]] == ["bug-root-cause"]
    files = {Path(i["file"]).name for i in document["invalid_plans"]}
    assert files == {"broken.yaml", "ghost.yaml"}
    assert (document["exit_code"], document["error"]["kind"]) == (2, "invalid-plan")


def test_a_password_is_scrubbed_from_an_unparsable_url() -> None:
    url = "postgresql://user:sekrit@[::1:5432/db?password=also"
    assert (
        scrub(f"failed for {url}", url)
        == "failed for postgresql://user:***@[::1:5432/db?password=***"
    )
    url = "postgresql://u:pa@s/s@[::1:5432/db"  # '@' and '/' in the password
    assert scrub(f"could not use {url}", url) == "could not use postgresql://u:***@[::1:5432/db"
    url = "postgresql://u:pa@ss@[::1:5432/db"
    assert scrub(f"could not use {url}", url) == "could not use postgresql://u:***@[::1:5432/db"


def test_a_password_holding_at_signs_in_a_url_sqlalchemy_parses_is_masked_whole() -> None:
    url = "postgresql://app:s@cret@127.0.0.1:1/prod"  # parsed: password 's', host 'cret@...'
    shown = mask_url(url)  # how phasegate itself renders it: postgresql://app:***@cret@...
    message = f'{{"message": "cannot connect to {shown}", "database": "{url}"}}'
    scrubbed = scrub(message, url)
    assert "cret" not in scrubbed and '"message"' in scrubbed and '"database"' in scrubbed
    plain = "postgresql://postgres@127.0.0.1:5432/db"
    assert scrub(f"using {plain}", plain) == f"using {plain}"  # no password, nothing masked


def test_json_may_follow_the_command(database_url) -> None:
    before = Phasegate(database_url)("status", P, json_output=True)
    after = invoke(
        "--database-url", database_url, "--config", str(ALEMBIC_INI), "status", P, "--json"
    )
    assert after.exit_code == 0, after.output
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert json.loads(invoke("validate", P, "--json").stdout)["valid"] is True


def test_json_after_the_command_is_not_taken_from_an_option_that_needs_a_value() -> None:
    flag = invoke("heartbeat", "--app", "a", "--json")  # moved: a JSON error document
    assert flag.exit_code == 2 and json.loads(flag.stdout)["error"]["kind"] == "usage"
    value = invoke("heartbeat", "--app", "a", "--instance", "--json")  # the instance's name
    assert value.exit_code == 2 and "pass --version" in value.output
    assert not value.stdout.lstrip().startswith("{")


def test_a_password_in_the_query_string_is_masked_too() -> None:
    url = "postgresql://postgres@127.0.0.1:1/nothing?password=hunter2"
    result = invoke("--json", "--database-url", url, "status", P)
    assert result.exit_code == 3
    assert "hunter2" not in result.output and "password=***" in result.stderr


def test_status_on_an_empty_database_creates_nothing(database_url) -> None:
    result = Phasegate(database_url)("status", P, json_output=True)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["phase"] is None
    with psycopg.connect(libpq_url(database_url)) as conn:
        made = conn.execute(
            "SELECT to_regclass('alembic_version'), to_regnamespace('phasegate')"
        ).fetchone()
    assert made == (None, None)


def ini_with_url(tmp_path: Path, url: str) -> Path:
    """The bundled alembic.ini, runnable from `tmp_path`, with `url` as sqlalchemy.url
    written as it stands (a `%` must be doubled there: configparser interpolates)."""
    ini = ALEMBIC_INI.read_text().replace("%(here)s/migrations", str(ROOT / "migrations"))
    ini = re.sub(r"(?m)^sqlalchemy\.url = .*$", lambda _: f"sqlalchemy.url = {url}", ini)
    config = tmp_path / "alembic.ini"
    config.write_text(ini)
    return config


@pytest.mark.db
def test_the_database_url_comes_from_the_flag_then_the_two_variables_then_alembic_ini(
    database_url: str, tmp_path: Path
) -> None:
    """README's order: --database-url, $PHASEGATE_DATABASE_URL, $DATABASE_URL, then
    sqlalchemy.url in alembic.ini. Each step puts the real database or NOWHERE (exit 3)
    above the others, so the exit code shows which one was used."""
    config = ini_with_url(tmp_path, database_url.replace("%", "%%"))

    def status(*flags: str, **env: str | None) -> int:
        unset: dict[str, str | None] = {"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None}
        result = CliRunner().invoke(
            cli, ["--config", str(config), *flags, "--json", "status", P], env={**unset, **env}
        )
        return result.exit_code

    assert status() == 0  # alembic.ini's
    assert status(DATABASE_URL=NOWHERE) == 3  # $DATABASE_URL before alembic.ini
    assert status(DATABASE_URL=NOWHERE, PHASEGATE_DATABASE_URL=database_url) == 0
    assert status(PHASEGATE_DATABASE_URL=NOWHERE, DATABASE_URL=database_url) == 3
    assert status("--database-url", database_url, PHASEGATE_DATABASE_URL=NOWHERE) == 0
    assert status("--database-url", NOWHERE, PHASEGATE_DATABASE_URL=database_url) == 3


def test_status_json_of_one_plan_is_its_object_and_of_several_a_list(
    seeded_url: str, tmp_path: Path
) -> None:
    """README: `status --json PLAN` prints that plan's object (`plan`, `phase`, `next`,
    `state`, `jobs`, `drift`, `drift_details`, `heads`, `phases`, ...); with several
    PLANs, `{"plans": [...]}`."""
    other = tmp_path / "notes.yaml"
    other.write_text(PLAN.read_text().replace("plan: bug-root-cause", "plan: bug-notes"))
    phasegate = Phasegate(seeded_url)
    one = json.loads(phasegate("status", P, json_output=True).stdout)
    promised = {"plan", "phase", "next", "state", "jobs", "drift", "drift_details", "heads"}
    assert promised | {"phases"} <= set(one), sorted(one)
    assert (one["plan"], one["phase"], one["next"]) == ("bug-root-cause", None, "expand")
    several = json.loads(phasegate("status", P, str(other), json_output=True).stdout)
    assert [p["plan"] for p in several["plans"]] == ["bug-root-cause", "bug-notes"]
    assert all(promised <= set(p) for p in several["plans"])


# -- --json: one document on stdout for every command -----------------------------------------

NOWHERE = "postgresql://postgres@127.0.0.1:1/nothing"  # no server listens there: exit 3
# Per command, cheap runs against a fresh seeded database (or NOWHERE): at least one that
# succeeds (demo's is test_demo_json_reports_the_crash_and_the_summary) and one that fails.
JSON_CASES: dict[str, list[tuple[str, ...]]] = {
    "validate": [(P,), ("missing.yaml",)],
    "lint": [("--rules",), (P,), ()],
    "preview": [(P, "--offline"), (P, "--no-sample", "--live-version", "1"), ("missing.yaml",)],
    "status": [(P,), (), ("nowhere", P)],
    "gate": [(P, "--phase", "expand", "--live-version", "1"), (P, "--phase", "contract")],
    "advance": [(P, "--to", "expand", "--live-version", "1", "--yes"), (P, "--to", "bogus")],
    "expand": [(P, "--live-version", "1", "--yes"), (P, "--live-version", "1")],
    "backfill": [(P, "--live-version", "1", "--yes"), (P, "--batch-size", "x")],
    "switch": [(P, "--live-version", "1", "--yes"), ("nowhere", P, "--yes")],
    "contract": [(P, "--live-version", "2", "--yes"), (P, "--lock-timeout", "x")],
    "rollback": [(P, "--live-version", "1", "--yes"), (P, "--to", "nowhere-phase")],
    "check-deploy": [("--app-version", "1"), ("--app-version", "2"), ()],
    "versions": [(), ("nowhere",)],
    "heartbeat": [("--app", "bugtracker", "--version", "1", "--instance", "t"), ("--app", "a")],
    "worker": [(P, "--wait", "0.1s"), ("nowhere", P)],
    "upgrade": [("--yes",), ("nowhere", "--yes")],
    "demo": [("--rows", "many")],
}
DONE_BEFORE = {"backfill": "expand", "switch": "backfill", "contract": "switch"}  # so they run


def test_every_command_has_json_cases() -> None:
    """A new command is checked for its --json contract as soon as it exists."""
    assert set(JSON_CASES) == set(cli.commands)


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_json_prints_exactly_one_document_for_every_command_and_outcome(
    command: str, seeded_url: str
) -> None:
    """README: `--json` prints one JSON document on stdout for every command, errors
    included, starting with `ok` and `exit_code`; progress and logs go to stderr. Run as a
    process, so click's own usage errors go through the same entry point."""
    if command in DONE_BEFORE:
        done = Phasegate(seeded_url)(
            "advance", P, "--to", DONE_BEFORE[command], "--live-version", "1", "--yes"
        )
        assert done.exit_code == 0, done.output
    codes = []
    for case in JSON_CASES[command]:
        url, args = (NOWHERE, case[1:]) if case[:1] == ("nowhere",) else (seeded_url, case)
        out, err = (process := run_phasegate(url, "--json", command, *args)).communicate(
            timeout=300
        )
        document = json.loads(out)  # the whole of stdout: one document, nothing else
        assert isinstance(document, dict), out
        assert list(document)[:2] == ["ok", "exit_code"], (case, out)
        assert document["exit_code"] == process.returncode, (case, out, err)
        assert document["ok"] is (process.returncode == 0), (case, out)
        if process.returncode >= 2:
            assert document["error"]["message"], (case, out)
        codes.append(process.returncode)
    assert 0 in codes or command == "demo", codes
    assert any(code != 0 for code in codes), codes


def test_a_lone_percent_in_the_ini_url_is_a_usage_error_that_names_the_fix(
    tmp_path: Path,
) -> None:
    """A URL-encoded password (`s%2Fcret`) copied into alembic.ini as it stands is an error
    of the file, not of phasegate: exit 2 naming alembic.ini and `%%`, never a traceback,
    and never the password."""
    config = ini_with_url(tmp_path, "postgresql://app:s%2Fcret@127.0.0.1:1/prod")
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "--json", "status", P],
        env={"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None},
    )
    assert result.exit_code == 2, result.output
    message = json.loads(result.stdout)["error"]["message"]
    assert str(config) in message and "%%" in message, message
    assert "%2Fcret" not in result.output and "s/cret" not in result.output
