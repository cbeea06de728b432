"""Tag resolution and validation over real Alembic script directories. No database."""

from __future__ import annotations

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
