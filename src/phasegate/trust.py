"""Which tables a plan works on: the roles that may use them are the ones its gates trust.

`application_name` is chosen by the client, so any role that may connect can call its
session `bugtracker/2.0`. A connection or heartbeat therefore counts toward *passing* a gate
only when its role may use the plan's tables (such a role could change those rows anyway)
or is listed in `trusted_roles`; every one counts toward *refusing*. This module names the
plan's tables, without a database; `sources` asks the database which roles may use them.

The plan's tables are the tables of its jobs (a batched job's `table`, and what an `sql`
job writes). A plan whose jobs name no table (or that has none) is judged by the tables its
revisions change, read from their offline SQL with PostgreSQL's parser as lint reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast import ast, parse_sql
from pglast.parser import ParseError

from phasegate import lint, locks, plan_lint
from phasegate.plan import Plan
from phasegate.revisions import AlembicProject, PlanRevisions


@dataclass(frozen=True)
class PlanTables:
    """The tables whose users a gate trusts, and where they came from (for messages)."""

    names: tuple[str, ...] = ()
    origin: str = ""  # e.g. "the plan's jobs"
    missing: str = ""  # why there are none, when there are none

    def describe(self) -> str:
        if self.names:
            return f"{', '.join(self.names)} ({self.origin})"
        return f"no table of the plan is known: {self.missing or 'none was given'}"


def plan_tables(
    plan: Plan,
    project: AlembicProject | None = None,
    resolved: PlanRevisions | None = None,
    rendered: plan_lint.RenderedPlan | None = None,
) -> PlanTables:
    """The plan's tables: its jobs', else (with a project at hand) its revisions';
    `rendered`: the plan's offline SQL when the caller has it already."""
    names = job_tables(plan)
    if names:
        return PlanTables(names, "the tables of the plan's jobs")
    if project is None or resolved is None:
        return PlanTables(missing="the plan's jobs name no table")
    return revision_tables(rendered or plan_lint.render_plan(project, resolved))


def job_tables(plan: Plan) -> tuple[str, ...]:
    names: list[str] = []
    for job in plan.jobs():
        if job.is_batched and job.table:
            names.append(job.table)
        elif job.sql:
            try:
                names += [t for raw in parse_sql(job.sql) for t in _tables_of(raw.stmt)]
            except ParseError:
                continue  # the job itself will fail, naming the error
    return tuple(dict.fromkeys(names))


def revision_tables(rendered: plan_lint.RenderedPlan) -> PlanTables:
    """Tables the plan's revisions create, change or lock, from their offline SQL."""
    if not rendered.phases:
        return PlanTables(missing="the plan has no job that names a table and no revision")
    if rendered.failure is not None:
        return PlanTables(
            missing=f"its revisions could not be rendered offline: {rendered.failure}"
        )
    names: list[str] = []
    for revision in rendered.phases:
        try:
            statements = lint.split_statements(
                rendered.sql.get(revision, ""), rendered.version_table
            )
        except ParseError:
            continue
        names += [t for statement in statements for t in _tables_of(statement.node)]
    if not names:
        return PlanTables(missing="neither its jobs nor its revisions name a table")
    return PlanTables(tuple(dict.fromkeys(names)), "the tables the plan's revisions change")


def _tables_of(node: ast.Node) -> list[str]:
    """Tables a statement creates or locks (an index known only by name is left out)."""
    names = [lock.table for lock in locks.locks_of(node)]
    if isinstance(node, ast.CreateStmt | ast.CreateTableAsStmt):
        relation = node.relation if isinstance(node, ast.CreateStmt) else node.into.rel
        names.append(locks.relation_name(relation))
    return [name for name in names if name != "?" and not name.endswith("'s table")]
