"""The phase-aware linter: each revision's SQL, parsed by PostgreSQL's own parser (pglast).

Input is the SQL Alembic renders offline (`--sql`) for every revision from the start of
the history, so the linter knows which tables and column types existed before each
statement (a type change can be judged a rewrite-free widening only against the old type).
Only the plan's revisions are judged, each against the rules of its phase: expand is
additive only, switch may validate and tighten, contract may drop.

A finding says: rule, severity, revision file, statement, the lock it takes on which
table, and the safe rewrite. A revision waives a rule with a module constant
`phasegate_allow = {"rule-id": "why"}`; the finding stays visible, marked waived.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pglast import ast, enums, parse_sql, visitors
from pglast.parser import ParseError

from phasegate.locks import Lock, locks_of, relation_name, strongest

ERROR = "error"
WARNING = "warning"
_ATT = enums.AlterTableType
_CT = enums.ConstrType


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    title: str
    fix: str


RULES = {
    rule.id: rule
    for rule in [
        Rule(
            "create-index-blocking",
            ERROR,
            "CREATE INDEX without CONCURRENTLY blocks writes for the whole build",
            "CREATE INDEX CONCURRENTLY inside `with op.get_context().autocommit_block():`, "
            "dropping an INVALID leftover of a failed build before retrying",
        ),
        Rule(
            "drop-index-blocking",
            ERROR,
            "DROP INDEX without CONCURRENTLY takes ACCESS EXCLUSIVE on the table",
            "DROP INDEX CONCURRENTLY inside an autocommit_block()",
        ),
        Rule(
            "reindex-blocking",
            ERROR,
            "REINDEX without CONCURRENTLY blocks writes",
            "REINDEX ... CONCURRENTLY inside an autocommit_block()",
        ),
        Rule(
            "constraint-validated-on-add",
            ERROR,
            "a FOREIGN KEY or CHECK added validated scans the whole table under its lock",
            "add it NOT VALID, then VALIDATE CONSTRAINT in a later transaction (a switch "
            "revision): VALIDATE takes only SHARE UPDATE EXCLUSIVE",
        ),
        Rule(
            "validate-same-transaction",
            ERROR,
            "VALIDATE in the transaction that added the constraint NOT VALID keeps the add's "
            "strong lock for the whole scan",
            "validate in a later revision, or after the add's transaction commits",
        ),
        Rule(
            "set-not-null-unchecked",
            ERROR,
            "SET NOT NULL scans the whole table under ACCESS EXCLUSIVE",
            "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; VALIDATE CONSTRAINT c "
            "(later transaction); SET NOT NULL (PostgreSQL 12+ skips the scan); DROP "
            "CONSTRAINT c",
        ),
        Rule(
            "add-column-not-null-no-default",
            ERROR,
            "a NOT NULL column without a default fails on a non-empty table and breaks old writers",
            "add it nullable (or with a constant default), backfill, and tighten in switch",
        ),
        Rule(
            "add-column-volatile-default",
            ERROR,
            "a volatile default rewrites the whole table under ACCESS EXCLUSIVE",
            "add the column without a default, SET DEFAULT separately, and fill existing "
            "rows in a backfill job",
        ),
        Rule(
            "add-column-default-unknown",
            WARNING,
            "a default that calls a function phasegate cannot classify may be volatile "
            "(then the table is rewritten)",
            "make sure the function is STABLE or IMMUTABLE, or add the column without a "
            "default and backfill",
        ),
        Rule(
            "column-type-rewrite",
            ERROR,
            "changing a column's type rewrites the table (and its indexes) under ACCESS EXCLUSIVE",
            "a new column of the new type + sync trigger + backfill + switch + drop the old "
            "one (rewrite-free: varchar(n) to a longer varchar or text, numeric precision up "
            "at the same scale)",
        ),
        Rule(
            "rename",
            ERROR,
            "renaming a column or table breaks the code that still uses the old name",
            "expand/contract: add the new column, sync and backfill it, switch, then drop "
            "the old one in contract",
        ),
        Rule(
            "drop-outside-contract",
            ERROR,
            "dropping a column, table or index breaks old code; only contract may drop",
            "move the drop to a contract revision, which runs once no old code is live",
        ),
        Rule(
            "unique-constraint-in-place",
            ERROR,
            "ADD UNIQUE / PRIMARY KEY builds its index under ACCESS EXCLUSIVE",
            "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX",
        ),
        Rule(
            "identity-column-added",
            ERROR,
            "a serial, identity or stored generated column added to a table rewrites it",
            "add a plain nullable column with a sequence default set separately, and "
            "backfill existing rows",
        ),
        Rule(
            "exclusion-constraint",
            ERROR,
            "an EXCLUDE constraint cannot be NOT VALID: it is built and checked under lock",
            "a new table with the constraint, filled by a backfill, then switched to",
        ),
        Rule(
            "json-column",
            WARNING,
            "json has no equality operator (DISTINCT, GROUP BY, UNION fail) and is reparsed "
            "on every read",
            "use jsonb",
        ),
        Rule(
            "unbatched-dml",
            ERROR,
            "an UPDATE or DELETE of an existing table in a revision locks every row it "
            "touches for the whole statement",
            "a backfill job in the plan: batched, resumable, throttled",
        ),
        Rule(
            "drop-add-same-type",
            ERROR,
            "dropping a column and adding one of the same type to the same table is "
            "autogenerate's rendering of a rename: the data is lost",
            "a rename plan: add the new column, backfill it from the old with a sync "
            "trigger, switch, and drop the old one in contract",
        ),
        Rule(
            "tighten-outside-switch",
            ERROR,
            "SET NOT NULL in expand refuses old code's writes of NULL",
            "tighten in a switch revision, once every live version writes the column",
        ),
        Rule(
            "constraint-on-old-column-in-expand",
            WARNING,
            "a constraint on a column old code already writes is enforced on its writes "
            "from now on, even NOT VALID",
            "add it in switch, once every live version writes valid values",
        ),
        Rule(
            "drop-not-null-in-expand",
            WARNING,
            "old readers may not expect NULL in a column that had NOT NULL",
            "drop NOT NULL in switch, once no old reader is live",
        ),
        Rule(
            "table-maintenance",
            ERROR,
            "VACUUM FULL, CLUSTER and TRUNCATE hold ACCESS EXCLUSIVE for long or lose data",
            "leave maintenance out of migrations (pg_repack for bloat; delete in batches)",
        ),
        Rule(
            "unparsable-sql",
            ERROR,
            "PostgreSQL's parser rejects this revision's SQL",
            "fix the SQL; `alembic upgrade A:B --sql` shows what Alembic renders",
        ),
        Rule(
            "offline-render-failed",
            ERROR,
            "Alembic cannot render the plan's revisions as SQL offline (--sql), so nothing "
            "could be checked",
            "guard code that needs a database (op.get_bind().execute) with "
            "`if not context.is_offline_mode():`",
        ),
        Rule(
            "unknown-waiver",
            WARNING,
            "phasegate_allow names a rule that does not exist",
            "use one of the rule ids `phasegate lint --rules` lists",
        ),
    ]
}

VOLATILE_FUNCTIONS = {
    "random",
    "setseed",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "clock_timestamp",
    "timeofday",
    "nextval",
    "txid_current",
}
# Functions that are STABLE or IMMUTABLE: fine as a default (the value is computed once)
SAFE_FUNCTIONS = {
    "now",
    "current_timestamp",
    "transaction_timestamp",
    "statement_timestamp",
    "current_date",
    "localtimestamp",
    "lower",
    "upper",
    "coalesce",
    "jsonb_build_object",
    "json_build_object",
    "array",
    "to_jsonb",
    "make_interval",
}


@dataclass
class RevisionSQL:
    """One revision's offline SQL and where it belongs; `phase` None: not judged."""

    revision: str
    path: str
    sql: str
    phase: str | None = None
    allow: dict[str, str] = field(default_factory=dict)


@dataclass
class Finding:
    rule: str
    severity: str
    revision: str
    path: str
    phase: str
    statement: str
    message: str
    fix: str
    lock: str | None = None
    table: str | None = None
    waived: str | None = None

    @property
    def blocking(self) -> bool:
        return self.severity == ERROR and self.waived is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "revision": self.revision,
            "path": self.path,
            "phase": self.phase,
            "statement": self.statement,
            "message": self.message,
            "lock": self.lock,
            "table": self.table,
            "fix": self.fix,
            "waived": self.waived,
        }

    def describe(self) -> str:
        lock = f" [{self.lock} on {self.table}]" if self.lock else ""
        waived = f" (waived: {self.waived})" if self.waived else ""
        return (
            f"{self.severity} {self.rule}{waived}: {self.path} ({self.phase} revision "
            f"{self.revision}){lock}\n    {self.statement}\n    {self.message}\n"
            f"    safe: {self.fix}"
        )


@dataclass
class Statement:
    """One statement of a revision, with the transaction block it runs in (-1: none)."""

    node: ast.Node
    text: str
    transaction: int


@dataclass
class Schema:
    """What the history so far created: tables with their column types, indexes."""

    tables: dict[str, dict[str, str]] = field(default_factory=dict)
    indexes: dict[str, str] = field(default_factory=dict)
    not_null_checks: dict[tuple[str, str], str] = field(default_factory=dict)  # -> column
    valid_not_null_checks: set[tuple[str, str]] = field(default_factory=set)  # (table, name)

    def checked_not_null(self, table: str, column: str) -> bool:
        """A validated CHECK (column IS NOT NULL) exists: SET NOT NULL needs no scan."""
        return any(
            key in self.valid_not_null_checks and checked == column and key[0] == table
            for key, checked in self.not_null_checks.items()
        )


def split_statements(sql: str, version_table: str = "alembic_version") -> list[Statement]:
    """Parse; drop the version table's bookkeeping; number the transaction blocks."""
    statements = []
    counter, inside = 0, False
    for raw in parse_sql(sql):
        node = raw.stmt
        if isinstance(node, ast.TransactionStmt):
            kind = node.kind
            if kind in (
                enums.TransactionStmtKind.TRANS_STMT_BEGIN,
                enums.TransactionStmtKind.TRANS_STMT_START,
            ):
                counter, inside = counter + 1, True
            elif kind in (
                enums.TransactionStmtKind.TRANS_STMT_COMMIT,
                enums.TransactionStmtKind.TRANS_STMT_ROLLBACK,
            ):
                inside = False
            continue
        if _touches_only(node, version_table):
            continue
        end = raw.stmt_location + raw.stmt_len if raw.stmt_len else len(sql)
        statements.append(
            Statement(node, _clean(sql[raw.stmt_location : end]), counter if inside else -1)
        )
    return statements


def lint(revisions: list[RevisionSQL], version_table: str = "alembic_version") -> list[Finding]:
    """Findings for every revision with a phase; the others only teach the schema."""
    schema = Schema()
    plan_columns: set[tuple[str, str]] = set()
    findings: list[Finding] = []
    for revision in revisions:
        checker = _RevisionChecker(revision, schema, plan_columns)
        try:
            statements = split_statements(revision.sql, version_table)
        except ParseError as exc:
            if revision.phase is not None:
                checker.report("unparsable-sql", str(exc), revision.sql[:200])
                findings += checker.findings
            continue
        for statement in statements:
            checker.check(statement)
        checker.finish()
        if revision.phase is not None:
            findings += checker.findings
    return findings


class _RevisionChecker:
    def __init__(
        self, revision: RevisionSQL, schema: Schema, plan_columns: set[tuple[str, str]]
    ) -> None:
        self.revision = revision
        self.phase = revision.phase
        self.schema = schema
        self.plan_columns = plan_columns  # columns the plan's own revisions added
        self.findings: list[Finding] = []
        self.created: set[str] = set()
        self.not_valid: dict[tuple[str, str], int] = {}  # (table, constraint) -> transaction
        self.dropped: list[tuple[str, str, str, str]] = []  # table, column, type, statement
        self.added: list[tuple[str, str, str]] = []  # table, column, type
        self.statement: Statement | None = None
        for rule in revision.allow:
            if rule not in RULES and self.phase is not None:
                self.report(
                    "unknown-waiver",
                    f"phasegate_allow waives {rule!r}, which is not a rule",
                    f"phasegate_allow = {revision.allow!r}",
                )

    # -- reporting --------------------------------------------------------------------------

    def report(self, rule_id: str, message: str, text: str | None = None) -> None:
        if self.phase is None:
            return
        rule = RULES[rule_id]
        lock: Lock | None = None
        if self.statement is not None:
            lock = strongest(locks_of(self.statement.node, self.schema.indexes))
        self.findings.append(
            Finding(
                rule=rule.id,
                severity=rule.severity,
                revision=self.revision.revision,
                path=self.revision.path,
                phase=self.phase,
                statement=text if text is not None else _short(self.statement),
                message=f"{rule.title}: {message}" if message else rule.title,
                fix=rule.fix,
                lock=lock.mode if lock else None,
                table=lock.table if lock else None,
                waived=self.revision.allow.get(rule.id),
            )
        )

    # -- statements -------------------------------------------------------------------------

    def check(self, statement: Statement) -> None:
        self.statement = statement
        node = statement.node
        if isinstance(node, ast.CreateStmt):
            self._create_table(node)
        elif isinstance(node, ast.IndexStmt):
            table = _table(node.relation)
            if node.idxname:
                self.schema.indexes[node.idxname] = table
            if not node.concurrent and self._existing(table):
                self.report("create-index-blocking", f"on {table}")
        elif isinstance(node, ast.DropStmt):
            self._drop(node)
        elif isinstance(node, ast.ReindexStmt):
            if not any(p.defname == "concurrently" for p in node.params or ()):
                self.report("reindex-blocking", "")
        elif isinstance(node, ast.AlterTableStmt):
            if node.objtype == enums.ObjectType.OBJECT_TABLE:
                table = _table(node.relation)
                for cmd in node.cmds or ():
                    self._alter(table, cmd)
        elif isinstance(node, ast.RenameStmt):
            self._rename(node)
        elif isinstance(node, ast.UpdateStmt | ast.DeleteStmt):
            table = _table(node.relation)
            if self._existing(table):
                verb = "UPDATE" if isinstance(node, ast.UpdateStmt) else "DELETE"
                self.report("unbatched-dml", f"{verb} of {table}")
        elif isinstance(node, ast.VacuumStmt):
            if any(o.defname == "full" for o in node.options or ()):
                self.report("table-maintenance", "VACUUM FULL")
        elif isinstance(node, ast.ClusterStmt):
            self.report("table-maintenance", "CLUSTER")
        elif isinstance(node, ast.TruncateStmt):
            self.report("table-maintenance", "TRUNCATE")
        self.statement = None

    def finish(self) -> None:
        """Rules that need the whole revision: a drop plus an add of the same type."""
        for table, column, kind, text in self.dropped:
            for added_table, added_column, added_kind in self.added:
                if (added_table, added_kind) == (table, kind) and added_column != column:
                    self.report(
                        "drop-add-same-type",
                        f"{table}.{column} dropped and {table}.{added_column} added, both {kind}",
                        text,
                    )

    def _existing(self, table: str) -> bool:
        """A table this revision did not create (it may hold rows and serve the app)."""
        return table not in self.created

    def _create_table(self, node: ast.CreateStmt) -> None:
        table = _table(node.relation)
        self.created.add(table)
        columns = {}
        for element in node.tableElts or ():
            if isinstance(element, ast.ColumnDef):
                columns[element.colname] = _type_text(element.typeName)
                if _base_type(element.typeName) == "json":
                    self.report("json-column", f"{table}.{element.colname}")
        self.schema.tables[table] = columns

    def _drop(self, node: ast.DropStmt) -> None:
        kind = node.removeType
        if kind not in (enums.ObjectType.OBJECT_TABLE, enums.ObjectType.OBJECT_INDEX):
            return
        for names in node.objects or ():
            name = _normal(".".join(n.sval for n in names))
            if kind == enums.ObjectType.OBJECT_INDEX:
                table = self.schema.indexes.get(name)
                if not node.concurrent and (table is None or self._existing(table)):
                    self.report("drop-index-blocking", f"index {name}")
                if self.phase != "contract" and (table is None or self._existing(table)):
                    self.report("drop-outside-contract", f"index {name} in {self.phase}")
                self.schema.indexes.pop(name, None)
            else:
                self.schema.tables.pop(name, None)
                if self.phase != "contract" and self._existing(name):
                    self.report("drop-outside-contract", f"table {name} in {self.phase}")

    def _rename(self, node: ast.RenameStmt) -> None:
        kind = node.renameType
        table = _table(node.relation) if node.relation is not None else "?"
        if kind == enums.ObjectType.OBJECT_COLUMN:
            columns = self.schema.tables.get(table, {})
            if node.subname in columns:
                columns[node.newname] = columns.pop(node.subname)
            if self._existing(table):
                self.report("rename", f"column {table}.{node.subname} to {node.newname}")
        elif kind == enums.ObjectType.OBJECT_TABLE:
            if table in self.schema.tables:
                self.schema.tables[node.newname] = self.schema.tables.pop(table)
            if self._existing(table):
                self.report("rename", f"table {table} to {node.newname}")

    def _alter(self, table: str, cmd: ast.AlterTableCmd) -> None:
        existing = self._existing(table)
        columns = self.schema.tables.setdefault(table, {})
        kind = cmd.subtype
        if kind == _ATT.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
            self._add_column(table, cmd.def_, existing)
            columns[cmd.def_.colname] = _type_text(cmd.def_.typeName)
        elif kind == _ATT.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
            self._add_constraint(table, cmd.def_, existing)
        elif kind == _ATT.AT_ValidateConstraint:
            key = (table, cmd.name)
            if self.not_valid.get(key) == self.statement.transaction != -1:  # type: ignore[union-attr]
                self.report(
                    "validate-same-transaction", f"{cmd.name} was added NOT VALID just before"
                )
            self.schema.valid_not_null_checks.add(key)
        elif kind == _ATT.AT_SetNotNull:
            if existing and self.phase in ("expand", "backfill"):
                self.report("tighten-outside-switch", f"{table}.{cmd.name}")
            elif existing and not self.schema.checked_not_null(table, cmd.name):
                self.report(
                    "set-not-null-unchecked",
                    f"{table}.{cmd.name} has no validated CHECK ({cmd.name} IS NOT NULL) before it",
                )
        elif kind == _ATT.AT_DropConstraint:
            self.schema.not_null_checks.pop((table, cmd.name), None)
            self.schema.valid_not_null_checks.discard((table, cmd.name))
        elif kind == _ATT.AT_DropNotNull:
            if existing and self.phase == "expand":
                self.report("drop-not-null-in-expand", f"{table}.{cmd.name}")
        elif kind == _ATT.AT_AlterColumnType and isinstance(cmd.def_, ast.ColumnDef):
            new_type = _type_text(cmd.def_.typeName)
            old_type = columns.get(cmd.name)
            if _base_type(cmd.def_.typeName) == "json":
                self.report("json-column", f"{table}.{cmd.name}")
            if existing and (cmd.def_.raw_default is not None or not _widening(old_type, new_type)):
                was = f"from {old_type} " if old_type else "(old type unknown) "
                using = " with USING" if cmd.def_.raw_default is not None else ""
                self.report("column-type-rewrite", f"{table}.{cmd.name} {was}to {new_type}{using}")
            columns[cmd.name] = new_type
        elif kind == _ATT.AT_DropColumn:
            old = columns.pop(cmd.name, None)
            if existing and self.phase != "contract":
                self.report("drop-outside-contract", f"column {table}.{cmd.name} in {self.phase}")
            if existing and old is not None:
                self.dropped.append((table, cmd.name, old, _short(self.statement)))

    def _add_column(self, table: str, column: ast.ColumnDef, existing: bool) -> None:
        name = f"{table}.{column.colname}"
        self.plan_columns.add((table, column.colname))
        kind = _type_text(column.typeName)
        if existing:
            self.added.append((table, column.colname, kind))
        if _base_type(column.typeName) == "json":
            self.report("json-column", name)
        if not existing:
            return
        constraints = column.constraints or ()
        default = next((c for c in constraints if c.contype == _CT.CONSTR_DEFAULT), None)
        if _base_type(column.typeName) in (
            "serial",
            "bigserial",
            "smallserial",
            "serial4",
            "serial8",
            "serial2",
        ) or any(c.contype in (_CT.CONSTR_IDENTITY, _CT.CONSTR_GENERATED) for c in constraints):
            self.report("identity-column-added", name)
        not_null = column.is_not_null or any(c.contype == _CT.CONSTR_NOTNULL for c in constraints)
        if (
            not_null
            and default is None
            and not any(
                c.contype in (_CT.CONSTR_IDENTITY, _CT.CONSTR_GENERATED) for c in constraints
            )
        ):
            self.report("add-column-not-null-no-default", name)
        if default is not None:
            functions = _functions(default.raw_expr)
            volatile = sorted(f for f in functions if f in VOLATILE_FUNCTIONS)
            unknown = sorted(f for f in functions if f not in VOLATILE_FUNCTIONS | SAFE_FUNCTIONS)
            if volatile:
                self.report(
                    "add-column-volatile-default", f"{name} DEFAULT calls {', '.join(volatile)}"
                )
            elif unknown:
                self.report(
                    "add-column-default-unknown", f"{name} DEFAULT calls {', '.join(unknown)}"
                )
        for constraint in constraints:
            self._add_constraint(table, constraint, existing, column.colname, default is not None)

    def _add_constraint(
        self,
        table: str,
        constraint: ast.Constraint,
        existing: bool,
        column: str | None = None,
        has_default: bool = False,
    ) -> None:
        kind = constraint.contype
        name = constraint.conname or "(unnamed)"
        if kind in (_CT.CONSTR_FOREIGN, _CT.CONSTR_CHECK):
            # on a column added with no default, PostgreSQL skips checking a foreign key
            # (every value is NULL), but not a CHECK, which it evaluates on every row
            scanned = column is None or kind == _CT.CONSTR_CHECK or has_default
            if constraint.skip_validation:
                self.not_valid[(table, name)] = self.statement.transaction  # type: ignore[union-attr]
            elif existing and scanned:
                what = "FOREIGN KEY" if kind == _CT.CONSTR_FOREIGN else "CHECK"
                self.report("constraint-validated-on-add", f"{what} {name} on {table}")
            checked = _not_null_column(constraint)
            if kind == _CT.CONSTR_CHECK and checked:
                self.schema.not_null_checks[(table, name)] = checked
                if not constraint.skip_validation:
                    self.schema.valid_not_null_checks.add((table, name))
            columns = _constraint_columns(constraint, column)
            old = [c for c in columns if (table, c) not in self.plan_columns]
            if existing and self.phase == "expand" and old:
                self.report(
                    "constraint-on-old-column-in-expand",
                    f"{name} on {table}({', '.join(old)})",
                )
        elif kind in (_CT.CONSTR_UNIQUE, _CT.CONSTR_PRIMARY):
            if existing and not constraint.indexname:
                self.report("unique-constraint-in-place", f"{name} on {table}")
        elif kind == _CT.CONSTR_EXCLUSION and existing:
            self.report("exclusion-constraint", f"{name} on {table}")


# -- helpers -----------------------------------------------------------------------------------


def _normal(name: str) -> str:
    return name[len("public.") :] if name.startswith("public.") else name


def _table(relation: ast.RangeVar | None) -> str:
    return _normal(relation_name(relation))


def _touches_only(node: ast.Node, table: str) -> bool:
    relation = getattr(node, "relation", None)
    return (
        isinstance(relation, ast.RangeVar)
        and relation.relname == table
        and isinstance(node, ast.CreateStmt | ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt)
    )


def _clean(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not line.strip().startswith("--")]
    return "\n".join(lines).strip()


def _short(statement: Statement | None, limit: int = 240) -> str:
    if statement is None:
        return ""
    text = " ".join(statement.text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _base_type(type_name: ast.TypeName | None) -> str:
    if type_name is None or not type_name.names:
        return "?"
    return type_name.names[-1].sval


def _type_text(type_name: ast.TypeName | None) -> str:
    """A comparable spelling: varchar(20), numeric(10,2), int4, text[]."""
    if type_name is None:
        return "?"
    base = _base_type(type_name)
    mods = []
    for mod in type_name.typmods or ():
        value = getattr(getattr(mod, "val", None), "ival", None)
        mods.append(str(value) if value is not None else "?")
    text = f"{base}({','.join(mods)})" if mods else base
    return text + "[]" * len(type_name.arrayBounds or ())


def _widening(old: str | None, new: str) -> bool:
    """The rewrite-free changes: varchar(n) to varchar(m>=n), varchar or text; text to
    varchar; numeric(p,s) to numeric(q>=p,s) or numeric."""
    if old is None:
        return False
    if old == new:
        return True
    old_base, old_mods = _split(old)
    new_base, new_mods = _split(new)
    texts = ("varchar", "text")
    if old_base in texts and new_base in texts:
        if new_base == "text" or not new_mods:
            return True
        return bool(old_mods) and old_base == "varchar" and new_mods[0] >= old_mods[0]
    if old_base == new_base == "numeric":
        if not new_mods:
            return True
        if len(old_mods) == 2 and len(new_mods) == 2:
            return new_mods[1] == old_mods[1] and new_mods[0] >= old_mods[0]
        if len(old_mods) == 1 and len(new_mods) in (1, 2):
            return (new_mods[1] if len(new_mods) == 2 else 0) == 0 and new_mods[0] >= old_mods[0]
    return False


def _split(text: str) -> tuple[str, list[int]]:
    if "(" not in text:
        return text, []
    base, _, rest = text.partition("(")
    try:
        return base, [int(v) for v in rest.rstrip(")").split(",")]
    except ValueError:
        return base, []


class _Functions(visitors.Visitor):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_FuncCall(self, _ancestors: Any, node: ast.FuncCall) -> None:
        self.names.add(node.funcname[-1].sval)

    def visit_SQLValueFunction(self, _ancestors: Any, _node: Any) -> None:
        pass  # CURRENT_TIMESTAMP and friends: stable


def _functions(expression: ast.Node | None) -> set[str]:
    if expression is None:
        return set()
    finder = _Functions()
    finder(expression)
    return finder.names


def _not_null_column(constraint: ast.Constraint) -> str | None:
    """`col` when the CHECK is exactly `col IS NOT NULL`."""
    expr = constraint.raw_expr
    if (
        isinstance(expr, ast.NullTest)
        and expr.nulltesttype == enums.NullTestType.IS_NOT_NULL
        and isinstance(expr.arg, ast.ColumnRef)
        and len(expr.arg.fields) == 1
    ):
        return expr.arg.fields[0].sval
    return None


def _constraint_columns(constraint: ast.Constraint, column: str | None) -> list[str]:
    if column is not None:
        return [column]
    if constraint.fk_attrs:
        return [a.sval for a in constraint.fk_attrs]
    refs: list[str] = []

    class _Columns(visitors.Visitor):
        def visit_ColumnRef(self, _ancestors: Any, node: ast.ColumnRef) -> None:
            if node.fields and isinstance(node.fields[-1], ast.String):
                refs.append(node.fields[-1].sval)

    if constraint.raw_expr is not None:
        _Columns()(constraint.raw_expr)
    return list(dict.fromkeys(refs))


def iter_rules() -> Iterator[Rule]:
    return iter(RULES.values())
