"""One plan is one contract: the jobs as the backfill phase started them.

When the backfill phase starts, every job's definition (table, key, set, where, sync; or
the `sql` statement) is recorded in the ledger with a digest. From then on every process
that works on the phase must run exactly those jobs: a `phasegate worker` started from a
checkout whose plan was edited would otherwise write its own expressions into the slices
it claims, and a resume after an edit would leave some rows with the old result and some
with the new one, while verification, which only counts `where`, says done.

This module is pure: what a job's definition is, and how a file differs from what was
recorded. Expressions are compared as PostgreSQL's parser reads them, so re-indenting a
YAML block or adding a comment is not a change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pglast import parse_sql
from pglast.stream import RawStream

from phasegate.plan import Job, Plan


@dataclass(frozen=True)
class Recorded:
    """One job's entry in the ledger (`phasegate.job_contract`)."""

    job: str
    position: int
    digest: str
    definition: dict[str, Any]


@dataclass(frozen=True)
class Difference:
    """Where the file's job differs from the recorded one."""

    job: str
    key: str  # dotted, as in the file ("set.root_cause_id", "where"); "job": added or
    # removed; "order": jobs that were recorded are in another order now
    recorded: Any
    now: Any
    line: int | None = None

    def describe(self, source: str) -> str:
        where = f"{source}:{self.line}: " if self.line else ""
        if self.key == "job":
            change = (
                "is not in the file any more"
                if self.now is None
                else "was added to the file since the phase started"
            )
            return f"{where}job {self.job!r} {change}"
        if self.key == "order":
            return (
                f"{where}the jobs were in the order {', '.join(self.recorded)} and are now in "
                f"the order {', '.join(self.now)} (one table's sync logic applies in plan order)"
            )
        return (
            f"{where}job {self.job!r}: `{self.key}` was {_shown(self.recorded)} when the phase "
            f"started, the file now says {_shown(self.now)}"
        )


def definition(job: Job) -> dict[str, Any]:
    """What binds every process that works on the job: what it writes, where, and how
    the sync trigger keeps it; not how fast (batch size is a knob, not the contract)."""
    if not job.is_batched:
        return {"sql": normalized(job.sql or "", statement=True)}
    return {
        "table": job.table,
        "key": job.key_columns,
        "set": {column: normalized(e) for column, e in sorted((job.set_ or {}).items())},
        "where": normalized(job.where or ""),
        "sync": (
            {"down": {column: normalized(e) for column, e in sorted(job.sync.down.items())}}
            if job.sync is not None
            else None
        ),
    }


def digest(job_definition: dict[str, Any]) -> str:
    text = json.dumps(job_definition, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def normalized(text: str, statement: bool = False) -> str:
    """SQL as PostgreSQL's parser reads it (whitespace and comments do not count); the
    text with its whitespace collapsed where the parser refuses it."""
    source = text if statement else f"SELECT ({text}\n)"
    try:
        printed = "; ".join(RawStream()(raw) for raw in parse_sql(source))
        return printed if statement else printed.removeprefix("SELECT ")
    except Exception:  # a ParseError, or the printer refusing an exotic node: compare text
        return " ".join(text.split())


def entries(plan: Plan) -> list[Recorded]:
    """The plan file's jobs as they would be recorded now."""
    found = []
    for position, job in enumerate(plan.jobs()):
        shape = definition(job)
        found.append(Recorded(job.name, position, digest(shape), shape))
    return found


def differences(plan: Plan, recorded: list[Recorded]) -> list[Difference]:
    """Every way the file's jobs differ from `recorded` (empty: the same contract)."""
    now = {entry.job: entry for entry in entries(plan)}
    before = {entry.job: entry for entry in recorded}
    found: list[Difference] = []
    kept_before = [e.job for e in sorted(recorded, key=lambda e: e.position) if e.job in now]
    kept_now = [job for job in now if job in before]
    if kept_before != kept_now:  # jobs added or removed around them do not count
        first = next(a for a, b in zip(kept_before, kept_now, strict=True) if a != b)
        found.append(
            Difference(first, "order", kept_before, kept_now, _line(plan, now[first].position))
        )
    for entry in recorded:
        current = now.get(entry.job)
        if current is None:
            found.append(Difference(entry.job, "job", entry.definition, None))
        elif current.digest != entry.digest:
            found += _field_differences(plan, entry, current)
    for name, current in now.items():
        if name not in before:
            found.append(
                Difference(name, "job", None, current.definition, _line(plan, current.position))
            )
    return found


def _field_differences(plan: Plan, recorded: Recorded, current: Recorded) -> list[Difference]:
    """The keys of one job that changed, each at its line in the file."""
    found = []
    for key, was, now in _flat(recorded.definition, current.definition):
        path = ("phases", "backfill", "jobs", current.position, *key.split("."))
        found.append(Difference(current.job, key, was, now, plan.line_of(*path)))
    return found


def _flat(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[Any]:
    """(dotted key, before, after) for every leaf that differs."""
    found = []
    for key in sorted(set(before) | set(after), key=str):
        was, now = before.get(key), after.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(was, dict) and isinstance(now, dict):
            found += _flat(was, now, f"{dotted}.")
        elif was != now:
            found.append((dotted, was, now))
    return found


def _line(plan: Plan, position: int) -> int | None:
    return plan.line_of("phases", "backfill", "jobs", position)


def _shown(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value, sort_keys=True)}`"
