"""Gate evaluation, check-deploy, settings and source parsing. No database."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version

from phasegate.config import load_config
from phasegate.durations import format_duration, parse_duration
from phasegate.errors import UsageError
from phasegate.gates import Observation, SourceFailure, check_deploy, evaluate
from phasegate.ledger import PlanState
from phasegate.plan import load_plan
from phasegate.sources import name_pattern, parse_command_output
from phasegate.trust import job_tables


def obs(*versions: str, source: str = "--live-version") -> list[Observation]:
    return [Observation(v, source, f"seen {v}") for v in versions]


def test_every_live_version_inside_passes() -> None:
    decision = evaluate("bugtracker", ">=1,<3", obs("1.4.2", "2.0.1"), "for entering backfill")
    assert decision.passed and decision.versions_ok
    assert "pass" in decision.message()


def test_a_version_outside_refuses_and_is_named_with_its_source() -> None:
    seen = [*obs("2.0"), Observation("1.4.2", "pg_stat_activity", "pid 42")]
    decision = evaluate("bugtracker", ">=2", seen, "for entering contract")
    assert not decision.passed
    assert [o.version for o in decision.outside] == ["1.4.2"]
    message = decision.message()
    assert "1.4.2 (pg_stat_activity: pid 42)" in message and "refused" in message
    assert "2.0" not in message.split("live:")[1]


def test_nothing_observed_fails_closed() -> None:
    decision = evaluate("bugtracker", ">=2", [], "for entering contract")
    assert not decision.passed
    assert "no live version of bugtracker was observed" in decision.message()
    assert "application_name 'bugtracker/<version>'" in decision.message()


def test_unparsable_version_fails_closed() -> None:
    decision = evaluate("bugtracker", ">=1", obs("2.0", "latest"), "for entering switch")
    assert not decision.passed
    assert [o.version for o in decision.unparsable] == ["latest"]
    assert "not PEP 440" in decision.message()


def test_prereleases_count_as_their_version() -> None:
    assert evaluate("a", ">=2", obs("2.1.0rc1"), "x").passed
    assert not evaluate("a", "<2", obs("2.0.0rc1"), "x").passed


def test_override_passes_but_says_so() -> None:
    decision = evaluate("a", ">=2", obs("1.0"), "x", override="v1 is draining, ticket 123")
    assert decision.passed and not decision.versions_ok
    assert decision.to_dict()["overridden"] is True
    assert "OVERRIDDEN (v1 is draining, ticket 123)" in decision.message()


def test_a_failed_source_refuses_even_when_every_seen_version_fits() -> None:
    failure = SourceFailure("versions_command", "`kubectl ...` exited with 1; its stderr: boom")
    decision = evaluate("a", ">=2", obs("2.0"), "x", failures=[failure])
    assert not decision.passed
    assert "a version source failed" in decision.message() and "boom" in decision.message()
    assert decision.to_dict()["failures"] == [failure.to_dict()]


def connection(version: str, role: str, trusted: bool) -> Observation:
    detail = f"1 connection as bugtracker/{version} by role {role}"
    return Observation(version, "pg_stat_activity", detail, role=role, trusted=trusted)


RULE = "a connection or heartbeat counts toward passing only when its role may use bug"


def test_an_untrusted_version_inside_the_range_counts_for_nothing() -> None:
    seen = [connection("2.0", "intruder", trusted=False)]
    decision = evaluate("bugtracker", ">=2", seen, "for entering contract", trust_rule=RULE)
    assert not decision.passed and not decision.observed
    message = decision.message()
    assert "no trusted live version of bugtracker was observed: seen but NOT trusted: 2.0" in (
        message
    )
    assert RULE in message and "If role intruder is the app's, grant it" in message
    assert decision.to_dict()["untrusted"][0]["role"] == "intruder"


def test_an_untrusted_version_outside_the_range_refuses() -> None:
    seen = [*obs("2.0"), connection("1.0", "intruder", trusted=False)]
    decision = evaluate("bugtracker", ">=2", seen, "for entering contract", trust_rule=RULE)
    assert not decision.passed and [o.version for o in decision.outside] == ["1.0"]
    assert "NOT trusted" not in decision.message()
    assert "Stop or upgrade those instances" in decision.message()


def test_a_trusted_version_passes_beside_an_untrusted_one() -> None:
    seen = [connection("2.0", "app", trusted=True), connection("2.1", "intruder", trusted=False)]
    decision = evaluate("bugtracker", ">=2", seen, "for entering contract", trust_rule=RULE)
    assert decision.passed
    assert "by role intruder) [not trusted]" in decision.message()


def test_the_plan_tables_are_its_jobs_tables() -> None:
    assert job_tables(SEED_PLAN) == ("root_cause", "bug")  # the sql job writes root_cause


# -- check-deploy ---------------------------------------------------------------------------

SEED_PLAN = load_plan(Path(__file__).resolve().parents[1] / "plans" / "bug_root_cause.yaml")


def deployable(version: str, **state: str | None) -> bool:
    return check_deploy(Version(version), SEED_PLAN, PlanState("p", **state)).allowed


def test_check_deploy_follows_the_plan_state() -> None:
    assert deployable("1.4") and not deployable("2.0")  # before the plan: "<2"
    assert not deployable("2.0", phase="expand")  # expand: "<2"
    assert deployable("2.0", phase="backfill") and not deployable("3.0", phase="backfill")
    assert deployable("2.5", phase="contract") and not deployable("1.9", phase="contract")


def test_check_deploy_mid_phase_needs_both_ends() -> None:
    running = {"phase": "expand", "state": "running", "active_phase": "backfill"}
    assert not deployable("2.0", **running, direction="advance")  # "<2" and ">=1,<3"
    assert deployable("1.5", **running, direction="advance")
    undoing = {"phase": "contract", "state": "failed", "active_phase": "contract"}
    check = check_deploy(Version("2.0"), SEED_PLAN, PlanState("p", **undoing, direction="rollback"))
    assert check.allowed  # ">=2" and, back at switch, ">=1"
    assert [spec for spec, _ in check.ranges] == [">=2", ">=1"]
    assert not deployable("1.5", **undoing, direction="rollback")


# -- durations, settings, sources' parsing ----------------------------------------------------


def test_durations() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300
    assert parse_duration("2min") == 120 and parse_duration("1.5h") == 5400
    assert parse_duration("250ms") == 0.25 and parse_duration(" 30 ") == 30
    with pytest.raises(ValueError, match=r"e\.g\. 90s"):
        parse_duration("soon")
    with pytest.raises(ValueError):
        parse_duration("5 weeks")
    assert format_duration(3.25) == "3.2 s" and format_duration(200) == "3 min 20 s"


def test_settings_default_without_files(tmp_path) -> None:
    config = load_config(tmp_path)
    assert config.source is None and config.heartbeat_ttl == 300
    assert config.plans_dir == tmp_path / "plans" and config.versions_command is None


def test_settings_from_pyproject_and_phasegate_toml(tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.phasegate]\nheartbeat_ttl = "2m"\n'
        'versions_command = ["./deployed-versions", "--json"]\n'
    )
    config = load_config(tmp_path)
    assert config.heartbeat_ttl == 120
    assert config.versions_command == ["./deployed-versions", "--json"]
    (tmp_path / "phasegate.toml").write_text('application_name = "{app}@{version}"\n')
    config = load_config(tmp_path)  # phasegate.toml wins
    assert config.application_name == "{app}@{version}" and config.heartbeat_ttl == 300
    assert config.trusted_roles == ()
    (tmp_path / "phasegate.toml").write_text('trusted_roles = ["app_pooler", "Ops"]\n')
    assert load_config(tmp_path).trusted_roles == ("app_pooler", "Ops")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('heartbeat_tll = "5m"\n', "unknown setting(s) heartbeat_tll"),
        ('heartbeat_ttl = "soon"\n', "heartbeat_ttl: 'soon' is not a duration"),
        ('application_name = "{app}"\n', "must hold {version} once"),
        ("versions_command = []\n", "versions_command must be"),
        ("heartbeat_ttl = \n", "not valid TOML"),
        ('trusted_roles = "app"\n', "trusted_roles must be a list of role names"),
        ('trusted_roles = ["app", ""]\n', "trusted_roles must be a list of role names"),
    ],
)
def test_settings_errors_name_the_file_and_key(tmp_path, text: str, expected: str) -> None:
    (tmp_path / "phasegate.toml").write_text(text)
    with pytest.raises(UsageError) as caught:
        load_config(tmp_path)
    assert expected in caught.value.message
    assert str(tmp_path / "phasegate.toml") in caught.value.message


def test_application_name_patterns() -> None:
    default = name_pattern("{app}/{version}", "bugtracker")
    assert default.fullmatch("bugtracker/2.0.1")["version"] == "2.0.1"
    assert default.fullmatch("bugtracker-admin/2.0") is None
    assert default.fullmatch("psql") is None
    custom = name_pattern("{app}:{instance}:v{version}", "shop")
    match = custom.fullmatch("shop:web-3:v1.4")
    assert match["version"] == "1.4" and match["instance"] == "web-3"
    assert name_pattern("{app}/{version}", None).fullmatch("crm/3.1")["app"] == "crm"


def test_versions_command_output_formats() -> None:
    assert parse_command_output("2.0\n\n# old\n1.9 web-2\n") == [("2.0", None), ("1.9", "web-2")]
    assert parse_command_output('["2.0", "2.1"]') == [("2.0", None), ("2.1", None)]
    as_objects = '{"versions": [{"version": "2.0", "instance": "pod-a"}]}'
    assert parse_command_output(as_objects) == [("2.0", "pod-a")]
    assert parse_command_output("") == []
    for bad in ('{"deployed": []}', "[2.0]", "[not json"):
        with pytest.raises(ValueError):
            parse_command_output(bad)


# -- the words a gate prints: operators act on them, --json consumers parse them -------------


def test_a_passing_gate_says_what_it_saw_and_how_long_it_waited() -> None:
    decision = evaluate("bugtracker", ">=1,<3", obs("1.4.2"), "for entering backfill")
    seen = "(seen: 1.4.2 (--live-version: seen 1.4.2))"
    assert decision.message() == (
        "gate for entering backfill: pass — every live bugtracker version is inside "
        f"'>=1,<3' {seen}"
    )
    decision.waited = 0.9  # under a second is no wait worth naming
    assert "waiting" not in decision.message()
    decision.waited = 1
    assert "pass after waiting 1.0 s — every" in decision.message()
    decision.waited = 75
    waited = "gate for entering backfill: pass after waiting 1 min 15 s — every"
    assert decision.message().startswith(waited)


def test_an_overridden_gate_names_the_reason_and_everything_it_overrode() -> None:
    decision = evaluate("bugtracker", ">=2", obs("1.0", "x1"), "for entering contract", "drain")
    decision.waited = 3
    message = (
        "gate for entering contract: OVERRIDDEN (drain) — after waiting 3.0 s, bugtracker "
        "versions outside '>=2' are live: 1.0 (--live-version: seen 1.0); "
        "x1 (--live-version: seen x1) (versions that are not PEP 440 count as outside)"
    )
    assert decision.message() == message
    decision.waited = 1
    assert "(drain) — after waiting 1.0 s, bugtracker" in decision.message()
    decision.waited = 3.26
    assert decision.to_dict()["waited_seconds"] == 3.3
    decision.waited = 3
    seen = [o.to_dict() for o in obs("1.0", "x1")]
    assert decision.to_dict() == {
        "app": "bugtracker",
        "target": "for entering contract",
        "compatible": ">=2",
        "passed": True,
        "overridden": True,
        "override_reason": "drain",
        "observed": seen,
        "outside": seen,  # the unparsable one too
        "untrusted": [],
        "trust_rule": "",
        "failures": [],
        "waited_seconds": 3,
        "message": message,
    }


def test_an_override_of_a_gate_that_passes_anyway_is_not_reported_as_overriding() -> None:
    decision = evaluate("a", ">=2", obs("2.0"), "x", override="just in case")
    assert decision.to_dict()["overridden"] is False
    assert decision.message().startswith("gate x: pass")


def test_a_refusal_for_nothing_seen_names_the_application_name_to_use() -> None:
    decision = evaluate("bugtracker", ">=2", [], "for entering contract")
    decision.naming = "bt/<version>"
    assert decision.message() == (
        "gate for entering contract: refused — no live version of bugtracker was observed: "
        "no connection with application_name 'bt/<version>' in pg_stat_activity, no fresh "
        "heartbeat, no versions command output and no --live-version given; phasegate fails "
        "closed. Connect the app with application_name 'bt/<version>', report heartbeats, or "
        "pass --live-version V, or pass --override-gate REASON"
    )


def test_a_refusal_for_untrusted_roles_names_each_role_once_and_the_default_rule() -> None:
    seen = [
        Observation("2.0", "pg_stat_activity", "c", role=None, trusted=False),
        Observation("2.1", "pg_stat_activity", "c", role="zed", trusted=False),
        Observation("2.2", "pg_stat_activity", "c", role="zed", trusted=False),
    ]
    assert evaluate("bugtracker", ">=2", seen, "x").message() == (
        "gate x: refused — no trusted live version of bugtracker was observed: seen but NOT "
        "trusted: 2.0 (pg_stat_activity: c); 2.1 (pg_stat_activity: c); "
        "2.2 (pg_stat_activity: c). Anyone who may connect can choose an application_name: "
        "only trusted roles count toward passing. If role (unknown), zed is the app's, grant "
        "it its privileges on the plan's tables or add it to trusted_roles in phasegate.toml; "
        "or pass --live-version V, or pass --override-gate REASON"
    )


def test_a_failed_source_and_an_outside_version_are_both_named_with_the_source_fix() -> None:
    failure = SourceFailure("versions_command", "exited with 1")
    decision = evaluate("a", ">=2", obs("1.0"), "x", failures=[failure])
    assert decision.message() == (
        "gate x: refused — a version source failed, so what runs is unknown: exited with 1; "
        "and a versions outside '>=2' are live: 1.0 (--live-version: seen 1.0). "
        "Fix the version source, or pass --override-gate REASON"
    )
    two = [failure, SourceFailure("heartbeats", "table missing")]
    assert (
        "unknown: exited with 1; table missing; and"
        in evaluate("a", ">=2", obs("1.0"), "x", failures=two).message()
    )
    assert (
        evaluate("a", ">=2", obs("1.0"), "x")
        .message()
        .endswith("Stop or upgrade those instances, or pass --override-gate REASON")
    )
    assert decision.problem() in decision.message()
    assert evaluate("a", ">=2", obs("2.0"), "x").problem() == ""


def test_check_deploy_says_why_each_range_applies() -> None:
    running = PlanState(
        "p", phase="expand", state="running", active_phase="backfill", direction=None
    )
    check = check_deploy(Version("2.0"), SEED_PLAN, running)
    assert check.message("2.0") == (
        "bug-root-cause: expand done, backfill advance running; bugtracker 2.0 may NOT be "
        "deployed: it must be in '<2' (once expand is done) and '>=1,<3' (backfill, which is "
        "running)"
    )
    assert check.to_dict() == {
        "plan": "bug-root-cause",
        "app": "bugtracker",
        "state": "expand done, backfill advance running",
        "ranges": [
            {"compatible": "<2", "why": "once expand is done"},
            {"compatible": ">=1,<3", "why": "backfill, which is running"},
        ],
        "allowed": False,
    }
    undoing = PlanState(
        "p", phase="contract", state="failed", active_phase="contract", direction="rollback"
    )
    assert check_deploy(Version("2.0"), SEED_PLAN, undoing).message("2.0") == (
        "bug-root-cause: contract done, contract rollback failed; bugtracker 2.0 may be "
        "deployed: it must be in '>=2' (once contract is done) and '>=1' (where the failed "
        "rollback of contract leads)"
    )
    fresh = check_deploy(Version("1.0"), SEED_PLAN, PlanState("p"))
    assert fresh.message("1.0") == (
        "bug-root-cause: not started; bugtracker 1.0 may be deployed: it must be in '<2' "
        "(before the plan)"
    )
    # a phase that stopped being active, or is done, adds no second range
    done = PlanState("p", phase="expand", state="done", active_phase="backfill")
    assert [spec for spec, _ in check_deploy(Version("1.0"), SEED_PLAN, done).ranges] == ["<2"]


def test_a_failed_source_with_nothing_seen_blames_only_the_source() -> None:
    """Nothing was observed because the source failed: "connect the app" would mislead."""
    failure = SourceFailure("versions_command", "exited with 1")
    assert evaluate("a", ">=2", [], "x", failures=[failure]).problem() == (
        "a version source failed, so what runs is unknown: exited with 1"
    )


def test_a_pass_lists_everything_it_saw() -> None:
    message = evaluate("a", ">=1", obs("1.0", "2.0"), "x").message()
    assert message.endswith(
        "(seen: 1.0 (--live-version: seen 1.0), 2.0 (--live-version: seen 2.0))"
    )


def test_a_release_candidate_may_be_deployed_where_its_release_may() -> None:
    assert deployable("2.5rc1", phase="contract") and not deployable("1.9rc1", phase="contract")
