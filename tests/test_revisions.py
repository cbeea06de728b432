"""Tag resolution and validation over real Alembic script directories. No database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phasegate.plan import PlanError, parse_plan
from phasegate.revisions import AlembicProject

from .conftest import ALEMBIC_INI, PLAN

PLAN_TEXT = """\
plan: {name}
app: shop
baseline_compatible: "<2"
phases:
  expand:
    compatible: "<2"{expand_extra}
  switch:
    compatible: ">=1"
  contract:
    compatible: ">=2"
"""


def make_project(tmp_path: Path, revisions: list[tuple[str, str | None, str | None, str | None]]):
    """Write an Alembic project whose revisions are (id, down, plan, phase)."""
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "migrations" / "env.py").write_text("raise RuntimeError('not run')\n")
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    for rev, down, plan, phase in revisions:
        (versions / f"{rev}.py").write_text(
            f'"""{rev} revision."""\n'
            f"revision = {rev!r}\ndown_revision = {down!r}\n"
            "branch_labels = None\ndepends_on = None\n"
            f"phasegate_plan = {plan!r}\nphasegate_phase = {phase!r}\n\n\n"
            "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
        )
    return AlembicProject(tmp_path / "alembic.ini")


def plan_text(name: str = "p", expand_extra: str = "") -> str:
    return PLAN_TEXT.format(name=name, expand_extra=expand_extra)


def test_bundled_project_resolves_in_graph_order() -> None:
    from phasegate.plan import load_plan

    resolved = AlembicProject(ALEMBIC_INI).resolve(load_plan(PLAN))
    assert resolved.by_phase == {
        "expand": ["6c55e0560fd4", "8f3a2d1c9b7e"],
        "switch": ["a41c7e9d2b58", "d7e2b9f4a613"],
        "contract": ["e59b1f0c3d82"],
    }
    assert resolved.foreign == {}


def test_tags_resolve_in_graph_order_not_file_order(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        [
            ("b000000000b1", None, None, None),
            ("zz00000000e1", "b000000000b1", "p", "expand"),
            ("aa00000000e2", "zz00000000e1", "p", "expand"),
            ("s000000000s1", "aa00000000e2", "p", "switch"),
            ("c000000000c1", "s000000000s1", "p", "contract"),
        ],
    )
    resolved = project.resolve(parse_plan(plan_text()))
    assert resolved.of("expand") == ["zz00000000e1", "aa00000000e2"]
    assert resolved.of("contract") == ["c000000000c1"]


def test_listed_revision_missing_or_mistagged(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        [
            ("b000000000b1", None, None, None),
            ("e000000000e1", "b000000000b1", "p", "expand"),
            ("s000000000s1", "e000000000e1", "p", "switch"),
        ],
    )
    extra = "\n    revisions: [e000000000e1, s000000000s1, ffffffffffff]"
    with pytest.raises(PlanError) as caught:
        project.resolve(parse_plan(plan_text(expand_extra=extra), "plans/p.yaml"))
    messages = [str(i) for i in caught.value.issues]
    assert any(
        "plans/p.yaml:7: phases.expand.revisions[1]" in m and "tagged plan='p', phase='switch'" in m
        for m in messages
    ), messages
    assert any("'ffffffffffff' does not exist" in m for m in messages), messages


def test_contract_before_expand_is_out_of_order(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        [
            ("b000000000b1", None, None, None),
            ("c000000000c1", "b000000000b1", "p", "contract"),
            ("e000000000e1", "c000000000c1", "p", "expand"),
        ],
    )
    with pytest.raises(PlanError) as caught:
        project.resolve(parse_plan(plan_text()))
    [issue] = caught.value.issues
    assert issue.file.endswith("e000000000e1.py") and issue.line == 6
    assert "comes after c000000000c1 (contract)" in issue.message


def test_an_expand_revision_appended_after_contract_is_the_one_named(tmp_path: Path) -> None:
    """`alembic revision` appends at the head: a new expand revision after the plan's switch
    and contract ones is one issue, at the new file, naming all three, not three issues
    blaming the old revisions."""
    project = make_project(
        tmp_path,
        [
            ("e000000000e1", None, "p", "expand"),
            ("s000000000s1", "e000000000e1", "p", "switch"),
            ("s000000000s2", "s000000000s1", "p", "switch"),
            ("c000000000c1", "s000000000s2", "p", "contract"),
            ("e000000000e2", "c000000000c1", "p", "expand"),
        ],
    )
    with pytest.raises(PlanError) as caught:
        project.resolve(parse_plan(plan_text()))
    [issue] = caught.value.issues
    assert issue.file.endswith("e000000000e2.py")
    assert (
        "comes after s000000000s1 (switch), s000000000s2 (switch), c000000000c1 (contract)"
        in issue.message
    )
    assert "tag it for contract or a later phase, or move it to a plan of its own" in issue.hint


def test_revision_tagged_for_a_phase_the_plan_lacks_or_backfill(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        [
            ("b000000000b1", None, "p", "backfill"),
            ("e000000000e1", "b000000000b1", "p", "expand"),
        ],
    )
    text = 'plan: p\napp: a\nbaseline_compatible: "<2"\nphases:\n  expand:\n    compatible: "<2"\n'
    with pytest.raises(PlanError, match="cannot be tagged 'backfill'"):
        project.resolve(parse_plan(text))


def test_other_plans_pending_phase_in_the_path_is_reported(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        [
            ("b000000000b1", None, None, None),
            ("o000000000e1", "b000000000b1", "other", "expand"),
            ("e000000000e1", "o000000000e1", "p", "expand"),
        ],
    )
    resolved = project.resolve(parse_plan(plan_text()))
    [foreign] = resolved.foreign["expand"]
    assert (foreign.revision, foreign.plan, foreign.phase) == ("o000000000e1", "other", "expand")


def test_missing_config_names_the_flag(tmp_path: Path) -> None:
    from phasegate.errors import UsageError

    with pytest.raises(UsageError, match="pass --config"):
        AlembicProject(tmp_path / "nope.ini")


def test_depends_on_is_a_parent_but_not_a_down_revision(tmp_path: Path) -> None:
    make_project(
        tmp_path,
        [
            ("b000000000b1", None, None, None),
            ("o000000000o1", "b000000000b1", None, None),
            ("e000000000e1", "b000000000b1", "p", "expand"),
        ],
    )
    path = tmp_path / "migrations" / "versions" / "e000000000e1.py"
    path.write_text(path.read_text().replace("depends_on = None", "depends_on = 'o000000000o1'"))
    info = AlembicProject(tmp_path / "alembic.ini").revisions["e000000000e1"]
    assert info.down_revisions == ("b000000000b1",)
    assert set(info.parents) == {"b000000000b1", "o000000000o1"}


# -- a revision that blocks at import (issue 18, item 16) --------------------------------------

SLEEPS_AT_IMPORT = '''"""Warms a cache at import: blocks for ever."""
import time

revision = "f00dcafe0001"
down_revision = "c0de1e7e0001"
time.sleep(10**6)


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''

WAITS_ON_A_SOCKET = '''"""Asks a service at import, and retries whatever goes wrong."""
import socket

revision = "f00dcafe0002"
down_revision = "c0de1e7e0001"
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
while True:
    try:
        client.recv(1)  # the server never answers
    except Exception:
        pass


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


def blocking_project(tmp_path: Path, name: str, source: str) -> Path:
    """The external 'shop' project, copied, with one blocking revision on top."""
    project = tmp_path / "shop"
    shutil.copytree(Path(__file__).parent / "external_project", project)
    (project / "migrations" / "versions" / name).write_text(source)
    return project


def run_cli(project: Path, *args: str, limit: str | None) -> tuple[int, str, float]:
    """The real CLI in a process of its own (a hang is killed after 30 s, not the suite)."""
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    if limit is not None:
        env["PHASEGATE_IMPORT_TIMEOUT"] = limit
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "phasegate", "--config", str(project / "alembic.ini"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_a_revision_that_sleeps_at_import_stops_validate_with_its_line(tmp_path: Path) -> None:
    project = blocking_project(tmp_path, "f00dcafe0001_slow.py", SLEEPS_AT_IMPORT)
    plan = str(project / "plans" / "customer_email.yaml")
    code, output, seconds = run_cli(project, "validate", plan, limit="2s")
    assert code == 2, output
    revision = project / "migrations" / "versions" / "f00dcafe0001_slow.py"
    assert f"{revision}:6 was still running after 2.0 s" in output
    assert "PHASEGATE_IMPORT_TIMEOUT" in output and "move that work into upgrade()" in output
    assert "Traceback" not in output
    assert seconds < 20


def test_a_revision_blocked_on_a_socket_stops_status_and_advance(tmp_path: Path) -> None:
    """A blocking recv, in a loop that swallows every Exception, still ends; nothing
    connects to the database (the URL is unreachable: a connection would exit 3)."""
    project = blocking_project(tmp_path, "f00dcafe0002_ask.py", WAITS_ON_A_SOCKET)
    plan = str(project / "plans" / "customer_email.yaml")
    revision = project / "migrations" / "versions" / "f00dcafe0002_ask.py"
    url = ["--database-url", "postgresql://nobody@127.0.0.1:1/none"]
    for command in (["status", plan], ["advance", plan, "--yes"]):
        code, output, _seconds = run_cli(project, *url, *command, limit="1")
        assert code == 2, (command, output)
        assert f"{revision}:10 was still running after 1.0 s" in output, output


def test_the_import_limit_is_read_from_the_environment(tmp_path: Path) -> None:
    project = blocking_project(tmp_path, "f00dcafe0001_slow.py", SLEEPS_AT_IMPORT)
    plan = str(project / "plans" / "customer_email.yaml")
    code, output, _seconds = run_cli(project, "validate", plan, limit="soon")
    assert code == 2 and "$PHASEGATE_IMPORT_TIMEOUT: 'soon' is not a duration" in output


def test_an_import_timeout_of_0_turns_the_limit_off(tmp_path: Path) -> None:
    """README: `PHASEGATE_IMPORT_TIMEOUT` ... `0` turns it off. A revision that takes 3 s
    at import fails validate under a 1 s limit and passes with 0 (it is waited for)."""
    slow = SLEEPS_AT_IMPORT.replace("time.sleep(10**6)", "time.sleep(3)")
    project = blocking_project(tmp_path, "f00dcafe0001_slow.py", slow)
    plan = str(project / "plans" / "customer_email.yaml")
    code, output, _seconds = run_cli(project, "validate", plan, limit="1s")
    assert code == 2 and "was still running after 1.0 s" in output, output
    code, output, _seconds = run_cli(project, "validate", plan, limit="0")
    assert code == 0, output
    assert "was still running" not in output
