"""The dry run a reviewer reads before approving a deploy: what each pending phase would do.

For each pending phase: the gate verdict now, each revision's SQL statement by statement
with the lock it takes, the lint findings, the sync triggers the backfill would install,
and each backfill job's rows, batches and duration. Nothing is written: not the ledger
(never created here), not the schema, not a row (the one measured sample batch is rolled
back). Without a database it still shows the SQL, the locks and the lint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg import sql
from psycopg.errors import UndefinedColumn, UndefinedFunction, UndefinedTable

from phasegate import backfill, gates, ledger, lint, sources, sync, trust
from phasegate.config import ProjectConfig
from phasegate.db import Session, quote_table
from phasegate.locks import locks_of
from phasegate.pacing import BackfillSettings
from phasegate.plan import REVISION_PHASES, Plan
from phasegate.plan_lint import lint_rendered, render_plan
from phasegate.revisions import AlembicProject, PlanRevisions

EXACT_COUNT_PAGES = 1000  # tables up to ~8 MB are counted when their statistics are missing


@dataclass
class PreviewOptions:
    phase: str | None = None
    exact: bool = False
    sample: bool = True
    live_versions: tuple[str, ...] = ()
    config: ProjectConfig = field(default_factory=ProjectConfig)


def preview(
    project: AlembicProject,
    plan: Plan,
    resolved: PlanRevisions,
    db: Session | None,
    options: PreviewOptions,
) -> dict[str, Any]:
    """One document describing every pending phase (or `options.phase`)."""
    state = _state(db, plan)
    pending = _pending(plan, state, options.phase)
    plan_sql = render_plan(project, resolved)  # once: shown and linted alike
    findings = lint_rendered(project, plan_sql)
    rendered, version_table, failure = plan_sql.sql, plan_sql.version_table, plan_sql.failure
    tables = trust.plan_tables(plan, project, resolved, plan_sql)
    phases = []
    for phase in pending:
        entry: dict[str, Any] = {"phase": phase, "compatible": plan.phase(phase).compatible}
        entry["gate"] = _gate(db, plan, phase, options, tables) if db is not None else None
        if phase in REVISION_PHASES:
            entry["revisions"] = [
                _revision(project, rev, rendered.get(rev), version_table, findings)
                for rev in resolved.of(phase)
            ]
        if phase == "backfill":
            entry["sync_triggers"] = [  # one function per table runs its jobs in plan order
                {
                    "job": ", ".join(job.name for job in group),
                    "table": group[0].table,
                    "sql": [_text(db, s) for s in sync.install_statements(plan.name, group)],
                }
                for group in sync.table_groups(db, plan.jobs())
            ]
            ahead = _pending(plan, state, None)  # --phase backfill: what is not done still
            earlier = ahead[: ahead.index(phase)] if phase in ahead else []
            unapplied = [p for p in earlier if resolved.of(p)]
            entry["jobs"] = [_job(db, job, options, unapplied) for job in plan.jobs()]
        phases.append(entry)
    return {
        "plan": plan.name,
        "app": plan.app,
        "offline": db is None,
        "state": {
            "phase": state.phase,
            "state": state.state,
            "active_phase": state.active_phase,
        },
        "render_error": failure,
        "lint": {
            "errors": sum(1 for f in findings if f.blocking),
            "warnings": sum(1 for f in findings if f.severity == lint.WARNING and not f.waived),
            "waived": sum(1 for f in findings if f.waived),
        },
        "phases": phases,
    }


def _state(db: Session | None, plan: Plan) -> ledger.PlanState:
    if db is None:
        return ledger.PlanState(plan.name)
    with db.tx():
        return ledger.get_state(db, plan.name)  # reads only; no ledger is created


def _pending(plan: Plan, state: ledger.PlanState, only: str | None) -> list[str]:
    names = plan.phase_names()
    if only is not None:
        plan.phase(only)
        return [only]
    start = 0 if state.phase is None else names.index(state.phase) + 1
    if state.state in ("running", "failed") and state.direction == "advance":
        start = names.index(state.active_phase or names[start])
    return names[start:]


def _gate(
    db: Session, plan: Plan, phase: str, options: PreviewOptions, tables: trust.PlanTables
) -> dict[str, Any]:
    sighting = sources.observe(db, plan.app, options.live_versions, options.config, tables)
    decision = gates.evaluate(
        plan.app,
        plan.phase(phase).compatible,
        sighting.observations,
        f"for entering {phase}",
        failures=sighting.failures,
        trust_rule=sighting.trust_rule,
    )
    return decision.to_dict()


def _revision(
    project: AlembicProject,
    revision: str,
    text: str | None,
    version_table: str,
    findings: list[lint.Finding],
) -> dict[str, Any]:
    info = project.revisions[revision]
    statements = []
    if text is not None:
        for statement in lint.split_statements(text, version_table):
            statements.append(
                {
                    "sql": statement.text,
                    "transaction": statement.transaction if statement.transaction >= 0 else None,
                    "locks": [
                        {"mode": lock.mode, "table": lock.table}
                        for lock in locks_of(statement.node)
                    ],
                }
            )
    return {
        "revision": revision,
        "doc": info.doc,
        "path": info.path,
        "statements": statements,
        "lint": [f.to_dict() for f in findings if f.revision == revision],
    }


def _job(
    db: Session | None, job: Any, options: PreviewOptions, unapplied: list[str]
) -> dict[str, Any]:
    """The job as it would run, timed on one rolled-back sample batch where it can be.

    `unapplied`: the pending phases before backfill that have revisions; while they are
    not applied, the job's new columns may not exist yet, and the sample says so.
    """
    entry: dict[str, Any] = {"name": job.name, "kind": "batched" if job.is_batched else "sql"}
    if not job.is_batched:
        entry["sql"] = job.sql
        return entry
    entry |= {"table": job.table, "set": job.set_, "where": job.where}
    if db is None:
        return entry
    rows, source = _rows(db, job.table or "", options.exact)
    entry |= {"estimated_rows": rows, "rows_from": source}
    settings = BackfillSettings()
    rules = backfill.update_rules(db, job.table or "") if source != "table missing" else []
    if rules:
        entry["sample"] = {"error": " ".join(backfill.rules_refusal(job.table or "", rules))}
    elif not options.sample:  # asked for: nothing runs against the rows, and preview says so
        entry["sample"] = {"skipped": "--no-sample"}
    elif rows:
        try:
            sample = backfill.sample_batch(db, backfill.up_work(job))
        except Exception as exc:  # a column that expand has yet to add, a lock, ...
            message = str(getattr(exc, "message", exc)).strip().splitlines()[0]
            if unapplied and isinstance(exc, UndefinedColumn | UndefinedTable | UndefinedFunction):
                message += f" ({' and '.join(unapplied)} not applied yet: timed once it is)"
            entry["sample"] = {"error": message}
        else:
            entry["sample"] = {"rows": sample.rows, "seconds": round(sample.seconds, 4)}
            if sample.rate > 0:
                size = job.batch_size or int(
                    min(
                        max(sample.rate * settings.target_ms / 1000, settings.min_batch),
                        settings.max_batch,
                    )
                )
                entry["batch_size"] = size
                entry["batches"] = -(-rows // size)
                entry["seconds"] = round(rows / sample.rate, 3)
    return entry


def _rows(db: Session, table: str, exact: bool) -> tuple[int | None, str]:
    """The table's rows: a count with --exact, else pg_class.reltuples, else a count of a
    small table or of a page sample of a big one (statistics missing)."""
    relation = quote_table(table)
    with db.tx():
        if exact:
            return int(db.scalar(sql.SQL("SELECT count(*) FROM {}").format(relation))), "count"
        row = db.execute(
            "SELECT reltuples::bigint, pg_relation_size(oid) / current_setting('block_size')::int"
            " FROM pg_class WHERE oid = to_regclass(%(t)s)",
            {"t": relation.as_string(db.raw)},
        ).fetchone()
        if row is None:
            return None, "table missing"
        reltuples, pages = row
        if reltuples >= 0:
            return int(reltuples), "pg_class.reltuples"
        if pages <= EXACT_COUNT_PAGES:
            return int(db.scalar(sql.SQL("SELECT count(*) FROM {}").format(relation))), "count"
        percent = max(100.0 * EXACT_COUNT_PAGES / pages, 0.01)
        counted = db.scalar(
            sql.SQL("SELECT count(*) FROM {} TABLESAMPLE SYSTEM (%(p)s)").format(relation),
            {"p": percent},
        )
        return int(counted * 100.0 / percent), f"sample of {percent:.2f}% of pages"


def _text(db: Session | None, statement: sql.Composable) -> str:
    return statement.as_string(db.raw if db is not None else None)
