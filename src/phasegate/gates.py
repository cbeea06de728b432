"""Gates: which app code versions are running now, and may the schema move?

A gate passes when every live version of the plan's app lies inside the `compatible`
range of the state the database is about to reach. It fails closed: a version that does
not parse, or no observation at all, is a refusal unless the operator overrides it
explicitly (and the override lands in the event log).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from phasegate.db import Session

SOURCE_PG_STAT_ACTIVITY = "pg_stat_activity"
SOURCE_COMMAND_LINE = "--live-version"


@dataclass(frozen=True)
class Observation:
    """One live version seen by one source, with where exactly it was seen."""

    version: str
    source: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.version} ({self.source}{': ' + self.detail if self.detail else ''})"

    def to_dict(self) -> dict[str, str]:
        return {"version": self.version, "source": self.source, "detail": self.detail}


@dataclass
class GateDecision:
    app: str
    target: str  # e.g. "entering contract", "rolling back contract (back to switch)"
    compatible: str
    observations: list[Observation]
    outside: list[Observation] = field(default_factory=list)
    unparsable: list[Observation] = field(default_factory=list)
    override: str | None = None

    @property
    def observed(self) -> bool:
        return bool(self.observations)

    @property
    def versions_ok(self) -> bool:
        return self.observed and not self.outside and not self.unparsable

    @property
    def passed(self) -> bool:
        return self.versions_ok or self.override is not None

    def message(self) -> str:
        seen = ", ".join(o.describe() for o in self.observations) or "nothing"
        if self.versions_ok:
            return (
                f"gate {self.target}: pass — every live {self.app} version is inside "
                f"{self.compatible!r} (seen: {seen})"
            )
        if not self.observed:
            problem = (
                f"no live version of {self.app} was observed: no connection with "
                f"application_name '{self.app}/<version>' in pg_stat_activity and no "
                f"--live-version given; phasegate fails closed"
            )
        else:
            bad = [*self.outside, *self.unparsable]
            lines = "; ".join(o.describe() for o in bad)
            problem = f"{self.app} versions outside {self.compatible!r} are live: {lines}"
            if self.unparsable:
                problem += " (versions that are not PEP 440 count as outside)"
        if self.override is not None:
            return f"gate {self.target}: OVERRIDDEN ({self.override}) — {problem}"
        fix = (
            "Stop or upgrade those instances"
            if self.observed
            else f"Connect the app with application_name '{self.app}/<version>' or pass "
            "--live-version V"
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
            "message": self.message(),
        }


def observe(db: Session, app: str, cli_versions: Iterable[str] = ()) -> list[Observation]:
    """The union of every version source: pg_stat_activity and the command line."""
    found = [Observation(v, SOURCE_COMMAND_LINE) for v in dict.fromkeys(cli_versions)]
    with db.tx():
        rows = db.dicts(
            """
            SELECT substr(application_name, length(%(app)s) + 2) AS version,
                   array_agg(pid ORDER BY pid) AS pids,
                   array_agg(DISTINCT coalesce(host(client_addr), 'local socket')) AS clients
            FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND left(application_name, length(%(app)s) + 1) = %(app)s || '/'
            GROUP BY 1 ORDER BY 1
            """,
            {"app": app},
        )
    for row in rows:
        pids = ", ".join(str(p) for p in row["pids"][:5])
        more = f" and {len(row['pids']) - 5} more" if len(row["pids"]) > 5 else ""
        count = len(row["pids"])
        detail = (
            f"{count} connection{'s' if count > 1 else ''} as {app}/{row['version']}, "
            f"pid {pids}{more}, from {', '.join(row['clients'])}"
        )
        found.append(Observation(row["version"], SOURCE_PG_STAT_ACTIVITY, detail))
    return found


def evaluate(
    app: str,
    compatible: str,
    observations: list[Observation],
    target: str,
    override: str | None = None,
) -> GateDecision:
    spec = SpecifierSet(compatible)
    decision = GateDecision(app, target, compatible, list(observations), override=override)
    for obs in observations:
        try:
            version = Version(obs.version)
        except InvalidVersion:
            decision.unparsable.append(obs)
            continue
        if not spec.contains(version, prereleases=True):
            decision.outside.append(obs)
    return decision
