"""Gates: may the schema move, given the app code versions running now?

A gate passes when every live version of the plan's app lies inside the `compatible`
range of the state the database is about to reach. It fails closed: a version that does
not parse, a version source that cannot answer, or no observation at all is a refusal
unless the operator overrides it explicitly (and the override lands in the event log).
A connection or heartbeat whose role is not trusted (see `trust`) still refuses when its
version is outside the range, but never counts as something observed.
The reverse question, whether version V may be deployed now, is `check_deploy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from phasegate.durations import format_duration
from phasegate.ledger import PlanState
from phasegate.plan import Plan
from phasegate.sources import (
    SOURCE_COMMAND_LINE,
    SOURCE_PG_STAT_ACTIVITY,
    Observation,
    SourceFailure,
)
from phasegate.text import one_line

__all__ = [
    "SOURCE_COMMAND_LINE",
    "SOURCE_PG_STAT_ACTIVITY",
    "DeployCheck",
    "GateDecision",
    "Observation",
    "SourceFailure",
    "check_deploy",
    "evaluate",
]


@dataclass
class GateDecision:
    app: str
    target: str  # e.g. "for entering contract", "for rolling back contract (back to switch)"
    compatible: str
    observations: list[Observation]
    outside: list[Observation] = field(default_factory=list)
    unparsable: list[Observation] = field(default_factory=list)
    failures: list[SourceFailure] = field(default_factory=list)
    override: str | None = None
    waited: float = 0.0
    naming: str = ""  # how a connection names itself, e.g. "bugtracker/<version>"
    untrusted: list[Observation] = field(default_factory=list)  # inside, but not trusted
    trust_rule: str = ""  # which roles count toward passing, in words

    @property
    def observed(self) -> bool:
        """Something that counts was seen: anything but an untrusted version inside."""
        return len(self.observations) > len(self.untrusted)

    @property
    def versions_ok(self) -> bool:
        return self.observed and not self.outside and not self.unparsable and not self.failures

    @property
    def passed(self) -> bool:
        return self.versions_ok or self.override is not None

    @property
    def _naming(self) -> str:
        return self.naming or f"{self.app}/<version>"

    def signature(self) -> tuple[object, ...]:
        """What the refusal is about, without details that change on every look
        (ages, pids): a waiting gate repeats itself only when this changes."""
        bad = [*self.outside, *self.unparsable]
        return (
            self.observed,
            tuple(sorted((o.version, o.source, o.instance or "") for o in bad)),
            tuple(sorted(f.source for f in self.failures)),
            tuple(sorted((o.version, o.source, o.role or "") for o in self.untrusted)),
        )

    def problem(self) -> str:
        """What stops the gate, in one sentence ('' when nothing does)."""
        if self.versions_ok:
            return ""
        problems = []
        if self.failures:
            problems.append(
                "a version source failed, so what runs is unknown: "
                + "; ".join(f.message for f in self.failures)
            )
        bad = [*self.outside, *self.unparsable]
        if not self.observed and not self.failures and self.untrusted:
            seen = "; ".join(o.describe() for o in self.untrusted)
            problems.append(
                f"no trusted live version of {self.app} was observed: seen but NOT "
                f"trusted: {seen}. Anyone who may connect can choose an application_name: "
                f"{one_line(self.trust_rule) or 'only trusted roles count toward passing'}"
            )
        elif not self.observed and not self.failures and not bad:
            problems.append(
                f"no live version of {self.app} was observed: no connection with "
                f"application_name '{self._naming}' in pg_stat_activity, no fresh "
                "heartbeat, no versions command output and no --live-version given; "
                "phasegate fails closed"
            )
        if bad:
            lines = "; ".join(o.describe() for o in bad)
            text = f"{self.app} versions outside {self.compatible!r} are live: {lines}"
            if self.unparsable:
                text += " (versions that are not PEP 440 count as outside)"
            problems.append(text)
        return "; and ".join(problems)

    def message(self) -> str:
        seen = (
            ", ".join(
                o.describe() + ("" if o.trusted else " [not trusted]") for o in self.observations
            )
            or "nothing"
        )
        if self.versions_ok:
            waited = f" after waiting {format_duration(self.waited)}" if self.waited >= 1 else ""
            return (
                f"gate {self.target}: pass{waited} — every live {self.app} version is inside "
                f"{self.compatible!r} (seen: {seen})"
            )
        problem = self.problem()
        if self.waited >= 1:
            problem = f"after waiting {format_duration(self.waited)}, {problem}"
        if self.override is not None:
            return f"gate {self.target}: OVERRIDDEN ({self.override}) — {problem}"
        if self.failures:
            fix = "Fix the version source"
        elif self.outside or self.unparsable:
            fix = "Stop or upgrade those instances"
        elif self.untrusted:
            roles = ", ".join(sorted({o.role or "(unknown)" for o in self.untrusted}))
            fix = (
                f"If role {roles} is the app's, grant it its privileges on the plan's tables "
                "or add it to trusted_roles in phasegate.toml; or pass --live-version V"
            )
        else:
            fix = (
                f"Connect the app with application_name '{self._naming}', report "
                "heartbeats, or pass --live-version V"
            )
        return f"gate {self.target}: refused — {problem}. {fix}, or pass --override-gate REASON"

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "target": self.target,
            "compatible": self.compatible,
            "passed": self.passed,
            "overridden": self.override is not None and not self.versions_ok,
            "override_reason": self.override,
            "observed": [o.to_dict() for o in self.observations],
            "outside": [o.to_dict() for o in [*self.outside, *self.unparsable]],
            "untrusted": [o.to_dict() for o in self.untrusted],
            "trust_rule": self.trust_rule,
            "failures": [f.to_dict() for f in self.failures],
            "waited_seconds": round(self.waited, 1),
            "message": self.message(),
        }


def evaluate(
    app: str,
    compatible: str,
    observations: list[Observation],
    target: str,
    override: str | None = None,
    failures: list[SourceFailure] | None = None,
    trust_rule: str = "",
) -> GateDecision:
    """Judge the observations; an untrusted one refuses like any other when its version is
    outside (or unreadable), and counts for nothing when it is inside."""
    spec = SpecifierSet(compatible)
    decision = GateDecision(
        app,
        target,
        compatible,
        list(observations),
        failures=list(failures or []),
        override=override,
        trust_rule=trust_rule,
    )
    for obs in observations:
        version = parse_version(obs.version)
        if version is None:
            decision.unparsable.append(obs)
        elif not spec.contains(version, prereleases=True):
            decision.outside.append(obs)
        elif not obs.trusted:
            decision.untrusted.append(obs)
    return decision


def parse_version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


# -- may version V be deployed now? ------------------------------------------------------------


@dataclass
class DeployCheck:
    """One plan's answer to `check-deploy`: the ranges V must lie in, and whether it does."""

    plan: str
    app: str
    where: str  # the plan's state in words
    ranges: list[tuple[str, str]]  # (specifier, why it applies)
    allowed: bool

    def message(self, version: str) -> str:
        ranges = " and ".join(f"{spec!r} ({why})" for spec, why in self.ranges)
        verdict = "may be deployed" if self.allowed else "may NOT be deployed"
        return f"{self.plan}: {self.where}; {self.app} {version} {verdict}: it must be in {ranges}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "app": self.app,
            "state": self.where,
            "ranges": [{"compatible": spec, "why": why} for spec, why in self.ranges],
            "allowed": self.allowed,
        }


def check_deploy(version: Version, plan: Plan, state: PlanState) -> DeployCheck:
    """V must work with the schema as it is now, and with where a running step leads.

    While a phase is running or failed half-way, the schema lies between two states, so
    V must be compatible with both ends.
    """
    done = state.phase
    ranges = [(plan.compatible_after(done), _after_words(done))]
    where = f"{done} done" if done else "not started"
    if state.state in ("running", "failed") and state.active_phase:
        active = state.active_phase
        if state.direction == "rollback":
            back_to = plan.previous_phase(active)
            ranges.append(
                (
                    plan.compatible_after(back_to),
                    f"where the {state.state} rollback of {active} leads",
                )
            )
        else:
            ranges.append((plan.phase(active).compatible, f"{active}, which is {state.state}"))
        where += f", {active} {state.direction or 'advance'} {state.state}"
    allowed = all(SpecifierSet(spec).contains(version, prereleases=True) for spec, _ in ranges)
    return DeployCheck(plan.name, plan.app, where, ranges, allowed)


def _after_words(phase: str | None) -> str:
    return "before the plan" if phase is None else f"once {phase} is done"
