"""The trust model against real roles and grants: who may pass a gate, who may write which
heartbeat, what the event log refuses, and what the orchestrator's role needs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.pool import NullPool

from phasegate import ledger
from phasegate.appversion import report_version
from phasegate.db import libpq_url

from .conftest import ALEMBIC_INI, PLAN, ROOT, SEED_ROWS, Phasegate

pytestmark = pytest.mark.db

# the grants the README documents for an app role that reports heartbeats
HEARTBEAT_GRANTS = """
GRANT USAGE ON SCHEMA phasegate TO {0};
GRANT EXECUTE ON FUNCTION phasegate.beat(text, text, text),
    phasegate.forget_heartbeat(text, text, text) TO {0};
"""


class Roles:
    """Login roles with unique names (roles are cluster-wide, the server is shared), each
    dropped with everything it owns or was granted in the test's database at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[str] = []

    def create(self, label: str, options: str = "LOGIN") -> str:
        name = f"trust_{label}_{uuid.uuid4().hex[:8]}"
        self.run(f"CREATE ROLE {{}} {options}", name)
        self.made.append(name)
        return name

    def run(self, statement: str, *names: str) -> None:
        """`statement` with each {} (or {0}) an identifier from `names`, as the superuser."""
        query = sql.SQL(statement).format(*(sql.Identifier(n) for n in names))
        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn:
            conn.execute(query)

    def url_of(self, role: str, driver: str = "psycopg") -> str:
        return (
            sa.engine.make_url(self.url)
            .set(drivername=f"postgresql+{driver}", username=role, password=None)
            .render_as_string(hide_password=False)
        )

    def connect(self, role: str, application_name: str = "") -> psycopg.Connection:
        return psycopg.connect(
            libpq_url(self.url_of(role)), application_name=application_name, autocommit=True
        )

    def drop_all(self) -> None:
        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn:
            for name in reversed(self.made):
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (name,),
                )
                role = sql.Identifier(name)
                conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role))
                conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
                conn.execute(sql.SQL("DROP ROLE {}").format(role))


@pytest.fixture
def roles(seeded_url: str) -> Iterator[Roles]:
    made = Roles(seeded_url)
    yield made
    made.drop_all()


@pytest.fixture
def project(tmp_path: Path, seeded_url: str) -> Project:
    return Project(tmp_path, seeded_url)


class Project:
    """A project directory of its own (alembic.ini, plans/, phasegate.toml) run as any role."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        (root / "plans").mkdir()
        self.plan = str(root / "plans" / "bug_root_cause.yaml")
        Path(self.plan).write_text(PLAN.read_text())
        ini = ALEMBIC_INI.read_text().replace("%(here)s/migrations", str(ROOT / "migrations"))
        (root / "alembic.ini").write_text(ini)
        self.run = Phasegate(url, root / "alembic.ini")

    def as_role(self, url: str) -> Phasegate:
        return Phasegate(url, self.root / "alembic.ini")

    def settings(self, text: str) -> None:
        (self.root / "phasegate.toml").write_text(text)


def query(url: str, statement: str, params: tuple[object, ...] | None = None) -> list[tuple]:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def last_gate_event(url: str) -> tuple[str, dict]:
    kind, detail = query(
        url, "SELECT kind, detail FROM phasegate.event WHERE kind LIKE 'gate.%' ORDER BY id DESC"
    )[0]
    return kind, detail


# -- gates: which connections count toward passing -------------------------------------------


def test_a_role_without_privileges_cannot_pass_a_gate_by_naming_itself(
    project, roles, seeded_url
) -> None:
    """The issue's attack: nothing else is observed, so the contract gate must fail closed."""
    intruder = roles.create("intruder")
    with roles.connect(intruder, "bugtracker/2.0"):
        result = project.run("gate", project.plan, "--phase", "contract")
    assert result.exit_code == 1, result.output  # old code: 0, "pass"
    assert "seen but NOT trusted: 2.0 (pg_stat_activity: 1 connection as bugtracker/2.0" in (
        result.stdout
    )
    assert f"by role {intruder}" in result.stdout
    assert "may write bug (the tables of the plan's jobs; root_cause: not there yet)" in (
        result.stdout
    )
    assert f"If role {intruder} is the app's, grant it its privileges" in result.stdout
    assert "trusted_roles in phasegate.toml" in result.stdout
    kind, detail = last_gate_event(seeded_url)
    assert kind == "gate.refused"
    assert [(o["version"], o["role"], o["trusted"]) for o in detail["untrusted"]] == [
        ("2.0", intruder, False)
    ]


def test_a_role_without_privileges_still_refuses_from_outside_the_range(project, roles) -> None:
    intruder = roles.create("intruder")
    with roles.connect(intruder, "bugtracker/1.0"):
        result = project.run("gate", project.plan, "--phase", "contract", "--live-version", "2.0")
    assert result.exit_code == 1, result.output
    assert "bugtracker versions outside '>=2' are live: 1.0 (pg_stat_activity" in result.stdout
    assert f"by role {intruder}" in result.stdout
    assert "Stop or upgrade those instances" in result.stdout


def test_the_apps_own_role_passes_and_the_event_names_it(project, roles, seeded_url) -> None:
    app = roles.create("app")
    roles.run("GRANT SELECT, INSERT, UPDATE, DELETE ON bug TO {}", app)
    with roles.connect(app, "bugtracker/2.0"):
        result = project.run("gate", project.plan, "--phase", "contract")
    assert result.exit_code == 0, result.output
    assert f"bugtracker/2.0 by role {app}" in result.stdout
    kind, detail = last_gate_event(seeded_url)
    assert kind == "gate.passed"
    assert [(o["role"], o["trusted"]) for o in detail["observed"]] == [(app, True)]


def test_a_column_grant_is_enough_and_a_public_grant_trusts_everyone(project, roles) -> None:
    """A write privilege on the plan's table, even on one column, trusts a role; reading
    it does not (a reporting role could otherwise open contract by naming itself)."""
    reader = roles.create("reader")
    roles.run("GRANT SELECT ON bug TO {}", reader)
    with roles.connect(reader, "bugtracker/2.0"):
        assert project.run("gate", project.plan, "--phase", "contract").exit_code == 1
    writer = roles.create("writer")
    roles.run("GRANT UPDATE (root_cause) ON bug TO {}", writer)
    with roles.connect(writer, "bugtracker/2.0"):
        assert project.run("gate", project.plan, "--phase", "contract").exit_code == 0
    anyone = roles.create("anyone")
    with roles.connect(anyone, "bugtracker/2.0"):
        assert project.run("gate", project.plan, "--phase", "contract").exit_code == 1
        roles.run("GRANT INSERT ON bug TO PUBLIC")
        try:
            assert project.run("gate", project.plan, "--phase", "contract").exit_code == 0
        finally:
            roles.run("REVOKE INSERT ON bug FROM PUBLIC")


def test_trusted_roles_and_their_members_pass(project, roles) -> None:
    pooler = roles.create("pooler")
    group = roles.create("group", "NOLOGIN")
    member = roles.create("member", f"LOGIN IN ROLE {group}")
    with roles.connect(pooler, "bugtracker/2.0"):
        assert project.run("gate", project.plan, "--phase", "contract").exit_code == 1
        project.settings(f'trusted_roles = ["{pooler}"]\n')
        result = project.run("gate", project.plan, "--phase", "contract")
        assert result.exit_code == 0, result.output
    with roles.connect(member, "bugtracker/2.0"):
        assert project.run("gate", project.plan, "--phase", "contract").exit_code == 1
        project.settings(f'trusted_roles = ["{group}"]\n')
        assert project.run("gate", project.plan, "--phase", "contract").exit_code == 0


def test_an_untrusted_connection_does_not_hide_behind_a_trusted_one(project, roles) -> None:
    """Trusted v2 and untrusted v2 pass; an untrusted v1 beside them refuses."""
    app, intruder = roles.create("app"), roles.create("intruder")
    roles.run("GRANT SELECT, UPDATE ON bug TO {}", app)
    with roles.connect(app, "bugtracker/2.0"), roles.connect(intruder, "bugtracker/2.0"):
        result = project.run("gate", project.plan, "--phase", "contract", json_output=True)
        assert result.exit_code == 0, result.output
        seen = json.loads(result.stdout)["observed"]
        assert sorted((o["role"], o["trusted"]) for o in seen) == sorted(
            [(app, True), (intruder, False)]
        )
        with roles.connect(intruder, "bugtracker/1.0"):
            assert project.run("gate", project.plan, "--phase", "contract").exit_code == 1


def test_a_plan_without_batched_jobs_is_judged_by_its_revisions_tables(project, roles) -> None:
    """Only revisions (no job): the tables they change are the plan's tables."""
    Path(project.plan).write_text(
        PLAN.read_text().split("  backfill:")[0]
        + '  switch:\n    compatible: ">=1"\n  contract:\n    compatible: ">=2"\n'
    )
    app, intruder = roles.create("app"), roles.create("intruder")
    roles.run("GRANT SELECT, INSERT, UPDATE, DELETE ON bug TO {}", app)
    with roles.connect(intruder, "bugtracker/2.0"):
        result = project.run("gate", project.plan, "--phase", "contract")
        assert result.exit_code == 1, result.output
    assert "may write bug (the tables the plan's revisions change; root_cause: not" in (
        result.stdout
    )
    with roles.connect(app, "bugtracker/2.0"):
        result = project.run("gate", project.plan, "--phase", "contract")
        assert result.exit_code == 0, result.output


def test_a_plan_that_names_no_table_trusts_only_trusted_roles(project, roles) -> None:
    notes = Path(project.root / "plans" / "notes.yaml")
    notes.write_text(
        'plan: bug-notes\napp: bugtracker\nbaseline_compatible: ">=1"\nphases:\n'
        '  backfill:\n    compatible: ">=1.5"\n    jobs:\n      - name: touch\n'
        "        sql: SELECT 1\n"
    )
    app = roles.create("app")
    roles.run("GRANT SELECT, UPDATE ON bug TO {}", app)
    with roles.connect(app, "bugtracker/2.0"):
        result = project.run("gate", str(notes))
        assert result.exit_code == 1, result.output
        assert "no table of the plan is known" in result.stdout
        assert "trusted_roles (none set)" in result.stdout
        project.settings(f'trusted_roles = ["{app}"]\n')
        assert project.run("gate", str(notes)).exit_code == 0


def test_versions_marks_untrusted_connections(project, roles) -> None:
    intruder = roles.create("intruder")
    with roles.connect(intruder, "bugtracker/2.0"):
        result = project.run("versions", "--app", "bugtracker")
        document = project.run("versions", "--app", "bugtracker", json_output=True)
    assert result.exit_code == 0, result.output
    assert f"by role {intruder}" in result.stdout and "[not trusted]" in result.stdout
    observed = json.loads(document.stdout)["apps"][0]["observed"]
    assert [(o["role"], o["trusted"]) for o in observed] == [(intruder, False)]


# -- heartbeats -----------------------------------------------------------------------------


def ledger_with_app_roles(project: Project, roles: Roles, *labels: str) -> list[str]:
    """The ledger (created by the orchestrator's role) and app roles with the documented
    grants: their tables, and the heartbeat functions."""
    assert project.run("gate", project.plan, "--live-version", "1.0").exit_code == 0
    made = []
    for label in labels:
        role = roles.create(label)
        roles.run("GRANT SELECT, INSERT, UPDATE, DELETE ON bug TO {}", role)
        roles.run(HEARTBEAT_GRANTS, role)
        made.append(role)
    return made


def test_an_app_role_touches_only_its_own_heartbeats(project, roles, seeded_url) -> None:
    web, rogue = ledger_with_app_roles(project, roles, "web", "rogue")
    as_web = project.as_role(roles.url_of(web))
    result = as_web("heartbeat", "--app", "bugtracker", "--version", "1.0", "--instance", "web-1")
    assert result.exit_code == 0, result.output
    stamped = query(seeded_url, "SELECT role, last_seen FROM phasegate.heartbeat")
    assert [r[0] for r in stamped] == [web]
    with roles.connect(rogue) as conn:
        for attack in (
            "DELETE FROM phasegate.heartbeat",
            "UPDATE phasegate.heartbeat SET last_seen = now() + interval '10 years'",
            "INSERT INTO phasegate.heartbeat (app, instance, version, last_seen) "
            "VALUES ('bugtracker', 'web-9', '2.0', now() + interval '10 years')",
            "TRUNCATE phasegate.heartbeat",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(attack)
        removed = conn.execute(
            "SELECT phasegate.forget_heartbeat('bugtracker', 'web-1')"
        ).fetchone()
        assert removed == (0,)
        # the same instance name under its own role: a row of its own, web's is untouched
        conn.execute("SELECT phasegate.beat('bugtracker', 'web-1', '1.0')")
    rows = query(
        seeded_url, "SELECT role, last_seen FROM phasegate.heartbeat ORDER BY role = %s", (web,)
    )
    assert [r[0] for r in rows] == [rogue, web] and rows[1][1] == stamped[0][1]
    result = as_web("heartbeat", "--app", "bugtracker", "--instance", "web-1", "--remove")
    assert result.exit_code == 0 and "1 removed" in result.stdout
    assert query(seeded_url, "SELECT role FROM phasegate.heartbeat") == [(rogue,)]


def test_an_app_role_cannot_upgrade_an_old_ledger_and_is_told_who_can(
    project, roles, seeded_url
) -> None:
    (app,) = ledger_with_app_roles(project, roles, "app")
    query(
        seeded_url,
        "DROP FUNCTION phasegate.beat(text, text, text); "
        "UPDATE phasegate.meta SET value = '6' WHERE key = 'schema_version'",
    )
    as_app = project.as_role(roles.url_of(app))
    result = as_app("heartbeat", "--app", "bugtracker", "--version", "1.0")
    assert result.exit_code == 3, result.output
    assert "older than this phasegate, and this role may not create or upgrade it" in (
        result.stderr
    )
    assert "as the role that owns the ledger" in result.stderr


def test_an_untrusted_heartbeat_refuses_but_never_passes(project, roles) -> None:
    (outsider,) = ledger_with_app_roles(project, roles, "outsider")
    roles.run("REVOKE ALL ON bug FROM {}", outsider)  # may beat, may not use the tables
    as_outsider = project.as_role(roles.url_of(outsider))
    as_outsider("heartbeat", "--app", "bugtracker", "--version", "2.0", "--instance", "x")
    result = project.run("gate", project.plan, "--phase", "contract")
    assert result.exit_code == 1, result.output
    assert "2.0 (heartbeat: instance x, last seen" in result.stdout
    assert f"written by role {outsider})" in result.stdout and "NOT trusted" in result.stdout
    as_outsider("heartbeat", "--app", "bugtracker", "--version", "1.0", "--instance", "y")
    result = project.run("gate", project.plan, "--phase", "contract", "--live-version", "2.0")
    assert result.exit_code == 1 and "outside '>=2' are live: 1.0 (heartbeat" in result.stdout


def test_a_heartbeat_from_the_future_is_never_fresh(project, seeded_url) -> None:
    assert project.run("gate", project.plan, "--live-version", "1.0").exit_code == 0
    query(
        seeded_url,
        "INSERT INTO phasegate.heartbeat (app, instance, version, first_seen, last_seen) "
        "VALUES ('bugtracker', 'web-1', '2.0', now(), now() + interval '10 years')",
    )
    result = project.run("versions", "--app", "bugtracker", json_output=True)
    assert json.loads(result.stdout)["apps"][0]["observed"] == []  # old code: "0.0 s ago"
    result = project.run("gate", project.plan, "--phase", "contract")
    assert result.exit_code == 1 and "no live version of bugtracker was observed" in result.stdout


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_report_version_works_with_only_the_documented_grants(
    project, roles, seeded_url, driver
) -> None:
    (app,) = ledger_with_app_roles(project, roles, "app")
    engine = sa.create_engine(roles.url_of(app, driver), poolclass=NullPool)
    reporter = report_version(engine, "bugtracker", "2.0", instance="api-1", interval=3600)
    try:
        rows = query(seeded_url, "SELECT role, instance, version FROM phasegate.heartbeat")
        assert rows == [(app, "api-1", "2.0")]
        query(seeded_url, "UPDATE phasegate.heartbeat SET last_seen = now() - interval '1 h'")
        with engine.connect():  # a new connection beats again, through the function
            pass
        fresh = "SELECT count(*) FROM phasegate.heartbeat WHERE last_seen > now() - interval '1m'"
        assert query(seeded_url, fresh) == [(1,)]
        result = project.run("gate", project.plan, "--phase", "contract")
        assert result.exit_code == 0, result.output  # its role may write bug: trusted
    finally:
        reporter.stop()
        engine.dispose()
    assert query(seeded_url, "SELECT count(*) FROM phasegate.heartbeat") == [(0,)]


def test_upgrading_the_ledger_moves_direct_writers_to_the_functions(
    project, roles, seeded_url
) -> None:
    """A version 6 ledger, with a row and a role granted direct writes (the README's old
    advice): the upgrade keeps the row (unknown writer: it only refuses) and moves the
    role to the functions."""
    assert project.run("gate", project.plan, "--live-version", "1.0").exit_code == 0
    query(  # back to the heartbeat table and event log of version 6
        seeded_url,
        "DROP FUNCTION phasegate.beat(text, text, text); "
        "DROP FUNCTION phasegate.forget_heartbeat(text, text, text); "
        "DROP TRIGGER event_is_not_truncated ON phasegate.event; "
        "ALTER TABLE phasegate.heartbeat DROP CONSTRAINT heartbeat_pkey; "
        "ALTER TABLE phasegate.heartbeat DROP COLUMN role; "
        "ALTER TABLE phasegate.heartbeat ADD PRIMARY KEY (app, instance, version); "
        "INSERT INTO phasegate.heartbeat (app, instance, version) "
        "VALUES ('bugtracker', 'web-1', '1.0'); "
        "UPDATE phasegate.meta SET value = '6' WHERE key = 'schema_version'",
    )
    old = roles.create("old")
    roles.run(
        "GRANT USAGE ON SCHEMA phasegate TO {0}; "
        "GRANT SELECT, INSERT, UPDATE, DELETE ON phasegate.heartbeat TO {0}",
        old,
    )
    roles.run("GRANT SELECT, UPDATE ON bug TO {}", old)
    result = project.run("gate", project.plan, "--phase", "contract", "--live-version", "2.0")
    assert result.exit_code == 1, result.output  # the old row refuses, as before
    assert "1.0 (heartbeat: instance web-1" in result.stdout
    assert "written by role (unknown: an old row))" in result.stdout
    version = "SELECT value FROM phasegate.meta WHERE key = 'schema_version'"
    assert query(seeded_url, version) == [(str(ledger.SCHEMA_VERSION),)]
    with roles.connect(old) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM phasegate.heartbeat")  # old code: deletes web-1's row
        conn.execute("SELECT phasegate.beat('bugtracker', 'web-1', '1.0')")
    rows = query(seeded_url, "SELECT role FROM phasegate.heartbeat ORDER BY role")
    assert rows == [("",), (old,)]
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        query(seeded_url, "TRUNCATE phasegate.event")


# -- the event log --------------------------------------------------------------------------


def test_the_event_log_refuses_truncate_update_and_delete(project, seeded_url) -> None:
    assert project.run("gate", project.plan, "--live-version", "1.0").exit_code == 0
    for statement in (
        "TRUNCATE phasegate.event",  # old code: succeeds and empties the log
        "UPDATE phasegate.event SET kind = 'gate.passed'",
        "DELETE FROM phasegate.event",
    ):
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            query(seeded_url, statement)
    assert query(seeded_url, "SELECT kind FROM phasegate.event") == [("gate.passed",)]


# -- the orchestrator's role ----------------------------------------------------------------


@pytest.mark.parametrize("ledger_schema", ["created by phasegate", "created for it"])
def test_the_orchestrator_needs_only_the_documented_privileges(
    project, roles, seeded_url, ledger_schema
) -> None:
    """A whole plan forward and back, with two walk workers, as a role that owns the plan's
    table, may write Alembic's version table, may create in public, and may create schema
    phasegate (or owns it, created by a DBA), and nothing else: no superuser, no TEMPORARY
    (the walk falls back to its CTE form), no pg_read_all_stats. The app's role writes
    with only its table privileges: the sync trigger needs nothing more."""
    database = sa.engine.make_url(seeded_url).database
    orchestrator, app = roles.create("orchestrator"), roles.create("app")
    roles.run("ALTER TABLE bug OWNER TO {}", orchestrator)
    roles.run("GRANT SELECT, INSERT, UPDATE, DELETE ON alembic_version TO {}", orchestrator)
    roles.run("GRANT CREATE ON SCHEMA public TO {}", orchestrator)
    if ledger_schema == "created by phasegate":
        roles.run("GRANT CREATE ON DATABASE {1} TO {0}", orchestrator, database)
    else:
        roles.run("CREATE SCHEMA phasegate AUTHORIZATION {}", orchestrator)
    roles.run("REVOKE TEMPORARY ON DATABASE {0} FROM PUBLIC", database)
    roles.run("GRANT SELECT, INSERT, UPDATE, DELETE ON bug TO {0}", app)
    roles.run(
        "ALTER DEFAULT PRIVILEGES FOR ROLE {0} IN SCHEMA public "
        "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {1}; "
        "ALTER DEFAULT PRIVILEGES FOR ROLE {0} IN SCHEMA public "
        "GRANT USAGE, SELECT ON SEQUENCES TO {1}",
        orchestrator,
        app,
    )
    run = project.as_role(roles.url_of(orchestrator))
    write = (
        "INSERT INTO bug (bug_tracker_url, root_cause, who) "
        "VALUES ('https://bugs.example.com/' || gen_random_uuid(), 'flaky test', 'ada')"
    )
    with roles.connect(app, "bugtracker/1.0") as v1:
        result = run("advance", project.plan, "--to", "switch", "--workers", "2", "--yes")
        assert result.exit_code == 0, result.output
        v1.execute(write)  # the sync trigger fills root_cause_id as the app's role
    with roles.connect(app, "bugtracker/2.0") as v2:
        result = run("contract", project.plan, "--yes")
        assert result.exit_code == 0, result.output
        v2.execute(
            "INSERT INTO bug (bug_tracker_url, root_cause_id, who) SELECT "
            "'https://bugs.example.com/' || gen_random_uuid(), id, 'bob' FROM root_cause LIMIT 1"
        )
    with roles.connect(app, "bugtracker/1.0"):
        result = run("rollback", project.plan, "--to", "start", "--workers", "2", "--yes")
        assert result.exit_code == 0, result.output
    empty = "SELECT count(*) FROM bug WHERE root_cause IS NULL"
    assert query(seeded_url, empty) == [(0,)]
    assert query(seeded_url, "SELECT count(*) FROM bug") == [(SEED_ROWS + 2,)]


def test_a_read_only_role_runs_status_versions_and_check_deploy(project, roles) -> None:
    """The documented grants for dashboards and pipelines that only ask."""
    assert project.run("expand", project.plan, "--live-version", "1.0", "--yes").exit_code == 0
    reader = roles.create("reader")
    roles.run(
        "GRANT USAGE ON SCHEMA phasegate TO {0}; "
        "GRANT SELECT ON ALL TABLES IN SCHEMA phasegate TO {0}; "
        "GRANT SELECT ON alembic_version TO {0}",
        reader,
    )
    as_reader = project.as_role(roles.url_of(reader))
    result = as_reader("status", project.plan, json_output=True)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["phase"] == "expand"
    assert as_reader("versions", "--app", "bugtracker").exit_code == 0
    result = as_reader("check-deploy", "--app-version", "2.0")
    assert result.exit_code == 1 and "may NOT be deployed" in result.stdout
