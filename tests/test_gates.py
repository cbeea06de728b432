"""Gate evaluation: PEP 440 ranges, fail-closed, overrides. No database."""

from __future__ import annotations

from phasegate.gates import Observation, evaluate


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
