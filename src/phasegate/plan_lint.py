"""Lint a plan: render its revisions offline through Alembic, then judge them by phase.

The glue between `revisions` (Alembic) and `lint` (pure rules over parsed SQL), used by
the `lint` command, by `advance` and the phase commands before they change anything, and
by `preview`.
"""

from __future__ import annotations

from dataclasses import dataclass

from phasegate import lint
from phasegate.plan import REVISION_PHASES
from phasegate.revisions import AlembicProject, OfflineSQL, PlanRevisions


@dataclass
class RenderedPlan:
    """The plan's revisions (of the phases asked for) and their offline SQL, rendered once."""

    phases: dict[str, str]  # revision -> phase
    sql: dict[str, str]  # every rendered revision (history included) -> its SQL
    version_table: str
    failure: str | None


def render_plan(
    project: AlembicProject, resolved: PlanRevisions, phases: list[str] | None = None
) -> RenderedPlan:
    wanted = {
        revision: phase
        for phase in REVISION_PHASES
        for revision in resolved.of(phase)
        if phases is None or phase in phases
    }
    if not wanted:
        return RenderedPlan({}, {}, "alembic_version", None)
    sql, version_table, failure = render(project, list(wanted))
    return RenderedPlan(wanted, sql, version_table, failure)


def lint_plan(
    project: AlembicProject, resolved: PlanRevisions, phases: list[str] | None = None
) -> list[lint.Finding]:
    """Findings for the plan's revisions (of `phases`, default all), waivers applied."""
    return lint_rendered(project, render_plan(project, resolved, phases))


def lint_rendered(project: AlembicProject, rendered: RenderedPlan) -> list[lint.Finding]:
    """Findings for a plan already rendered (preview shows the same SQL it lints)."""
    wanted = rendered.phases
    if not wanted:
        return []
    if rendered.failure is not None:
        first = project.sort(wanted)[0]
        info = project.revisions[first]
        return [
            lint.Finding(
                rule="offline-render-failed",
                severity=lint.ERROR,
                revision=first,
                path=info.path,
                phase=wanted[first],
                statement="",
                message=f"{lint.RULES['offline-render-failed'].title}: {rendered.failure}",
                fix=lint.RULES["offline-render-failed"].fix,
            )
        ]
    revisions = [
        lint.RevisionSQL(
            revision=revision,
            path=project.revisions[revision].path,
            sql=sql,
            phase=wanted.get(revision),
            allow=project.revisions[revision].allow,
        )
        for revision, sql in rendered.sql.items()
    ]
    return lint.lint(revisions, rendered.version_table)


def render(project: AlembicProject, revisions: list[str]) -> tuple[dict[str, str], str, str | None]:
    """Offline SQL of every revision up to `revisions`, from the start of the history.

    The whole history teaches the linter which tables and column types exist. When an
    older revision cannot render offline, the rendering starts at the plan instead.
    """
    leaves = [
        r for r in revisions if not any(r != o and r in project.ancestors(o) for o in revisions)
    ]
    rendered: dict[str, str] = {}
    version_table = "alembic_version"
    for leaf in project.sort(leaves):
        try:
            out = _render(project, leaf, None)
        except Exception as first_error:
            start = _plan_start(project, revisions)
            try:
                out = _render(project, leaf, start) if start else None
            except Exception as exc:
                return {}, version_table, f"{type(exc).__name__}: {exc}"
            if out is None:
                return {}, version_table, f"{type(first_error).__name__}: {first_error}"
        rendered.update(out.by_revision)
        version_table = out.version_table
    return rendered, version_table, None


def _render(project: AlembicProject, target: str, start: str | None) -> OfflineSQL:
    return project.offline_sql(target, start)


def _plan_start(project: AlembicProject, revisions: list[str]) -> str | None:
    """The one revision the plan's first revision builds on, if there is exactly one."""
    first = project.sort(revisions)[0]
    parents = project.revisions[first].down_revisions
    return parents[0] if len(parents) == 1 else None
