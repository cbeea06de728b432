"""phasegate's own tables in the target database: phase states, job checkpoints, events.

The ledger records; it does not guess. Alembic's version table and the job checkpoints
are the truth about where the database is; the ledger says which phase a plan reached,
who moved it, and why. Every writer here runs inside the caller's transaction so a
ledger row commits (or rolls back) together with the work it describes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from phasegate.contract import Recorded
from phasegate.db import LOCK_NAMESPACE, Session
from phasegate.errors import Fenced, UsageError

SCHEMA = "phasegate"
SCHEMA_VERSION = 8

_DDL = """
DO $$
BEGIN  -- not CREATE SCHEMA IF NOT EXISTS: it needs CREATE on the database even when the
       -- schema is there, and a DBA may create the schema for a role that lacks it
    IF to_regnamespace('phasegate') IS NULL THEN
        CREATE SCHEMA phasegate;
    END IF;
END
$$;
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
-- version 2: slices for parallel workers, and what status needs for rate and ETA
ALTER TABLE phasegate.job_checkpoint
    ADD COLUMN IF NOT EXISTS walked bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total bigint,
    ADD COLUMN IF NOT EXISTS run_started_at timestamptz,
    ADD COLUMN IF NOT EXISTS run_walked bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS phasegate.job_slice (
    plan text NOT NULL,
    job text NOT NULL,
    slice integer NOT NULL,
    lower_key text,
    upper_key text NOT NULL,
    last_key text,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done')),
    rows_done bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    owner text,
    owner_pid integer,
    owner_started timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan, job, slice)
);
COMMENT ON COLUMN phasegate.job_slice.lower_key IS 'exclusive; NULL: from the first key';
COMMENT ON COLUMN phasegate.job_slice.upper_key IS 'inclusive';
-- version 3: heartbeats of running app instances, one row per (app, instance)
CREATE TABLE IF NOT EXISTS phasegate.heartbeat (
    app text NOT NULL,
    instance text NOT NULL,
    version text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app, instance, version)
);
COMMENT ON TABLE phasegate.heartbeat IS
    'one row per app instance and version: an in-place upgrade leaves the old row to expire';
-- version 4: which key the saved bounds are values of, so a resume can tell it changed
ALTER TABLE phasegate.job_checkpoint ADD COLUMN IF NOT EXISTS walk_key text;
COMMENT ON COLUMN phasegate.job_checkpoint.walk_key IS
    'the key the bounds belong to: columns and types, e.g. "id bigint"';
-- version 5: the orchestrator's search_path, which every walk session of the job adopts
ALTER TABLE phasegate.job_checkpoint ADD COLUMN IF NOT EXISTS search_path text;
COMMENT ON COLUMN phasegate.job_checkpoint.search_path IS
    'search_path of the session that prepared the walk (env.py may set it): workers use it';
-- version 6: a job whose new columns may have gone stale while no trigger ran
ALTER TABLE phasegate.job_checkpoint
    ADD COLUMN IF NOT EXISTS resweep boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN phasegate.job_checkpoint.resweep IS
    'rollback of backfill: the next walk also fixes rows whose new columns differ from set';
-- version 7: apps write heartbeats through functions that stamp the server's time and the
-- writer's role (session_user, part of the key: no role can squat another's instance name),
-- and touch only the caller's own rows; the event log refuses TRUNCATE too
ALTER TABLE phasegate.heartbeat ADD COLUMN IF NOT EXISTS role text NOT NULL DEFAULT '';
ALTER TABLE phasegate.heartbeat ALTER COLUMN role SET DEFAULT session_user;
COMMENT ON COLUMN phasegate.heartbeat.role IS
    'session_user of the writer; empty: written before ledger version 7 (never trusted)';
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.conrelid = 'phasegate.heartbeat'::regclass AND c.contype = 'p'
          AND a.attname = 'role'
    ) THEN
        ALTER TABLE phasegate.heartbeat DROP CONSTRAINT IF EXISTS heartbeat_pkey;
        ALTER TABLE phasegate.heartbeat
            ADD CONSTRAINT heartbeat_pkey PRIMARY KEY (app, instance, version, role);
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION phasegate.beat(app text, instance text, version text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO phasegate.heartbeat (app, instance, version, role, first_seen, last_seen)
    VALUES ($1, $2, $3, session_user, clock_timestamp(), clock_timestamp())
    ON CONFLICT (app, instance, version, role) DO UPDATE SET last_seen = clock_timestamp()
$$;
CREATE OR REPLACE FUNCTION phasegate.forget_heartbeat(
    app text, instance text, version text DEFAULT NULL
) RETURNS integer LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM phasegate.heartbeat
        WHERE app = $1 AND instance = $2 AND (version = $3 OR $3 IS NULL)
          AND role = session_user
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;
COMMENT ON FUNCTION phasegate.beat(text, text, text) IS
    'heartbeat of an app instance, stamped with the server''s time and the caller''s role';
COMMENT ON FUNCTION phasegate.forget_heartbeat(text, text, text) IS
    'remove the caller''s own heartbeats of an instance (of one version, when given)';
-- rows written before this upgrade (by an older helper, which cannot beat any more: its
-- grants go below and its ON CONFLICT no longer matches the key) stay fresh if they were
-- fresh now: their instance may still run, and its silence must not open a gate
INSERT INTO phasegate.meta (key, value)
    VALUES ('heartbeat_functions_since', clock_timestamp()::text) ON CONFLICT (key) DO NOTHING;
REVOKE ALL ON FUNCTION phasegate.beat(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION phasegate.forget_heartbeat(text, text, text) FROM PUBLIC;
-- roles that wrote the table directly (the grants the README asked for before) get the
-- functions instead, and lose the direct writes that let them overwrite other rows
DO $$
DECLARE
    writer record;
BEGIN
    FOR writer IN
        SELECT DISTINCT g.grantee, r.rolname
        FROM pg_class c
        CROSS JOIN LATERAL aclexplode(c.relacl) AS g
        LEFT JOIN pg_roles r ON r.oid = g.grantee
        WHERE c.oid = 'phasegate.heartbeat'::regclass AND g.grantee <> c.relowner
          AND g.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
    LOOP
        IF writer.grantee = 0 THEN
            REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON phasegate.heartbeat FROM PUBLIC;
        ELSIF writer.rolname IS NOT NULL THEN
            EXECUTE format(
                'GRANT EXECUTE ON FUNCTION phasegate.beat(text, text, text), '
                'phasegate.forget_heartbeat(text, text, text) TO %I', writer.rolname);
            EXECUTE format(
                'REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON phasegate.heartbeat FROM %I',
                writer.rolname);
        END IF;
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION phasegate.event_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'phasegate.event is append-only: rows are never updated, deleted or truncated';
END
$$;
DROP TRIGGER IF EXISTS event_is_not_truncated ON phasegate.event;
CREATE TRIGGER event_is_not_truncated BEFORE TRUNCATE ON phasegate.event
    FOR EACH STATEMENT EXECUTE FUNCTION phasegate.event_is_append_only();
-- version 8: one plan is one contract (the jobs as the phase started them), and fencing
CREATE TABLE IF NOT EXISTS phasegate.job_contract (
    plan text NOT NULL,
    job text NOT NULL,
    position integer NOT NULL,
    digest text NOT NULL,
    definition jsonb NOT NULL,
    columns jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan, job)
);
COMMENT ON TABLE phasegate.job_contract IS
    'each job as the backfill phase started it: every later process must run exactly this';
COMMENT ON COLUMN phasegate.job_contract.columns IS
    'table oid and attnum of its old and new columns when checked: a changed one was re-created';
ALTER TABLE phasegate.plan_state ADD COLUMN IF NOT EXISTS generation bigint;
ALTER TABLE phasegate.job_checkpoint ADD COLUMN IF NOT EXISTS generation bigint;
ALTER TABLE phasegate.job_checkpoint ADD COLUMN IF NOT EXISTS settings jsonb;
COMMENT ON COLUMN phasegate.job_checkpoint.settings IS
    'TimeZone, DateStyle... of the session that prepared the walk: every worker adopts them';
COMMENT ON COLUMN phasegate.job_checkpoint.generation IS
    'the run that prepared the walk: its batches stop once another run has begun';
INSERT INTO phasegate.meta (key, value) VALUES ('generation', '0') ON CONFLICT (key) DO NOTHING;
INSERT INTO phasegate.meta (key, value) VALUES ('schema_version', '8')
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
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
    generation: int | None = None  # the run that last began a phase of this plan


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
    walked: int = 0
    total: int | None = None
    run_started_at: dt.datetime | None = None
    run_walked: int = 0
    walk_key: str | None = None  # keys.Key.signature of the walk's key
    search_path: str | None = None  # the preparing session's, for every walk session
    resweep: bool = False  # new columns may be stale (rollback of backfill): walk those too
    generation: int | None = None  # the run that prepared the walk (see `begin_run`)
    settings: dict[str, str] | None = None  # its session's expression settings, for workers


@dataclass
class Slice:
    """One key range of a job, claimed by one worker at a time."""

    plan: str
    job: str
    slice: int
    upper_key: str
    lower_key: str | None = None
    last_key: str | None = None
    status: str = "pending"
    rows_done: int = 0
    batches: int = 0
    owner: str | None = None
    owner_pid: int | None = None
    owner_started: dt.datetime | None = None
    updated_at: dt.datetime | None = None


def exists(db: Session) -> bool:
    return bool(db.scalar("SELECT to_regclass('phasegate.plan_state') IS NOT NULL"))


def _readable(db: Session) -> bool:
    """The ledger exists, and this phasegate understands it (see `check_version`): every
    read goes through here, so status or check-deploy never answers from a ledger a newer
    phasegate wrote (check-deploy would fail open)."""
    if not exists(db):
        return False
    check_version(schema_version(db))
    return True


def ensure_schema(db: Session) -> None:
    """Create or upgrade the ledger; safe to run any number of times (under the lock)."""
    with db.tx():
        # concurrent creators (an orchestrator and a `phasegate worker`) queue here
        db.execute("SELECT pg_advisory_xact_lock(%(ns)s, 2)", {"ns": LOCK_NAMESPACE})
        version = schema_version(db)
        if version is not None and version >= SCHEMA_VERSION:
            check_version(version)
            return
        db.execute(_DDL)


def schema_version(db: Session) -> int | None:
    """The ledger's version, or None when there is no ledger yet."""
    if not exists(db):
        return None
    return int(db.scalar("SELECT value FROM phasegate.meta WHERE key = 'schema_version'") or 0)


def check_version(version: int | None) -> None:
    """Refuse a ledger written by a newer phasegate: this one would misread its columns
    (and ignore what they mean, e.g. the search_path every walk session must use)."""
    if version is not None and version > SCHEMA_VERSION:
        raise UsageError(
            f"the ledger (schema phasegate) is version {version}, written by a newer "
            f"phasegate; this one knows version {SCHEMA_VERSION}. Upgrade phasegate here "
            "(every orchestrator and `phasegate worker` of a database must be at least as "
            "new as the newest that ran on it)"
        )


# -- runs and fencing ---------------------------------------------------------------------


def begin_run(db: Session) -> int:
    """A new generation for the run that has just taken the orchestrator lock.

    Every ledger write of the run checks it (`fence`), and so does every batch of its walks
    and every claim of a slice (`RUN_IS_CURRENT`): once another run has begun, a process
    that lost its lock (its session ended: terminated, an idle timeout, a failover) writes
    nothing more, even if it could connect again.
    """
    db.generation = None  # the bump is the run's first write: nothing to check it against
    with db.tx():
        value = db.scalar(
            "UPDATE phasegate.meta SET value = (value::bigint + 1)::text"
            " WHERE key = 'generation' RETURNING value"
        )
    db.generation = int(value)
    return db.generation


def current_generation(db: Session) -> int | None:
    """The generation of the run that began last (None: no ledger, or none began)."""
    if not _readable(db):
        return None
    value = db.scalar("SELECT value FROM phasegate.meta WHERE key = 'generation'")
    return int(value) if value is not None else None


def fence(db: Session) -> None:
    """Refuse a write from a run that is no longer the current one (see `begin_run`).

    FOR SHARE: the next run's bump waits for this write's transaction, and this check
    waits for the bump's, so a write lands either wholly before the next run began or not
    at all. Sessions that began no run (status, gate, a `phasegate worker`) pass.
    """
    if db.generation is None:
        return
    current = db.scalar("SELECT value FROM phasegate.meta WHERE key = 'generation' FOR SHARE")
    if current != str(db.generation):
        raise Fenced(
            f"this phasegate lost the orchestrator lock (run {db.generation}; run {current} has "
            "begun since): it stops and writes nothing more. `phasegate status` shows where "
            "the plan is; run the command again if it is still needed",
            generation=db.generation,
        )


# The walk's own check, in SQL: its run is still the current one, and the job's driver
# lock (`hold_driver`) is still held, i.e. the orchestrator's session is alive. A batch and
# a claim run only where it holds, so a worker whose orchestrator lost its lock stops
# within one batch. Parameters: generation (text), driver (`driver_key`).
_DRIVER_HELD = sql.SQL(
    "EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%(driver)s, 0))"
)
RUN_IS_CURRENT = sql.SQL(
    "EXISTS (SELECT FROM phasegate.meta WHERE key = 'generation' AND value = %(generation)s) AND {}"
).format(_DRIVER_HELD)


def run_is_current(db: Session, plan: str, job: str, generation: int | None) -> bool:
    """Whether the run that prepared the job's walk may still walk it (RUN_IS_CURRENT)."""
    return bool(
        db.scalar(sql.SQL("SELECT {}").format(RUN_IS_CURRENT), run_params(plan, job, generation))
    )


def run_params(plan: str, job: str, generation: int | None) -> dict[str, Any]:
    return {"generation": str(generation), "driver": _driver_key(plan, job)}


def walk_fenced(job: str, generation: int | None) -> Fenced:
    """What a worker says when its run is no longer current (RUN_IS_CURRENT)."""
    return Fenced(
        f"job {job!r}: the phasegate that started this walk (run {generation}) lost its lock "
        "(its session ended) or another run has begun since, so this worker stops; every "
        "batch it committed is checkpointed. `phasegate status` shows where the plan is",
        job=job,
        generation=generation,
    )


# -- the contract: each job as the backfill phase started it ------------------------------


def contract(db: Session, plan: str) -> list[Recorded]:
    """The plan's recorded jobs in plan order (empty: the backfill has not started)."""
    if not _readable(db):
        return []
    rows = db.dicts(
        "SELECT job, position, digest, definition FROM phasegate.job_contract"
        " WHERE plan = %(p)s ORDER BY position",
        {"p": plan},
    )
    return [Recorded(**row) for row in rows]


def record_contract(db: Session, plan: str, jobs: Iterable[Recorded]) -> None:
    """Record (or replace) jobs of the contract; their column check starts over."""
    fence(db)
    for entry in jobs:
        db.execute(
            """
            INSERT INTO phasegate.job_contract (plan, job, position, digest, definition)
            VALUES (%(p)s, %(j)s, %(pos)s, %(d)s, %(def)s)
            ON CONFLICT (plan, job) DO UPDATE SET position = excluded.position,
                digest = excluded.digest, definition = excluded.definition, columns = NULL,
                recorded_at = now()
            """,
            {
                "p": plan,
                "j": entry.job,
                "pos": entry.position,
                "d": entry.digest,
                "def": Jsonb(entry.definition),
            },
        )


def reposition_contract(db: Session, plan: str, positions: dict[str, int]) -> None:
    """The recorded jobs' positions as the file has them (a job inserted before them)."""
    fence(db)
    for job, position in positions.items():
        db.execute(
            "UPDATE phasegate.job_contract SET position = %(n)s WHERE plan = %(p)s AND job = %(j)s",
            {"n": position, "p": plan, "j": job},
        )


def forget_contract_jobs(db: Session, plan: str, jobs: Iterable[str]) -> None:
    """Jobs the file no longer has, dropped from the contract on the operator's word."""
    fence(db)
    db.execute(
        "DELETE FROM phasegate.job_contract WHERE plan = %(p)s AND job = ANY(%(j)s)",
        {"p": plan, "j": list(jobs)},
    )


def clear_contract(db: Session, plan: str) -> None:
    """Forget the contract (rollback of backfill: the next start records the file's jobs)."""
    fence(db)
    db.execute("DELETE FROM phasegate.job_contract WHERE plan = %(p)s", {"p": plan})


def contract_columns(db: Session, plan: str) -> dict[str, dict[str, Any]]:
    """The columns each job's check recorded (see `save_contract_columns`), by job."""
    if not _readable(db):
        return {}
    rows = db.all(
        "SELECT job, columns FROM phasegate.job_contract"
        " WHERE plan = %(p)s AND columns IS NOT NULL",
        {"p": plan},
    )
    return {job: columns for job, columns in rows}


def save_contract_columns(db: Session, plan: str, job: str, columns: dict[str, Any]) -> None:
    """The table's oid and the attnum of each old and new column, as they are now: a
    column dropped and added back (an out-of-band downgrade) comes back empty under a new
    attnum, which is how phasegate later tells that its values are gone."""
    fence(db)
    db.execute(
        "UPDATE phasegate.job_contract SET columns = %(c)s WHERE plan = %(p)s AND job = %(j)s",
        {"c": Jsonb(columns), "p": plan, "j": job},
    )


def get_state(db: Session, plan: str) -> PlanState:
    if not _readable(db):
        return PlanState(plan)
    rows = db.dicts("SELECT * FROM phasegate.plan_state WHERE plan = %(p)s", {"p": plan})
    return PlanState(**rows[0]) if rows else PlanState(plan)


def all_states(db: Session) -> list[PlanState]:
    if not _readable(db):
        return []
    return [PlanState(**r) for r in db.dicts("SELECT * FROM phasegate.plan_state ORDER BY plan")]


def save_state(db: Session, state: PlanState) -> None:
    fence(db)
    db.execute(
        """
        INSERT INTO phasegate.plan_state AS s
            (plan, phase, state, active_phase, direction, plan_digest, alembic_heads,
             actor, error, started_at, updated_at, generation)
        VALUES (%(plan)s, %(phase)s, %(state)s, %(active_phase)s, %(direction)s,
                %(plan_digest)s, %(alembic_heads)s, %(actor)s, %(error)s, %(started_at)s, now(),
                %(generation)s)
        ON CONFLICT (plan) DO UPDATE SET
            phase = excluded.phase, state = excluded.state,
            active_phase = excluded.active_phase, direction = excluded.direction,
            plan_digest = excluded.plan_digest, alembic_heads = excluded.alembic_heads,
            actor = excluded.actor, error = excluded.error,
            started_at = excluded.started_at, updated_at = now(),
            generation = excluded.generation
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
            "generation": db.generation if db.generation is not None else state.generation,
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
    fence(db)
    db.execute(
        """
        INSERT INTO phasegate.event (plan, phase, kind, actor, detail)
        VALUES (%(plan)s, %(phase)s, %(kind)s, %(actor)s, %(detail)s)
        """,
        {"plan": plan, "phase": phase, "kind": kind, "actor": actor, "detail": Jsonb(detail or {})},
    )


def get_checkpoint(db: Session, plan: str, job: str, lock: bool = False) -> Checkpoint:
    """The job's checkpoint; `lock`: FOR UPDATE, for a read-modify-write of the whole row
    while other sessions' batches add to its counters."""
    if not _readable(db):
        return Checkpoint(plan, job)
    rows = db.dicts(
        "SELECT * FROM phasegate.job_checkpoint WHERE plan = %(p)s AND job = %(j)s"
        + (" FOR UPDATE" if lock else ""),
        {"p": plan, "j": job},
    )
    return Checkpoint(**rows[0]) if rows else Checkpoint(plan, job)


def checkpoints(db: Session, plan: str) -> list[Checkpoint]:
    if not _readable(db):
        return []
    rows = db.dicts(
        "SELECT * FROM phasegate.job_checkpoint WHERE plan = %(p)s ORDER BY started_at, job",
        {"p": plan},
    )
    return [Checkpoint(**r) for r in rows]


def save_checkpoint(db: Session, cp: Checkpoint) -> None:
    fence(db)
    db.execute(
        """
        INSERT INTO phasegate.job_checkpoint AS c
            (plan, job, status, last_key, upper_key, rows_done, batches, remaining,
             started_at, updated_at, verified_at, walked, total, run_started_at, run_walked,
             walk_key, search_path, resweep, generation, settings)
        VALUES (%(plan)s, %(job)s, %(status)s, %(last_key)s, %(upper_key)s, %(rows_done)s,
                %(batches)s, %(remaining)s, coalesce(%(started_at)s, now()), now(),
                %(verified_at)s, %(walked)s, %(total)s, %(run_started_at)s, %(run_walked)s,
                %(walk_key)s, %(search_path)s, %(resweep)s, %(generation)s, %(settings)s)
        ON CONFLICT (plan, job) DO UPDATE SET
            status = excluded.status, last_key = excluded.last_key,
            upper_key = excluded.upper_key, rows_done = excluded.rows_done,
            batches = excluded.batches, remaining = excluded.remaining,
            started_at = excluded.started_at, updated_at = now(),
            verified_at = excluded.verified_at, walked = excluded.walked,
            total = excluded.total, run_started_at = excluded.run_started_at,
            run_walked = excluded.run_walked, walk_key = excluded.walk_key,
            search_path = excluded.search_path, resweep = excluded.resweep,
            generation = excluded.generation, settings = excluded.settings
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
            "walked": cp.walked,
            "total": cp.total,
            "run_started_at": cp.run_started_at,
            "run_walked": cp.run_walked,
            "walk_key": cp.walk_key,
            "search_path": cp.search_path,
            "resweep": cp.resweep,
            "generation": cp.generation,
            "settings": Jsonb(cp.settings) if cp.settings is not None else None,
        },
    )


# A batch writes its checkpoint in its own statement (backfill.BatchSQL), so batch and
# checkpoint commit together in one round trip. These are that statement's ledger CTEs.
# `SLICE_OWNED` locks the slice's row if it is still this session's: the batch's UPDATE
# runs only if it found it, so a worker whose slice was taken over (the job was re-cut or
# cleared meanwhile), or whose run is no longer current (`RUN_IS_CURRENT`: the orchestrator
# lost its lock), writes nothing. `checkpoint_ctes` then writes the slice's progress and
# the job's totals from the batch's outcome, the CTE `phasegate_batch` (reached, scanned,
# updated, done). Parameters: `checkpoint_params`.
SLICE_OWNED = sql.SQL(
    "phasegate_owned AS ("
    " SELECT FROM phasegate.job_slice"
    " WHERE plan = %(plan)s AND job = %(job)s AND slice = %(slice)s"
    " AND owner_pid = pg_backend_pid() AND {} FOR UPDATE)"
).format(RUN_IS_CURRENT)


def checkpoint_ctes(last_key: sql.Composable) -> sql.Composable:
    """The slice's and the job's checkpoint writes; `last_key` is the reached key as text."""
    return sql.SQL(
        "phasegate_slice AS ("
        " UPDATE phasegate.job_slice AS s"
        " SET last_key = {last}, status = CASE WHEN b.done THEN 'done' ELSE 'running' END,"
        " rows_done = s.rows_done + b.updated, batches = s.batches + (b.scanned > 0)::int,"
        " updated_at = now()"
        " FROM phasegate_batch AS b"
        " WHERE s.plan = %(plan)s AND s.job = %(job)s AND s.slice = %(slice)s"
        " AND s.owner_pid = pg_backend_pid()"
        " RETURNING s.slice"
        "), phasegate_job AS ("
        " UPDATE phasegate.job_checkpoint AS c"
        " SET rows_done = c.rows_done + b.updated, batches = c.batches + (b.scanned > 0)::int,"
        " walked = c.walked + b.scanned,"
        " last_key = CASE WHEN (SELECT count(*) FROM phasegate.job_slice"
        " WHERE plan = %(plan)s AND job = %(job)s) = 1 THEN {last} END, updated_at = now()"
        " FROM phasegate_batch AS b"
        " WHERE c.plan = %(plan)s AND c.job = %(job)s AND EXISTS (SELECT FROM phasegate_slice)"
        " RETURNING c.job)"
    ).format(last=last_key)


def checkpoint_params(piece: Slice, generation: int | None) -> dict[str, Any]:
    """The parameters of `SLICE_OWNED` and `checkpoint_ctes` for one slice of a walk that
    run `generation` prepared."""
    return {
        "plan": piece.plan,
        "job": piece.job,
        "slice": piece.slice,
        **run_params(piece.plan, piece.job, generation),
    }


def replace_slices(db: Session, plan: str, job: str, bounds: list[tuple[str | None, str]]) -> None:
    """Cut a job into key ranges (lower exclusive, upper inclusive), forgetting old ones."""
    fence(db)
    db.execute(
        "DELETE FROM phasegate.job_slice WHERE plan = %(p)s AND job = %(j)s", {"p": plan, "j": job}
    )
    for number, (lower, upper) in enumerate(bounds):
        db.execute(
            "INSERT INTO phasegate.job_slice (plan, job, slice, lower_key, upper_key) "
            "VALUES (%(p)s, %(j)s, %(n)s, %(lower)s, %(upper)s)",
            {"p": plan, "j": job, "n": number, "lower": lower, "upper": upper},
        )


def slices(db: Session, plan: str, job: str) -> list[Slice]:
    rows = db.dicts(
        "SELECT * FROM phasegate.job_slice WHERE plan = %(p)s AND job = %(j)s ORDER BY slice",
        {"p": plan, "j": job},
    )
    return [Slice(**r) for r in rows]


def claim_slice(
    db: Session, plan: str, job: str, owner: str, generation: int | None
) -> Slice | None:
    """Take the next unfinished slice nobody holds; SKIP LOCKED keeps claims apart.

    Holding a slice means holding a session advisory lock on it: the lock dies with the
    session, so a crashed worker's slice is free again at once, and it needs no privilege
    to see (other roles' pg_stat_activity rows hide their backend_start). Only for the
    current run (`RUN_IS_CURRENT`): raises `Fenced` once it is not.
    """
    with db.tx():
        if not run_is_current(db, plan, job, generation):
            raise walk_fenced(job, generation)
        # One row at a time: locking every candidate at once left a worker that claimed
        # at the same moment as another with nothing (all rows locked) but a pause.
        tried: list[int] = []
        while True:
            rows = db.dicts(
                """
                SELECT * FROM phasegate.job_slice s
                WHERE plan = %(p)s AND job = %(j)s AND status <> 'done'
                  AND slice <> ALL(%(tried)s::int[])
                ORDER BY slice LIMIT 1
                FOR UPDATE SKIP LOCKED
                """,
                {"p": plan, "j": job, "tried": tried},
            )
            if not rows:
                return None
            claimed = Slice(**rows[0])
            if _try_hold(db, claimed):
                break
            tried.append(claimed.slice)  # held by a live worker that claimed it before
        db.execute(
            """
            UPDATE phasegate.job_slice
            SET status = 'running', owner = %(owner)s, owner_pid = pg_backend_pid(),
                owner_started = (SELECT backend_start FROM pg_stat_activity
                                 WHERE pid = pg_backend_pid()),
                updated_at = now()
            WHERE plan = %(p)s AND job = %(j)s AND slice = %(n)s
            """,
            {"owner": owner, "p": plan, "j": job, "n": claimed.slice},
        )
    claimed.status, claimed.owner = "running", owner
    return claimed


def release_slice(db: Session, piece: Slice) -> None:
    """Give up the advisory lock on a slice (finished, or abandoned on an error)."""
    with db.tx():
        db.execute(
            "SELECT pg_advisory_unlock(hashtextextended(%(k)s, 0))", {"k": _slice_key(piece)}
        )


def slice_holders(db: Session, plan: str, job: str) -> list[dict[str, Any]]:
    """Unfinished slices held by someone, with how long since their last batch."""
    with db.tx():
        return db.dicts(
            """
            SELECT slice, owner, owner_pid, now() - updated_at AS idle
            FROM phasegate.job_slice
            WHERE plan = %(p)s AND job = %(j)s AND status <> 'done' AND owner IS NOT NULL
            ORDER BY slice
            """,
            {"p": plan, "j": job},
        )


def _driver_key(plan: str, job: str) -> str:
    return f"phasegate driver {plan}/{job}"


def hold_driver(db: Session, plan: str, job: str) -> None:
    """Held by the orchestrator's session while it walks and verifies a job.

    A `phasegate worker` helps only while someone holds it: a job whose checkpoint says
    running after its orchestrator stopped (Ctrl-C, a failure, kill -9) is not being
    run, and a helper that went on would finish a walk the operator stopped. A session
    lock, so it dies with the orchestrator's connection.
    """
    with db.tx():
        db.execute(
            "SELECT pg_advisory_lock(hashtextextended(%(k)s, 0))", {"k": _driver_key(plan, job)}
        )


def release_driver(db: Session, plan: str, job: str) -> None:
    with db.tx():
        db.execute(
            "SELECT pg_advisory_unlock(hashtextextended(%(k)s, 0))", {"k": _driver_key(plan, job)}
        )


def driven(db: Session, plan: str, job: str) -> bool:
    """Whether an orchestrator is running the job now (see `hold_driver`); any role may
    ask, as pg_locks is public. A bigint advisory key shows as classid (high 32 bits)
    and objid (low 32 bits) with objsubid 1."""
    return bool(
        db.scalar(sql.SQL("SELECT {}").format(_DRIVER_HELD), {"driver": _driver_key(plan, job)})
    )


def _slice_key(piece: Slice) -> str:
    return f"phasegate slice {piece.plan}/{piece.job}/{piece.slice}"


def _try_hold(db: Session, piece: Slice) -> bool:
    return bool(
        db.scalar(
            "SELECT pg_try_advisory_lock(hashtextextended(%(k)s, 0))", {"k": _slice_key(piece)}
        )
    )


def unfinished_slices(db: Session, plan: str, job: str) -> int:
    return int(
        db.scalar(
            "SELECT count(*) FROM phasegate.job_slice "
            "WHERE plan = %(p)s AND job = %(j)s AND status <> 'done'",
            {"p": plan, "j": job},
        )
    )


def delete_checkpoint(db: Session, plan: str, job: str) -> None:
    fence(db)
    for table in ("job_slice", "job_checkpoint"):
        db.execute(
            sql.SQL("DELETE FROM phasegate.{} WHERE plan = %(p)s AND job = %(j)s").format(
                sql.Identifier(table)
            ),
            {"p": plan, "j": job},
        )


def clear_checkpoints(db: Session, plan: str, resweep: Iterable[str] = ()) -> int:
    """Forget the plan's job progress (rollback of backfill); returns how many jobs had some.

    Each job of `resweep` keeps a pending checkpoint flagged `resweep`: its new columns keep
    their values while no trigger runs, so old code's writes from now on leave them stale,
    and the next walk must fix those rows too. Every synced job, walked or not: backfill
    installs all the triggers before its first job, so a trigger may have filled the new
    columns of a job whose walk never started (a failed `sql` job before it, a Ctrl-C).
    """
    fence(db)
    db.execute("DELETE FROM phasegate.job_slice WHERE plan = %(p)s", {"p": plan})
    cursor = db.execute("DELETE FROM phasegate.job_checkpoint WHERE plan = %(p)s", {"p": plan})
    for job in resweep:
        save_checkpoint(db, Checkpoint(plan, job, resweep=True))
    return cursor.rowcount


# -- heartbeats ---------------------------------------------------------------------------

# Apps write through the ledger's functions, which stamp the server's time and the caller's
# role and touch only the caller's own rows (schema version 7). pyformat parameters:
# psycopg 3 and psycopg2 both take them, so the app-side helper runs these very statements
# through SQLAlchemy's exec_driver_sql on either driver.
HEARTBEAT_BEAT = "SELECT phasegate.beat(%(app)s, %(instance)s, %(version)s)"
# every version of the instance, or only `version` when it is given; returns the count
HEARTBEAT_FORGET = "SELECT phasegate.forget_heartbeat(%(app)s, %(instance)s, %(version)s)"


@dataclass
class Heartbeat:
    app: str
    instance: str
    version: str
    role: str  # who wrote it (session_user); '' for rows older than the functions
    first_seen: dt.datetime
    last_seen: dt.datetime
    age_seconds: float
    kept: bool = False  # older than the TTL, kept fresh: written before the functions


def heartbeat_functions_exist(db: Session) -> bool:
    """Whether the ledger has the heartbeat functions (version 7 or later)."""
    return bool(db.scalar("SELECT to_regprocedure('phasegate.beat(text, text, text)') IS NOT NULL"))


def beat(db: Session, app: str, instance: str, version: str) -> None:
    db.execute(HEARTBEAT_BEAT, {"app": app, "instance": instance, "version": version})


def forget_legacy_heartbeat(
    db: Session, app: str, instance: str, version: str | None = None
) -> int:
    """Remove the instance's rows written before the heartbeat functions (role ''), which
    never expire (see `heartbeats`); only the ledger's owner may."""
    return int(
        db.execute(
            "DELETE FROM phasegate.heartbeat WHERE role = '' AND app = %(app)s"
            " AND instance = %(instance)s AND (version = %(version)s OR %(version)s::text IS NULL)",
            {"app": app, "instance": instance, "version": version},
        ).rowcount
    )


def forget_heartbeat(db: Session, app: str, instance: str, version: str | None = None) -> int:
    """Remove this role's heartbeats of the instance; another role's rows stay."""
    params = {"app": app, "instance": instance, "version": version}
    return int(db.scalar(HEARTBEAT_FORGET, params) or 0)


def heartbeats(db: Session, app: str | None, ttl_seconds: float) -> list[Heartbeat]:
    """Heartbeats younger than the TTL, by the database's clock (the writers' clock too).

    A `last_seen` later than the clock now is never fresh: the functions stamp the server's
    time, so only a direct write (by the ledger's owner) can put one there, and a row ten
    years ahead would otherwise never expire.
    """
    if not db.scalar("SELECT to_regclass('phasegate.heartbeat') IS NOT NULL"):
        return []
    version = schema_version(db) or 0
    check_version(version)
    # before version 7 no row says who wrote it: every row is then untrusted
    role = sql.SQL("role" if version >= 7 else "''::text")
    # A row written before the heartbeat functions (role '') whose instance ran an older
    # helper: that helper cannot beat since the upgrade, so such a row stays fresh if it
    # was fresh then, until removed (`forget_legacy_heartbeat`): its silence would
    # otherwise drop a live old version out of every gate after one TTL.
    query = sql.SQL(
        """
        SELECT app, instance, version, {role} AS role, first_seen, last_seen,
               extract(epoch FROM clock_timestamp() - last_seen)::float8 AS age_seconds,
               NOT (last_seen > now() - make_interval(secs => %(ttl)s)) AS kept
        FROM phasegate.heartbeat
        WHERE (app = %(app)s OR %(app)s::text IS NULL)
          AND last_seen <= clock_timestamp()
          AND (last_seen > now() - make_interval(secs => %(ttl)s)
               OR ({role} = '' AND last_seen > (
                   SELECT value::timestamptz FROM phasegate.meta
                   WHERE key = 'heartbeat_functions_since') - make_interval(secs => %(ttl)s)))
        ORDER BY app, version, instance, role
        """
    ).format(role=role)
    rows = db.dicts(query, {"app": app, "ttl": ttl_seconds})
    return [Heartbeat(**row) for row in rows]
