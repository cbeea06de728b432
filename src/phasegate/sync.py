"""Sync triggers: keep old and new columns equal while both code versions write.

One definition serves the backfill and the dual-write: the trigger evaluates the job's
`set` (up) and `sync.down` expressions, written against the row alias `new`, exactly as
the batched UPDATE does. The direction comes from what the writer changed.

One function per plan and table runs every synced job of the plan on that table, so
their order is the plan's, never their names': `set` in plan order (a later job may
derive its new columns from an earlier job's), then `sync.down` in reverse plan order
(an earlier job's old columns from a later job's). PostgreSQL fires a table's BEFORE ROW
triggers in name order (byte order), so the function's two triggers (INSERT; UPDATE) are
named to sort after every ordinary name (`~`), and see the row as the table's own BEFORE
triggers leave it; a BEFORE trigger that still sorts after them is refused before they
are installed and is drift while they are.

Every backfill batch marks its transaction (`phasegate.backfill = on`) and the UPDATE
trigger's WHEN clause steps aside for it: the batch computed the new columns itself, and
running `down` on it could rewrite the old columns lossily. An up walk's batch also sets
`phasegate.up_walk`: then the trigger runs `set` for a row whose old columns changed
under the batch (a BEFORE trigger of the table's own rewrote them after the batch
computed the new columns from them). A refill (the rollback of contract) never does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pglast import ast, parse_sql
from psycopg import sql

from phasegate.db import Session, quote_table
from phasegate.plan import Job

BACKFILL_SETTING = "phasegate.backfill"
UP_WALK_SETTING = "phasegate.up_walk"
_MAX_IDENT = 63
_TRIGGER_PREFIX = "~"  # beyond ASCII letters, digits and `_`: after any ordinary name
_TRIGGER_SUFFIXES = ("_ins", "_upd")
_OWNER_PREFIX = "phasegate sync trigger of plan "


def object_name(plan: str, job: str) -> str:
    """The name of a job's own trigger and function, as phasegate installed them before
    one function per table ran them in plan order: found (and dropped) by this name.

    The readable part maps `-` to `_`, which alone could make two jobs collide (`x-y` and
    `x_y`); the hash of the exact pair keeps the mapping one-to-one.
    """
    digest = hashlib.sha1(f"{plan}\0{job}".encode()).hexdigest()[:8]
    readable = f"sync_{plan}_{job}".replace("-", "_")[: _MAX_IDENT - len(digest) - 1]
    return f"{readable}_{digest}"


def function_name(plan: str, table: str) -> str:
    """The function of the plan's synced jobs on `table` (as its first job names it),
    short enough that its triggers' names (`~`, the ordinal, name, `_ins`) fit 63 bytes."""
    digest = hashlib.sha1(f"{plan}\0table\0{table}".encode()).hexdigest()[:8]
    room = _MAX_IDENT - len(_TRIGGER_PREFIX) - _ORDINAL_WIDTH - 1 - max(map(len, _TRIGGER_SUFFIXES))
    readable = re.sub(r"[^A-Za-z0-9_]", "_", f"sync_{plan}_{table}")[: room - len(digest) - 1]
    return f"{readable}_{digest}"


_ORDINAL_WIDTH = 3
_ORDINAL = re.compile(rf"^{re.escape(_TRIGGER_PREFIX)}(\d{{{_ORDINAL_WIDTH}}})_")


def trigger_names(function: str, ordinal: int = 1) -> tuple[str, str]:
    """The INSERT and the UPDATE trigger that call `function`. `ordinal`: the plan's place
    among the plans whose sync runs on the table, in the order their backfills installed
    it (`ordinal_for`): PostgreSQL fires the triggers in name order, so a plan that started
    later (whose `set` may read what an earlier plan's writes) runs after it."""
    prefix = f"{_TRIGGER_PREFIX}{ordinal:0{_ORDINAL_WIDTH}d}_"
    insert, update = (f"{prefix}{function}{suffix}" for suffix in _TRIGGER_SUFFIXES)
    return insert, update


def ordinal_for(db: Session, plan: str, table: str) -> int:
    """The plan's ordinal on `table`: the one its triggers already have there, else one
    past every other plan's (triggers named before ordinals count as 0). Inside the
    caller's transaction."""
    function = function_name(plan, table)
    rows = db.all(
        "SELECT t.tgname::text, p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
        " WHERE p.pronamespace = 'phasegate'::regnamespace AND NOT t.tgisinternal"
        " AND t.tgrelid = to_regclass(%(t)s)",
        {"t": quote_table(table).as_string(db.raw)},
    )
    mine, others = None, [0]
    for trigger, proname in rows:
        found = _ORDINAL.match(trigger)
        number = int(found.group(1)) if found else 0
        if proname == function:
            mine = number
        else:
            others.append(number)
    return mine if mine else max(others) + 1


def table_groups(db: Session | None, jobs: Sequence[Job]) -> list[list[Job]]:
    """The synced batched `jobs` per table, each list in plan order. With a database, a
    table named two ways (`t`, `public.t`) is one table; offline, its name is."""
    synced = [job for job in jobs if job.is_batched and job.sync is not None]
    identity: dict[str, object] = {}
    for job in synced:
        table = job.table or ""
        if table not in identity:
            oid = None
            if db is not None:
                oid = db.scalar(
                    "SELECT to_regclass(%(t)s)::oid",
                    {"t": quote_table(table).as_string(db.raw)},
                )
            identity[table] = oid if oid is not None else table
    groups: dict[object, list[Job]] = {}
    for job in synced:
        groups.setdefault(identity[job.table or ""], []).append(job)
    return list(groups.values())


def function_sql(
    plan: str, jobs: Sequence[Job], defaults: Mapping[str, str] | None = None
) -> sql.Composed:
    """CREATE OR REPLACE FUNCTION for the trigger of `jobs` (one table's, in plan order).

    The same rules as for one job (DESIGN.md "The plan file"), applied job by job: an
    INSERT runs `set` where the old columns were written and the new ones are empty, in
    plan order; then `sync.down` where only the new ones were written, in reverse plan
    order; then `set` of the empty old columns where neither was written, in plan order,
    as the walk would. An UPDATE runs `set` where only the old columns changed, in plan
    order, then `down` where only the new ones changed, in reverse order. In an up walk's
    batch the WHEN clause lets a row in only if some job's old columns changed under the
    batch; each such job's `set` runs again, in plan order.

    `defaults`: the constant DEFAULT of a synced column (`constant_defaults`). An INSERT
    that leaves a column out gets its default, not NULL, so on INSERT a column counts as
    not written when it is NULL or equal to its default: an old-code insert that leaves a
    new column to its default still gets `set`, a new-code insert that leaves an old one
    to its default still gets `down`.
    """
    unwritten = functools.partial(_unwritten, defaults=defaults or {})
    flagged = [(job, sql.Identifier(f"phasegate_ran_{n}")) for n, job in enumerate(jobs)]
    insert: list[sql.Composable] = []
    for job, flag in flagged:
        insert.append(
            sql.SQL("  IF NOT {} AND {} THEN {} {} := true; END IF;").format(
                unwritten(job.old_columns), unwritten(job.new_columns), _up(job), flag
            )
        )
    for job, flag in reversed(flagged):
        insert.append(
            sql.SQL("  IF {} AND NOT {} THEN {} {} := true; END IF;").format(
                unwritten(job.old_columns), unwritten(job.new_columns), _down(job), flag
            )
        )
    for job, flag in flagged:
        insert.append(
            sql.SQL("  IF NOT {} AND {} THEN {} END IF;").format(
                flag, unwritten(job.new_columns), _up(job)
            )
        )
    walk = [
        sql.SQL("  IF {} THEN {} END IF;").format(_changed(job.old_columns), _up(job))
        for job in jobs
    ]
    update = [
        sql.SQL("  IF {} AND NOT {} THEN {} END IF;").format(
            _changed(job.old_columns), _changed(job.new_columns), _up(job)
        )
        for job in jobs
    ]
    update += [
        sql.SQL("  IF {} AND NOT {} THEN {} END IF;").format(
            _changed(job.new_columns), _changed(job.old_columns), _down(job)
        )
        for job in reversed(jobs)
    ]
    declarations = sql.SQL(" ").join(
        sql.SQL("{} boolean := false;").format(f) for _job, f in flagged
    )
    body = [
        sql.SQL("IF TG_OP = 'INSERT' THEN"),
        *insert,
        sql.SQL("ELSIF current_setting({}, true) = 'on' THEN").format(
            sql.Literal(BACKFILL_SETTING)
        ),
        *walk,
        sql.SQL("ELSE"),
        *update,
        sql.SQL("END IF;"),
        sql.SQL("RETURN NEW;"),
    ]
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {schema}.{name}() RETURNS trigger LANGUAGE plpgsql\n"
        "SET search_path FROM CURRENT AS $phasegate$\n#variable_conflict use_column\n"
        "DECLARE {declarations}\nBEGIN\n{body}\nEND\n$phasegate$"
    ).format(
        schema=sql.Identifier("phasegate"),
        name=sql.Identifier(function_name(plan, jobs[0].table or "")),
        declarations=declarations,
        body=sql.SQL("\n").join(body),
    )


def owner_comment(plan: str, jobs: Sequence[Job], defaults: Mapping[str, str] | None = None) -> str:
    """The comment on a trigger function: whose it is (how the plan finds its triggers
    after the file changed: a job renamed, its `sync` removed), and a line per job with a
    digest of the expressions it runs (how `outdated` tells they were edited since; not
    the function's body, which a newer phasegate may write differently)."""
    names = ", ".join(job.name for job in jobs)
    lines = [f"{_OWNER_PREFIX}{plan}, jobs {names}"]
    lines += [f"expressions {job.name} {expressions_digest(job)}" for job in jobs]
    lines.append(f"{_DEFAULTS_LINE}{json.dumps(dict(defaults or {}), sort_keys=True)}")
    return "\n".join(lines)


_DEFAULTS_LINE = "column defaults "


def expressions_digest(job: Job) -> str:
    text = json.dumps(
        [job.table, job.set_ or {}, job.sync.down if job.sync else {}], sort_keys=True
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _owned_jobs(comment: str | None, plan: str) -> dict[str, str | None]:
    """The jobs of `plan` that a function's comment names, each with its expressions
    digest (None where none was recorded). Reads this version's comments ("jobs a, b",
    a digest line per job) and the per-job ones before it ("job a", one digest line)."""
    first, *rest = (comment or "").split("\n")
    head = f"{_OWNER_PREFIX}{plan}, "
    if not first.startswith(head):
        return {}
    owners = first[len(head) :]
    if owners.startswith("jobs "):
        jobs: dict[str, str | None] = dict.fromkeys(owners[len("jobs ") :].split(", "))
        for line in rest:
            label, _space, named = line.partition(" ")
            job, _space, digest = named.partition(" ")
            if label == "expressions" and job in jobs:
                jobs[job] = digest
        return jobs
    if owners.startswith("job "):
        digest = rest[0].removeprefix("expressions ") if rest else None
        return {owners[len("job ") :]: digest or None}
    return {}


def install_statements(
    plan: str, jobs: Sequence[Job], ordinal: int = 1, defaults: Mapping[str, str] | None = None
) -> list[sql.Composed]:
    """The statements that create (or replace) the function of one table's `jobs` and its
    two triggers. The UPDATE trigger's WHEN clause is checked before the function is
    entered, so the backfill's own batches pay no plpgsql call for a row whose old columns
    no BEFORE trigger changed; an INSERT trigger's WHEN may not name OLD (batches never
    insert, so it has none: a row inserted inside a batch's transaction, by a trigger of
    the user's, is written like any other)."""
    function = function_name(plan, jobs[0].table or "")
    insert, update = (sql.Identifier(name) for name in trigger_names(function, ordinal))
    table = quote_table(jobs[0].table or "")
    called = sql.SQL("{}.{}()").format(sql.Identifier("phasegate"), sql.Identifier(function))
    return [
        function_sql(plan, jobs, defaults),
        sql.SQL("COMMENT ON FUNCTION {} IS {}").format(
            called, sql.Literal(owner_comment(plan, jobs, defaults))
        ),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(insert, table),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(update, table),
        sql.SQL("CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}").format(
            insert, table, called
        ),
        sql.SQL(
            "CREATE TRIGGER {} BEFORE UPDATE ON {} FOR EACH ROW WHEN ({}) EXECUTE FUNCTION {}"
        ).format(update, table, update_condition(_old_columns(jobs)), called),
    ]


def update_condition(old_columns: Sequence[str]) -> sql.Composed:
    """The UPDATE trigger's WHEN: every write but a backfill batch's, and an up walk's
    batch where it changed old columns. The column test comes first, so a batch's row
    costs one setting and one comparison per column."""
    return sql.SQL(
        "current_setting({backfill}, true) IS DISTINCT FROM 'on'"
        " OR ({changed} AND current_setting({up}, true) = 'on')"
    ).format(
        backfill=sql.Literal(BACKFILL_SETTING),
        changed=_changed(old_columns),
        up=sql.Literal(UP_WALK_SETTING),
    )


def install_all(db: Session, plan: str, jobs: Sequence[Job]) -> list[str]:
    """Install the plan's triggers as `jobs` (the file, now) says, inside the caller's
    transaction; returns the jobs whose trigger went because the plan no longer has them.

    Every other trigger function of the plan goes first, with every trigger that calls
    it, on whatever table: one of a job renamed, or whose `sync` was removed, would keep
    running the old expressions; one of a job whose `table:` was edited would name the
    new table's columns; and a job's own trigger, as phasegate installed it before one
    function per table (found by its comment, or by its name), would run the job a second
    time, in name order."""
    groups = {function_name(plan, group[0].table or ""): group for group in table_groups(db, jobs)}
    current = {job.name for job in jobs if job.is_batched and job.sync is not None}
    gone: list[str] = []
    for job, name, _table in installed(db, plan):
        if name not in groups:
            drop_installed(db, name)
        if job not in current and job not in gone:
            gone.append(job)
    for job in jobs:
        drop_installed(db, object_name(plan, job.name))  # installed before the comment
    for name, group in groups.items():
        table = group[0].table or ""
        ordinal = ordinal_for(db, plan, table)  # before its triggers go
        defaults = constant_defaults(db, table, group)
        _drop_callers(db, name)  # on another table, or under another name
        for statement in install_statements(plan, group, ordinal, defaults):
            db.execute(statement)
    return gone


# -- column defaults ----------------------------------------------------------------------------


def column_defaults(db: Session, table: str, jobs: Sequence[Job]) -> dict[str, str]:
    """The DEFAULT expression of each old and new column of `jobs` that has one."""
    columns = [c for job in jobs for c in (*job.old_columns, *job.new_columns)]
    rows = db.all(
        "SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a"
        " JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE a.attrelid = to_regclass(%(t)s) AND a.attname = ANY(%(c)s)"
        " AND NOT a.attisdropped AND a.attgenerated = ''",
        {"t": quote_table(table).as_string(db.raw), "c": columns},
    )
    return {name: expression for name, expression in rows}


def constant_defaults(db: Session, table: str, jobs: Sequence[Job]) -> dict[str, str]:
    """`column_defaults` that are constants (a literal, maybe cast): the ones the INSERT
    path can tell from a written value (`function_sql`)."""
    return {c: e for c, e in column_defaults(db, table, jobs).items() if _is_constant(e)}


def default_issues(db: Session, jobs: Sequence[Job]) -> list[tuple[Job, str, str]]:
    """(job, column, default) of each synced column whose DEFAULT is not a constant
    (`now()`, `nextval(...)`): an INSERT that leaves the column out gets a value no trigger
    can tell from one the writer chose, so which code version wrote the row is lost."""
    issues = []
    for group in table_groups(db, jobs):
        table = group[0].table or ""
        for column, expression in column_defaults(db, table, group).items():
            if not _is_constant(expression):
                owner = next(j for j in group if column in (*j.old_columns, *j.new_columns))
                issues.append((owner, column, expression))
    return issues


def defaults_drift(db: Session, plan: str, jobs: Sequence[Job]) -> list[tuple[str, str]]:
    """Tables whose synced columns' defaults are not the ones the installed trigger was
    built with (a revision set or dropped one since): (table, what changed)."""
    changed = []
    for group in table_groups(db, jobs):
        table = group[0].table or ""
        comment = db.scalar(
            "SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p"
            " WHERE p.pronamespace = 'phasegate'::regnamespace AND p.proname = %(n)s",
            {"n": function_name(plan, table)},
        )
        if comment is None:
            continue  # not installed: schema_drift says so where it should be
        line = next((x for x in comment.split("\n") if x.startswith(_DEFAULTS_LINE)), None)
        built = json.loads(line[len(_DEFAULTS_LINE) :]) if line else {}
        now = constant_defaults(db, table, group)
        if built != now:
            changed.append((table, f"built with {built or 'none'}, now {now or 'none'}"))
    return changed


def _is_constant(expression: str) -> bool:
    """A literal, possibly cast (`0`, `'x'::text`, `'{}'::jsonb`, `NULL::integer`)."""
    try:
        [raw] = parse_sql(f"SELECT {expression}")
    except Exception:
        return False
    node: Any = raw.stmt.targetList[0].val
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return isinstance(node, ast.A_Const)


def _old_columns(jobs: Sequence[Job]) -> list[str]:
    return list(dict.fromkeys(column for job in jobs for column in job.old_columns))


def _drop_callers(db: Session, name: str) -> None:
    """Drop every trigger that calls function phasegate.`name`, on whatever table.

    Partition clones of a trigger go with their parent's, and PostgreSQL refuses to drop
    one alone: parents first (fewest ancestors), and IF EXISTS skips the clones.
    """
    callers = db.all(
        "SELECT t.tgname, t.tgrelid::regclass::text FROM pg_trigger t"
        " JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'phasegate' AND p.proname = %(n)s"
        " ORDER BY (SELECT count(*) FROM pg_partition_ancestors(t.tgrelid))",
        {"n": name},
    )
    for trigger, relation in callers:
        db.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(trigger), sql.SQL(relation)
            )
        )


def outdated(db: Session, plan: str, job: Job) -> bool:
    """Whether the job's installed trigger runs other expressions than the plan file has
    now (its `set` or `sync.down` edited since backfill installed it)."""
    rows = db.all(_FUNCTIONS, {"prefix": f"{_OWNER_PREFIX}{plan}, job"})
    for comment, _name, _table in rows:
        digest = _owned_jobs(comment, plan).get(job.name)
        if digest:  # none recorded: installed before digests were
            return digest != expressions_digest(job)
    return False


def is_installed(db: Session, plan: str, job: Job) -> bool:
    """Whether triggers that fire for the app's writes run the job's sync on INSERT and on
    UPDATE, on its table and on every partition of it (phasegate's own, under any name it
    ever gave them). Enabled means 'O' or 'A': one enabled for replicas only ('R') fires
    only where the app's writes do not, and a partition's clone may be disabled alone."""
    rows = db.all(
        "SELECT r.relid, t.tgtype, p.proname, obj_description(p.oid, 'pg_proc')"
        " FROM (SELECT to_regclass(%(t)s) AS relid"
        " UNION SELECT relid FROM pg_partition_tree(to_regclass(%(t)s))) r"
        " LEFT JOIN pg_trigger t ON t.tgrelid = r.relid AND t.tgenabled IN ('O', 'A')"
        " LEFT JOIN pg_proc p ON p.oid = t.tgfoid"
        " AND p.pronamespace = 'phasegate'::regnamespace",
        {"t": quote_table(job.table or "").as_string(db.raw)},
    )
    events: dict[int, int] = {}
    for relation, kind, name, comment in rows:
        if relation is None:
            continue  # no such table: not installed
        events.setdefault(relation, 0)
        if name is not None and (
            name == object_name(plan, job.name) or job.name in _owned_jobs(comment, plan)
        ):
            events[relation] |= int(kind)
    return bool(events) and all(
        found & _INSERT_AND_UPDATE == _INSERT_AND_UPDATE for found in events.values()
    )


def drop(db: Session, plan: str, job: Job) -> None:
    """Drop a job's own trigger and function as phasegate named them before one function
    per table (`object_name`); a no-op when they are gone or never were."""
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


# The plan's trigger functions, told by their comments (%(prefix)s: up to ", job", which
# starts both "job a" and "jobs a, b"), with one table that a trigger of each is on.
_FUNCTIONS = (
    "SELECT d.description, p.proname, t.relation"
    " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
    " JOIN pg_description d ON d.objoid = p.oid AND d.classoid = 'pg_proc'::regclass"
    " LEFT JOIN LATERAL (SELECT tgrelid::regclass::text AS relation FROM pg_trigger"
    " WHERE tgfoid = p.oid ORDER BY tgrelid LIMIT 1) t ON true"
    " WHERE n.nspname = 'phasegate' AND starts_with(d.description, %(prefix)s)"
    " ORDER BY p.proname"
)


def installed(db: Session, plan: str) -> list[tuple[str, str, str | None]]:
    """The plan's sync triggers in the database, told by their functions' comments:
    (job, function name, table as regclass text or None when no trigger uses it)."""
    rows = db.all(_FUNCTIONS, {"prefix": f"{_OWNER_PREFIX}{plan}, job"})
    return sorted(
        (job, name, table) for comment, name, table in rows for job in _owned_jobs(comment, plan)
    )


def drop_all(db: Session, plan: str, jobs: list[Job]) -> list[str]:
    """Drop the triggers of `jobs` and every other trigger the plan installed (of a job
    since renamed, or whose `sync` was removed from the file); returns the jobs named.
    Run inside the caller's transaction."""
    for job in jobs:
        drop(db, plan, job)
    named = [job.name for job in jobs]
    for job, name, _table in installed(db, plan):
        drop_installed(db, name)
        if job not in named:
            named.append(job)
    return named


# -- the order of a table's BEFORE ROW triggers -----------------------------------------------

_ROW_BEFORE = 1 | 2  # pg_trigger.tgtype: TRIGGER_TYPE_ROW | TRIGGER_TYPE_BEFORE
_INSERT_AND_UPDATE = 4 | 16  # TRIGGER_TYPE_INSERT | TRIGGER_TYPE_UPDATE

# The table's (and its partitions') enabled BEFORE ROW INSERT or UPDATE triggers that are
# not phasegate's and whose names sort after %(first)s, byte by byte, as PostgreSQL fires
# them. 'R' triggers fire only where ours do not (session_replication_role = replica).
_LATE_TRIGGERS = (
    'SELECT DISTINCT t.tgname::text COLLATE "C", t.tgrelid::regclass::text'
    " FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
    " JOIN pg_namespace n ON n.oid = p.pronamespace"
    " WHERE (t.tgrelid = to_regclass(%(t)s)"
    " OR t.tgrelid IN (SELECT relid FROM pg_partition_tree(to_regclass(%(t)s))))"
    " AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')"
    f" AND t.tgtype & {_ROW_BEFORE} = {_ROW_BEFORE} AND t.tgtype & {_INSERT_AND_UPDATE} <> 0"
    " AND n.nspname <> 'phasegate'"
    ' AND t.tgname::text COLLATE "C" > %(first)s::text COLLATE "C"'
    " ORDER BY 1, 2"
)


def trigger_order_issues(db: Session, plan: str, jobs: Sequence[Job]) -> list[tuple[Job, str, str]]:
    """Before the plan's triggers are installed: each table where a BEFORE ROW trigger of
    the user's would fire after them (so the sync would not see the row as it leaves
    it), as (the table's first synced job, what, what to do). Inside a transaction."""
    issues = []
    for group in table_groups(db, jobs):
        table = group[0].table or ""
        first = min(trigger_names(function_name(plan, table), ordinal_for(db, plan, table)))
        late = _late_triggers(db, group[0].table or "", first)
        if late:
            issues.append((group[0], *_late_refusal(db, group[0].table or "", late, first)))
    return issues


def order_drift(db: Session, plan: str, jobs: Sequence[Job]) -> list[str]:
    """While the plan's triggers are installed: a BEFORE ROW trigger of the user's that
    fires after them (added since, or renamed), and jobs of one table whose triggers an
    older phasegate installed one per job, which fire in name order rather than plan
    order. Inside a transaction."""
    problems = []
    for group in table_groups(db, jobs):
        table = group[0].table or ""
        ours = db.all(
            "SELECT t.tgname::text, p.proname, obj_description(p.oid, 'pg_proc')"
            " FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE t.tgrelid = to_regclass(%(t)s) AND n.nspname = 'phasegate'",
            {"t": quote_table(table).as_string(db.raw)},
        )
        names = {job.name for job in group}
        legacy = {object_name(plan, job.name): job.name for job in group}
        mine: list[str] = []
        per_job: set[str] = set()  # jobs with a trigger of their own, as phasegate once named it
        for trigger, function, comment in ours:
            if function in legacy:
                per_job.add(legacy[function])
            elif not names & set(_owned_jobs(comment, plan)):
                continue
            mine.append(trigger)
        if not mine:
            continue  # missing: schema_drift says so
        first = db.scalar('SELECT min(x COLLATE "C") FROM unnest(%(n)s::text[]) AS x', {"n": mine})
        late = _late_triggers(db, table, first)
        if late:
            message, hint = _late_refusal(db, table, late, first)
            problems.append(f"{message}: {hint}")
        if len(per_job) > 1:
            listed = ", ".join(repr(job.name) for job in group if job.name in per_job)
            problems.append(
                f"the sync triggers of jobs {listed} on {table} were installed one per job by "
                "an older phasegate and fire in name order, not in plan order: run "
                "`phasegate rollback PLAN --to expand`, then `phasegate backfill PLAN`, which "
                "installs them as one and sweeps every row again"
            )
    return problems


def _late_triggers(db: Session, table: str, first: str) -> list[tuple[str, str]]:
    """(name, table) of each BEFORE ROW trigger of the user's that fires after `first`."""
    rows = db.all(_LATE_TRIGGERS, {"t": quote_table(table).as_string(db.raw), "first": first})
    return [(name, relation) for name, relation in rows]


def _late_refusal(
    db: Session, table: str, late: list[tuple[str, str]], first: str
) -> tuple[str, str]:
    """What to say about BEFORE triggers that fire after phasegate's, and the renames."""
    taken: dict[str, set[str]] = {}
    renames = []
    for name, relation in late:
        if relation not in taken:
            taken[relation] = {
                row[0]
                for row in db.all(
                    "SELECT tgname::text FROM pg_trigger WHERE tgrelid = %(r)s::regclass",
                    {"r": relation},
                )
            }
        earlier = _earlier_name(name, first, taken[relation])
        taken[relation].add(earlier)
        renames.append(
            sql.SQL("ALTER TRIGGER {} ON {} RENAME TO {}")
            .format(sql.Identifier(name), sql.SQL(relation), sql.Identifier(earlier))
            .as_string(db.raw)
        )
    names = ", ".join(sql.Identifier(name).as_string(db.raw) for name, _relation in late)
    return (
        f"table {table!r} has BEFORE ROW trigger(s) {names} that fire after phasegate's "
        f"sync trigger {sql.Identifier(first).as_string(db.raw)} (PostgreSQL fires them in "
        "name order, byte by byte), so the sync would not see the row as they leave it and "
        "old and new columns would drift apart",
        "rename them to sort before it: " + "; ".join(renames),
    )


def _earlier_name(name: str, first: str, taken: set[str]) -> str:
    """A name for trigger `name` that sorts before `first` and is free on its table:
    its letters, digits and `_` (each other character becomes `_`), prefixed with `0_` if
    that is not early enough (phasegate's names start with `~` or `sync_`)."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", name)[: _MAX_IDENT - 6] or "trigger"
    if base.encode() >= first.encode():
        base = f"0_{base}"
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        candidate = f"{base}_{number}"
    return candidate


# -- SQL pieces -------------------------------------------------------------------------------


def _up(job: Job) -> sql.Composed:
    return _assign(job.set_ or {})


def _down(job: Job) -> sql.Composed:
    return _assign(job.sync.down if job.sync else {})


def _assign(columns: dict[str, str]) -> sql.Composed:
    """One SELECT ... INTO so every expression sees the row as written, like UPDATE SET."""
    return sql.SQL("SELECT {} INTO {};").format(
        sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(e)) for e in columns.values()),
        sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in columns),
    )


def _unwritten(columns: list[str], defaults: Mapping[str, str]) -> sql.Composed:
    """On INSERT: each of `columns` NULL, or equal to its constant default."""
    terms = (
        sql.SQL("(NEW.{0} IS NULL OR NEW.{0} IS NOT DISTINCT FROM ({1}))").format(
            sql.Identifier(c), sql.SQL(defaults[c])
        )
        if c in defaults
        else sql.SQL("NEW.{} IS NULL").format(sql.Identifier(c))
        for c in columns
    )
    return sql.SQL("({})").format(sql.SQL(" AND ").join(terms))


def _all_null(columns: list[str]) -> sql.Composed:
    terms = (sql.SQL("NEW.{} IS NULL").format(sql.Identifier(c)) for c in columns)
    return sql.SQL("({})").format(sql.SQL(" AND ").join(terms))


def _changed(columns: Sequence[str]) -> sql.Composed:
    terms = (sql.SQL("NEW.{0} IS DISTINCT FROM OLD.{0}").format(sql.Identifier(c)) for c in columns)
    return sql.SQL("({})").format(sql.SQL(" OR ").join(terms))
