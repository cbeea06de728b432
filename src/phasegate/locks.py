"""Which table lock a statement takes, read from its parse tree (pglast: PostgreSQL's parser).

Lint names the lock of each finding, preview shows the lock of each statement, and the
executor picks a statement_timeout by it: short for statements that block the app's
writes while they hold their lock, none for those that do not (concurrent builds,
VALIDATE). The modes and which statement takes which are PostgreSQL's documented ones
("Explicit Locking", and the ALTER TABLE reference for its subcommands).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pglast import ast, enums

ACCESS_SHARE = "ACCESS SHARE"
ROW_SHARE = "ROW SHARE"
ROW_EXCLUSIVE = "ROW EXCLUSIVE"
SHARE_UPDATE_EXCLUSIVE = "SHARE UPDATE EXCLUSIVE"
SHARE = "SHARE"
SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"
EXCLUSIVE = "EXCLUSIVE"
ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"

MODES = [
    ACCESS_SHARE,
    ROW_SHARE,
    ROW_EXCLUSIVE,
    SHARE_UPDATE_EXCLUSIVE,
    SHARE,
    SHARE_ROW_EXCLUSIVE,
    EXCLUSIVE,
    ACCESS_EXCLUSIVE,
]
_STRENGTH = {mode: i for i, mode in enumerate(MODES)}

_ATT = enums.AlterTableType
# ALTER TABLE subcommands weaker than ACCESS EXCLUSIVE (everything else takes it)
_ALTER_TABLE_LOCKS = {
    _ATT.AT_ValidateConstraint: SHARE_UPDATE_EXCLUSIVE,
    _ATT.AT_SetStatistics: SHARE_UPDATE_EXCLUSIVE,
    _ATT.AT_ClusterOn: SHARE_UPDATE_EXCLUSIVE,
    _ATT.AT_DropCluster: SHARE_UPDATE_EXCLUSIVE,
    _ATT.AT_AttachPartition: SHARE_UPDATE_EXCLUSIVE,
    _ATT.AT_DetachPartitionFinalize: SHARE_UPDATE_EXCLUSIVE,
    _ATT.AT_EnableTrig: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_EnableAlwaysTrig: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_EnableReplicaTrig: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_EnableTrigAll: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_EnableTrigUser: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_DisableTrig: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_DisableTrigAll: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_DisableTrigUser: SHARE_ROW_EXCLUSIVE,
    _ATT.AT_SetRelOptions: SHARE_UPDATE_EXCLUSIVE,  # fillfactor, autovacuum_*, toast.*
    _ATT.AT_ResetRelOptions: SHARE_UPDATE_EXCLUSIVE,
    _ATT.AT_SetOptions: SHARE_UPDATE_EXCLUSIVE,  # a column's n_distinct
    _ATT.AT_ResetOptions: SHARE_UPDATE_EXCLUSIVE,
}
_OT = enums.ObjectType
# DROP of these takes ACCESS EXCLUSIVE on the table they belong to (the name's prefix)
_DROP_ON_TABLE = {_OT.OBJECT_TRIGGER, _OT.OBJECT_POLICY, _OT.OBJECT_RULE}
_LOCK_STMT_MODES = {i + 1: mode for i, mode in enumerate(MODES)}  # LOCK TABLE's mode numbers


@dataclass(frozen=True)
class Lock:
    mode: str
    table: str

    def describe(self) -> str:
        return f"{self.mode} on {self.table}"

    @property
    def blocks_writes(self) -> bool:
        """SHARE and stronger conflict with ROW EXCLUSIVE: the app's INSERT/UPDATE/DELETE."""
        return _STRENGTH[self.mode] >= _STRENGTH[SHARE]

    @property
    def blocks_reads(self) -> bool:
        return self.mode == ACCESS_EXCLUSIVE


def stronger(a: str, b: str) -> str:
    return a if _STRENGTH[a] >= _STRENGTH[b] else b


def relation_name(relation: ast.RangeVar | None) -> str:
    if relation is None:
        return "?"
    return f"{relation.schemaname}.{relation.relname}" if relation.schemaname else relation.relname


def dotted(names: tuple[ast.String, ...] | None) -> str:
    return ".".join(n.sval for n in names or ())


def locks_of(node: ast.Node, index_tables: Mapping[str, str] | None = None) -> list[Lock]:
    """The table locks `node` takes, strongest per table; [] for statements on no table.

    `index_tables` maps index names to their tables (the linter knows them from the
    history); without it, a dropped or reindexed index is named as "<index>'s table".
    """
    found: dict[str, str] = {}
    indexes = index_tables or {}

    def table_of_index(name: str) -> str:
        return indexes.get(name) or indexes.get(name.removeprefix("public.")) or f"{name}'s table"

    def take(table: str, mode: str) -> None:
        found[table] = stronger(found.get(table, mode), mode)

    if isinstance(node, ast.AlterTableStmt):
        table = relation_name(node.relation)
        for cmd in node.cmds or ():
            take(table, _alter_table_cmd_lock(cmd))
            referenced = _referenced_table(cmd)
            if referenced:
                take(referenced, SHARE_ROW_EXCLUSIVE)
            if cmd.subtype == _ATT.AT_AttachPartition and isinstance(cmd.def_, ast.PartitionCmd):
                take(relation_name(cmd.def_.name), ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.IndexStmt):
        take(relation_name(node.relation), SHARE_UPDATE_EXCLUSIVE if node.concurrent else SHARE)
    elif isinstance(node, ast.DropStmt):
        mode = SHARE_UPDATE_EXCLUSIVE if node.concurrent else ACCESS_EXCLUSIVE
        for names in node.objects or ():
            if node.removeType == _OT.OBJECT_TABLE:
                take(dotted(names), mode)
            elif node.removeType == _OT.OBJECT_INDEX:
                take(table_of_index(dotted(names)), mode)
            elif node.removeType in _DROP_ON_TABLE and isinstance(names, tuple):
                take(dotted(names[:-1]), ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.ReindexStmt):
        concurrently = any(p.defname == "concurrently" for p in node.params or ())
        target = relation_name(node.relation)
        if node.kind == enums.ReindexObjectType.REINDEX_OBJECT_INDEX:
            target = table_of_index(target)
        take(target, SHARE_UPDATE_EXCLUSIVE if concurrently else SHARE)
    elif isinstance(node, ast.RenameStmt) and node.relation is not None:
        take(relation_name(node.relation), ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.CreateStmt):
        for element in node.tableElts or ():
            for referenced in _create_table_references(element):
                take(referenced, SHARE_ROW_EXCLUSIVE)
    elif isinstance(node, ast.CreateTrigStmt):
        take(relation_name(node.relation), SHARE_ROW_EXCLUSIVE)
    elif isinstance(node, ast.UpdateStmt | ast.DeleteStmt | ast.InsertStmt):
        take(relation_name(node.relation), ROW_EXCLUSIVE)
    elif isinstance(node, ast.TruncateStmt):
        for relation in node.relations or ():
            take(relation_name(relation), ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.VacuumStmt):
        full = any(o.defname == "full" for o in node.options or ())
        for rel in node.rels or ():
            take(relation_name(rel.relation), ACCESS_EXCLUSIVE if full else SHARE_UPDATE_EXCLUSIVE)
    elif isinstance(node, ast.RefreshMatViewStmt):
        take(relation_name(node.relation), EXCLUSIVE if node.concurrent else ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.ClusterStmt) and node.relation is not None:
        take(relation_name(node.relation), ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.LockStmt):
        for relation in node.relations or ():
            take(relation_name(relation), _LOCK_STMT_MODES.get(node.mode, ACCESS_EXCLUSIVE))
    elif isinstance(node, ast.CommentStmt) and node.objtype == _OT.OBJECT_TABLE:
        take(dotted(node.object), SHARE_UPDATE_EXCLUSIVE)
    elif isinstance(node, ast.CommentStmt) and node.objtype == _OT.OBJECT_COLUMN:
        take(dotted(node.object[:-1]), SHARE_UPDATE_EXCLUSIVE)
    elif isinstance(node, ast.CreatePolicyStmt):
        take(relation_name(node.table), ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.RuleStmt):
        take(relation_name(node.relation), ACCESS_EXCLUSIVE)
    elif isinstance(node, ast.CreateStatsStmt):
        for relation in node.relations or ():
            if isinstance(relation, ast.RangeVar):
                take(relation_name(relation), SHARE_UPDATE_EXCLUSIVE)
    return [Lock(mode, table) for table, mode in found.items()]


def strongest(locks: list[Lock]) -> Lock | None:
    return max(locks, key=lambda lock: _STRENGTH[lock.mode], default=None)


def _alter_table_cmd_lock(cmd: ast.AlterTableCmd) -> str:
    definition = cmd.def_
    foreign = isinstance(definition, ast.Constraint) and (
        definition.contype == enums.ConstrType.CONSTR_FOREIGN
    )
    if cmd.subtype == _ATT.AT_AddConstraint and foreign:
        return SHARE_ROW_EXCLUSIVE
    return _ALTER_TABLE_LOCKS.get(cmd.subtype, ACCESS_EXCLUSIVE)


def _referenced_table(cmd: ast.AlterTableCmd) -> str | None:
    definition = cmd.def_
    if (
        isinstance(definition, ast.Constraint)
        and definition.contype == enums.ConstrType.CONSTR_FOREIGN
    ):
        return relation_name(definition.pktable)
    if isinstance(definition, ast.ColumnDef):
        for constraint in definition.constraints or ():
            if constraint.contype == enums.ConstrType.CONSTR_FOREIGN:
                return relation_name(constraint.pktable)
    return None


def _create_table_references(element: ast.Node) -> list[str]:
    constraints: tuple[ast.Constraint, ...] = ()
    if isinstance(element, ast.ColumnDef):
        constraints = element.constraints or ()
    elif isinstance(element, ast.Constraint):
        constraints = (element,)
    return [
        relation_name(c.pktable)
        for c in constraints
        if c.contype == enums.ConstrType.CONSTR_FOREIGN
    ]
