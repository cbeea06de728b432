"""Each lint rule on real Alembic revision files rendered offline: a failing and a passing
example per rule, waivers, and the lock table. No database."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from pglast import parse_sql

from phasegate.cli import cli
from phasegate.lint import RULES, RevisionSQL
from phasegate.lint import lint as run_lint
from phasegate.locks import EXCLUSIVE, SHARE, locks_of, stronger, strongest

from .conftest import ALEMBIC_INI, PLAN, ROOT
from .lint_project import Revision, build

AUTOCOMMIT = "with op.get_context().autocommit_block():\n"
ADD_CHECK = "ALTER TABLE bug ADD CONSTRAINT ck_score CHECK (score > 0) NOT VALID"


def lint(tmp_path, *revisions: Revision) -> tuple[int, list[dict]]:
    ini, plan = build(tmp_path, list(revisions))
    result = CliRunner().invoke(
        cli, ["--config", str(ini), "--json", "lint", str(plan)], catch_exceptions=False
    )
    document = json.loads(result.stdout)
    return result.exit_code, document["findings"]


def rules(findings: list[dict]) -> set[str]:
    return {f["rule"] for f in findings}


R = Revision
# rule id -> (revisions that break it, revisions that do the same job safely)
CASES: dict[str, tuple[list[Revision], list[Revision]]] = {
    "create-index-blocking": (
        [R("expand", 'op.create_index("ix_bug_score", "bug", ["score"])')],
        [
            R(
                "expand",
                AUTOCOMMIT + '    op.create_index("ix_bug_score", "bug", ["score"], '
                "postgresql_concurrently=True)",
            )
        ],
    ),
    "drop-index-blocking": (
        [R("contract", 'op.drop_index("ix_bug_title", table_name="bug")')],
        [
            R(
                "contract",
                AUTOCOMMIT + '    op.drop_index("ix_bug_title", table_name="bug", '
                "postgresql_concurrently=True)",
            )
        ],
    ),
    "reindex-blocking": (
        [R("switch", AUTOCOMMIT + '    op.execute("REINDEX INDEX ix_bug_title")')],
        [R("switch", AUTOCOMMIT + '    op.execute("REINDEX INDEX CONCURRENTLY ix_bug_title")')],
    ),
    "constraint-validated-on-add": (
        [R("switch", 'op.create_foreign_key("fk_owner", "bug", "owner", ["owner_id"], ["id"])')],
        [
            R(
                "switch",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT fk_owner FOREIGN KEY (owner_id) '
                'REFERENCES owner (id) NOT VALID")',
            )
        ],
    ),
    "validate-same-transaction": (
        [
            R(
                "switch",
                f"op.execute({ADD_CHECK!r})\n"
                'op.execute("ALTER TABLE bug VALIDATE CONSTRAINT ck_score")',
            )
        ],
        [
            R(
                "switch",
                f"op.execute({ADD_CHECK!r})\n"
                + AUTOCOMMIT
                + '    op.execute("ALTER TABLE bug VALIDATE CONSTRAINT ck_score")',
            )
        ],
    ),
    "set-not-null-unchecked": (
        [R("switch", 'op.alter_column("bug", "body", nullable=False)')],
        [
            R(
                "switch",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT ck_body CHECK (body IS NOT NULL) '
                'NOT VALID")',
            ),
            R(
                "switch",
                'op.execute("ALTER TABLE bug VALIDATE CONSTRAINT ck_body")\n'
                'op.alter_column("bug", "body", nullable=False)\n'
                'op.drop_constraint("ck_body", "bug")',
            ),
        ],
    ),
    "add-column-not-null-no-default": (
        [R("expand", 'op.add_column("bug", sa.Column("votes", sa.Integer, nullable=False))')],
        [
            R(
                "expand",
                'op.add_column("bug", sa.Column("votes", sa.Integer, nullable=False, '
                'server_default="0"))',
            )
        ],
    ),
    "add-column-volatile-default": (
        [
            R(
                "expand",
                'op.add_column("bug", sa.Column("uid", postgresql.UUID, '
                'server_default=sa.text("gen_random_uuid()")))',
            )
        ],
        [
            R(
                "expand",
                'op.add_column("bug", sa.Column("seen", sa.DateTime(timezone=True), '
                'server_default=sa.text("now()")))',
            )
        ],
    ),
    "column-type-rewrite": (
        [R("switch", 'op.alter_column("bug", "score", type_=sa.BigInteger)')],
        [
            R(
                "switch",
                'op.alter_column("bug", "title", type_=sa.String(50))\n'
                'op.alter_column("bug", "price", type_=sa.Numeric(12, 2))',
            )
        ],
    ),
    "rename": (
        [R("switch", 'op.alter_column("bug", "body", new_column_name="text")')],
        [R("expand", 'op.add_column("bug", sa.Column("text", sa.Text))')],
    ),
    "drop-outside-contract": (
        [R("expand", 'op.drop_column("bug", "meta")')],
        [R("contract", 'op.drop_column("bug", "meta")')],
    ),
    "unique-constraint-in-place": (
        [R("switch", 'op.create_unique_constraint("uq_title", "bug", ["title"])')],
        [
            R(
                "expand",
                AUTOCOMMIT + '    op.create_index("ux_title", "bug", ["title"], unique=True, '
                "postgresql_concurrently=True)",
            ),
            R(
                "switch",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT uq_title UNIQUE USING INDEX ux_title")',
            ),
        ],
    ),
    "identity-column-added": (
        [R("expand", 'op.add_column("bug", sa.Column("seq", sa.BigInteger, sa.Identity()))')],
        [
            R(
                "expand",
                'op.create_table("tag", sa.Column("id", sa.BigInteger, sa.Identity(), '
                "primary_key=True))",
            )
        ],
    ),
    "exclusion-constraint": (
        [
            R(
                "switch",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT ex_score EXCLUDE USING btree '
                '(score WITH =)")',
            )
        ],
        [
            R(
                "expand",
                'op.execute("CREATE TABLE slot (n int, EXCLUDE USING btree (n WITH =))")',
            )
        ],
    ),
    "json-column": (
        [R("expand", 'op.add_column("bug", sa.Column("extra", sa.JSON))')],
        [R("expand", 'op.add_column("bug", sa.Column("extra", postgresql.JSONB))')],
    ),
    "unbatched-dml": (
        [R("expand", 'op.execute("UPDATE bug SET score = 0 WHERE score IS NULL")')],
        [
            R(
                "expand",
                'op.create_table("tag", sa.Column("name", sa.Text))\n'
                "op.execute(\"INSERT INTO tag VALUES ('x')\")\n"
                "op.execute(\"UPDATE tag SET name = 'y'\")",
            )
        ],
    ),
    "drop-add-same-type": (
        [
            R(
                "contract",
                'op.drop_column("bug", "body")\nop.add_column("bug", sa.Column("text", sa.Text))',
            )
        ],
        [
            R(
                "contract",
                'op.drop_column("bug", "body")\n'
                'op.add_column("bug", sa.Column("votes", sa.Integer))',
            )
        ],
    ),
    "tighten-outside-switch": (
        [
            R(
                "expand",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT ck_body CHECK (body IS NOT NULL) '
                'NOT VALID")\n' + AUTOCOMMIT + '    op.execute("ALTER TABLE bug VALIDATE '
                'CONSTRAINT ck_body")\n    op.alter_column("bug", "body", nullable=False)',
            )
        ],
        [
            R("expand", 'op.add_column("bug", sa.Column("text", sa.Text))'),
            R(
                "switch",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT ck_text CHECK (text IS NOT NULL) '
                'NOT VALID")\n' + AUTOCOMMIT + '    op.execute("ALTER TABLE bug VALIDATE '
                'CONSTRAINT ck_text")\n    op.alter_column("bug", "text", nullable=False)',
            ),
        ],
    ),
    "constraint-on-old-column-in-expand": (
        [
            R(
                "expand",
                'op.execute("ALTER TABLE bug ADD CONSTRAINT ck_score CHECK (score > 0) NOT VALID")',
            )
        ],
        [
            R(
                "expand",
                'op.add_column("bug", sa.Column("rank", sa.Integer))\n'
                'op.execute("ALTER TABLE bug ADD CONSTRAINT ck_rank CHECK (rank > 0) NOT VALID")',
            )
        ],
    ),
    "drop-not-null-in-expand": (
        [R("expand", 'op.execute("ALTER TABLE owner ALTER COLUMN id DROP NOT NULL")')],
        [R("switch", 'op.execute("ALTER TABLE owner ALTER COLUMN name DROP NOT NULL")')],
    ),
    "table-maintenance": (
        [R("switch", AUTOCOMMIT + '    op.execute("VACUUM FULL bug")')],
        [R("switch", AUTOCOMMIT + '    op.execute("VACUUM (ANALYZE) bug")')],
    ),
    "add-column-default-unknown": (
        [
            R(
                "expand",
                'op.add_column("bug", sa.Column("slug", sa.Text, '
                'server_default=sa.text("make_slug()")))',
            )
        ],
        [
            R(
                "expand",
                'op.add_column("bug", sa.Column("slug", sa.Text, server_default="none"))',
            )
        ],
    ),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fails_the_unsafe_form_and_passes_the_safe_one(tmp_path, rule: str) -> None:
    unsafe, safe = CASES[rule]
    code, findings = lint(tmp_path / "unsafe", *unsafe)
    hit = [f for f in findings if f["rule"] == rule]
    assert hit, f"{rule} not reported; got {rules(findings)}"
    finding = hit[0]
    assert finding["path"].endswith(".py") and finding["fix"] and finding["message"]
    assert finding["revision"].startswith("rev")
    if finding["severity"] == "error":
        assert code == 1
    code, findings = lint(tmp_path / "safe", *safe)
    assert rule not in rules(findings), findings
    assert not [f for f in findings if f["severity"] == "error"], findings
    assert code == 0


def test_every_rule_has_a_failing_example() -> None:
    untested = (
        set(RULES) - set(CASES) - {"unparsable-sql", "unknown-waiver", "offline-render-failed"}
    )
    assert untested == set()


def test_a_finding_names_the_lock_table_statement_and_safe_rewrite(tmp_path) -> None:
    _, findings = lint(tmp_path, R("expand", 'op.create_index("ix_bug_score", "bug", ["score"])'))
    (finding,) = findings
    assert (finding["lock"], finding["table"], finding["phase"]) == ("SHARE", "bug", "expand")
    assert finding["statement"] == "CREATE INDEX ix_bug_score ON bug (score)"
    assert "CONCURRENTLY" in finding["fix"]


def test_a_waiver_turns_an_error_into_a_shown_reason(tmp_path) -> None:
    waiver = 'phasegate_allow = {"unbatched-dml": "bug has 40 rows in every environment"}'
    code, findings = lint(
        tmp_path, R("expand", 'op.execute("UPDATE bug SET score = 0")', module=waiver)
    )
    assert code == 0
    (finding,) = findings
    assert finding["rule"] == "unbatched-dml"
    assert finding["waived"] == "bug has 40 rows in every environment"
    ini_dir = tmp_path
    text = CliRunner().invoke(
        cli, ["--config", str(ini_dir / "alembic.ini"), "lint", str(ini_dir / "plans" / "p.yaml")]
    )
    assert "(waived: bug has 40 rows in every environment)" in text.stdout
    assert "0 error(s), 0 warning(s), 1 waived" in text.stdout


def test_a_waiver_of_an_unknown_rule_is_reported(tmp_path) -> None:
    code, findings = lint(
        tmp_path, R("expand", "pass", module='phasegate_allow = {"no-such-rule": "x"}')
    )
    assert code == 0 and rules(findings) == {"unknown-waiver"}


def test_lint_only_one_phase(tmp_path) -> None:
    ini, plan = build(
        tmp_path,
        [
            R("expand", 'op.execute("UPDATE bug SET score = 0")'),
            R("contract", 'op.drop_index("ix_bug_title", table_name="bug")'),
        ],
    )
    base = ["--config", str(ini), "--json", "lint", str(plan)]
    result = CliRunner().invoke(cli, [*base, "--phase", "contract"])
    assert rules(json.loads(result.stdout)["findings"]) == {"drop-index-blocking"}


def test_the_seed_plan_is_clean() -> None:
    result = CliRunner().invoke(cli, ["--config", str(ALEMBIC_INI), "lint", str(PLAN)])
    assert result.exit_code == 0, result.output
    assert "0 error(s), 0 warning(s), 0 waived" in result.stdout


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("CREATE INDEX i ON t (a)", [("SHARE", "t")]),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", [("SHARE UPDATE EXCLUSIVE", "t")]),
        ("ALTER TABLE t ADD COLUMN a int", [("ACCESS EXCLUSIVE", "t")]),
        ("ALTER TABLE t VALIDATE CONSTRAINT c", [("SHARE UPDATE EXCLUSIVE", "t")]),
        (
            "ALTER TABLE t ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES u (id) NOT VALID",
            [("SHARE ROW EXCLUSIVE", "t"), ("SHARE ROW EXCLUSIVE", "u")],
        ),
        ("UPDATE s.t SET a = 1", [("ROW EXCLUSIVE", "s.t")]),
        ("VACUUM FULL t", [("ACCESS EXCLUSIVE", "t")]),
        ("LOCK TABLE t IN SHARE MODE", [("SHARE", "t")]),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", []),
        ("DROP TRIGGER tr ON t", [("ACCESS EXCLUSIVE", "t")]),
        ("CREATE POLICY p ON t USING (true)", [("ACCESS EXCLUSIVE", "t")]),
        ("COMMENT ON COLUMN t.a IS 'x'", [("SHARE UPDATE EXCLUSIVE", "t")]),
        ("ALTER TABLE t SET (fillfactor = 70)", [("SHARE UPDATE EXCLUSIVE", "t")]),
        (
            "ALTER TABLE p ATTACH PARTITION c FOR VALUES IN (1)",
            [("SHARE UPDATE EXCLUSIVE", "p"), ("ACCESS EXCLUSIVE", "c")],
        ),
        ("DROP INDEX i", [("ACCESS EXCLUSIVE", "i's table")]),
        ("DROP INDEX CONCURRENTLY s.i", [("SHARE UPDATE EXCLUSIVE", "s.i's table")]),
        ("DROP TABLE a, s.b", [("ACCESS EXCLUSIVE", "a"), ("ACCESS EXCLUSIVE", "s.b")]),
        ("DROP TRIGGER tr ON s.t", [("ACCESS EXCLUSIVE", "s.t")]),
        ("REINDEX INDEX i", [("SHARE", "i's table")]),
        ("REINDEX INDEX CONCURRENTLY i", [("SHARE UPDATE EXCLUSIVE", "i's table")]),
        ("REINDEX TABLE t", [("SHARE", "t")]),
        ("REINDEX TABLE CONCURRENTLY s.t", [("SHARE UPDATE EXCLUSIVE", "s.t")]),
        ("ALTER TABLE t RENAME TO u", [("ACCESS EXCLUSIVE", "t")]),
        ("ALTER TABLE s.t RENAME COLUMN a TO b", [("ACCESS EXCLUSIVE", "s.t")]),
        (
            "CREATE TABLE c (id int REFERENCES p (id), o int, FOREIGN KEY (o) REFERENCES q (id))",
            [("SHARE ROW EXCLUSIVE", "p"), ("SHARE ROW EXCLUSIVE", "q")],
        ),
        (
            "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
            [("SHARE ROW EXCLUSIVE", "t")],
        ),
        ("TRUNCATE a, b", [("ACCESS EXCLUSIVE", "a"), ("ACCESS EXCLUSIVE", "b")]),
        ("VACUUM t, u", [("SHARE UPDATE EXCLUSIVE", "t"), ("SHARE UPDATE EXCLUSIVE", "u")]),
        ("VACUUM (FULL) t", [("ACCESS EXCLUSIVE", "t")]),
        ("ANALYZE t, u", [("SHARE UPDATE EXCLUSIVE", "t"), ("SHARE UPDATE EXCLUSIVE", "u")]),
        ("CLUSTER t USING i", [("ACCESS EXCLUSIVE", "t")]),
        ("LOCK TABLE t, u", [("ACCESS EXCLUSIVE", "t"), ("ACCESS EXCLUSIVE", "u")]),
        ("LOCK TABLE t IN ROW EXCLUSIVE MODE", [("ROW EXCLUSIVE", "t")]),
        ("COMMENT ON TABLE s.t IS 'x'", [("SHARE UPDATE EXCLUSIVE", "s.t")]),
        ("COMMENT ON COLUMN s.t.a IS 'x'", [("SHARE UPDATE EXCLUSIVE", "s.t")]),
        ("ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0)", [("ACCESS EXCLUSIVE", "t")]),
        (
            "ALTER TABLE t ADD COLUMN a int REFERENCES u (id)",
            [("ACCESS EXCLUSIVE", "t"), ("SHARE ROW EXCLUSIVE", "u")],
        ),
        ("ALTER TABLE t DETACH PARTITION c", [("ACCESS EXCLUSIVE", "t")]),
        ("CREATE RULE r AS ON INSERT TO s.t DO INSTEAD NOTHING", [("ACCESS EXCLUSIVE", "s.t")]),
        ("CREATE STATISTICS st ON a, b FROM s.t", [("SHARE UPDATE EXCLUSIVE", "s.t")]),
        ("SELECT 1", []),
    ],
)
def test_locks_of_statements(statement: str, expected: list[tuple[str, str]]) -> None:
    found = locks_of(parse_sql(statement)[0].stmt)
    assert [(lock.mode, lock.table) for lock in found] == expected


def test_an_index_lock_names_the_table_the_revisions_built_it_on() -> None:
    """An index's lock is its table's: with the table known, a finding names it."""
    on_t = {"i": "t"}
    for statement, mode in [
        ("DROP INDEX i", "ACCESS EXCLUSIVE"),
        ("DROP INDEX public.i", "ACCESS EXCLUSIVE"),  # the default schema, spelled out
        ("REINDEX INDEX i", "SHARE"),
    ]:
        found = locks_of(parse_sql(statement)[0].stmt, on_t)
        assert [(lock.mode, lock.table) for lock in found] == [(mode, "t")], statement


def test_the_strongest_lock_wins_and_a_tie_keeps_the_first() -> None:
    assert strongest([]) is None
    both = locks_of(
        parse_sql("ALTER TABLE t ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES u (id)")[0].stmt
    )
    assert strongest(both) == both[0]  # SHARE ROW EXCLUSIVE on t and on u
    assert stronger(SHARE, EXCLUSIVE) == EXCLUSIVE == stronger(EXCLUSIVE, SHARE)


def test_the_readme_lists_every_rule_with_its_safe_rewrite() -> None:
    readme = (ALEMBIC_INI.parent / "README.md").read_text()
    for rule in RULES.values():
        assert f"| `{rule.id}` | {rule.severity} | {rule.title} | {rule.fix} |" in readme, rule.id


def test_constraints_declared_on_an_added_column(tmp_path) -> None:
    """A CHECK is evaluated on every row; a FOREIGN KEY only when the column has a default."""
    _, findings = lint(
        tmp_path / "check",
        R(
            "switch",
            'op.add_column("bug", sa.Column("n", sa.Integer, sa.CheckConstraint("n > 0")))',
        ),
    )
    assert "constraint-validated-on-add" in rules(findings)
    _, findings = lint(
        tmp_path / "fk_default",
        R("switch", 'op.execute("ALTER TABLE bug ADD COLUMN o bigint DEFAULT 1 REFERENCES owner")'),
    )
    assert "constraint-validated-on-add" in rules(findings)
    _, findings = lint(
        tmp_path / "fk",
        R("switch", 'op.execute("ALTER TABLE bug ADD COLUMN o bigint REFERENCES owner")'),
    )
    assert "constraint-validated-on-add" not in rules(findings)


def test_a_dropped_index_is_named_with_its_table(tmp_path) -> None:
    _, findings = lint(tmp_path, R("contract", 'op.drop_index("ix_bug_title", table_name="bug")'))
    (finding,) = findings
    assert (finding["lock"], finding["table"]) == ("ACCESS EXCLUSIVE", "bug")


NOT_NULL_CHECK = (
    'op.execute("ALTER TABLE bug ADD CONSTRAINT {name} CHECK ({column} IS NOT NULL) NOT VALID")'
)
SET_BODY_NOT_NULL = 'op.alter_column("bug", "body", nullable=False)'


@pytest.mark.parametrize(
    "revisions",
    [
        pytest.param(
            [
                R("switch", NOT_NULL_CHECK.format(name="ck_body", column="body")),
                R("switch", SET_BODY_NOT_NULL),
            ],
            id="check-never-validated",
        ),
        pytest.param(
            [
                R("switch", NOT_NULL_CHECK.format(name="ck_title", column="title")),
                R("switch", 'op.execute("ALTER TABLE bug VALIDATE CONSTRAINT ck_title")'),
                R("switch", SET_BODY_NOT_NULL),
            ],
            id="validated-check-on-another-column",
        ),
        pytest.param(
            [
                R("switch", NOT_NULL_CHECK.format(name="ck_body", column="body")),
                R("switch", NOT_NULL_CHECK.format(name="ck_title", column="title")),
                R("switch", 'op.execute("ALTER TABLE bug VALIDATE CONSTRAINT ck_title")'),
                R("switch", SET_BODY_NOT_NULL),
            ],
            id="the-other-check-validated-not-this-one",
        ),
    ],
)
def test_set_not_null_needs_a_validated_check_on_that_very_column(
    tmp_path, revisions: list[Revision]
) -> None:
    """Only a VALIDATEd CHECK (col IS NOT NULL) on the same column spares SET NOT NULL its
    scan under ACCESS EXCLUSIVE; a NOT VALID one, or one on another column, does not."""
    code, findings = lint(tmp_path, *revisions)
    assert "set-not-null-unchecked" in rules(findings), findings
    assert code == 1


def test_lint_rules_lists_every_rule_the_registry_and_the_readme_know_without_a_database() -> None:
    """`lint --rules` is what a waiver's author reads: it must name every rule lint can
    report, as the README's table does, with the same severities."""
    unreachable = "postgresql://nobody@127.0.0.1:1/none"  # a database would not be reached
    runner = CliRunner()
    text = runner.invoke(
        cli, ["--database-url", unreachable, "--config", str(ALEMBIC_INI), "lint", "--rules"]
    )
    assert text.exit_code == 0, text.output
    listed = dict(re.findall(r"^([a-z][a-z-]+) \((error|warning)\): ", text.stdout, re.M))
    document = runner.invoke(
        cli,
        ["--database-url", unreachable, "--config", str(ALEMBIC_INI), "--json", "lint", "--rules"],
    )
    assert document.exit_code == 0
    in_json = {r["id"]: r["severity"] for r in json.loads(document.stdout)["rules"]}
    readme = (ROOT / "README.md").read_text()
    in_readme = dict(re.findall(r"^\| `([a-z-]+)` \| (error|warning) \|", readme, re.M))
    registry = {rule.id: rule.severity for rule in RULES.values()}
    reported = set(
        re.findall(r'report\(\s*"([a-z-]+)"', (ROOT / "src/phasegate/lint.py").read_text())
    )
    assert reported and reported <= set(registry)  # every id a finding may carry is registered
    assert listed == in_json == registry == in_readme


def test_lint_phase_checks_only_that_phases_revisions(tmp_path) -> None:
    """`lint PLAN --phase P`: a blocking index build in expand is not switch's finding."""
    ini, plan = build(
        tmp_path,
        [
            R("expand", 'op.create_index("ix_bug_score", "bug", ["score"])'),
            R("switch", f'op.execute("{ADD_CHECK}")'),
        ],
    )

    def lint_phase(*phase: str) -> tuple[int, set[str]]:
        args = ["--config", str(ini), "--json", "lint", str(plan), *phase]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        return result.exit_code, rules(json.loads(result.stdout)["findings"])

    assert lint_phase() == (1, {"create-index-blocking"})
    assert lint_phase("--phase", "expand") == (1, {"create-index-blocking"})
    assert lint_phase("--phase", "switch") == (0, set())


def type_change_findings(old: str | None, new: str) -> list[str]:
    """The column-type-rewrite details of changing bug.c from `old` (None: a table the
    revisions never created, so its type is unknown) to `new` in expand."""
    base = [] if old is None else [RevisionSQL("base", "base.py", f"CREATE TABLE bug (c {old});")]
    change = RevisionSQL("r1", "r1.py", f"ALTER TABLE bug ALTER COLUMN c TYPE {new};", "expand")
    return [f.message for f in run_lint([*base, change]) if f.rule == "column-type-rewrite"]


@pytest.mark.parametrize(
    ("old", "new", "rewrites"),
    [
        (None, "text", True),  # unknown: assume the worst
        ("varchar(20)", "varchar(20)", False),
        ("varchar(20)", "varchar(30)", False),
        ("varchar(20)", "varchar(10)", True),
        ("varchar(20)", "varchar", False),
        ("varchar(20)", "text", False),
        ("text", "varchar", False),
        ("text", "varchar(10)", True),
        ("text", "integer", True),
        ("integer", "text", True),
        ("numeric(10,2)", "numeric", False),
        ("numeric(10,2)", "numeric(12,2)", False),
        ("numeric(10,2)", "numeric(9,2)", True),
        ("numeric(10,2)", "numeric(12,3)", True),
        ("numeric(10,2)", "numeric(12)", True),
        ("numeric(10)", "numeric(12)", False),
        ("numeric(10)", "numeric(10,0)", False),
        ("numeric(10)", "numeric(12,0)", False),
        ("numeric(10)", "numeric(8)", True),
        ("numeric(10)", "numeric(12,2)", True),
    ],
)
def test_only_a_type_change_without_a_table_rewrite_passes(
    old: str | None, new: str, rewrites: bool
) -> None:
    """PostgreSQL rewrites the table (under ACCESS EXCLUSIVE) unless the new type only
    widens the old one; a missed rewrite is an outage, a false one blocks a safe change."""
    assert bool(type_change_findings(old, new)) is rewrites


def test_a_type_rewrite_names_the_old_and_new_type() -> None:
    rewrite = "changing a column's type rewrites the table (and its indexes) under ACCESS EXCLUSIVE"
    assert type_change_findings("varchar(20)", "varchar(10)") == [
        f"{rewrite}: bug.c from varchar(20) to varchar(10)"
    ]
    assert type_change_findings(None, "text") == [f"{rewrite}: bug.c (old type unknown) to text"]


BUG_TABLE = RevisionSQL(
    "base",
    "base.py",
    "CREATE TABLE bug (id int, title varchar(20), score int);"
    "CREATE INDEX ix_bug_title ON bug (title);",
)
ADD = "ALTER TABLE bug ADD COLUMN"


def findings_of(sql: str, phase: str = "switch", version_table: str | None = None) -> list:
    """The findings of one revision of `phase` running `sql` on BUG_TABLE's schema."""
    revisions = [BUG_TABLE, RevisionSQL("r1", "r1.py", sql, phase)]
    if version_table is None:
        return run_lint(revisions)
    return run_lint(revisions, version_table)


def detail(finding) -> str:
    """What a finding's message says after its rule's title: the object it found."""
    return finding.message.removeprefix(RULES[finding.rule].title + ": ")


@pytest.mark.parametrize(
    ("phase", "sql", "expected"),
    [
        (
            "expand",
            "DROP INDEX ix_bug_title;",
            [
                ("drop-index-blocking", "index ix_bug_title"),
                ("drop-outside-contract", "index ix_bug_title in expand"),
            ],
        ),
        (
            "expand",
            "DROP INDEX CONCURRENTLY ix_unknown;",
            [("drop-outside-contract", "index ix_unknown in expand")],
        ),
        ("contract", "DROP INDEX CONCURRENTLY ix_bug_title; DROP TABLE bug;", []),
        ("switch", "DROP TABLE bug;", [("drop-outside-contract", "table bug in switch")]),
        ("expand", "CREATE TABLE doc (id int, body json);", [("json-column", "doc.body")]),
        (
            "expand",
            "CREATE TABLE tmp (a int); CREATE INDEX ix_tmp ON tmp (a);"
            "DROP INDEX ix_tmp; DROP TABLE tmp;",
            [],  # what this revision created no one uses yet
        ),
        (
            "expand",
            "ALTER TABLE bug RENAME COLUMN title TO name;"
            "ALTER TABLE bug ALTER COLUMN name TYPE varchar(10);",
            [
                ("rename", "column bug.title to name"),
                ("column-type-rewrite", "bug.name from varchar(20) to varchar(10)"),
            ],
        ),
        (
            "expand",
            "ALTER TABLE bug RENAME TO issue; ALTER TABLE issue ALTER COLUMN title TYPE text;",
            [("rename", "table bug to issue")],  # the type is known under the new name
        ),
        (
            "expand",
            f"{ADD} a serial, ADD b bigserial, ADD c smallserial, ADD d serial4,"
            "ADD e serial8, ADD f serial2, ADD g int GENERATED ALWAYS AS IDENTITY;",
            [("identity-column-added", f"bug.{c}") for c in "abcdefg"],
        ),
        (
            "expand",
            f"{ADD} a timestamptz DEFAULT clock_timestamp(),"
            "ADD b int DEFAULT my_fn() + other_fn(), ADD c int NOT NULL, ADD j json;",
            [
                ("add-column-volatile-default", "bug.a DEFAULT calls clock_timestamp"),
                ("add-column-default-unknown", "bug.b DEFAULT calls my_fn, other_fn"),
                ("add-column-not-null-no-default", "bug.c"),
                ("json-column", "bug.j"),
            ],
        ),
        (
            "expand",
            "ALTER TABLE bug ADD CHECK (score > 0) NOT VALID,"
            "ADD CONSTRAINT fk FOREIGN KEY (score) REFERENCES bug (id);",
            [
                ("constraint-on-old-column-in-expand", "(unnamed) on bug(score)"),
                ("constraint-validated-on-add", "FOREIGN KEY fk on bug"),
                ("constraint-on-old-column-in-expand", "fk on bug(score)"),
            ],
        ),
        (
            "switch",
            "ALTER TABLE bug ADD CONSTRAINT ck CHECK (title IS NOT NULL) NOT VALID; COMMIT;"
            "ALTER TABLE bug VALIDATE CONSTRAINT ck;"
            "ALTER TABLE bug ALTER COLUMN score SET NOT NULL;"
            "ALTER TABLE bug ALTER COLUMN title SET NOT NULL;",
            [
                (
                    "set-not-null-unchecked",
                    "bug.score has no validated CHECK (score IS NOT NULL) before it",
                )
            ],
        ),
        (
            "expand",
            "ALTER TABLE bug ALTER COLUMN title SET NOT NULL;",
            [("tighten-outside-switch", "bug.title")],
        ),
        (
            "expand",
            "DROP INDEX public.ix_bug_title;",  # the default schema, spelled out
            [
                ("drop-index-blocking", "index ix_bug_title"),
                ("drop-outside-contract", "index ix_bug_title in expand"),
            ],
        ),
        ("contract", "DROP TABLE IF EXISTS gone; DROP INDEX CONCURRENTLY IF EXISTS ix_gone;", []),
        (
            "expand",
            "CREATE TABLE tmp (a int, b int);"
            "ALTER TABLE tmp ADD COLUMN c int NOT NULL, ALTER COLUMN a TYPE bigint,"
            "ALTER COLUMN b SET NOT NULL, DROP COLUMN a;"
            "ALTER TABLE tmp RENAME COLUMN b TO d; ALTER TABLE tmp RENAME TO tmp2;",
            [],  # a table this revision created: no one uses it yet
        ),
        (
            "switch",
            "ALTER TABLE elsewhere RENAME COLUMN a TO b; ALTER FUNCTION f() RENAME TO g;",
            [("rename", "column elsewhere.a to b")],  # a table the history never showed
        ),
        (
            "expand",
            f"{ADD} a timestamptz DEFAULT now(), ADD b text DEFAULT lower('X'),"
            "ADD c float DEFAULT random() * txid_current();",
            [("add-column-volatile-default", "bug.c DEFAULT calls random, txid_current")],
        ),
        (
            "expand",
            f"{ADD} n int CONSTRAINT ck_n CHECK (n > score);",
            [("constraint-validated-on-add", "CHECK ck_n on bug")],  # old code writes no n
        ),
        (
            "expand",
            "ALTER TABLE bug ADD CONSTRAINT ck CHECK (score > id) NOT VALID;",
            [("constraint-on-old-column-in-expand", "ck on bug(score, id)")],
        ),
        (
            "switch",
            "ALTER TABLE bug ADD CONSTRAINT uq UNIQUE (title),"
            "ADD CONSTRAINT ex EXCLUDE USING btree (score WITH =);",
            [("unique-constraint-in-place", "uq on bug"), ("exclusion-constraint", "ex on bug")],
        ),
        (
            "expand",
            f"{ADD} v varchar(20); ALTER TABLE bug ALTER COLUMN v TYPE varchar(30),"
            "ALTER COLUMN title TYPE varchar(30); ALTER TABLE bug ALTER COLUMN title TYPE text;",
            [],  # each change judged against the type the one before left
        ),
        (
            "expand",
            "ALTER TABLE bug ALTER COLUMN title TYPE json USING to_json(title);",
            [
                ("json-column", "bug.title"),
                ("column-type-rewrite", "bug.title from varchar(20) to json with USING"),
            ],
        ),
        (
            "expand",
            "ALTER TABLE bug ALTER COLUMN score DROP NOT NULL, DROP COLUMN id;",
            [
                ("drop-not-null-in-expand", "bug.score"),
                ("drop-outside-contract", "column bug.id in expand"),
            ],
        ),
        (
            "contract",
            "ALTER TABLE elsewhere DROP COLUMN a, DROP CONSTRAINT fk;",
            [],  # a column and a constraint the history never showed
        ),
        (
            "switch",
            "BEGIN;"
            "ALTER TABLE bug ADD CONSTRAINT ck CHECK (score > 0) NOT VALID;"
            "ALTER TABLE bug VALIDATE CONSTRAINT ck;"
            "COMMIT;",
            [("validate-same-transaction", "ck was added NOT VALID just before")],
        ),
    ],
)
def test_a_finding_names_exactly_what_it_found(
    phase: str, sql: str, expected: list[tuple[str, str]]
) -> None:
    """The rule and the object it names (table, column, index, constraint, function):
    what an operator reads to find the statement to fix."""
    assert [(f.rule, detail(f)) for f in findings_of(sql, phase)] == expected


# -- plan_lint: rendering the plan offline --------------------------------------------------

NEEDS_A_DATABASE = 'raise RuntimeError("needs a database")'


@pytest.mark.parametrize(
    "revisions",
    [
        pytest.param([R("expand", NEEDS_A_DATABASE)], id="the-first-revision-fails"),
        pytest.param(
            [R("expand", "pass"), R("switch", NEEDS_A_DATABASE)], id="a-later-revision-fails"
        ),
    ],
)
def test_a_plan_that_cannot_render_offline_is_one_error_on_its_first_revision(
    tmp_path, revisions: list[Revision]
) -> None:
    """Nothing could be checked: one finding, on the plan's first revision, with the error
    Alembic's rendering raised, and the lint fails."""
    code, findings = lint(tmp_path, *revisions)
    assert code == 1
    (finding,) = findings
    title = "Alembic cannot render the plan's revisions as SQL offline (--sql)"
    assert finding["rule"] == "offline-render-failed"
    assert finding["severity"] == "error"
    assert (finding["revision"], finding["phase"]) == ("rev00001", "expand")
    assert finding["path"].endswith("rev00001.py")
    assert finding["statement"] == ""
    assert finding["message"].startswith(title)
    assert finding["message"].endswith(": RuntimeError: needs a database")
    assert finding["fix"].startswith("guard code that needs a database")


def test_history_that_cannot_render_offline_is_skipped_and_the_plan_still_linted(
    tmp_path,
) -> None:
    """An old revision outside the plan that needs a database: rendering starts at the
    plan instead, and the plan's revisions are judged as usual."""
    code, findings = lint(
        tmp_path,
        R(None, NEEDS_A_DATABASE),
        R("expand", 'op.create_index("ix_bug_score", "bug", ["score"])'),
        R("switch", f'op.execute("{ADD_CHECK}")'),
    )
    assert code == 1
    assert [(f["rule"], f["revision"], f["phase"]) for f in findings] == [
        ("create-index-blocking", "rev00002", "expand")
    ]


def test_a_phase_without_revisions_has_nothing_to_lint(tmp_path) -> None:
    ini, plan = build(tmp_path, [R("expand", 'op.execute("UPDATE bug SET score = 0")')])
    args = ["--config", str(ini), "--json", "lint", str(plan), "--phase", "contract"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert (result.exit_code, json.loads(result.stdout)["findings"]) == (0, [])


# -- lint: statements, transactions, version bookkeeping ------------------------------------

NOT_VALID = "ALTER TABLE bug ADD CONSTRAINT ck CHECK (score > 0) NOT VALID;"
VALIDATE = "ALTER TABLE bug VALIDATE CONSTRAINT ck;"


@pytest.mark.parametrize(
    ("sql", "same_transaction"),
    [
        (f"BEGIN; {NOT_VALID} {VALIDATE} COMMIT;", True),
        (f"START TRANSACTION; {NOT_VALID} {VALIDATE} COMMIT;", True),
        (f"BEGIN; {NOT_VALID} COMMIT; BEGIN; {VALIDATE} COMMIT;", False),
        (f"BEGIN; {NOT_VALID} ROLLBACK; {VALIDATE}", False),
        (f"BEGIN; {NOT_VALID} COMMIT; {VALIDATE}", False),
        (f"{NOT_VALID} {VALIDATE}", False),  # autocommit: each statement its own
    ],
)
def test_validate_is_judged_by_the_transaction_block_it_runs_in(
    sql: str, same_transaction: bool
) -> None:
    found = "validate-same-transaction" in {f.rule for f in findings_of(sql)}
    assert found is same_transaction


@pytest.mark.parametrize(
    ("sql", "version_table"),
    [
        (
            "CREATE TABLE alembic_version (version_num varchar(32) NOT NULL);"
            "INSERT INTO alembic_version (version_num) VALUES ('r1');"
            "UPDATE alembic_version SET version_num='r2' WHERE version_num = 'r1';"
            "DELETE FROM alembic_version WHERE version_num = 'r2';",
            None,
        ),
        (
            "UPDATE public.my_versions SET version_num='r2';DELETE FROM my_versions;",
            "my_versions",
        ),
    ],
)
def test_alembic_s_version_bookkeeping_is_not_judged(sql: str, version_table: str | None) -> None:
    assert findings_of(sql, "expand", version_table) == []


def test_only_the_configured_version_table_is_bookkeeping() -> None:
    sql = "UPDATE alembic_version SET version_num='r2';"
    assert [f.rule for f in findings_of(sql, "expand", "my_versions")] == ["unbatched-dml"]


def test_a_finding_shows_its_own_statement_on_one_line_without_comments() -> None:
    sql = (
        "-- Running upgrade base -> r1\n\nUPDATE bug\n   -- everyone starts at zero\n"
        "   SET score = 0;\n\n-- the last statement, with no semicolon\nDELETE FROM bug"
    )
    assert [f.statement for f in findings_of(sql, "expand")] == [
        "UPDATE bug SET score = 0",
        "DELETE FROM bug",
    ]


DROP_AND_ADD = "ALTER TABLE bug DROP COLUMN title, ADD COLUMN {name} varchar(20)"


@pytest.mark.parametrize(("length", "cut"), [(240, False), (241, True)])
def test_a_long_statement_is_cut_to_240_characters(length: int, cut: bool) -> None:
    """Where a finding shows a statement (here the drop of a drop-and-add), its spaces are
    collapsed and a long one ends in an ellipsis."""
    name = "n" * (length - len(DROP_AND_ADD.format(name="")))
    flat = DROP_AND_ADD.format(name=name)
    assert len(flat) == length
    (finding,) = findings_of(flat.replace(", ", ",\n    ") + ";", "contract")
    assert finding.rule == "drop-add-same-type"
    assert finding.statement == (flat[:239] + "…" if cut else flat)


def test_unparsable_sql_is_an_error_of_its_revision_and_the_others_are_still_judged() -> None:
    broken = "ALTER TABLE bug ADD COLUMN;"
    revisions = [
        BUG_TABLE,
        RevisionSQL("old", "old.py", "NOT SQL AT ALL;"),  # history: teaches nothing, no finding
        RevisionSQL("r1", "r1.py", broken, "expand"),
        RevisionSQL("r2", "r2.py", "UPDATE bug SET score = 0;", "expand"),
    ]
    findings = run_lint(revisions)
    assert [(f.rule, f.revision) for f in findings] == [
        ("unparsable-sql", "r1"),
        ("unbatched-dml", "r2"),
    ]
    error = findings[0]
    assert (error.severity, error.statement, error.path) == ("error", broken, "r1.py")
    assert error.message.startswith("PostgreSQL's parser rejects this revision's SQL: syntax error")
    assert error.blocking


def test_a_check_added_validated_in_the_history_lets_set_not_null_skip_its_scan() -> None:
    revisions = [
        BUG_TABLE,
        RevisionSQL(
            "old", "old.py", "ALTER TABLE bug ADD CONSTRAINT ck CHECK (title IS NOT NULL);"
        ),
        RevisionSQL("r1", "r1.py", "ALTER TABLE bug ALTER COLUMN title SET NOT NULL;", "switch"),
    ]
    assert run_lint(revisions) == []


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE bug DROP CONSTRAINT ck; ALTER TABLE bug ALTER COLUMN title SET NOT NULL;",
        "ALTER TABLE bug DROP CONSTRAINT ck;"
        "ALTER TABLE bug ADD CONSTRAINT ck CHECK (title IS NOT NULL) NOT VALID;"
        "ALTER TABLE bug ALTER COLUMN title SET NOT NULL;",
        "ALTER TABLE bug DROP CONSTRAINT ck;"
        "ALTER TABLE bug ADD CONSTRAINT ck CHECK (score > 0) NOT VALID;"
        "ALTER TABLE bug VALIDATE CONSTRAINT ck;"
        "ALTER TABLE bug ALTER COLUMN title SET NOT NULL;",
    ],
    ids=["dropped", "added-again-not-valid", "reused-for-another-check"],
)
def test_a_dropped_check_no_longer_spares_set_not_null_its_scan(sql: str) -> None:
    revisions = [
        BUG_TABLE,
        RevisionSQL(
            "old", "old.py", "ALTER TABLE bug ADD CONSTRAINT ck CHECK (title IS NOT NULL);"
        ),
        RevisionSQL("r1", "r1.py", sql, "switch"),
    ]
    assert [f.rule for f in run_lint(revisions)] == ["set-not-null-unchecked"]


def test_a_finding_reads_as_one_line_with_its_lock_and_waiver_then_statement_and_fix() -> None:
    """The text `phasegate lint` prints: the lock only when the statement takes one."""
    (blocking,) = findings_of("CREATE INDEX ix ON bug (score);", "expand")
    assert blocking.describe() == (
        "error create-index-blocking: r1.py (expand revision r1) [SHARE on bug]\n"
        "    CREATE INDEX ix ON bug (score)\n"
        f"    {RULES['create-index-blocking'].title}: on bug\n"
        f"    safe: {RULES['create-index-blocking'].fix}"
    )
    waived = RevisionSQL("r1", "r1.py", "SELECT 1;", "expand", {"no-such-rule": "why"})
    (unknown,) = run_lint([waived])
    assert unknown.describe().splitlines()[0] == (
        "warning unknown-waiver: r1.py (expand revision r1)"
    )


@pytest.mark.parametrize(
    ("history", "table"),
    [
        ("", "bug"),
        ("DROP INDEX ix_bug_title;", "ix_bug_title's table"),  # dropped: its table is unknown
    ],
)
def test_the_lock_of_a_dropped_index_names_the_table_it_is_on(history: str, table: str) -> None:
    revisions = [
        BUG_TABLE,
        RevisionSQL("old", "old.py", history),
        RevisionSQL("r1", "r1.py", "DROP INDEX IF EXISTS ix_bug_title;", "contract"),
    ]
    (finding,) = run_lint(revisions)
    assert (finding.rule, finding.lock, finding.table) == (
        "drop-index-blocking",
        "ACCESS EXCLUSIVE",
        table,
    )


def test_a_table_dropped_and_made_again_without_create_table_has_unknown_column_types() -> None:
    """CREATE TABLE AS is not parsed for columns: after a drop, the old types are gone, so
    a type change is judged against an unknown type (a rewrite), not the dropped table's."""
    sql = (
        "DROP TABLE bug; CREATE TABLE bug AS SELECT 1 AS id, 'x'::varchar(20) AS title;"
        "ALTER TABLE bug ALTER COLUMN title TYPE varchar(30);"
    )
    assert [(f.rule, detail(f)) for f in findings_of(sql, "contract")] == [
        ("column-type-rewrite", "bug.title (old type unknown) to varchar(30)")
    ]


def test_the_version_table_env_py_configures_is_bookkeeping_too(tmp_path) -> None:
    """Each revision's rendering ends in an UPDATE of Alembic's version table: whatever
    env.py names it, that is not the revision's unbatched DML."""
    ini, plan = build(tmp_path, [R("expand", "pass"), R("switch", "pass")])
    env_py = tmp_path / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "literal_binds=True,", 'literal_binds=True, version_table="deploy_versions",'
        )
    )
    result = CliRunner().invoke(
        cli, ["--config", str(ini), "--json", "lint", str(plan)], catch_exceptions=False
    )
    assert (result.exit_code, json.loads(result.stdout)["findings"]) == (0, [])
