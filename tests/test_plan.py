"""Plan loading: valid plans, and errors that name file, line, key and fix. No database."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phasegate.plan import COMPLEX_KEY, PlanError, PlanIssue, load_plan, parse_plan

from .conftest import ALEMBIC_INI, HYPOTHESIS_PROFILE, PLAN

VALID = """\
plan: demo-plan
app: shop
baseline_compatible: "<2"
phases:
  expand:
    compatible: "<2"
  backfill:
    compatible: ">=1,<3"
    jobs:
      - name: copy
        table: customer
        set:
          email_normalized: lower(new.email)
        where: new.email_normalized IS NULL
        sync:
          down:
            email: new.email_normalized
  contract:
    compatible: ">=2"
"""


def assert_located(issues: list[dict[str, Any]], text: str) -> None:
    """Each issue of `text` (as `--json` or `PlanIssue.to_dict` gives it) points at a line
    that shows its key: the key itself, a missing key's parent, a job's list item. An issue
    with no key is the YAML's own (syntax, nesting, aliases), and still has its line."""
    lines = text.splitlines()
    for issue in issues:
        line, key = issue["line"], issue["key"]
        assert isinstance(line, int) and 1 <= line <= len(lines) + 1, issue
        if not key:
            yaml_own = "YAML" in issue["message"] or "alias" in issue["message"]
            assert yaml_own or "''" in issue["message"], issue  # or the key is empty text
            continue
        path = key.split(".")
        if issue["message"].startswith("missing required key"):
            path = path[:-1]
        if not path:  # a missing top-level key: the document's first line
            before = lines[: line - 1]
            assert all(not b.strip() or b.lstrip()[0] in "#-%" for b in before), issue
        elif issue["message"] in ("Keys should be strings", COMPLEX_KEY):
            continue  # a key that is not text (`? `, `1:`, `? [a]`): the line need not spell it
        elif re.search(r"\[\d+\]$", path[-1]):  # the job (or list item) itself
            assert lines[line - 1].lstrip().startswith("- "), (issue, lines[line - 1])
        else:
            leaf = re.sub(r"\[\d+\]$", "", path[-1])
            assert leaf in lines[line - 1], (issue, lines[line - 1])


def issues_of(text: str) -> list:
    with pytest.raises(PlanError) as caught:
        parse_plan(textwrap.dedent(text), "plans/x.yaml")
    return caught.value.issues


def test_bundled_plan_loads() -> None:
    plan = load_plan(PLAN)
    assert plan.name == "bug-root-cause"
    assert plan.phase_names() == ["expand", "backfill", "switch", "contract"]
    job = plan.jobs()[1]
    assert job.is_batched and job.new_columns == ["root_cause_id"]
    assert job.old_columns == ["root_cause"]
    assert len(plan.digest) == 64


def test_phase_navigation_and_ranges() -> None:
    plan = parse_plan(VALID)
    assert plan.next_phase(None) == "expand"
    assert plan.next_phase("backfill") == "contract"
    assert plan.next_phase("contract") is None
    assert plan.previous_phase("contract") == "backfill"
    assert plan.compatible_after(None) == "<2"
    assert plan.compatible_after("contract") == ">=2"


def test_unknown_key_names_line_key_and_allowed_keys() -> None:
    [issue] = issues_of(VALID.replace("        where:", "        wher:"))
    assert issue.line == 14
    assert issue.key == "phases.backfill.jobs[0].wher"
    assert "unknown key 'wher'" in issue.message
    assert "where" in issue.hint and "set" in issue.hint
    assert issue.hint.startswith("did you mean 'where'?")
    assert str(issue).startswith("plans/x.yaml:14: phases.backfill.jobs[0].wher:")


def test_a_misspelt_phase_gets_a_suggestion_and_a_far_one_does_not() -> None:
    [issue] = issues_of(VALID.replace("  contract:", "  contrat:"))
    assert issue.hint.startswith("did you mean 'contract'?")
    [issue] = issues_of(VALID.replace("  contract:", "  teardown:"))
    assert issue.hint == "phases are expand, backfill, switch and contract"


def test_every_issue_is_reported_at_once() -> None:
    text = VALID.replace('compatible: "<2"\n  backfill', 'compatible: "2"\n  backfill').replace(
        "app: shop", "app: shop\ncolour: blue"
    )
    issues = issues_of(text)
    keys = {i.key for i in issues}
    assert keys == {"colour", "phases.expand.compatible"}
    spec = next(i for i in issues if i.key == "phases.expand.compatible")
    assert "not a PEP 440 version specifier" in spec.message and spec.line == 7


def test_missing_required_key_points_at_parent() -> None:
    [issue] = issues_of(VALID.replace('    compatible: ">=2"\n', "    revisions: [abc]\n"))
    assert issue.key == "phases.contract.compatible"
    assert "missing required key 'compatible'" in issue.message
    assert issue.line == 18


def test_phases_out_of_order() -> None:
    text = """\
    plan: p
    app: a
    baseline_compatible: "<2"
    phases:
      contract:
        compatible: ">=2"
      expand:
        compatible: "<2"
    """
    [issue] = issues_of(text)
    assert issue.key == "phases.expand" and issue.line == 7
    assert "expand → backfill → switch → contract" in issue.hint


def test_unquoted_specifier_is_a_yaml_error_with_a_hint() -> None:
    [issue] = issues_of(VALID.replace('compatible: ">=2"', "compatible: >=2"))
    assert issue.line == 19
    assert "quote version specifiers" in issue.hint


def test_number_instead_of_specifier_asks_for_quotes() -> None:
    [issue] = issues_of(VALID.replace('compatible: ">=2"', "compatible: 2"))
    assert issue.key == "phases.contract.compatible" and "quote it" in issue.hint


def test_duplicate_keys_are_errors() -> None:
    issues = issues_of(VALID.replace("app: shop", "app: shop\napp: other"))
    assert [(i.key, i.line) for i in issues] == [("app", 3)]


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("        table: customer", "        sql: SELECT 1\n        table: customer", "not both"),
        ("        where: new.email_normalized IS NULL\n", "", "missing: where"),
        ("            email: new.email_normalized", "            email_normalized: x", "both"),
        ("      - name: copy", "      - name: Copy Job", "is not allowed"),
        ("    jobs:\n", "    revisions: [abc]\n    jobs:\n", "backfill runs jobs only"),
        (
            "          down:\n            email: new.email_normalized\n",
            "          down: {}\n",
            "sync.down",
        ),
    ],
)
def test_job_rules(replace: str, by: str, message: str) -> None:
    issues = issues_of(VALID.replace(replace, by))
    assert any(message in f"{i.message} {i.hint}" for i in issues), issues


def test_duplicate_job_names() -> None:
    text = VALID.replace("  contract:", "      - name: copy\n        sql: SELECT 1\n  contract:")
    [issue] = issues_of(text)
    assert "two jobs are named 'copy'" in issue.message


def test_not_a_mapping_and_empty_phases() -> None:
    assert "a plan is a YAML mapping" in issues_of("- a\n- b\n")[0].message
    text = 'plan: p\napp: a\nbaseline_compatible: "<2"\nphases: {}\n'
    assert "at least one phase" in issues_of(text)[0].message


def test_an_empty_plan_is_located_at_its_first_line() -> None:
    """File and line always: an empty file (or one of comments only) is refused at line 1."""
    for text in ("", "# nothing yet\n"):
        [issue] = issues_of(text)
        assert (issue.line, issue.message) == (1, "a plan is a YAML mapping")
        assert str(issue).startswith("plans/x.yaml:1: a plan is a YAML mapping")
    missing = issues_of("{}\n")  # a mapping with no keys: each missing key at line 1
    assert {(i.line, i.key) for i in missing} == {
        (1, "plan"),
        (1, "app"),
        (1, "baseline_compatible"),
        (1, "phases"),
    }


def test_a_list_or_mapping_as_a_key_is_an_invalid_plan_with_its_line() -> None:
    """YAML's complex keys (`? [a]`) are bad input like any other: exit 2 at their line,
    not an internal error (exit 3) from hashing them."""
    for text, line in (("? [a]\n: b\n", 1), ("plan: p\nphases:\n  ? {x: 1}\n  : y\n", 3)):
        issues = issues_of(text)
        assert any(i.line == line and COMPLEX_KEY in i.message for i in issues), issues
        assert_located([i.to_dict() for i in issues], text)


def test_unreadable_file(tmp_path) -> None:
    with pytest.raises(PlanError, match="cannot read the plan"):
        load_plan(tmp_path / "missing.yaml")


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_either_loads_or_raises_plan_error(text: str) -> None:
    """Bad input never escapes as a crash: it is a PlanError with located issues."""
    try:
        parse_plan(text, "fuzz.yaml")
    except PlanError as exc:
        assert exc.issues and all(i.file == "fuzz.yaml" for i in exc.issues)
        assert_located([i.to_dict() for i in exc.issues], text)


@pytest.mark.hypothesis  # in CI's random run too, where it checks the draws differ
def test_property_tests_draw_the_same_examples_each_run_unless_random_is_asked_for() -> None:
    """CI's default run is reproducible (a red run fails the same way again); the run with
    PHASEGATE_HYPOTHESIS=random draws new examples, so many runs cover more cases."""
    runs: list[list[str]] = []

    @settings(max_examples=30, deadline=None)
    @given(st.text(max_size=20))
    def draw(text: str) -> None:
        runs[-1].append(text)

    for _ in range(2):
        runs.append([])
        draw()
    if HYPOTHESIS_PROFILE == "random":
        assert runs[0] != runs[1]
    else:
        assert runs[0] == runs[1]


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=VALID.count("\n") - 1), st.sampled_from(["x", ":", "-"]))
def test_corrupted_lines_of_a_valid_plan_are_located(line: int, junk: str) -> None:
    lines = VALID.splitlines()
    lines[line] = lines[line] + junk
    text = "\n".join(lines) + "\n"
    try:
        parse_plan(text, "fuzz.yaml")
    except PlanError as exc:
        assert_located([i.to_dict() for i in exc.issues], text)


def test_sync_object_names_are_one_to_one_and_fit() -> None:
    from phasegate.sync import object_name

    assert object_name("p", "x-y") != object_name("p", "x_y")
    assert object_name("bug-root", "cause-id") != object_name("bug", "root-cause-id")
    long = object_name("a" * 40, "b" * 40)
    assert len(long) <= 63 and long == object_name("a" * 40, "b" * 40)


# -- bounds: alias bombs and deep nesting (issue 18, item 15) ---------------------------------

# 340 bytes that expand to 9**7 (4.8 million) strings: 17 s and 1.1 GB in `validate` before
ALIAS_BOMB = """\
plan: bomb
app: shop
baseline_compatible: "<2"
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
phases:
  expand:
    compatible: "<2"
"""


def validate_in_a_process(path: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The real CLI in a process of its own, so a runaway parse is killed, not the suite."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "phasegate", "--config", str(ALEMBIC_INI), "validate", path],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return done, time.monotonic() - started


@pytest.mark.slow
def test_an_alias_bomb_is_refused_at_once_with_its_line(tmp_path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    done, seconds = validate_in_a_process(str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{path}:9: the YAML expands to more than 100,000 nodes" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert seconds < 10


@pytest.mark.slow
def test_deep_nesting_is_refused_by_the_cli_without_a_crash(tmp_path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("plan: deep\napp: shop\nx: " + "[" * 10_000 + "]" * 10_000 + "\n")
    done, _seconds = validate_in_a_process(str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{path}:3: the YAML is nested more than 64 levels deep" in done.stdout
    assert "internal error" not in done.stderr


def test_deep_nesting_is_an_invalid_plan_with_its_line() -> None:
    issue = issues_of("plan: deep\nphases:\n  x: " + "{a: " * 65 + "1" + "}" * 65 + "\n")[0]
    assert (issue.line, issue.message) == (3, "the YAML is nested more than 64 levels deep")


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    [issue] = issues_of("plan: loop\nphases:\n  expand: &a\n    compatible: [*a]\n")
    assert issue.line == 4 and "alias *a refers to a node that contains it" in issue.message


def test_plans_that_share_values_through_aliases_still_load() -> None:
    text = VALID.replace('baseline_compatible: "<2"', 'baseline_compatible: &old "<2"')
    text = text.replace('  expand:\n    compatible: "<2"', "  expand:\n    compatible: *old")
    text = text.replace("table: customer", "table: &t customer\n        batch_size: &n 500")
    plan = parse_plan(text, "plans/aliases.yaml")
    assert plan.phase("expand").compatible == "<2" and plan.jobs()[0].table == "customer"
    assert plan.jobs()[0].batch_size == 500


@pytest.mark.slow
def test_many_small_aliases_stay_inside_the_node_budget() -> None:
    """Far more nodes than any real plan, through aliases, stay well inside the budget."""
    text = VALID.replace('baseline_compatible: "<2"', 'baseline_compatible: &old "<2"')
    text = text.replace("table: customer", "table: &t customer\n        batch_size: &n 500")
    jobs = "".join(
        f"      - {{name: j{i}, table: *t, set: {{c: *old}}, where: *old, batch_size: *n}}\n"
        for i in range(2000)
    )
    big = text.replace("  contract:\n", jobs + "  contract:\n", 1)
    assert len(parse_plan(big, "plans/many.yaml").jobs()) == 2001


# -- each error in full: the file, line, key, message and hint an author fixes it from ----------


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        (
            '    compatible: ">=1,<3"\n',
            '    compatible: ">=1,<3"\n    revisions: [abc]\n',
            "plans/x.yaml:9: phases.backfill.revisions: unknown key 'revisions'. "
            "backfill runs jobs only; tag schema changes expand or switch",
        ),
        (
            '    compatible: ">=2"',
            "    compatible: 2",
            "plans/x.yaml:19: phases.contract.compatible: expected text, got int. "
            'quote it, e.g. ">=2"',
        ),
        (
            "name: copy",
            "name: Copy Job",
            "plans/x.yaml:10: phases.backfill.jobs[0].name: 'Copy Job' is not allowed. "
            "lowercase letters, digits, `-` and `_`",
        ),
        (
            "app: shop",
            "app: shop\napps: x",
            "plans/x.yaml:3: apps: unknown key 'apps'. did you mean 'app'? (allowed keys here: "
            "plan, description, app, baseline_compatible, phases)",
        ),
        (
            "app: shop\n",
            "",
            "plans/x.yaml:1: app: missing required key 'app'. the application whose running "
            "versions gate this plan, e.g. `app: bugtracker`",
        ),
        (
            "        where:",
            "        zzzzz:",
            "plans/x.yaml:14: phases.backfill.jobs[0].zzzzz: unknown key 'zzzzz'. allowed keys "
            "here: name, sql, table, key, set, where, sync, batch_size",
        ),
    ],
)
def test_an_error_reads_in_full(replace: str, by: str, expected: str) -> None:
    [issue] = issues_of(VALID.replace(replace, by))
    assert str(issue) == expected
    file, line, key, rest = expected.split(":", 3)
    message, _, hint = rest.strip().partition(". ")
    assert issue.to_dict() == {
        "file": file,
        "line": int(line),
        "key": key.strip(),
        "message": message,
        "hint": hint,
    }


CHECK_THERE = "check the indentation and quoting there"


@pytest.mark.parametrize(
    ("replace", "by", "line", "message", "hint"),
    [
        # where the parser gave up (line 3), not where the open list began (line 2)
        ("app: shop", "app: [shop", 3, "expected ',' or ']', but got ':'", CHECK_THERE),
        (
            'compatible: ">=2"',
            "compatible: >=2",
            19,
            "expected chomping or indentation indicators, but found '='",
            'quote version specifiers: compatible: ">=2"',
        ),
        # a control character, named as it would be written in a string
        ("app: shop", "app: sh\x07op", 2, "character '\\x07' is not allowed in YAML", CHECK_THERE),
    ],
)
def test_a_yaml_error_reads_in_full(
    replace: str, by: str, line: int, message: str, hint: str
) -> None:
    [issue] = issues_of(VALID.replace(replace, by))
    assert issue.to_dict() == {
        "file": "plans/x.yaml",
        "line": line,
        "key": "",
        "message": f"not valid YAML: {message}",
        "hint": hint,
    }


def test_a_validators_message_comes_without_pydantics_prefix_or_an_unrelated_hint() -> None:
    [issue] = issues_of(
        VALID.replace('compatible: "<2"\n  backfill', 'compatible: "2"\n  backfill')
    )
    assert issue.to_dict() == {
        "file": "plans/x.yaml",
        "line": 6,
        "key": "phases.expand.compatible",
        "message": "'2' is not a PEP 440 version specifier; write e.g. '>=2', '<3' or '>=1,<3'",
        "hint": "",
    }
    down = "          down:\n            email: new.email_normalized\n"
    [issue] = issues_of(VALID.replace(down, "          {}\n"))
    assert str(issue) == (
        "plans/x.yaml:15: phases.backfill.jobs[0].sync.down: missing required key 'down'"
    )
    assert str(PlanIssue("f.yaml", None, "", "unreadable", "")) == "f.yaml: unreadable"
