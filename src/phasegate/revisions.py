"""The Alembic bridge: revision tags, phase → revisions, upgrade and downgrade.

Tags are two module constants (`phasegate_plan`, `phasegate_phase`) read from
`Script.module`; `branch_labels` would spread over a whole chain. Migrations run through
the project's own env.py (so its version table and settings apply), with `configure`
wrapped on the active `EnvironmentContext` to force `transaction_per_migration` and append
our `on_version_apply` hook, so even a plain cookbook env.py records each step in the
ledger inside that step's own transaction.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError, to_tuple

from phasegate import guard
from phasegate.db import Session
from phasegate.errors import RuntimeFailure, UsageError
from phasegate.plan import PHASES, REVISION_PHASES, Plan, PlanError, PlanIssue
from phasegate.timelimit import TimeLimitExceeded, seconds_from_env, time_limit

StepHook = Callable[[MigrationInfo, tuple[str, ...]], None]

# Reading the revisions imports every revision file; module-level code that blocks (a
# sleep, a connection) would hang every command, so the reading has a time limit.
IMPORT_TIMEOUT_ENV = "PHASEGATE_IMPORT_TIMEOUT"
RENDERING = "phasegate_rendering"  # config attribute: phasegate renders SQL for lint/preview
IMPORT_TIMEOUT = 30.0


@dataclass(frozen=True)
class RevisionInfo:
    revision: str
    parents: tuple[str, ...]  # down revisions and depends_on: all must be applied first
    down_revisions: tuple[str, ...]  # the graph edges alone: what a downgrade returns to
    plan: str | None
    phase: str | None
    path: str
    doc: str
    allow: dict[str, str] = field(default_factory=dict)  # phasegate_allow: lint waivers
    guarded: bool = False  # its upgrade() carries phasegate.guard.guarded

    def describe(self) -> str:
        return f"{self.revision} ({self.doc})" if self.doc else self.revision


@dataclass
class PlanRevisions:
    """A plan's phases resolved to revision ids in graph order, plus foreign ancestors."""

    by_phase: dict[str, list[str]]
    foreign: dict[str, list[RevisionInfo]] = field(default_factory=dict)

    def of(self, phase: str) -> list[str]:
        return self.by_phase.get(phase, [])


@dataclass
class OfflineSQL:
    """Rendered SQL per revision, in the order Alembic would run them."""

    by_revision: dict[str, str]
    version_table: str


class AlembicProject:
    """One Alembic project (alembic.ini + script directory), loaded without a database."""

    def __init__(self, config_path: str | Path) -> None:
        path = Path(config_path)
        if not path.is_file():
            raise UsageError(
                f"no Alembic config at {path}: pass --config path/to/alembic.ini "
                "or run phasegate from the directory that holds alembic.ini"
            )
        self.config_path = path
        self.config = Config(str(path))
        self.import_limit = limit = seconds_from_env(IMPORT_TIMEOUT_ENV, IMPORT_TIMEOUT)
        try:
            self.script = ScriptDirectory.from_config(self.config)

            def explain(stack: list[traceback.FrameSummary]) -> str:
                return self._import_too_long(stack, f"still running after {limit:g} s")

            with time_limit(limit, explain):
                walked = list(self.script.walk_revisions())
        except CommandError as exc:
            raise UsageError(f"{path}: Alembic cannot read its revisions: {exc}") from None
        except TimeLimitExceeded as exc:
            raise UsageError(self._import_too_long(exc.stack, str(exc))) from None
        except Exception as exc:  # a revision file that fails to import
            where = _failing_file(exc, str(path.parent))
            raise UsageError(
                f"{path}: Alembic cannot read its revisions: {where}raised "
                f"{type(exc).__name__}: {exc}. Fix that file, then run the command again"
            ) from None
        walked.reverse()  # base → head
        self.order: list[str] = [s.revision for s in walked]
        self.position = {rev: i for i, rev in enumerate(self.order)}
        self.revisions = {s.revision: _info(s) for s in walked}

    def _import_too_long(self, stack: list[traceback.FrameSummary], what: str) -> str:
        return (
            f"{self.config_path}: Alembic cannot read its revisions: "
            f"{_running_file(stack, self.script)}was {what} of loading the revision files "
            f"({IMPORT_TIMEOUT_ENV}: {self.import_limit:g} s). A revision file's module-level "
            "code runs whenever phasegate or Alembic reads the revisions, so it must not "
            "sleep, connect or query: move that work into upgrade() or downgrade(). If "
            f"loading is only slow, raise the limit, e.g. {IMPORT_TIMEOUT_ENV}=2m (0 turns it "
            "off)"
        )

    @property
    def ini_url(self) -> str | None:
        try:
            return self.config.get_main_option("sqlalchemy.url") or None
        except configparser.InterpolationError:  # its message quotes the URL: not shown
            raise UsageError(
                f"{self.config_path}: sqlalchemy.url holds a '%' that is not '%%' or "
                "'%(name)s': alembic.ini interpolates '%', so write each '%' of the URL "
                "as '%%' (e.g. p%%40ss for a URL-encoded 'p@ss')"
            ) from None

    @property
    def location(self) -> str:
        return str(self.script.dir)

    def tagged(self, plan: str, phase: str | None = None) -> list[RevisionInfo]:
        return [
            info
            for rev in self.order
            if (info := self.revisions[rev]).plan == plan and (phase is None or info.phase == phase)
        ]

    def ancestors(self, revision: str) -> set[str]:
        """`revision` and everything it depends on, through down_revision and depends_on."""
        seen: set[str] = set()
        stack = [revision]
        while stack:
            rev = stack.pop()
            if rev in seen or rev not in self.revisions:
                continue
            seen.add(rev)
            stack.extend(self.revisions[rev].parents)
        return seen

    def applied(self, heads: Iterable[str]) -> set[str]:
        """Every revision applied in a database whose version table holds `heads`."""
        result: set[str] = set()
        for head in heads:
            result |= self.ancestors(head)
        return result

    def sort(self, revisions: Iterable[str]) -> list[str]:
        return sorted(revisions, key=lambda r: self.position.get(r, -1))

    # -- resolution -------------------------------------------------------------------------

    def resolve(self, plan: Plan) -> PlanRevisions:
        """Map each of the plan's phases to its revisions; PlanError lists every problem."""
        issues: list[PlanIssue] = []
        by_phase: dict[str, list[str]] = {}
        for phase in plan.phase_names():
            if phase not in REVISION_PHASES:
                continue
            listed = plan.phase(phase).revisions  # type: ignore[union-attr]
            if listed is None:
                by_phase[phase] = [i.revision for i in self.tagged(plan.name, phase)]
                continue
            found = []
            for index, rev in enumerate(listed):
                info = self.revisions.get(rev) or self._by_prefix(rev)
                loc = ("phases", phase, "revisions", index)
                if info is None:
                    issues.append(
                        plan.issue(
                            loc,
                            f"revision {rev!r} does not exist in {self.location}",
                            "check the id (`alembic history`) or remove it from the list",
                        )
                    )
                elif info.plan is not None and (info.plan, info.phase) != (plan.name, phase):
                    issues.append(
                        plan.issue(
                            loc,
                            f"revision {info.revision} is tagged plan={info.plan!r}, "
                            f"phase={info.phase!r} ({info.path})",
                            f"list it under its own phase, or retag it phasegate_plan = "
                            f"{plan.name!r}, phasegate_phase = {phase!r}",
                        )
                    )
                else:
                    found.append(info.revision)
            for info in self.tagged(plan.name, phase):
                if info.revision not in found:
                    issues.append(
                        self._file_issue(
                            info,
                            f"tagged for phase {phase!r} of plan {plan.name!r} but missing from "
                            f"phases.{phase}.revisions in {plan.source}",
                            "list it there, or drop `revisions:` to take every tagged revision",
                        )
                    )
            by_phase[phase] = self.sort(found)
        issues += self._stray_tags(plan)
        issues += self._order_issues(plan, by_phase)
        if issues:
            raise PlanError(issues)
        foreign = {
            phase: self._foreign_ancestors(plan, revs) for phase, revs in by_phase.items() if revs
        }
        return PlanRevisions(by_phase, {k: v for k, v in foreign.items() if v})

    def _by_prefix(self, prefix: str) -> RevisionInfo | None:
        matches = [r for r in self.order if r.startswith(prefix)] if len(prefix) >= 4 else []
        return self.revisions[matches[0]] if len(matches) == 1 else None

    def _stray_tags(self, plan: Plan) -> list[PlanIssue]:
        issues = []
        for info in self.tagged(plan.name):
            if info.phase == "backfill":
                issues.append(
                    self._file_issue(
                        info,
                        "revisions cannot be tagged 'backfill': that phase runs jobs",
                        "tag schema changes 'expand' (additive) or 'switch' (constraints)",
                    )
                )
            elif info.phase not in PHASES:
                issues.append(
                    self._file_issue(
                        info,
                        f"unknown phase tag {info.phase!r}",
                        "phasegate_phase is one of 'expand', 'switch', 'contract'",
                    )
                )
            elif info.phase not in plan.phase_names():
                issues.append(
                    self._file_issue(
                        info,
                        f"tagged for phase {info.phase!r}, which plan {plan.name!r} "
                        f"({plan.source}) does not have",
                        f"add a `{info.phase}:` phase to the plan or retag the revision",
                    )
                )
        return issues

    def _order_issues(self, plan: Plan, by_phase: dict[str, list[str]]) -> list[PlanIssue]:
        """One issue per revision that descends from revisions of a later phase.

        The issue is filed at the descendant, the newer of the two: the usual slip is a
        revision added at the head after the later phases' revisions (`alembic revision`
        appends there), not an old, applied one in the wrong place; the hint covers both.
        """
        issues = []
        phases = [p for p in REVISION_PHASES if by_phase.get(p)]
        for i, earlier in enumerate(phases):
            for early in by_phase[earlier]:
                before = self.ancestors(early)
                ahead = [
                    (late, later)
                    for later in phases[i + 1 :]
                    for late in by_phase[later]
                    if late in before
                ]
                if not ahead:
                    continue
                named = ", ".join(f"{late} ({later})" for late, later in ahead)
                last = ahead[-1][1]
                issues.append(
                    self._file_issue(
                        self.revisions[early],
                        f"this {earlier} revision comes after {named} in the revision graph, "
                        f"so it would run after them",
                        f"phases apply in order: tag it for {last} or a later phase, or move "
                        f"it to a plan of its own; if those revisions were meant to follow it, "
                        f"make them descend from {early} (edit their down_revision)",
                    )
                )
        return issues

    def _foreign_ancestors(self, plan: Plan, revisions: list[str]) -> list[RevisionInfo]:
        """Revisions of other plans that upgrading to `revisions` would also apply."""
        reach: set[str] = set()
        for rev in revisions:
            reach |= self.ancestors(rev)
        return [
            self.revisions[r]
            for r in self.sort(reach)
            if self.revisions[r].plan not in (None, plan.name)
        ]

    def _file_issue(self, info: RevisionInfo, message: str, hint: str) -> PlanIssue:
        return PlanIssue(
            info.path, _tag_line(info.path), f"revision {info.revision}", message, hint
        )

    # -- running migrations -----------------------------------------------------------------

    def current_heads(self, db: Session) -> tuple[str, ...]:
        """The heads in the database's version table, read through the project's env.py."""
        found: list[str] = []

        def capture(rev: Any, context: MigrationContext) -> list[Any]:
            found.extend(context.get_current_heads())
            return []

        def explain(stack: list[traceback.FrameSummary]) -> str:
            return self._env_too_long(stack, f"still running after {self.import_limit:g} s")

        try:  # env.py runs here as it would for a migration, but a read must not hang
            with time_limit(self.import_limit, explain):
                self._run_env(db, capture, destination=None, on_step=None, read_only=True)
        except TimeLimitExceeded as exc:
            raise UsageError(self._env_too_long(exc.stack, str(exc))) from None
        return tuple(sorted(found))

    def _env_too_long(self, stack: list[traceback.FrameSummary], what: str) -> str:
        return (
            f"{self.config_path}: reading the database's Alembic heads through env.py: "
            f"{_running_file(stack, self.script)}was {what} ({IMPORT_TIMEOUT_ENV}: "
            f"{self.import_limit:g} s). env.py (or what it imports) must not block when it "
            "runs: keep slow work inside run_migrations; raise the limit if reading is "
            "only slow"
        )

    def upgrade(
        self,
        db: Session,
        target: str,
        on_step: StepHook | None = None,
        phase_of: tuple[str, str] | None = None,
    ) -> None:
        """Upgrade to `target`. `phase_of` (plan, phase): phasegate runs that phase now, so
        the revision guard lets its revisions run (the marker is this session's, set in a
        committed transaction of its own so a retried revision still sees it, and cleared
        afterwards)."""
        if phase_of is not None:
            _mark(db, "/".join(phase_of))
        try:
            self._run_env(
                db,
                lambda rev, context: self.script._upgrade_revs(target, rev),
                destination=target,
                on_step=on_step,
            )
        finally:
            if phase_of is not None:
                with contextlib.suppress(Exception):  # a lost session took its marker along
                    _mark(db, "")

    def downgrade(self, db: Session, target: str, on_step: StepHook | None = None) -> None:
        self._run_env(
            db,
            lambda rev, context: self.script._downgrade_revs(target, rev),
            destination=target,
            on_step=on_step,
        )

    def offline_sql(self, target: str, start: str | None = None) -> OfflineSQL:
        """The SQL `alembic upgrade start:target --sql` renders, cut per revision.

        No database: Alembic renders each revision's operations as text through env.py's
        offline branch. Our `on_version_apply` hook marks where each revision's text ends.
        """
        buffer = io.StringIO()
        cuts: list[tuple[str, int]] = []
        settings: dict[str, Any] = {}

        def cut(step: MigrationInfo, _heads: tuple[str, ...]) -> None:
            cuts.append((step.up_revision_id or "", buffer.tell()))

        environment = EnvironmentContext(
            self.config,
            self.script,
            fn=lambda rev, context: self.script._upgrade_revs(target, start),
            as_sql=True,
            starting_rev=start,
            destination_rev=target,
        )
        _force_phasegate_settings(environment, None, cut, settings, offline=True)
        previous = self.config.output_buffer
        self.config.output_buffer = buffer
        self.config.attributes[RENDERING] = True  # lint and preview: no guard statement
        try:
            with environment:
                self.script.run_env()
        except CommandError as exc:
            raise RuntimeFailure(f"Alembic cannot render {target} offline: {exc}") from None
        finally:
            self.config.output_buffer = previous
            self.config.attributes.pop(RENDERING, None)
        text = buffer.getvalue()
        pieces, begin = {}, 0
        for revision, end in cuts:
            pieces[revision] = text[begin:end]
            begin = end
        return OfflineSQL(pieces, settings.get("version_table") or "alembic_version")

    def downgrade_steps(self, heads: tuple[str, ...], target: str) -> list[str]:
        """The revisions `downgrade(target)` would undo from `heads`, newest first: the
        applied ones that descend from `target` (all, for "base"). A branch beside it
        (another team's revision on the baseline) stays, as Alembic leaves it."""
        applied = self.applied(heads)
        if target == "base":
            return list(reversed(self.sort(applied)))
        undone = {r for r in applied if r != target and target in self.ancestors(r)}
        return list(reversed(self.sort(undone)))

    def unguarded(self, plan: Plan, resolved: PlanRevisions) -> list[PlanIssue]:
        """The plan's revisions that a plain `alembic upgrade` would run at any time: untagged
        (listed in `revisions:`), or tagged without the guard on their upgrade()."""
        issues = []
        for phase, revisions in resolved.by_phase.items():
            for rev in revisions:
                info = self.revisions[rev]
                if info.plan is None:
                    issues.append(
                        self._file_issue(
                            info,
                            f"listed in phases.{phase}.revisions of {plan.source} but not tagged, "
                            "so a plain `alembic upgrade` cannot tell it belongs to the plan and "
                            "runs it whenever it is next",
                            f"tag it: phasegate_plan = {plan.name!r}, phasegate_phase = "
                            f"{phase!r}, then guard its upgrade() as below",
                        )
                    )
                elif not info.guarded:
                    issues.append(
                        PlanIssue(
                            info.path,
                            _upgrade_line(info.path),
                            f"revision {info.revision}",
                            f"tagged for phase {phase!r} but its upgrade() has no guard, so a "
                            "plain `alembic upgrade head` (a deploy's, a container's start) "
                            "runs it before phasegate has run the phase",
                            "add `from phasegate.guard import guarded` and put `@guarded` on "
                            "the line above `def upgrade()`",
                        )
                    )
        return issues

    def _run_env(
        self,
        db: Session,
        fn: Callable[[Any, MigrationContext], list[Any]],
        destination: str | None,
        on_step: StepHook | None,
        read_only: bool = False,
    ) -> None:
        db.ensure_idle()  # Alembic never commits a transaction it did not begin
        self.config.attributes["connection"] = db.connection
        environment = EnvironmentContext(
            self.config,
            self.script,
            fn=fn,
            destination_rev=destination,
            dont_mutate=read_only,  # reading the heads must not create alembic_version
        )
        _force_phasegate_settings(environment, db.connection, on_step)
        try:
            with environment:
                self.script.run_env()
        except CommandError as exc:
            db.reset()
            raise RuntimeFailure(f"Alembic refused: {exc}") from None
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                db.reset()
            raise
        finally:
            self.config.attributes.pop("connection", None)
        db.ensure_idle()


def _force_phasegate_settings(
    environment: EnvironmentContext,
    connection: Any,
    on_step: StepHook | None,
    seen: dict[str, Any] | None = None,
    offline: bool = False,
) -> None:
    """Whatever env.py passes to `context.configure`, add our per-step transaction and hook.

    Alembic's `context` module proxies to the active EnvironmentContext instance, so an
    instance-level `configure` reaches even a user's own env.py unchanged.
    """
    original = environment.configure

    def record_step(
        *, ctx: MigrationContext, step: MigrationInfo, heads: set[str], run_args: dict[str, Any]
    ) -> None:
        if not offline and ctx.connection is not connection:
            raise RuntimeFailure(
                "env.py opened its own database connection instead of using "
                "config.attributes['connection']; follow Alembic's cookbook recipe "
                "'Sharing a Connection across one or more programmatic migration commands'"
            )
        if on_step is not None:
            on_step(step, tuple(sorted(heads)))

    def configure(*args: Any, **kw: Any) -> None:
        kw["transaction_per_migration"] = True
        if offline:  # render for PostgreSQL whatever URL (often a placeholder) env.py found
            kw.pop("url", None)
            kw["dialect_name"] = "postgresql"
        if seen is not None:
            seen["version_table"] = kw.get("version_table")
        kw["on_version_apply"] = [*to_tuple(kw.get("on_version_apply"), default=()), record_step]
        original(*args, **kw)

    environment.configure = configure  # type: ignore[method-assign]


def _info(script: Script) -> RevisionInfo:
    module = script.module
    return RevisionInfo(
        revision=script.revision,
        parents=tuple(script._all_down_revisions),
        down_revisions=tuple(script._versioned_down_revisions),
        plan=getattr(module, "phasegate_plan", None),
        phase=getattr(module, "phasegate_phase", None),
        path=str(script.path),
        doc=(script.doc or "").strip(),
        allow=_waivers(getattr(module, "phasegate_allow", None)),
        guarded=guard.is_guarded(getattr(module, "upgrade", None)),
    )


def _mark(db: Session, value: str) -> None:
    """Set the guard's marker on this session (session-level, committed)."""
    with db.tx():
        db.execute(
            "SELECT set_config(%(name)s, %(value)s, false)", {"name": guard.MARKER, "value": value}
        )


def _waivers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(rule): str(reason) for rule, reason in value.items()}


def _failing_file(exc: BaseException, root: str) -> str:
    """'file:line ' of the deepest frame in the project (a revision that raised)."""
    found = ""
    trace = exc.__traceback__
    while trace is not None:
        filename = trace.tb_frame.f_code.co_filename
        if filename.startswith(str(Path(root).resolve())) or "/versions/" in filename:
            found = f"{filename}:{trace.tb_lineno} "
        trace = trace.tb_next
    return found


def _running_file(stack: list[traceback.FrameSummary], script: ScriptDirectory) -> str:
    """'file:line ' of the innermost frame in the script directory (the revision, or
    env.py, that was still running), else of the innermost frame at all."""
    root = Path(script.dir).resolve()
    inside = [f for f in stack if Path(f.filename).resolve().is_relative_to(root)]
    frame = (inside or stack or [None])[-1]
    return f"{frame.filename}:{frame.lineno} " if frame is not None else ""


def _upgrade_line(path: str) -> int | None:
    try:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.startswith("def upgrade("):
                return number
    except OSError:
        return None
    return None


def _tag_line(path: str) -> int | None:
    try:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.startswith("phasegate_phase") or line.startswith("phasegate_plan"):
                return number
    except OSError:
        return None
    return None
