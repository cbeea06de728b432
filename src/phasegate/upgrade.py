"""`phasegate upgrade`: what a deploy runs instead of `alembic upgrade head`.

It applies every revision that is safe now and stops before the first revision of a
plan's phase that phasegate has not run (not started, or running or failed part way:
phasegate resumes those). Safe means what the revision guard allows (`phasegate.guard`):
a revision of no plan, or of a phase the ledger records as done. A plan's revisions are
what its file in the plans directory resolves them to (tags, or a `revisions:` list); a
tagged revision of a plan with no file there counts as not started. Every head's path
is followed, so a branched history goes as far as each branch may.

The computation (`plan_upgrade`) needs no database beyond the heads and the ledger's
states; `run` applies it under the orchestrator lock and records each revision in the
event log inside that revision's transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationInfo

from phasegate import guard, ledger
from phasegate.db import Session
from phasegate.errors import PhasegateError, RuntimeFailure
from phasegate.plan import Plan
from phasegate.revisions import AlembicProject

Notify = Callable[[str], None]


@dataclass(frozen=True)
class Owner:
    """The plan and phase a revision belongs to; `source` None: no plan file for it."""

    plan: str
    phase: str
    source: str | None


@dataclass
class Left:
    """One phase of a plan whose revisions wait for phasegate."""

    plan: str
    phase: str
    source: str | None
    why: str
    revisions: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        source = self.source or f"<plan file of {self.plan}>"
        return f"phasegate advance {source} --to {self.phase}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "phase": self.phase,
            "source": self.source,
            "why": self.why,
            "revisions": self.revisions,
            "command": self.command,
        }


@dataclass
class UpgradePlan:
    """What an upgrade applies, in graph order, and what it leaves."""

    apply: list[str]  # every revision that runs, parents first
    targets: list[str]  # the furthest of them on each path: what Alembic is asked for
    left: list[Left]  # per plan and phase, the revisions phasegate must run
    waiting: list[str]  # other revisions that come after those, so wait with them


def owners(project: AlembicProject, plans: list[Plan]) -> dict[str, Owner]:
    """Revision → its plan and phase: the plan files' resolution, then the tags of
    revisions whose plan has no file (those count as not started)."""
    found: dict[str, Owner] = {}
    for plan in plans:
        for phase, revisions in project.resolve(plan).by_phase.items():
            for revision in revisions:
                found[revision] = Owner(plan.name, phase, _shown(plan.source))
    for revision, info in project.revisions.items():
        if revision not in found and info.plan and info.phase:
            found[revision] = Owner(info.plan, info.phase, None)
    return found


def _shown(source: str) -> str:
    """A plan file as a command line would name it: relative to here when below it."""
    path = Path(source)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (OSError, ValueError):
        return source


def plan_upgrade(
    project: AlembicProject,
    heads: tuple[str, ...],
    owned: dict[str, Owner],
    states: dict[str, ledger.PlanState],
) -> UpgradePlan:
    """Split the revisions not yet applied into those that run now and those that wait."""
    applied = project.applied(heads)
    pending = [r for r in project.order if r not in applied]  # parents before children
    left: dict[tuple[str, str], Left] = {}
    blocked: set[str] = set()
    for revision in pending:
        owner = owned.get(revision)
        if owner is None:
            continue
        why = _why_not(owner, states.get(owner.plan))
        if why is None:
            continue
        blocked.add(revision)
        entry = left.setdefault(
            (owner.plan, owner.phase), Left(owner.plan, owner.phase, owner.source, why)
        )
        entry.revisions.append(revision)
    # a revision waits when it, or anything it needs, waits
    held: set[str] = set()
    for revision in pending:
        parents = project.revisions[revision].parents
        if revision in blocked or any(p in held for p in parents):
            held.add(revision)
    apply = [r for r in pending if r not in held]
    needed = {p for r in apply for p in project.revisions[r].parents}
    targets = [r for r in apply if r not in needed]
    waiting = [r for r in pending if r in held and r not in blocked]
    return UpgradePlan(apply, targets, list(left.values()), waiting)


def _why_not(owner: Owner, state: ledger.PlanState | None) -> str | None:
    """Why phasegate must run this phase's revisions itself, or None when they may run."""
    if owner.source is None:
        return "no plan file in the plans directory: add it there"
    row = None
    if state is not None:
        row = guard.LedgerRow(state.phase, state.state, state.active_phase, state.direction)
    if guard.phase_done(row, owner.phase):
        return None
    return guard.not_done(row, owner.phase)


@dataclass
class UpgradeResult:
    applied: list[str]
    plan: UpgradePlan
    heads_before: tuple[str, ...]
    heads: tuple[str, ...]

    def to_dict(self, project: AlembicProject) -> dict[str, Any]:
        return {
            "applied": [_describe(project, r) for r in self.applied],
            "left": [entry.to_dict() for entry in self.plan.left],
            "waiting": [_describe(project, r) for r in self.plan.waiting],
            "heads_before": list(self.heads_before),
            "heads": list(self.heads),
        }


def _describe(project: AlembicProject, revision: str) -> dict[str, Any]:
    info = project.revisions[revision]
    return {"revision": revision, "doc": info.doc, "plan": info.plan, "phase": info.phase}


def pending(db: Session, project: AlembicProject, plans: list[Plan]) -> UpgradeResult:
    """What `run` would do now, read without writing anything (not even the ledger) and
    without the orchestrator lock: a deploy during a long backfill, with nothing new to
    apply, must not wait for the lock or fail on it."""
    heads = _known_heads(db, project)
    with db.tx():
        states = {state.plan: state for state in ledger.all_states(db)}
    plan = plan_upgrade(project, heads, owners(project, plans), states)
    return UpgradeResult([], plan, heads, heads)


def _known_heads(db: Session, project: AlembicProject) -> tuple[str, ...]:
    heads = project.current_heads(db)
    unknown = [head for head in heads if head not in project.revisions]
    if unknown:
        raise RuntimeFailure(
            f"the database is at revision(s) {', '.join(unknown)}, which {project.location} "
            "does not have (deployed by newer code?); nothing was applied. Run phasegate "
            "from the code that has them"
        )
    return heads


def run(
    db: Session,
    project: AlembicProject,
    plans: list[Plan],
    actor: str,
    notify: Notify,
) -> UpgradeResult:
    """Apply every revision that is safe now (we hold the orchestrator lock)."""
    owned = owners(project, plans)
    heads_before = _known_heads(db, project)
    ledger.ensure_schema(db)
    with db.tx():
        states = {state.plan: state for state in ledger.all_states(db)}
    plan = plan_upgrade(project, heads_before, owned, states)

    def record(step: MigrationInfo, heads: tuple[str, ...]) -> None:
        revision = step.up_revision_id or ""
        owner = owned.get(revision)
        ledger.record_event(
            db,
            owner.plan if owner else None,
            "revision.applied",
            actor,
            owner.phase if owner else None,
            {"revision": revision, "heads": list(heads), "by": "upgrade"},
        )
        notify(f"  applied {project.revisions[revision].describe()}")

    try:
        for target in plan.targets:
            notify(f"upgrading to {project.revisions[target].describe()}")
            db.retrying(f"the upgrade to {target}", lambda t=target: project.upgrade(db, t, record))
    except BaseException as exc:
        _record_failure(db, actor, exc)
        raise
    heads = project.current_heads(db)
    result = UpgradeResult(plan.apply, plan, heads_before, heads)
    with db.tx():
        ledger.record_event(db, None, "upgrade.completed", actor, None, result.to_dict(project))
    return result


def _record_failure(db: Session, actor: str, exc: BaseException) -> None:
    """Best effort: the connection may be gone, and the original error is what matters."""
    message = exc.message if isinstance(exc, PhasegateError) else f"{type(exc).__name__}: {exc}"
    try:
        db.reset()
        with db.tx():
            ledger.record_event(db, None, "upgrade.failed", actor, None, {"error": message[:2000]})
    except Exception:
        pass
