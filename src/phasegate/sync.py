"""Sync triggers: keep old and new columns equal while both code versions write.

One definition serves the backfill and the dual-write: the trigger evaluates the job's
`set` (up) and `sync.down` expressions, written against the row alias `new`, exactly as
the batched UPDATE does. The direction comes from what the writer changed. A transaction
that sets `phasegate.backfill = on` (the backfill's batches) is skipped by the trigger's
WHEN clause: its batch already computed the new columns, and running `down` on it could
rewrite the old columns lossily.
"""

from __future__ import annotations

import hashlib
import json

from psycopg import sql

from phasegate.db import Session, quote_table
from phasegate.plan import Job

BACKFILL_SETTING = "phasegate.backfill"
_MAX_IDENT = 63


def object_name(plan: str, job: str) -> str:
    """A name for the trigger and its function, unique per (plan, job), within 63 bytes.

    The readable part maps `-` to `_`, which alone could make two jobs collide (`x-y` and
    `x_y`); the hash of the exact pair keeps the mapping one-to-one.
    """
    digest = hashlib.sha1(f"{plan}\0{job}".encode()).hexdigest()[:8]
    readable = f"sync_{plan}_{job}".replace("-", "_")[: _MAX_IDENT - len(digest) - 1]
    return f"{readable}_{digest}"


def function_sql(plan: str, job: Job) -> sql.Composed:
    """CREATE OR REPLACE FUNCTION for the job's trigger (author expressions pass through)."""
    new_cols = job.new_columns
    old_cols = job.old_columns
    up = _assign(job.set_ or {})
    down = _assign(job.sync.down if job.sync else {})
    body = [
        sql.SQL("IF TG_OP = 'INSERT' THEN"),
        sql.SQL("  IF {} THEN {}").format(_all_null(new_cols), up),
        sql.SQL("  ELSIF {} THEN {}").format(_all_null(old_cols), down),
        sql.SQL("  END IF;"),
        sql.SQL("ELSIF {} AND NOT {} THEN {}").format(_changed(old_cols), _changed(new_cols), up),
        sql.SQL("ELSIF {} AND NOT {} THEN {}").format(_changed(new_cols), _changed(old_cols), down),
    ]
    body += [sql.SQL("END IF;"), sql.SQL("RETURN NEW;")]
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {schema}.{name}() RETURNS trigger LANGUAGE plpgsql\n"
        "SET search_path FROM CURRENT AS $phasegate$\nBEGIN\n{body}\nEND\n$phasegate$"
    ).format(
        schema=sql.Identifier("phasegate"),
        name=sql.Identifier(object_name(plan, job.name)),
        body=sql.SQL("\n").join(body),
    )


def owner_comment(plan: str, job: Job) -> str:
    """The comment on a trigger's function: whose it is (how the plan finds its triggers
    after the file changed: a job renamed, its `sync` removed), and on its second line a
    digest of the expressions it runs (how `outdated` tells they were edited since; not
    the function's body, which a newer phasegate may write differently)."""
    return f"{_OWNER_PREFIX}{plan}, job {job.name}\nexpressions {expressions_digest(job)}"


def expressions_digest(job: Job) -> str:
    text = json.dumps(
        [job.table, job.set_ or {}, job.sync.down if job.sync else {}], sort_keys=True
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


_OWNER_PREFIX = "phasegate sync trigger of plan "


def install_statements(plan: str, job: Job) -> list[sql.Composed]:
    """The statements that create (or replace) the job's function and trigger."""
    name = sql.Identifier(object_name(plan, job.name))
    table = quote_table(job.table or "")
    # The WHEN clause is checked before the function is entered, so the backfill's own
    # batches (which compute the new columns themselves) pay no plpgsql call per row.
    return [
        function_sql(plan, job),
        sql.SQL("COMMENT ON FUNCTION {}.{}() IS {}").format(
            sql.Identifier("phasegate"), name, sql.Literal(owner_comment(plan, job))
        ),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, table),
        sql.SQL(
            "CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW "
            "WHEN (current_setting({setting}, true) IS DISTINCT FROM 'on') "
            "EXECUTE FUNCTION {schema}.{name}()"
        ).format(
            name=name,
            table=table,
            setting=sql.Literal(BACKFILL_SETTING),
            schema=sql.Identifier("phasegate"),
        ),
    ]


def install(db: Session, plan: str, job: Job) -> None:
    """Create (or replace) the function and the trigger; run inside the caller's tx.

    A trigger of the same job on another table goes first: the job's `table:` was edited,
    and that trigger would call the replaced function, which names the new table's columns.
    """
    name = object_name(plan, job.name)
    _drop_callers(db, name, keep=quote_table(job.table or "").as_string(db.raw))
    for statement in install_statements(plan, job):
        db.execute(statement)


def _drop_callers(db: Session, name: str, keep: str | None = None) -> None:
    """Drop every trigger that calls function phasegate.`name`, except on table `keep`.

    Partition clones of a trigger go with their parent's; IF EXISTS covers them.
    """
    callers = db.all(
        "SELECT t.tgname, t.tgrelid::regclass::text, t.tgrelid = to_regclass(%(keep)s)"
        " FROM pg_trigger t"
        " JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'phasegate' AND p.proname = %(n)s",
        {"n": name, "keep": keep},
    )
    for trigger, relation, kept in callers:
        if not kept:
            db.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(trigger), sql.SQL(relation)
                )
            )


def outdated(db: Session, plan: str, job: Job) -> bool:
    """Whether the job's installed trigger runs other expressions than the plan file has
    now (its `set` or `sync.down` edited since backfill installed it)."""
    comment = db.scalar(
        "SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'phasegate' AND p.proname = %(n)s",
        {"n": object_name(plan, job.name)},
    )
    _owner, _newline, digest = (comment or "").partition("\nexpressions ")
    return bool(digest) and digest != expressions_digest(job)  # no digest: installed before


def drop(db: Session, plan: str, job: Job) -> None:
    """Drop the trigger and its function; a no-op when they are already gone."""
    drop_installed(db, object_name(plan, job.name))


def drop_installed(db: Session, name: str) -> None:
    """Drop a trigger function by name (as `installed` lists them) and every trigger that
    calls it, on whatever table: a job whose `table:` was edited keeps its name, so its
    trigger on the old table calls the same function, and DROP FUNCTION would refuse while
    it depends on it."""
    _drop_callers(db, name)
    db.execute(
        sql.SQL("DROP FUNCTION IF EXISTS {}.{}()").format(
            sql.Identifier("phasegate"), sql.Identifier(name)
        )
    )


def installed(db: Session, plan: str) -> list[tuple[str, str, str | None]]:
    """The plan's sync triggers in the database, told by their functions' comments:
    (job, function name, table as regclass text or None when no trigger uses it)."""
    rows = db.all(
        "SELECT split_part(substr(d.description, length(%(prefix)s) + 1), E'\\n', 1), p.proname,"
        " t.tgrelid::regclass::text"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " JOIN pg_description d ON d.objoid = p.oid AND d.classoid = 'pg_proc'::regclass"
        " LEFT JOIN pg_trigger t ON t.tgfoid = p.oid"
        " WHERE n.nspname = 'phasegate' AND starts_with(d.description, %(prefix)s)"
        " ORDER BY 1, 2",
        {"prefix": f"{_OWNER_PREFIX}{plan}, job "},
    )
    return [(job, name, table) for job, name, table in rows]


def drop_all(db: Session, plan: str, jobs: list[Job]) -> list[str]:
    """Drop the triggers of `jobs` and every other trigger the plan installed (of a job
    since renamed, or whose `sync` was removed from the file); returns the jobs named.
    Run inside the caller's transaction."""
    for job in jobs:
        drop(db, plan, job)
    orphans = installed(db, plan)
    for _job, name, _table in orphans:
        drop_installed(db, name)
    return [job.name for job in jobs] + [job for job, _name, _table in orphans]


def _assign(columns: dict[str, str]) -> sql.Composed:
    """One SELECT ... INTO so every expression sees the row as written, like UPDATE SET."""
    return sql.SQL("SELECT {} INTO {};").format(
        sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(e)) for e in columns.values()),
        sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in columns),
    )


def _all_null(columns: list[str]) -> sql.Composed:
    terms = (sql.SQL("NEW.{} IS NULL").format(sql.Identifier(c)) for c in columns)
    return sql.SQL("({})").format(sql.SQL(" AND ").join(terms))


def _changed(columns: list[str]) -> sql.Composed:
    terms = (sql.SQL("NEW.{0} IS DISTINCT FROM OLD.{0}").format(sql.Identifier(c)) for c in columns)
    return sql.SQL("({})").format(sql.SQL(" OR ").join(terms))
