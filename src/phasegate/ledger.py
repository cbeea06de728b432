"""phasegate's own tables in the target database: phase states, job checkpoints, events.

The ledger records; it does not guess. Alembic's version table and the job checkpoints
are the truth about where the database is; the ledger says which phase a plan reached,
who moved it, and why. Every writer here runs inside the caller's transaction so a
ledger row commits (or rolls back) together with the work it describes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from phasegate.db import Session

SCHEMA = "phasegate"
SCHEMA_VERSION = 1

_DDL = """
CREATE SCHEMA IF NOT EXISTS phasegate;
CREATE TABLE IF NOT EXISTS phasegate.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS phasegate.plan_state (
    plan text PRIMARY KEY,
    phase text,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'done', 'failed')),
    active_phase text,
    direction text CHECK (direction IN ('advance', 'rollback')),
    plan_digest text,
    alembic_heads text[] NOT NULL DEFAULT '{}',
    actor text,
    error text,
    started_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN phasegate.plan_state.phase IS 'last completed phase; NULL before the first';
COMMENT ON COLUMN phasegate.plan_state.active_phase IS 'phase being run or rolled back';
CREATE TABLE IF NOT EXISTS phasegate.job_checkpoint (
    plan text NOT NULL,
    job text NOT NULL,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'done', 'failed')),
    last_key text,
    upper_key text,
    rows_done bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    remaining bigint,
    started_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    verified_at timestamptz,
    PRIMARY KEY (plan, job)
);
CREATE TABLE IF NOT EXISTS phasegate.event (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    plan text,
    phase text,
    kind text NOT NULL,
    actor text,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE OR REPLACE FUNCTION phasegate.event_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'phasegate.event is append-only: rows are never updated or deleted';
END
$$;
DROP TRIGGER IF EXISTS event_is_append_only ON phasegate.event;
CREATE TRIGGER event_is_append_only BEFORE UPDATE OR DELETE ON phasegate.event
    FOR EACH ROW EXECUTE FUNCTION phasegate.event_is_append_only();
INSERT INTO phasegate.meta (key, value) VALUES ('schema_version', '1')
    ON CONFLICT (key) DO NOTHING;
"""


@dataclass
class PlanState:
    plan: str
    phase: str | None = None
    state: str = "pending"
    active_phase: str | None = None
    direction: str | None = None
    plan_digest: str | None = None
    alembic_heads: list[str] = field(default_factory=list)
    actor: str | None = None
    error: str | None = None
    started_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


@dataclass
class Checkpoint:
    plan: str
    job: str
    status: str = "pending"
    last_key: str | None = None
    upper_key: str | None = None
    rows_done: int = 0
    batches: int = 0
    remaining: int | None = None
    started_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    verified_at: dt.datetime | None = None


def exists(db: Session) -> bool:
    return bool(db.scalar("SELECT to_regclass('phasegate.plan_state') IS NOT NULL"))


def ensure_schema(db: Session) -> None:
    """Create or upgrade the ledger; safe to run any number of times (under the lock)."""
    with db.tx():
        if exists(db) and db.scalar(
            "SELECT value::int >= %(v)s FROM phasegate.meta WHERE key = 'schema_version'",
            {"v": SCHEMA_VERSION},
        ):
            return
        db.execute(_DDL)


def get_state(db: Session, plan: str) -> PlanState:
    if not exists(db):
        return PlanState(plan)
    rows = db.dicts("SELECT * FROM phasegate.plan_state WHERE plan = %(p)s", {"p": plan})
    return PlanState(**rows[0]) if rows else PlanState(plan)


def all_states(db: Session) -> list[PlanState]:
    if not exists(db):
        return []
    return [PlanState(**r) for r in db.dicts("SELECT * FROM phasegate.plan_state ORDER BY plan")]


def save_state(db: Session, state: PlanState) -> None:
    db.execute(
        """
        INSERT INTO phasegate.plan_state AS s
            (plan, phase, state, active_phase, direction, plan_digest, alembic_heads,
             actor, error, started_at, updated_at)
        VALUES (%(plan)s, %(phase)s, %(state)s, %(active_phase)s, %(direction)s,
                %(plan_digest)s, %(alembic_heads)s, %(actor)s, %(error)s, %(started_at)s, now())
        ON CONFLICT (plan) DO UPDATE SET
            phase = excluded.phase, state = excluded.state,
            active_phase = excluded.active_phase, direction = excluded.direction,
            plan_digest = excluded.plan_digest, alembic_heads = excluded.alembic_heads,
            actor = excluded.actor, error = excluded.error,
            started_at = excluded.started_at, updated_at = now()
        """,
        {
            "plan": state.plan,
            "phase": state.phase,
            "state": state.state,
            "active_phase": state.active_phase,
            "direction": state.direction,
            "plan_digest": state.plan_digest,
            "alembic_heads": list(state.alembic_heads),
            "actor": state.actor,
            "error": state.error,
            "started_at": state.started_at,
        },
    )


def record_event(
    db: Session,
    plan: str | None,
    kind: str,
    actor: str | None,
    phase: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    db.execute(
        """
        INSERT INTO phasegate.event (plan, phase, kind, actor, detail)
        VALUES (%(plan)s, %(phase)s, %(kind)s, %(actor)s, %(detail)s)
        """,
        {"plan": plan, "phase": phase, "kind": kind, "actor": actor, "detail": Jsonb(detail or {})},
    )


def get_checkpoint(db: Session, plan: str, job: str) -> Checkpoint:
    if not exists(db):
        return Checkpoint(plan, job)
    rows = db.dicts(
        "SELECT * FROM phasegate.job_checkpoint WHERE plan = %(p)s AND job = %(j)s",
        {"p": plan, "j": job},
    )
    return Checkpoint(**rows[0]) if rows else Checkpoint(plan, job)


def checkpoints(db: Session, plan: str) -> list[Checkpoint]:
    if not exists(db):
        return []
    rows = db.dicts(
        "SELECT * FROM phasegate.job_checkpoint WHERE plan = %(p)s ORDER BY started_at, job",
        {"p": plan},
    )
    return [Checkpoint(**r) for r in rows]


def save_checkpoint(db: Session, cp: Checkpoint) -> None:
    db.execute(
        """
        INSERT INTO phasegate.job_checkpoint AS c
            (plan, job, status, last_key, upper_key, rows_done, batches, remaining,
             started_at, updated_at, verified_at)
        VALUES (%(plan)s, %(job)s, %(status)s, %(last_key)s, %(upper_key)s, %(rows_done)s,
                %(batches)s, %(remaining)s, coalesce(%(started_at)s, now()), now(),
                %(verified_at)s)
        ON CONFLICT (plan, job) DO UPDATE SET
            status = excluded.status, last_key = excluded.last_key,
            upper_key = excluded.upper_key, rows_done = excluded.rows_done,
            batches = excluded.batches, remaining = excluded.remaining,
            started_at = excluded.started_at, updated_at = now(),
            verified_at = excluded.verified_at
        """,
        {
            "plan": cp.plan,
            "job": cp.job,
            "status": cp.status,
            "last_key": cp.last_key,
            "upper_key": cp.upper_key,
            "rows_done": cp.rows_done,
            "batches": cp.batches,
            "remaining": cp.remaining,
            "started_at": cp.started_at,
            "verified_at": cp.verified_at,
        },
    )


def delete_checkpoint(db: Session, plan: str, job: str) -> None:
    db.execute(
        "DELETE FROM phasegate.job_checkpoint WHERE plan = %(p)s AND job = %(j)s",
        {"p": plan, "j": job},
    )


def clear_checkpoints(db: Session, plan: str) -> int:
    cursor = db.execute("DELETE FROM phasegate.job_checkpoint WHERE plan = %(p)s", {"p": plan})
    return cursor.rowcount
