"""The phase state machine: status, gate, advance, run one phase, rollback.

 (not started) --expand--> expanded --backfill--> backfilled --switch--> switched
                                                               --contract--> done

Alembic's version table and the job checkpoints are the truth about where the database
is; the ledger records which phase a plan reached. A phase that failed part-way is the
plan's *active* phase: `advance` runs it again (everything it does is idempotent) and
`rollback` undoes it. Every step is gated on the live app versions, and every decision
lands in the event log.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from alembic.runtime.migration import MigrationInfo

from phasegate import (
    backfill,
    contract,
    emptied,
    failpoints,
    gates,
    keys,
    ledger,
    plan_lint,
    sources,
    sync,
    trust,
)
from phasegate.config import ProjectConfig
from phasegate.db import Session, orchestrator_running
from phasegate.durations import format_duration
from phasegate.errors import PhasegateError, Refused, RuntimeFailure, UsageError
from phasegate.pacing import BackfillSettings
from phasegate.plan import Job, Plan, PlanError
from phasegate.revisions import AlembicProject, PlanRevisions

START = "start"  # `rollback --to start`: undo every phase
GATE_POLL_SECONDS = 2.0  # how often a waiting gate looks again
GATE_REMIND_SECONDS = 30.0  # how often it repeats an unchanged reason while it waits


@dataclass
class Options:
    actor: str
    live_versions: tuple[str, ...] = ()
    override_gate: str | None = None
    allow_data_loss: bool = False
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    wait: float = 0.0  # seconds a refused gate is polled before it counts as refused
    allow_unsafe: str | None = None  # run despite lint errors; the reason is logged
    config: ProjectConfig = field(default_factory=ProjectConfig)
    restart_jobs: tuple[str, ...] = ()  # re-walk these jobs from their first key (new contract)


@dataclass
class Step:
    phase: str
    direction: str  # "advance" | "rollback"
    result: str  # "done" | "noop" | "refused"
    message: str
    gate: dict[str, Any] | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "direction": self.direction,
            "result": self.result,
            "message": self.message,
            "gate": self.gate,
            "jobs": self.jobs,
        }


@dataclass
class Outcome:
    """What a mutating command did, step by step; `refused` decides exit code 1."""

    plan: str
    steps: list[Step]
    status: dict[str, Any]

    @property
    def refused(self) -> bool:
        return any(s.result == "refused" for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "refused": self.refused,
            "steps": [s.to_dict() for s in self.steps],
            "status": self.status,
        }


Notify = Callable[[str], None]


class Orchestrator:
    """Drives one plan against one database through one connection."""

    def __init__(
        self,
        db: Session,
        project: AlembicProject,
        plan: Plan,
        options: Options,
        progress: backfill.Progress | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.db = db
        self.project = project
        self.plan = plan
        self.revisions: PlanRevisions = project.resolve(plan)
        self.options = options
        self.progress = progress or backfill.NoProgress()
        self.notify = notify or (lambda message: None)

    # -- reading ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.db.tx():
            state = ledger.get_state(self.db, self.plan.name)
            checkpoints = ledger.checkpoints(self.db, self.plan.name)
            now = self.db.scalar("SELECT now()")
            # a run the ledger calls running is dead unless a phasegate holds the lock and
            # is that run (another plan's run may hold it: it began a later generation)
            abandoned = state.state == "running" and not (
                orchestrator_running(self.db)
                and state.generation is not None
                and state.generation == ledger.current_generation(self.db)
            )
            stopped = {
                cp.job
                for cp in checkpoints
                if cp.status == "running" and not ledger.driven(self.db, self.plan.name, cp.job)
            }
        heads = self.project.current_heads(self.db)
        self._check_recorded_phases(state)
        drift = self.drift(state, heads) + self.schema_drift(state)
        lost = [e.describe() for e in self._emptied(state, heads)]
        phase_list = self.plan.phase_names()
        return {
            "plan": self.plan.name,
            "app": self.plan.app,
            "source": self.plan.source,
            "phase": state.phase,
            "next": self._next_phase(state),
            "state": state.state,
            "abandoned": abandoned,
            "active_phase": state.active_phase if state.state in ("running", "failed") else None,
            "direction": state.direction,
            "error": state.error,
            "actor": state.actor,
            "updated_at": _iso(state.updated_at),
            "plan_changed": bool(state.plan_digest) and state.plan_digest != self.plan.digest,
            "contract_changes": [d.describe(self.plan.source) for d in self._contract_changes()],
            "outdated_triggers": self._outdated_triggers(),
            "heads": list(heads),
            "drift": bool(drift),
            "drift_details": drift,
            "emptied": lost,
            "phases": [
                {
                    "name": name,
                    "compatible": self.plan.phase(name).compatible,
                    "revisions": self.revisions.of(name),
                    "done": state.phase is not None
                    and phase_list.index(name) <= phase_list.index(state.phase),
                }
                for name in phase_list
            ],
            "jobs": [_job_status(cp, now, cp.job in stopped) for cp in checkpoints],
        }

    def drift(
        self, state: ledger.PlanState, heads: tuple[str, ...], rolling_back: bool = False
    ) -> list[str]:
        """Where Alembic's version table disagrees with the phases the ledger recorded.

        `rolling_back`: the newest done phase's revisions downgraded by hand are not drift
        for a rollback, which undoes that phase first: it finishes what the downgrade began
        (for contract: the sync triggers again, and the old columns the downgrade brought
        back empty refilled with sync.down)."""
        applied = self.project.applied(heads)
        names = self.plan.phase_names()
        done = set(names[: names.index(state.phase) + 1]) if state.phase else set()
        active = state.active_phase if state.state in ("running", "failed") else None
        problems = []
        for phase, revisions in self.revisions.by_phase.items():
            if phase == active:
                continue
            if phase in done:
                missing = [r for r in revisions if r not in applied]
                if missing and rolling_back and phase == state.phase and active is None:
                    continue
                if missing:
                    refill = (
                        ", which re-installs the sync triggers and refills the old columns "
                        "the downgrade brought back empty with sync.down"
                        if phase == "contract" and self._sync_jobs()
                        else ""
                    )
                    problems.append(
                        f"phase {phase!r} is recorded as done but revision(s) "
                        f"{', '.join(missing)} are not applied (was `alembic downgrade` run by "
                        f"hand?); restore with `alembic upgrade {revisions[-1]}`, or undo the "
                        f"phase with `phasegate rollback {self.plan.source}`{refill}"
                    )
            else:
                present = [r for r in revisions if r in applied]
                if present:
                    problems.append(
                        f"phase {phase!r} has not run but revision(s) {', '.join(present)} are "
                        f"applied (was `alembic upgrade` run by hand?); undo with "
                        f"`alembic downgrade {self._before(phase)}`"
                    )
        return problems

    def schema_drift(self, state: ledger.PlanState, triggers: bool = True) -> list[str]:
        """Columns and sync triggers changed by hand: what the plan's state says must exist."""
        names = self.plan.phase_names()
        done = set(names[: names.index(state.phase) + 1]) if state.phase else set()
        active = state.active_phase if state.state in ("running", "failed") else None
        if "contract" in done or state.state == "done":
            return []  # the plan is over: later migrations may change its tables freely
        # before the backfill has checked the plan's columns against the table, a missing
        # column is more likely a typo in the plan: the backfill reports that (exit 2)
        new_expected = "backfill" in done
        old_expected = new_expected and "contract" not in done and active != "contract"
        trigger_expected = (
            triggers and "backfill" in done and "contract" not in done and active is None
        )
        problems = []
        for job in self.plan.jobs():
            if not job.is_batched:
                continue
            table = job.table or ""
            columns = backfill.table_columns(self.db, table)
            if columns is None:
                if new_expected or old_expected:
                    problems.append(f"table {table} of job {job.name!r} does not exist")
                continue
            expected = (job.new_columns if new_expected else []) + (
                job.old_columns if old_expected else []
            )
            missing = [c for c in expected if c not in columns]
            if missing:
                problems.append(
                    f"column(s) {', '.join(f'{table}.{c}' for c in missing)} of job "
                    f"{job.name!r} are missing (dropped or renamed by hand?): restore them; "
                    "phasegate refuses to move the plan either way until they are back"
                )
            if trigger_expected and job.sync is not None and not self._trigger_exists(job):
                problems.append(
                    f"the sync trigger of job {job.name!r} on {table} is missing or disabled "
                    "(dropped by hand?), so one code version's writes no longer reach the "
                    "other's columns: run `phasegate rollback PLAN --to expand`, then "
                    "`phasegate backfill PLAN`, which reinstalls it and sweeps every row again"
                )
        if trigger_expected:  # a BEFORE trigger added since that fires after ours, ...
            with self.db.tx():
                problems += sync.order_drift(self.db, self.plan.name, self._sync_jobs())
                volatile = sync.default_issues(self.db, self._sync_jobs())
            problems += [
                f"column {job.table}.{column} of job {job.name!r} got DEFAULT {expression} "
                "since the backfill, which is not a constant: inserts that leave it out can "
                "no longer be told apart by the sync trigger. Drop the default (set it in a "
                "contract revision instead)"
                for job, column, expression in volatile
            ]
        return problems

    def _refresh_triggers(self, state: ledger.PlanState) -> None:
        """Re-install the sync triggers when a synced column's constant DEFAULT changed
        since they were built (a revision set or dropped one): the INSERT path compares
        with the defaults it was built with (`sync.function_sql`)."""
        names = self.plan.phase_names()
        done = set(names[: names.index(state.phase) + 1]) if state.phase else set()
        if "backfill" not in done or "contract" in done or state.state == "done":
            return
        self._reinstall_if_defaults_changed()

    def _reinstall_if_defaults_changed(self) -> None:
        with self.db.tx():
            changed = sync.defaults_drift(self.db, self.plan.name, self._sync_jobs())
        if not changed:
            return
        for table, what in changed:
            self.notify(f"the synced columns' defaults on {table} changed ({what}): re-installing")
        self.db.retrying("re-installing the sync triggers", self._install_triggers)

    def _outdated_triggers(self) -> list[str]:
        """Jobs whose installed sync trigger runs expressions the file no longer has."""
        with self.db.tx():
            return [j.name for j in self._sync_jobs() if sync.outdated(self.db, self.plan.name, j)]

    OUTDATED_HINT = (
        "edited since backfill installed it, so the trigger still runs the old expressions. "
        "Backfill installs the new ones: `phasegate rollback PLAN --to expand`, then "
        "`phasegate backfill PLAN` (it also rewrites the rows the old ones left different)"
    )

    def _trigger_exists(self, job: Any) -> bool:
        with self.db.tx():
            return sync.is_installed(self.db, self.plan.name, job)

    def gate(self, phase: str | None = None) -> tuple[GateView, gates.GateDecision]:
        """Evaluate the gate for entering `phase` (default: the next one); changes nothing."""
        with self.db.tx():
            state = ledger.get_state(self.db, self.plan.name)
        target = phase or self._next_phase(state)
        if target is None:
            raise UsageError(
                f"plan {self.plan.name!r} is complete; name a phase with --phase to evaluate it"
            )
        decision = self._decide(self.plan.phase(target).compatible, f"for entering {target}")
        self._record_gate(target, "gate", decision)
        return GateView(target, self._next_phase(state)), decision

    # -- moving forward ---------------------------------------------------------------------

    def advance(self, to: str | None = None, only: str | None = None) -> Outcome:
        """Run the next phase(s) up to `to` (default: all), or exactly `only` if it is next."""
        names = self.plan.phase_names()
        for wanted in (to, only):
            if wanted is not None:
                self.plan.phase(wanted)
        state, heads = self._prepare()
        steps: list[Step] = []
        current = self._next_phase(state)
        if only is not None and current != only:
            done_already = state.phase is not None and names.index(only) <= names.index(state.phase)
            if done_already and state.state not in ("running", "failed"):
                steps.append(Step(only, "advance", "noop", f"{only} is already done"))
                return Outcome(self.plan.name, steps, self.status())
            raise UsageError(
                f"{only} is not the next phase of {self.plan.name!r}: the next is "
                f"{current or 'nothing (the plan is complete)'}; run `phasegate {current}` "
                f"or `phasegate advance`"
                if current
                else f"plan {self.plan.name!r} is complete; nothing to run"
            )
        last = only or to or names[-1]
        if current is None or names.index(current) > names.index(last):
            steps.append(
                Step(last, "advance", "noop", f"{self.plan.name} is already past {last}: no-op")
            )
            return Outcome(self.plan.name, steps, self.status())
        pending = names[names.index(current) : names.index(last) + 1]
        self._refuse_unguarded(names[names.index(current) :])  # --to aside: all still to run
        refusal = self._lint_first(current, pending)
        if refusal is not None:
            return Outcome(self.plan.name, [refusal], self.status())
        while current is not None and names.index(current) <= names.index(last):
            step = self._run_phase(current, state, heads)
            steps.append(step)
            if step.result == "refused":
                break
            with self.db.tx():
                state = ledger.get_state(self.db, self.plan.name)
            heads = self.project.current_heads(self.db)
            current = self._next_phase(state)
        return Outcome(self.plan.name, steps, self.status())

    def _refuse_unguarded(self, pending: list[str]) -> None:
        """A revision of a phase still to run (up to the plan's end, whatever `--to` says)
        that a plain `alembic upgrade head` would run at any time (untagged, or tagged
        without the guard): refused before anything, so a plan cannot move while a deploy
        could apply such a revision behind its gate."""
        waiting = {rev for phase in pending for rev in self.revisions.of(phase)}
        issues = [
            issue
            for issue in self.project.unguarded(self.plan, self.revisions)
            if issue.key.removeprefix("revision ") in waiting
        ]
        if issues:
            raise PlanError(issues)

    def _lint_first(self, phase: str, pending: list[str]) -> Step | None:
        """Lint the phases about to run; errors refuse unless --allow-unsafe.

        Phases already done are not judged again: an error allowed back then must not
        force --allow-unsafe on every later command, hiding new errors with it.
        """
        findings = plan_lint.lint_plan(self.project, self.revisions, pending)
        blocking = [f for f in findings if f.blocking]
        if not blocking:
            return None
        listed = "; ".join(
            f"{f.rule} in {f.revision} ({f.phase})" + (f": {f.statement}" if f.statement else "")
            for f in blocking
        )
        detail = {
            "reason": self.options.allow_unsafe,
            "findings": [f.to_dict() for f in blocking],
        }
        if self.options.allow_unsafe:
            with self.db.tx():
                ledger.record_event(
                    self.db, self.plan.name, "lint.overridden", self.options.actor, phase, detail
                )
            self.notify(
                f"lint: {len(blocking)} error(s) allowed ({self.options.allow_unsafe}): {listed}"
            )
            return None
        with self.db.tx():
            ledger.record_event(
                self.db, self.plan.name, "lint.refused", self.options.actor, phase, detail
            )
        message = (
            f"lint found {len(blocking)} error(s) in plan {self.plan.name!r}: {listed}. "
            "`phasegate lint PLAN` shows each with its safe rewrite; fix the revision, waive "
            "the rule in it with phasegate_allow = {'rule-id': 'why'}, or pass "
            "--allow-unsafe REASON"
        )
        return Step(phase, "advance", "refused", message)

    def _run_phase(self, phase: str, state: ledger.PlanState, heads: tuple[str, ...]) -> Step:
        if phase == "backfill":  # before the gate: a refusal touches nothing
            self._hold_to_contract("backfill", restartable=True)
        decision = self._decide(self.plan.phase(phase).compatible, f"for entering {phase}")
        self._record_gate(phase, "advance", decision)
        self.notify(decision.message())
        if not decision.passed:
            return Step(phase, "advance", "refused", decision.message(), decision.to_dict())
        blocked = self._foreign_pending(phase, heads)
        if blocked:
            return Step(phase, "advance", "refused", blocked, decision.to_dict())
        if phase == "backfill":
            backfill.check_columns(self.db, self.plan)  # a plan error touches nothing
        self._begin(phase, "advance", state)
        try:
            if phase == "backfill":
                self._sign_contract()
            jobs = self._execute(phase)
        except BaseException as exc:  # a second Ctrl-C too: the ledger must not say running
            self._fail(phase, "advance", exc)
            raise
        self._finish(phase, "advance", completed=phase)
        return Step(phase, "advance", "done", f"{phase} done", decision.to_dict(), jobs)

    def _execute(self, phase: str) -> list[dict[str, Any]]:
        if phase == "backfill":
            return self._run_backfill()
        if phase == "contract":

            def drop_triggers() -> list[str]:
                with self.db.tx():
                    for job in self._sync_jobs():
                        # a later rollback must refill everything written from now on
                        ledger.delete_checkpoint(self.db, self.plan.name, backfill.down_name(job))
                    return sync.drop_all(self.db, self.plan.name, self._sync_jobs())

            for name in self.db.retrying("dropping the sync triggers", drop_triggers):
                self.notify(f"dropped sync trigger of job {name!r}")
        # read now, not before the gate (which may wait): a revision must never be skipped
        applied = self.project.applied(self.project.current_heads(self.db))
        for revision in self.revisions.of(phase):
            if revision in applied:  # a run that stopped part way: Alembic would skip it too
                self.notify(f"{self.project.revisions[revision].describe()}: already applied")
                continue
            failpoints.reach(f"before-revision:{revision}")
            self.notify(f"upgrading to {self.project.revisions[revision].describe()}")
            self.db.retrying(
                f"revision {revision}",
                lambda rev=revision: self.project.upgrade(
                    self.db, rev, self._on_step(phase), phase_of=(self.plan.name, phase)
                ),
            )
            failpoints.reach(f"after-revision:{revision}")
        if phase == "switch" and self._sync_jobs():  # a revision may have set a DEFAULT
            self._reinstall_if_defaults_changed()
        return []

    def _run_backfill(self) -> list[dict[str, Any]]:
        self.db.retrying("installing the sync triggers", self._install_triggers)
        for job in self._sync_jobs():
            self.notify(f"installed sync trigger of job {job.name!r} on {job.table}")
        results = []
        walked: list[Job] = []  # batched jobs so far: a later `sql` job may write their tables
        recheck: dict[str, tuple[Job, str]] = {}  # job name → (job, the `sql` job after it)
        for job in self.plan.jobs():
            if job.is_batched:
                walked.append(job)
                result = backfill.run_batched(
                    self.db,
                    self.plan.name,
                    backfill.forward_work(self.db, self.plan.name, job),
                    self.options.backfill,
                    self.progress,
                    self.notify,
                )
            else:
                result = backfill.run_sql_job(
                    self.db, self.plan.name, job, self.progress, self.options.backfill, self.notify
                )
                if result.status == "done":
                    recheck.update({earlier.name: (earlier, job.name) for earlier in walked})
            with self.db.tx():
                ledger.record_event(
                    self.db,
                    self.plan.name,
                    "job.finished",
                    self.options.actor,
                    "backfill",
                    result.to_dict(),
                )
            results.append(result.to_dict())
        for job, after in recheck.values():
            backfill.verify(self.db, self.plan.name, backfill.up_work(job), after)
        return results

    # -- moving back ------------------------------------------------------------------------

    def rollback(self, to: str | None = None) -> Outcome:
        """Undo the newest phase, or phases newest first until `to` is the last one done."""
        names = self.plan.phase_names()
        if to not in (None, START):
            self.plan.phase(to or "")
        state, heads = self._prepare(rolling_back=True)
        steps: list[Step] = []
        undo = self._phase_to_undo(state)
        if undo is None:
            steps.append(Step(to or START, "rollback", "noop", "nothing to roll back"))
            return Outcome(self.plan.name, steps, self.status())
        stop_after = names.index(to) if to not in (None, START) else -1
        if to is not None and names.index(undo) <= stop_after:
            where = (
                f"{self.plan.name} is already at {to}"
                if undo == to
                else f"{self.plan.name} is at {undo}, before {to}: nothing after {to} to undo"
            )
            steps.append(Step(to, "rollback", "noop", where))
            return Outcome(self.plan.name, steps, self.status())
        while undo is not None:
            step = self._undo_phase(undo, state, heads)
            steps.append(step)
            if step.result == "refused" or to is None:
                break
            with self.db.tx():
                state = ledger.get_state(self.db, self.plan.name)
            heads = self.project.current_heads(self.db)
            undo = self._phase_to_undo(state)
            if undo is not None and names.index(undo) <= stop_after:
                break
        return Outcome(self.plan.name, steps, self.status())

    def _undo_phase(self, phase: str, state: ledger.PlanState, heads: tuple[str, ...]) -> Step:
        if phase == "contract":  # it re-installs the triggers and refills with the jobs
            self._hold_to_contract("the rollback of contract", restartable=False)
        back_to = self.plan.previous_phase(phase)
        label = f"for rolling back {phase} (back to {back_to or 'before the plan'})"
        decision = self._decide(self.plan.compatible_after(back_to), label)
        self._record_gate(phase, "rollback", decision)
        self.notify(decision.message())
        if not decision.passed:
            return Step(phase, "rollback", "refused", decision.message(), decision.to_dict())
        refusal = self._downgrade_refusal(phase, heads)
        if refusal:
            return Step(phase, "rollback", "refused", refusal, decision.to_dict())
        self._begin(phase, "rollback", state)
        try:
            jobs = self._revert(phase, heads)
        except BaseException as exc:
            self._fail(phase, "rollback", exc)
            raise
        self._finish(phase, "rollback", completed=back_to)
        return Step(phase, "rollback", "done", f"{phase} rolled back", decision.to_dict(), jobs)

    def _revert(self, phase: str, heads: tuple[str, ...]) -> list[dict[str, Any]]:
        if phase == "backfill":
            # every batched job: its new columns keep what it wrote, and the next start may
            # bring other expressions (or old code may change the old columns meanwhile)
            walked = [job.name for job in self.plan.jobs() if job.is_batched]

            def drop_triggers() -> int:
                with self.db.tx():
                    sync.drop_all(self.db, self.plan.name, self._sync_jobs())
                    ledger.clear_contract(self.db, self.plan.name)
                    return ledger.clear_checkpoints(self.db, self.plan.name, resweep=walked)

            cleared = self.db.retrying("dropping the sync triggers", drop_triggers)
            self.notify(
                f"dropped the sync triggers and {cleared} job checkpoint(s); the new columns "
                "keep their values, so the next backfill also rewrites every row whose new "
                "columns no longer match `set` (old code may change the old ones meanwhile)"
            )
            return []
        applied = self.project.applied(heads)
        if any(r in applied for r in self.revisions.of(phase)):
            target = self._before(phase)
            self.notify(f"downgrading to {target}")
            self.db.retrying(
                f"the downgrade to {target}",
                lambda: self.project.downgrade(self.db, target, self._on_step(phase)),
            )
        if phase == "expand":  # the new columns are gone: no job's progress means anything
            with self.db.tx():
                ledger.clear_checkpoints(self.db, self.plan.name)
        if phase != "contract":
            return []
        backfill.check_expressions(self.db, self.plan)  # edited since? a trigger would break writes
        self.db.retrying("installing the sync triggers", self._install_triggers)
        for job in self._sync_jobs():
            self.notify(f"re-installed sync trigger of job {job.name!r} on {job.table}")
        results = []
        # reverse plan order: a later job's old columns may be an earlier job's new ones
        for job in reversed(self._sync_jobs()):
            work = backfill.down_work(job, keys.base_types(self.db, job.table or ""))
            self.notify(f"refilling {', '.join(job.old_columns)} of {job.table} (sync.down)")
            result = backfill.run_batched(
                self.db, self.plan.name, work, self.options.backfill, self.progress, self.notify
            )
            results.append(result.to_dict())
        with self.db.tx():  # the refill is finished; a later rollback starts a new one
            for result in results:
                ledger.delete_checkpoint(self.db, self.plan.name, result["name"])
        # the downgrade added the old columns back: these are the ones checked from now on
        emptied.record(self.db, self.plan.name, self.plan.jobs())
        return results

    def _install_triggers(self) -> None:
        """The plan's triggers as its file says now: one a job no longer has (renamed, or
        its `sync` removed since it was installed) goes, or it would keep running the old
        expressions, and contract, which drops the plan's triggers, is the only other
        place that finds it."""
        with self.db.tx():
            for job in sync.install_all(self.db, self.plan.name, self._sync_jobs()):
                self.notify(
                    f"dropped the sync trigger of job {job!r}, which the plan no longer has"
                )

    def _downgrade_refusal(self, phase: str, heads: tuple[str, ...]) -> str | None:
        """Why this phase cannot be undone safely, or None."""
        revisions = self.revisions.of(phase)
        applied = self.project.applied(heads)
        ran = any(r in applied for r in revisions)  # else the downgrade is skipped
        if phase == "contract" and ran and not self.options.allow_data_loss:
            lossy = [j.name for j in self.plan.jobs() if j.is_batched and j.sync is None]
            if lossy:
                return (
                    f"rollback of contract refused: job(s) {', '.join(lossy)} have no "
                    "`sync` with `down`, so the columns the contract dropped cannot be rebuilt "
                    "from the new ones. Add `sync.down` to the plan, or pass --allow-data-loss "
                    "to downgrade and leave those columns empty"
                )
        if phase == "contract":
            for job in self._sync_jobs():
                rules = backfill.update_rules(self.db, job.table or "")
                if rules:
                    message, hint = backfill.rules_refusal(job.table or "", rules)
                    return (
                        f"rollback of contract refused: its refill of {', '.join(job.old_columns)} "
                        f"runs in backfill batches, and {message}. Nothing was downgraded; {hint}"
                    )
            with self.db.tx():
                late = sync.trigger_order_issues(self.db, self.plan.name, self._sync_jobs())
            if late:
                _job, message, hint = late[0]
                return (
                    f"rollback of contract refused: it re-installs the sync triggers, and "
                    f"{message}. Nothing was downgraded; {hint}"
                )
        if phase == "backfill" or not ran:
            return None
        target = self._before(phase)
        undone = self.project.downgrade_steps(heads, target)
        foreign = [r for r in undone if r not in revisions]
        if foreign:
            names = ", ".join(self.project.revisions[r].describe() for r in foreign)
            return (
                f"rollback of {phase} refused: downgrading to {target} would also undo "
                f"{names}, applied on top of this phase; roll those back first"
            )
        return None

    # -- columns that came back empty -------------------------------------------------------

    def _emptied(self, state: ledger.PlanState, heads: tuple[str, ...]) -> list[emptied.Emptied]:
        """Old or new columns re-created behind phasegate's back that lost values, where the
        plan's state says they hold them: old ones from the backfill's start until the
        contract (and after it, when its revisions were downgraded by hand, which brings
        them back empty), new ones from the backfill's end (see `emptied`)."""
        names = self.plan.phase_names()
        done = set(names[: names.index(state.phase) + 1]) if state.phase else set()
        active = state.active_phase if state.state in ("running", "failed") else None
        if active == "contract":
            return []  # the contract drops, or its rollback refills, the old columns now
        if "contract" in done:  # over, unless its revisions were undone by hand since
            applied = self.project.applied(heads)
            if all(r in applied for r in self.revisions.of("contract")):
                return []
        started = "backfill" in done or active == "backfill"
        batched = [job for job in self.plan.jobs() if job.is_batched]
        return emptied.find(self.db, self.plan.name, batched, old=started, new="backfill" in done)

    def _repair_emptied(self, state: ledger.PlanState, heads: tuple[str, ...]) -> None:
        """Before anything else: refill old columns with sync.down and walk new ones again
        with set, where an out-of-band drop and re-add emptied them. A job with no sync.down
        cannot rebuild its old columns: refused with the way out."""
        found = self._emptied(state, heads)
        hopeless = [e for e in found if e.side == emptied.OLD and e.job.sync is None]
        if hopeless:
            raise Refused(
                "; ".join(e.describe() for e in hopeless),
                emptied=[e.describe() for e in hopeless],
            )
        for lost in found:
            self.notify(lost.describe())
            job = lost.job
            if lost.side == emptied.OLD:
                work = backfill.down_work(job, keys.base_types(self.db, job.table or ""))
            else:
                with self.db.tx():  # walk it again from its first key, as the file says
                    ledger.delete_checkpoint(self.db, self.plan.name, job.name)
                    ledger.save_checkpoint(
                        self.db, ledger.Checkpoint(self.plan.name, job.name, resweep=True)
                    )
                work = backfill.forward_work(self.db, self.plan.name, job)
            result = backfill.run_batched(
                self.db, self.plan.name, work, self.options.backfill, self.progress, self.notify
            )
            with self.db.tx():
                if lost.side == emptied.OLD:  # the refill is over; a later one starts anew
                    ledger.delete_checkpoint(self.db, self.plan.name, work.checkpoint)
                ledger.record_event(
                    self.db,
                    self.plan.name,
                    "columns.refilled",
                    self.options.actor,
                    None,
                    {"job": job.name, "columns": lost.columns, **result.to_dict()},
                )
            emptied.repaired(self.db, self.plan.name, lost)

    # -- the contract ----------------------------------------------------------------------

    def _contract_changes(self) -> list[contract.Difference]:
        with self.db.tx():
            recorded = ledger.contract(self.db, self.plan.name)
        return contract.differences(self.plan, recorded) if recorded else []

    def _hold_to_contract(self, what: str, restartable: bool) -> None:
        """The jobs as the backfill phase started them bind every later run of it: a file
        that differs is refused (exit 2) before anything is touched, except for jobs the
        operator restarts explicitly (`--restart-job`), which walk again from their first
        key with the new expressions."""
        restarted = set(self.options.restart_jobs) if restartable else set()
        every = self._contract_changes()
        self._refuse_a_new_down(every, restarted)
        changes = [d for d in every if d.job not in restarted]
        if not changes:
            return
        listed = "; ".join(d.describe(self.plan.source) for d in changes)
        names = sorted({d.job for d in changes})  # a job the file lost: restarting forgets it
        ways = (
            f"roll the backfill back (`phasegate rollback {self.plan.source}`) and start it over "
            "with the file as it is, or re-walk the changed job(s) from their first key with "
            "the new expressions: " + " ".join(f"--restart-job {name}" for name in names)
            if restartable
            else f"restore {self.plan.source} to the jobs the backfill started with (git has "
            "them), or roll back to expand and run the backfill again with the file as it is"
        )
        raise UsageError(
            f"{what} refused: the plan's jobs are not the ones the backfill phase started "
            f"with, and running them would leave some rows with the old result and some with "
            f"the new: {listed}. Nothing was changed. The honest ways out: {ways}",
            changes=[d.describe(self.plan.source) for d in changes],
        )

    def _refuse_a_new_down(self, changes: list[contract.Difference], restarted: set[str]) -> None:
        """A restart re-walks `set`; it cannot take back what the old `sync.down` wrote.
        The rows new code wrote since the phase started hold the old `down`'s result in
        their old columns, and no walk can tell them from rows old code wrote (whose old
        columns are the truth): `--restart-job` of a job whose `sync` changed is refused."""
        downs = [d for d in changes if d.job in restarted and d.key.split(".")[0] == "sync"]
        if not downs:
            return
        listed = "; ".join(d.describe(self.plan.source) for d in downs)
        raise UsageError(
            f"--restart-job refused: {listed}. A restart walks the job's `set` again, but the "
            "old columns of rows new code wrote since the backfill started hold what the old "
            "`sync.down` gave, and no walk can tell those rows from ones old code wrote, so "
            "they would keep the old result while new writes get the new one. Nothing was "
            f"changed. Keep the recorded `sync.down` in {self.plan.source}; a new one takes a "
            "new plan, or a rollback of the backfill first (whose old columns, from then on "
            "the truth again, keep what they hold)",
            changes=[d.describe(self.plan.source) for d in downs],
        )

    def _check_restarts(self, state: ledger.PlanState) -> None:
        """`--restart-job` names jobs of the file, and only while the backfill is the phase
        that runs next."""
        if not self.options.restart_jobs:
            return
        with self.db.tx():
            recorded = {entry.job for entry in ledger.contract(self.db, self.plan.name)}
        names = {job.name for job in self.plan.jobs()} | recorded
        unknown = [n for n in self.options.restart_jobs if n not in names]
        if unknown:
            raise UsageError(
                f"--restart-job {unknown[0]}: plan {self.plan.name!r} has no such job (its jobs: "
                f"{', '.join(sorted(names)) or 'none'})"
            )
        if self._next_phase(state) != "backfill":
            raise UsageError(
                "--restart-job re-walks a job when the backfill phase runs, and it is not the "
                f"next phase of {self.plan.name!r} (next: {self._next_phase(state) or 'none'}); "
                "roll back to expand to run the backfill again"
            )

    def _sign_contract(self) -> None:
        """Record the file's jobs as the contract when the phase starts (or the jobs the
        operator restarts), and set each restarted job's walk back to its first key: it
        rewrites every row whose new columns differ from what the new `set` gives (the
        resweep), so no row keeps the old result."""
        with self.db.tx():
            recorded = ledger.contract(self.db, self.plan.name)
            now = contract.entries(self.plan)
            if not recorded:
                ledger.record_contract(self.db, self.plan.name, now)
        if not recorded:
            emptied.record(self.db, self.plan.name, self.plan.jobs())
            return
        with self.db.tx():
            restarted = [e for e in now if e.job in self.options.restart_jobs]
            gone = [e.job for e in recorded if e.job not in {n.job for n in now}]
            forgotten = [job for job in gone if job in self.options.restart_jobs]
            ledger.record_contract(self.db, self.plan.name, restarted)
            ledger.forget_contract_jobs(self.db, self.plan.name, forgotten)
            ledger.reposition_contract(self.db, self.plan.name, {e.job: e.position for e in now})
            for job in forgotten:  # its trigger goes with the install; what it wrote stays
                ledger.delete_checkpoint(self.db, self.plan.name, job)
                ledger.record_event(
                    self.db,
                    self.plan.name,
                    "job.forgotten",
                    self.options.actor,
                    "backfill",
                    {"job": job},
                )
            for entry in restarted:
                ledger.delete_checkpoint(self.db, self.plan.name, entry.job)
                ledger.save_checkpoint(
                    self.db, ledger.Checkpoint(self.plan.name, entry.job, resweep=True)
                )
                ledger.record_event(
                    self.db,
                    self.plan.name,
                    "job.restarted",
                    self.options.actor,
                    "backfill",
                    {"job": entry.job, "definition": entry.definition},
                )
        for entry in restarted:
            self.notify(
                f"job {entry.job!r}: restarted with the file's expressions; it walks again "
                "from its first key and rewrites every row the old ones wrote"
            )
        for job in forgotten:
            self.notify(f"job {job!r}: no longer in the file, forgotten; what it wrote stays")
        emptied.record(self.db, self.plan.name, self.plan.jobs(), only_missing=True)

    # -- shared steps -----------------------------------------------------------------------

    def _prepare(self, rolling_back: bool = False) -> tuple[ledger.PlanState, tuple[str, ...]]:
        """Ledger ready, state read, no drift: the common start of every mutating command.

        A missing sync trigger does not stop a rollback: rolling back removes it anyway,
        and that is the way out the drift message offers.
        """
        heads = self.project.current_heads(self.db)
        if not heads and not rolling_back:  # before the ledger: the URL may be wrong
            with self.db.tx():
                self._refuse_an_empty_database(ledger.get_state(self.db, self.plan.name))
        ledger.ensure_schema(self.db)
        ledger.begin_run(self.db)
        with self.db.tx():
            state = ledger.get_state(self.db, self.plan.name)
        self._check_recorded_phases(state)
        self._check_restarts(state)
        drift = self.drift(state, heads, rolling_back) + self.schema_drift(
            state, triggers=not rolling_back
        )
        if drift:
            raise Refused(
                "the database has drifted from what phasegate recorded: "
                + "; ".join(drift)
                + ". Resolve it, then run the command again",
                drift=drift,
            )
        self._repair_emptied(state, heads)
        self._refresh_triggers(state)
        if not rolling_back and state.active_phase != "backfill":  # backfill reinstalls them
            for job in self._outdated_triggers():
                self.notify(f"warning: `set` or `sync.down` of job {job!r} {self.OUTDATED_HINT}")
        return state, heads

    def _decide(self, compatible: str, target: str) -> gates.GateDecision:
        """Evaluate the gate; with `wait`, look again until it passes or the time is up.

        An override passes at once: the operator has decided, waiting would only delay.
        """
        deadline = time.monotonic() + self.options.wait
        naming = self.options.config.application_name.format(
            app=self.plan.app, version="<version>", instance="<instance>"
        )
        waited, said, said_at = 0.0, None, 0.0
        tables = trust.plan_tables(self.plan, self.project, self.revisions)
        while True:
            sighting = sources.observe(
                self.db, self.plan.app, self.options.live_versions, self.options.config, tables
            )
            decision = gates.evaluate(
                self.plan.app,
                compatible,
                sighting.observations,
                target,
                self.options.override_gate,
                sighting.failures,
                sighting.trust_rule,
            )
            decision.waited, decision.naming = waited, naming
            now = time.monotonic()
            if decision.passed or now >= deadline:
                return decision
            if decision.signature() != said or now - said_at >= GATE_REMIND_SECONDS:
                left = format_duration(deadline - now)
                self.notify(f"gate {target}: waiting, {left} left — {decision.problem()}")
                said, said_at = decision.signature(), now
            pause = min(GATE_POLL_SECONDS, deadline - now)
            if self.options.backfill.stop.wait(pause):
                return decision  # stopped by a signal: the refusal stands
            waited += pause

    def _record_gate(self, phase: str, direction: str, decision: gates.GateDecision) -> None:
        ledger.ensure_schema(self.db)
        if decision.versions_ok:
            kind = "gate.passed"
        else:
            kind = "gate.overridden" if decision.passed else "gate.refused"
        with self.db.tx():
            ledger.record_event(
                self.db,
                self.plan.name,
                kind,
                self.options.actor,
                phase,
                {"direction": direction, **decision.to_dict()},
            )

    def _begin(self, phase: str, direction: str, state: ledger.PlanState) -> None:
        if state.state == "running" and state.active_phase:  # we hold the lock: it died
            by = f" ({state.actor})" if state.actor else ""
            self.notify(
                f"the {state.direction} of {state.active_phase} that a phasegate{by} started "
                "never finished (killed, or its connection lost); "
                + ("resuming it" if state.direction == direction else f"{direction} of {phase}")
                + " from where the database is"
            )
        with self.db.tx():
            state.state, state.active_phase, state.direction = "running", phase, direction
            state.actor, state.error = self.options.actor, None
            state.plan_digest = self.plan.digest
            state.started_at = self.db.scalar("SELECT now()")
            ledger.save_state(self.db, state)
            ledger.record_event(
                self.db, self.plan.name, f"{direction}.started", self.options.actor, phase
            )

    def _finish(self, phase: str, direction: str, completed: str | None) -> None:
        heads = self.project.current_heads(self.db)
        with self.db.tx():
            state = ledger.get_state(self.db, self.plan.name)
            state.phase = completed
            last = self.plan.phase_names()[-1]
            state.state = "done" if completed == last else "pending"
            state.active_phase, state.direction, state.error = None, direction, None
            state.alembic_heads = list(heads)
            ledger.save_state(self.db, state)
            ledger.record_event(
                self.db,
                self.plan.name,
                f"{direction}.completed",
                self.options.actor,
                phase,
                {"heads": list(heads)},
            )
        self.notify(f"{phase}: {'done' if direction == 'advance' else 'rolled back'}")

    def _fail(self, phase: str, direction: str, exc: Exception) -> None:
        original = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
        if isinstance(exc, PhasegateError):
            message = exc.message
        else:
            message = f"{type(original).__name__}: {without_row_values(original)}"
        message = message.strip()
        try:
            self.db.connection.rollback()
            self.db.ensure_idle()
            with self.db.tx():
                state = ledger.get_state(self.db, self.plan.name)
                state.state, state.active_phase, state.direction = "failed", phase, direction
                state.error = message[:2000]
                ledger.save_state(self.db, state)
                ledger.record_event(
                    self.db,
                    self.plan.name,
                    f"{direction}.failed",
                    self.options.actor,
                    phase,
                    {"error": message[:2000]},
                )
        except Exception:  # the connection itself may be gone; the original error matters
            pass

    def _on_step(self, phase: str) -> Callable[[MigrationInfo, tuple[str, ...]], None]:
        """Record each Alembic step inside that step's own transaction."""

        def record(step: MigrationInfo, heads: tuple[str, ...]) -> None:
            revision = step.up_revision_id
            kind = "revision.applied" if step.is_upgrade else "revision.reverted"
            ledger.record_event(
                self.db,
                self.plan.name,
                kind,
                self.options.actor,
                phase,
                {"revision": revision, "heads": list(heads)},
            )
            self.db.execute(
                "UPDATE phasegate.plan_state SET alembic_heads = %(h)s, updated_at = now() "
                "WHERE plan = %(p)s",
                {"h": list(heads), "p": self.plan.name},
            )
            self.notify(f"  {kind.split('.')[1]} {revision}")

        return record

    def _foreign_pending(self, phase: str, heads: tuple[str, ...]) -> str | None:
        applied = self.project.applied(heads)
        pending = [i for i in self.revisions.foreign.get(phase, []) if i.revision not in applied]
        if not pending:
            return None
        first = pending[0]
        return (
            f"{phase} refused: upgrading to {self.revisions.of(phase)[-1]} would also apply "
            f"{first.describe()} of plan {first.plan!r} (phase {first.phase!r}), whose gate has "
            f"not been passed; advance plan {first.plan!r} through {first.phase} first"
        )

    def _check_recorded_phases(self, state: ledger.PlanState) -> None:
        """The phases the ledger recorded must still be in the plan file: every decision
        (what is done, what comes next, what to undo) is made against the file's list."""
        names = self.plan.phase_names()
        gone = [p for p in dict.fromkeys((state.phase, state.active_phase)) if p and p not in names]
        if gone:
            raise UsageError(
                f"the ledger records phase {gone[0]!r} of plan {self.plan.name!r} as "
                f"{'done' if gone[0] == state.phase else state.state}, but "
                f"{self.plan.source} no longer has it (it has {', '.join(names)}); restore the "
                "phase in the file (`git log` has it) before running phasegate on this plan",
                phase=gone[0],
            )

    def _sync_jobs(self) -> list[Any]:
        return [j for j in self.plan.jobs() if j.is_batched and j.sync is not None]

    def _next_phase(self, state: ledger.PlanState) -> str | None:
        if state.state in ("running", "failed") and state.active_phase:
            return state.active_phase
        return self.plan.next_phase(state.phase)

    def _phase_to_undo(self, state: ledger.PlanState) -> str | None:
        if state.state in ("running", "failed") and state.active_phase:
            return state.active_phase
        return state.phase

    def _refuse_an_empty_database(self, state: ledger.PlanState) -> None:
        """A plan that has not started, on a database with no Alembic revision at all.

        Its first phase would apply every revision below the plan's too, building the app's
        whole schema from nothing: what happens when the URL points at the wrong database
        (the bundled alembic.ini names `postgres`). phasegate migrates a database that is at
        the revision before the plan already, so it refuses and says how to get there.
        """
        names = self.plan.phase_names()
        first = next((p for p in names if self.revisions.of(p)), None)
        if state.phase is not None or state.state != "pending" or first is None:
            return
        before = self._before(first)
        if before == "base":  # the plan's own first revision starts the history
            return
        raise Refused(
            f"{first} refused: {self.db.masked_url()} has no Alembic revision (no "
            f"alembic_version, or an empty one), so {first} would first apply every revision "
            f"up to {before}, creating the app's schema from nothing. phasegate migrates a "
            f"database that is already at the revision before the plan: check the database "
            f"URL, or bring a new database there with `alembic upgrade {before}` first. "
            "Nothing was written"
        )

    def _before(self, phase: str) -> str:
        """The Alembic target just below a phase's first revision."""
        first = self.project.revisions[self.revisions.of(phase)[0]]
        if len(first.down_revisions) > 1:
            raise RuntimeFailure(
                f"{first.revision} merges several branches; phasegate cannot tell which one to "
                f"downgrade to: undo it with `alembic downgrade` and an explicit target"
            )
        return first.down_revisions[0] if first.down_revisions else "base"


def without_row_values(exc: BaseException) -> str:
    """A database error as the ledger keeps it: PostgreSQL's primary message and which
    constraint, table or column, never its DETAIL ("Failing row contains (...)", "Key
    (email)=(...) already exists"), which holds the row's values: the ledger refuses DELETE
    (nothing could purge them) and a read-only role may read it without any grant on the
    table. The terminal gets the whole error."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return str(exc).strip().split("\n", 1)[0]
    where = [
        f"{label} {value}"
        for label, value in (
            ("constraint", diag.constraint_name),
            ("table", diag.table_name),
            ("column", diag.column_name),
        )
        if value
    ]
    return primary + (f" ({', '.join(where)})" if where else "")


@dataclass
class GateView:
    phase: str
    next: str | None


def _job_status(cp: ledger.Checkpoint, now: dt.datetime, stopped: bool = False) -> dict[str, Any]:
    """A job's progress as status shows it: rows, rate over this run, ETA from the estimate.

    `stopped`: the checkpoint says running but no orchestrator runs the job (it was
    interrupted, failed or killed): shown as stopped, with no rate or ETA, which would
    otherwise decay with the wall clock as if the walk were crawling.
    """
    rate = eta = None
    if stopped:
        cp = replace(cp, status="stopped")
    if cp.status == "running" and cp.run_started_at is not None:
        seconds = (now - cp.run_started_at).total_seconds()
        walked = cp.walked - cp.run_walked
        if seconds > 0 and walked > 0:
            rate = walked / seconds
            if cp.total:
                eta = max(cp.total - cp.walked, 0) / rate
    return {
        "name": cp.job,
        "status": cp.status,
        "rows_done": cp.rows_done,
        "walked": cp.walked,
        "total_estimate": cp.total,
        "batches": cp.batches,
        "rows_per_second": round(rate) if rate else None,
        "eta_seconds": round(eta) if eta is not None else None,
        "last_key": cp.last_key,
        "upper_key": cp.upper_key,
        "verified_at": _iso(cp.verified_at),
        "resweep": cp.resweep,
    }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
