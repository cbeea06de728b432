"""Adversarial cases against issue 18's trust, guard, secrets, terminal and bounds fixes,
found by a review that tried to break them (a gate passing wrongly, a plan revision
applied behind phasegate, a secret or a forged line shown, a hang). Each failed on the
code it was written against and passes since the fix; each docstring says what it found
and where the cause was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from phasegate import guard
from phasegate.cli import cli
from phasegate.db import libpq_url, normalize_url

from .conftest import ALEMBIC_INI, PLAN, ROOT, Phasegate
from .test_failures import SWITCH_WITH_SHORT_LOCK_WAITS, blocked_at_backfill
from .test_trust import Project, Roles, query

P = str(PLAN)
SWITCH_HEAD = "d7e2b9f4a613"
CONTRACT = "e59b1f0c3d82"


def project_copy(tmp_path: Path) -> Path:
    """The bundled project (alembic.ini, migrations/, plans/) in a directory of its own."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(ROOT / "migrations", root / "migrations")
    shutil.copytree(ROOT / "plans", root / "plans")
    shutil.copy(ALEMBIC_INI, root / "alembic.ini")
    return root


def cli_process(
    root: Path, *args: str, url: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, float]:
    """`python -m phasegate` in a process of its own; a hang is cut off after 30 s."""
    environment = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    environment.pop(guard.ESCAPE, None)
    environment.update(env or {})
    base = [sys.executable, "-m", "phasegate", "--config", str(root / "alembic.ini")]
    if url is not None:
        base += ["--database-url", url]
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*base, *args],
            capture_output=True,
            text=True,
            env=environment,
            cwd=root,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
        return -1, f"(killed after 30 s){output}", time.monotonic() - started
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def alembic_process(root: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `alembic` command, as a deploy script runs it (guard on)."""
    environment = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    environment.pop(guard.ESCAPE, None)
    environment["PHASEGATE_DATABASE_URL"] = url  # the bundled env.py reads it
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# -- bounds (item 15): YAML the safe constructor rejects -----------------------------------------

PLAN_WITH = """\
plan: demo-plan
app: shop
baseline_compatible: "<2"
description: {value}
phases:
  expand:
    compatible: "<2"
"""


@pytest.mark.parametrize(
    "value",
    [
        "2024-02-30",  # resolves as a timestamp; datetime.date() raises ValueError
        "!!int twelve",  # an explicit tag the constructor cannot honour
        "1" * 5000,  # an int longer than Python's int_max_str_digits (4300)
        "!mytag value",  # a local tag: ConstructorError, raised outside the except
        "!!python/name:os.system ''",  # SafeLoader refuses it, the same way
        "!!binary 'not base64!'",
    ],
)
def test_yaml_the_constructor_rejects_is_an_invalid_plan_with_its_line(
    tmp_path: Path, value: str
) -> None:
    """Found: `validate` exits 3, "internal error: ValueError: day is out of range for
    month" (or "invalid literal for int()", "Exceeds the limit (4300 digits)", or
    "ConstructorError: could not determine a constructor for the tag '!mytag'" with
    PyYAML's own "<unicode string>" marks), no file, no line. Cause: plan.parse_plan runs
    `yaml.safe_load` outside its `except yaml.YAMLError` (compose, inside it, does not
    construct), and SafeConstructor raises ConstructorError for tags and plain ValueError
    for these scalars."""
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN_WITH.format(value=value))
    env = {"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None}
    result = CliRunner().invoke(cli, ["--config", str(ALEMBIC_INI), "validate", str(path)], env=env)
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output
    assert f"{path}:4" in result.output  # the line of `description:`


# -- bounds (item 16): the import time limit --------------------------------------------------

SWALLOWS_EVERYTHING = '''"""Waits for a service at import, retrying whatever goes wrong."""
import time

revision = "fa11fa110001"
down_revision = "e59b1f0c3d82"
branch_labels = None
depends_on = None

for _attempt in range(10_000):
    try:
        time.sleep(0.5)  # the service never comes
    except:  # noqa: E722 - as real code writes it
        pass


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


def test_a_bare_except_at_import_does_not_outlast_the_time_limit(tmp_path: Path) -> None:
    """Found: `validate` never ends (killed after 30 s with PHASEGATE_IMPORT_TIMEOUT=1s).
    Cause: timelimit.time_limit arms a one-shot ITIMER_REAL; the single TimeLimitExceeded
    is swallowed by the revision's bare `except:` (it catches BaseException too), and
    nothing fires again. An interval timer (or a watchdog that ends the process) would."""
    validate_ends_with_a_blocking_revision(tmp_path, "fa11fa110001_waits.py", SWALLOWS_EVERYTHING)


def validate_ends_with_a_blocking_revision(tmp_path: Path, name: str, text: str) -> None:
    """`validate` of the bundled project plus revision `name` (`text`) under a 1 s import
    limit: exit 2 naming the file and the setting, well within 20 s."""
    root = project_copy(tmp_path)
    revision = root / "migrations" / "versions" / name
    revision.write_text(text)
    code, output, seconds = cli_process(
        root,
        "validate",
        str(root / "plans" / "bug_root_cause.yaml"),
        env={"PHASEGATE_IMPORT_TIMEOUT": "1s"},
    )
    assert code == 2, output
    assert str(revision) in output and "PHASEGATE_IMPORT_TIMEOUT" in output
    assert seconds < 20


CONNECTS_WITH_THE_C_DRIVER = '''"""Checks the database at import, with psycopg2 (libpq in C)."""
import socket

import psycopg2

revision = "fa11fa110002"
down_revision = "e59b1f0c3d82"
branch_labels = None
depends_on = None

_stalled = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never answers
psycopg2.connect(host="127.0.0.1", port=_stalled.getsockname()[1], dbname="app", user="app")


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


def test_a_revision_blocked_inside_a_c_call_does_not_outlast_the_time_limit(
    tmp_path: Path,
) -> None:
    """psycopg2 is the most common driver, and libpq's connect runs in C with the GIL
    released and retries on EINTR, so Python never gets to run the SIGALRM handler while
    it waits. Found: `validate` never ends (killed after 30 s with
    PHASEGATE_IMPORT_TIMEOUT=1s) when a revision connects at import to a server that
    accepts TCP but never answers (without connect_timeout: for ever; to an unroutable
    host: the kernel's SYN timeout, about two minutes). Cause: timelimit.time_limit relies
    on a Python-level signal handler; a watchdog thread that reports and ends the process
    (os._exit) or loading the revisions in a child process would hold."""
    validate_ends_with_a_blocking_revision(
        tmp_path, "fa11fa110002_checks.py", CONNECTS_WITH_THE_C_DRIVER
    )


@pytest.mark.db
def test_an_env_py_that_blocks_at_import_is_bounded_too(tmp_path: Path, database_url: str) -> None:
    """Found: `status` never ends (killed after 30 s). env.py runs on every command that
    reads the heads (status, gate, advance, upgrade...), and projects import their app's
    settings or models there, which is where a connection at import usually hides.
    Cause: revisions.AlembicProject._run_env (and offline_sql) run `script.run_env()` with
    no time limit; only the walk of the revision files in AlembicProject.__init__ has one."""
    root = project_copy(tmp_path)
    env_py = root / "migrations" / "env.py"
    text = env_py.read_text()
    marker = "config = context.config\n"
    env_py.write_text(
        text.replace(marker, marker + "import time\n\ntime.sleep(10**6)  # settings at import\n")
    )
    code, output, seconds = cli_process(
        root, "status", url=database_url, env={"PHASEGATE_IMPORT_TIMEOUT": "1s"}
    )
    assert code in (2, 3), output
    assert str(env_py) in output
    assert seconds < 20


# -- the revision guard (item 6) ----------------------------------------------------------------

DROPS_THE_HELPER = '''"""bug-root-cause contract, step 1: drop the helper the sync trigger uses.

Written by hand (not from script.py.mako): tagged, but its upgrade() has no guard.
"""

from alembic import op

revision = "c0a1c0a1c0a1"
down_revision = "d7e2b9f4a613"
branch_labels = None
depends_on = None
phasegate_plan = "bug-root-cause"
phasegate_phase = "contract"


def upgrade() -> None:
    op.execute("DROP FUNCTION root_cause_id_for(text)")


def downgrade() -> None:
    pass
'''


# the same revision as script.py.mako renders it: guarded
GUARDED_HELPER = DROPS_THE_HELPER.replace(
    "from alembic import op\n", "from alembic import op\n\nfrom phasegate.guard import guarded\n"
).replace("\n\n\ndef upgrade", "\n\n\n@guarded\ndef upgrade")


def split_contract(root: Path, helper: str = DROPS_THE_HELPER) -> None:
    """Contract in two revisions, as teams often write it: first the helper function
    (`helper`), then the column (the bundled, guarded e59b1f0c3d82, now after it)."""
    versions = root / "migrations" / "versions"
    (versions / "c0a1c0a1c0a1_drop_helper.py").write_text(helper)
    column = versions / f"{CONTRACT}_bug_root_cause_contract.py"
    text = column.read_text()
    text = text.replace(
        'down_revision: str | Sequence[str] | None = "d7e2b9f4a613"',
        'down_revision: str | Sequence[str] | None = "c0a1c0a1c0a1"',
    )
    text = text.replace('    op.execute("DROP FUNCTION root_cause_id_for(text)")\n', "")
    column.write_text(text)


def old_code_write(url: str) -> str | None:
    """A v1 write to bug (through the sync trigger); its error, or None when it went in."""
    with psycopg.connect(libpq_url(normalize_url(url)), autocommit=True) as conn:
        try:
            conn.execute(
                "INSERT INTO bug (bug_tracker_url, root_cause) VALUES ('v1://after', 'disk')"
            )
        except psycopg.Error as exc:
            return str(exc).strip()
    return None


# the same revision, untagged, as a plan that lists its revisions (`revisions:`) may have it
UNTAGGED_HELPER = DROPS_THE_HELPER.replace(
    'phasegate_plan = "bug-root-cause"\nphasegate_phase = "contract"\n', ""
)


@pytest.mark.db
@pytest.mark.parametrize("kind", ["tagged without the guard", "listed in revisions: untagged"])
def test_an_unguarded_plan_revision_is_not_left_to_a_deploys_alembic(
    tmp_path: Path, seeded_url: str, kind: str
) -> None:
    """A contract revision written by hand (or before the project's script.py.mako had the
    guard) carries the tags but not `@guarded`; or the plan lists its revisions under
    `revisions:` (the plan format allows it) and the file has no tags at all. Found:
    `validate` only warns, `advance` runs expand, backfill and switch without a word about
    it, and the deploy's own `alembic upgrade head` then applies it mid-plan: the helper is
    gone and every v1 write fails in the sync trigger ("function root_cause_id_for(text)
    does not exist") - the issue's story. Cause: revisions.AlembicProject.unguarded is
    consulted only by `validate` (cli/read.py); no phase command refuses (or even warns
    about) a plan whose revisions a plain `alembic upgrade` would run before their phase."""
    root = project_copy(tmp_path)
    plan = root / "plans" / "bug_root_cause.yaml"
    if kind == "tagged without the guard":
        split_contract(root)
    else:
        split_contract(root, UNTAGGED_HELPER)
        plan.write_text(
            plan.read_text().replace(
                '  contract:\n    compatible: ">=2"\n',
                '  contract:\n    compatible: ">=2"\n    revisions: [c0a1c0a1c0a1, e59b1f0c3d82]\n',
            )
        )
    phasegate = Phasegate(seeded_url, root / "alembic.ini")
    validate = phasegate("validate", str(plan))
    assert validate.exit_code == 0 and "warning:" in validate.output, validate.output
    advance = phasegate("advance", str(plan), "--to", "switch", "--live-version", "1.0", "--yes")

    deploy = alembic_process(root, seeded_url, "upgrade", "head")

    assert old_code_write(seeded_url) is None, (advance.output, deploy.stdout)


@pytest.mark.db
def test_an_offline_script_cannot_apply_a_plan_revision_mid_plan(
    tmp_path: Path, seeded_url: str
) -> None:
    """Alembic's offline mode is how many teams hand migrations to a DBA: `alembic upgrade
    A:B --sql > release.sql`, reviewed, then `psql -f release.sql`. Found: mid-plan (switch
    done, v1 still live) the script carries the contract revisions with no check at all;
    run as psql runs it, the helper's DROP FUNCTION commits and every v1 write fails in
    the sync trigger. (The bundled contract's DROP COLUMN alone happens to fail: the sync
    UPDATE trigger's WHEN clause depends on the column.) Cause: guard.check returns at once
    when `context.as_sql`; the rendered SQL could carry the check itself, e.g. a DO block
    that raises unless phasegate.plan_state has the phase done or the marker is set."""
    root = project_copy(tmp_path)
    split_contract(root, GUARDED_HELPER)
    phasegate = Phasegate(seeded_url, root / "alembic.ini")
    plan = str(root / "plans" / "bug_root_cause.yaml")
    result = phasegate("advance", plan, "--to", "switch", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    rendered = alembic_process(root, seeded_url, "upgrade", f"{SWITCH_HEAD}:head", "--sql")
    assert rendered.returncode == 0, rendered.stderr
    assert "DROP FUNCTION root_cause_id_for(text)" in rendered.stdout

    script = tmp_path / "release.sql"
    script.write_text(rendered.stdout)
    subprocess.run(  # as a DBA runs it; a refusal inside the script is the right outcome
        ["psql", "-X", "-q", "-f", str(script), libpq_url(normalize_url(seeded_url))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert old_code_write(seeded_url) is None


# -- secrets (item 10): what a failed batch stores ---------------------------------------------

ROW_SECRET = "sk_live_51HrowSecret"


def ledger_text(url: str) -> str:
    """plan_state.error and every event's detail, as stored for ever."""
    with psycopg.connect(libpq_url(normalize_url(url))) as conn:
        errors = conn.execute(
            "SELECT coalesce(string_agg(error, ' '), '') FROM phasegate.plan_state"
        )
        details = conn.execute(
            "SELECT coalesce(string_agg(detail::text, ' '), '') FROM phasegate.event"
        )
        return f"{errors.fetchone()[0]} {details.fetchone()[0]}"


@pytest.mark.db
def test_a_failed_batch_keeps_the_rows_values_out_of_the_append_only_log(
    phasegate: Phasegate, seeded_url: str
) -> None:
    """A batch that violates a constraint fails with PostgreSQL's DETAIL "Failing row
    contains (...)" (or "Key (email)=(...) already exists" for a unique index): the row's
    values, secrets and personal data included. Found: that text goes into
    plan_state.error and the event log, which refuses DELETE and TRUNCATE (so it cannot be
    purged, e.g. for an erasure request) and which the README's read-only role may read
    although it has no grant on `bug`. Item 10 removed other sessions' literals from the
    ledger but not the rows' own values. Cause: the backfill/orchestrator failure path
    stores str(psycopg error), DETAIL included (orchestrator/backfill failure recording)."""
    result = phasegate("advance", P, "--to", "expand", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    with psycopg.connect(libpq_url(normalize_url(seeded_url)), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO bug (bug_tracker_url, root_cause, who) VALUES "
            f"('https://bugs.example.com/SEC-1?token={ROW_SECRET}', 'leaked key', NULL)"
        )
        # a team rule: a bug with a curated root cause has an owner (new rows only for now)
        conn.execute(
            "ALTER TABLE bug ADD CONSTRAINT bug_owned CHECK "
            "(root_cause_id IS NULL OR who IS NOT NULL) NOT VALID"
        )
    failed = phasegate("backfill", P, "--live-version", "1.0", "--yes")
    assert failed.exit_code == 3, failed.output
    assert "bug_owned" in failed.output  # the constraint is named: that is what helps
    assert ROW_SECRET not in ledger_text(seeded_url)


# -- passwords (item 11): a password with a space -----------------------------------------------


@pytest.mark.db
def test_a_password_with_a_space_still_names_the_blocker(seeded_url: str) -> None:
    """Found: with a password that holds a space (given percent-encoded, as URLs must),
    the lock-timeout message names no blocker. phasegate's own connection works (SQLAlchemy
    hands the password over as a parameter), but db.libpq_url renders it raw ("pass
    word"), libpq refuses the URI ("unexpected spaces found in ..."), and the blocker watch
    and the long-wait watch (lockguard.BlockerWatch._run, LongWait._waiting) swallow the
    error as a courtesy. The same makes LongWait unable to cancel a concurrent build on
    SIGTERM. The server here trusts every local connection, so the password itself is
    never checked: only its shape matters. Cause: db.libpq_url (SQLAlchemy's
    render_as_string leaves spaces unquoted in the password)."""
    url = sa.engine.make_url(normalize_url(seeded_url)).set(password="pass word")
    spaced = url.render_as_string(hide_password=False)
    phasegate = Phasegate(spaced)
    blocker = blocked_at_backfill(phasegate, seeded_url)
    blocker_pid = blocker.info.backend_pid
    try:
        result = phasegate(
            *SWITCH_WITH_SHORT_LOCK_WAITS, "--lock-retries", "1", "--yes", json_output=True
        )
    finally:
        blocker.close()
    assert result.exit_code == 3, result.output
    assert "pass word" not in result.output
    message = json.loads(result.stdout)["error"]["message"]
    assert f"blocked by pid {blocker_pid}" in message, message


# -- terminals (item 12): a row's text in a database error --------------------------------------

FORGED = "gate for entering contract: pass - every live bugtracker version is inside '>=2'"


@pytest.mark.db
def test_a_rows_text_in_a_database_error_cannot_print_a_line_of_its_own(
    phasegate: Phasegate, seeded_url: str
) -> None:
    """Anyone who can file a bug writes bug_tracker_url. Found: when a batch fails on that
    row, PostgreSQL's DETAIL ("Failing row contains (...)") carries the text, newline and
    all, and phasegate prints it as is (terminal_safe keeps newlines, since the message
    has its own): the row's second line stands at the start of a line, a forged "gate ...:
    pass", on the failing command's stderr and again in `status`. Control characters are
    escaped, newlines are not. Cause: cli/app.handle_errors and cli/read.status print
    database error text through terminal_safe, not one_line (or an indented block)."""
    result = phasegate("advance", P, "--to", "expand", "--live-version", "1.0", "--yes")
    assert result.exit_code == 0, result.output
    with psycopg.connect(libpq_url(normalize_url(seeded_url)), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO bug (bug_tracker_url, root_cause, who) VALUES (%s, 'disk', NULL)",
            (f"https://bugs.example.com/BUG-X\n{FORGED}",),
        )
        conn.execute(
            "ALTER TABLE bug ADD CONSTRAINT bug_owned CHECK "
            "(root_cause_id IS NULL OR who IS NOT NULL) NOT VALID"
        )
    failed = phasegate("backfill", P, "--live-version", "1.0", "--yes")
    status = phasegate("status", P)
    assert failed.exit_code == 3, failed.output
    printed = failed.output.splitlines() + status.output.splitlines()
    assert not [line for line in printed if line.lstrip().startswith(FORGED[:20])], printed


# -- heartbeats (item 8): an app on the previous phasegate --------------------------------------

# what report_version wrote before ledger version 7 (phasegate.ledger.HEARTBEAT_UPSERT then)
OLD_HELPER_BEAT = """
INSERT INTO phasegate.heartbeat (app, instance, version)
VALUES ('bugtracker', 'web-1', '1.0')
ON CONFLICT (app, instance, version) DO UPDATE SET last_seen = now()
"""

BACK_TO_LEDGER_6 = (
    "DROP FUNCTION phasegate.beat(text, text, text); "
    "DROP FUNCTION phasegate.forget_heartbeat(text, text, text); "
    "DROP TRIGGER event_is_not_truncated ON phasegate.event; "
    "ALTER TABLE phasegate.heartbeat DROP CONSTRAINT heartbeat_pkey; "
    "ALTER TABLE phasegate.heartbeat DROP COLUMN role; "
    "ALTER TABLE phasegate.heartbeat ADD PRIMARY KEY (app, instance, version); "
    "UPDATE phasegate.meta SET value = '6' WHERE key = 'schema_version'"
)


@pytest.fixture
def app_roles(seeded_url: str) -> Iterator[Roles]:
    """Login roles with unique names, dropped at the end (test_trust's Roles)."""
    made = Roles(seeded_url)
    yield made
    made.drop_all()


@pytest.mark.db
def test_an_old_apps_heartbeats_do_not_vanish_when_the_ledger_is_upgraded(
    tmp_path: Path, app_roles: Roles, seeded_url: str
) -> None:
    """v1 is the old build, so it carries the previous phasegate's report_version, which
    writes the heartbeat table directly with the grants the README used to give. Found:
    the first command of the new phasegate upgrades the ledger, revokes those grants and
    changes the key, so every later v1 beat fails (logged in the app, never raised);
    once the TTL runs out the v1 instance, still running and still trying, is invisible,
    and the contract gate PASSES on the trusted v2 connection alone: fail open, at the one
    gate that exists to see v1. Cause: ledger._DDL version 7 (REVOKE of the direct writes
    and the new primary key) with nothing that keeps an old writer visible or refusing,
    e.g. a trigger that stamps role and server time on direct writes, or a gate that
    refuses while a pre-7 row's instance is still trying."""
    project, roles = Project(tmp_path, seeded_url), app_roles
    project.settings('heartbeat_ttl = "2s"\n')
    assert project.run("gate", project.plan, "--live-version", "1.0").exit_code == 0
    query(seeded_url, BACK_TO_LEDGER_6)
    web_v1, api_v2 = roles.create("web_v1"), roles.create("api_v2")
    for role in (web_v1, api_v2):
        roles.run("GRANT SELECT, INSERT, UPDATE, DELETE ON bug TO {}", role)
    roles.run(  # the README's advice before ledger version 7
        "GRANT USAGE ON SCHEMA phasegate TO {0}; "
        "GRANT SELECT, INSERT, UPDATE, DELETE ON phasegate.heartbeat TO {0}",
        web_v1,
    )
    v1 = roles.connect(web_v1)
    try:
        v1.execute(OLD_HELPER_BEAT)  # v1 beats, as it always did
        with roles.connect(api_v2, "bugtracker/2.0"):
            refused = project.run("gate", project.plan, "--phase", "contract")
            assert refused.exit_code == 1, refused.output  # v1 seen; the ledger is upgraded
            errors = []
            for _ in range(4):  # v1 keeps running and beating for longer than the TTL
                time.sleep(1)
                try:
                    v1.execute(OLD_HELPER_BEAT)
                except psycopg.Error as exc:
                    errors.append(type(exc).__name__)
            assert errors  # every beat fails now (the helper logs it, the app runs on)
            later = project.run("gate", project.plan, "--phase", "contract")
    finally:
        v1.close()
    assert later.exit_code == 1, later.output


@pytest.mark.db
def test_an_app_name_from_a_heartbeat_stays_on_one_line_in_versions(
    phasegate: Phasegate, seeded_url: str
) -> None:
    """Any role that may beat chooses the heartbeat's `app` too. Found: `phasegate
    versions` (no --app lists every app it finds, heartbeats' included) prints the app
    name as it is, so a newline in it starts a line of the attacker's: control characters
    are escaped, newlines are not. (application_name cannot do this: PostgreSQL turns its
    non-printable characters into '?'.) Cause: cli/versions._versions_text puts `name`
    into the text without one_line (versions and instances get it)."""
    assert phasegate("gate", P, "--live-version", "1.0").exit_code == 0  # the ledger
    with psycopg.connect(libpq_url(normalize_url(seeded_url)), autocommit=True) as conn:
        conn.execute("SELECT phasegate.beat(%s, 'web-1', '1.0')", (f"shop\n{FORGED}",))
    result = phasegate("versions")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert not [line for line in lines if line.lstrip().startswith(FORGED[:20])], lines
