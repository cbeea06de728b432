"""Secrets stay out of phasegate's output, ledger and command lines (issue 18, items 10, 11).

Item 10: when a lock wait runs out, the blocking sessions are named with their query, and
that text (another session's, literals included) went to the terminal, the --json error,
`plan_state.error` and the event log for ever. It is now kept without its literals.

Item 11: a URL's sslpassword was printed in clear, masking the password `postgres` mangled
every 'postgres' of a message, and the demo put the URL, password and all, on a child's
command line.
"""

from __future__ import annotations

import json
import subprocess

import psycopg
import pytest
from click.testing import CliRunner
from pglast.parser import ParseError
from sqlalchemy.engine import make_url

from phasegate import redact
from phasegate.cli import cli
from phasegate.db import libpq_url, mask_url, normalize_url, scrub
from phasegate.errors import UsageError
from phasegate.redact import NOT_SHOWN, without_literals

from .conftest import PLAN, Phasegate, on_a_terminal
from .test_cli import invoke
from .test_failures import hold

P = str(PLAN)
SECRET = "sk_live_abc123"
TOKEN = "tok_9f8e7d"


def ledger_text(url: str) -> tuple[str, str]:
    """plan_state.error and every event's detail, as stored."""
    with psycopg.connect(libpq_url(url)) as conn:
        error = conn.execute(
            "SELECT coalesce(string_agg(error, ' '), '') FROM phasegate.plan_state"
        )
        details = conn.execute("SELECT string_agg(detail::text, ' ') FROM phasegate.event")
        return error.fetchone()[0], details.fetchone()[0]


@pytest.mark.db
def test_a_blockers_literals_reach_neither_output_nor_ledger(phasegate, seeded_url) -> None:
    assert (
        phasegate("advance", P, "--to", "backfill", "--live-version", "1", "--yes").exit_code == 0
    )
    reader = hold(
        seeded_url,
        f"BEGIN; SELECT '{SECRET}' AS api_key, who FROM bug WHERE id = 1 FOR UPDATE",
        application_name="billing",
    )
    writer = hold(
        seeded_url,
        f"BEGIN; /* key {SECRET} */ UPDATE bug SET who = $$token {TOKEN}$$ WHERE id = 2",
        application_name="crm",
    )
    switch = ["switch", P, "--live-version", "1", "--lock-timeout", "200ms", "--yes"]
    try:
        text = phasegate(*switch, "--lock-retries", "1")
        document = phasegate(*switch, "--lock-retries", "0", json_output=True)
    finally:
        reader.close()
        writer.close()

    assert text.exit_code == 3 and document.exit_code == 3, text.output + document.output
    error = json.loads(document.stdout)["error"]
    for shown in (text.output, document.output, *ledger_text(seeded_url)):
        assert SECRET not in shown and TOKEN not in shown
    # the statements are still recognisable, constants as $n
    read = "BEGIN; SELECT $1 AS api_key, who FROM bug WHERE id = $2 FOR UPDATE"
    write = "BEGIN; UPDATE bug SET who = $1 WHERE id = $2"
    assert read in text.stderr and write in text.stderr
    assert read in error["message"] and write in error["message"]
    assert sorted(b["query"] for b in error["blockers"]) == sorted([read, write])
    state_error, events = ledger_text(seeded_url)
    assert read in state_error and write in state_error
    assert read in events and "switch" in events


def test_literals_of_every_kind_become_parameters() -> None:
    query = (
        "SELECT 'a', E'b\\'c', $$d$$, $x$e$x$, B'1', X'ff', U&'g', 42, 1.5e3, $1 "
        "FROM t -- comment with a secret\n WHERE k = 'secret' /* another */"
    )
    assert without_literals(query) == (
        "SELECT $2, $3, $4, $5, $6, $7, $8, $9, $10, $1 FROM t WHERE k = $11"
    )
    # a bare word as a setting's value is an identifier to the lexer, but may be a secret
    assert without_literals("SET app.key TO sk_live; ALTER ROLE r SET app.k = sk_x") == (
        "SET app.key TO $1; ALTER ROLE r SET app.k = $2"
    )
    assert without_literals("ALTER TABLE bug RENAME TO issue") == "ALTER TABLE bug RENAME TO issue"


def test_a_query_cut_inside_a_literal_keeps_only_whole_tokens_before_it() -> None:
    assert without_literals("UPDATE bug SET title = 'sk_live_cut off her") == (
        "UPDATE bug SET title = …"
    )
    assert without_literals("SELECT 1 /* sk_live never closed") == "SELECT $1 …"
    assert without_literals("SELECT $q$sk_live") == "SELECT …"
    assert without_literals("<insufficient privilege>") == "<insufficient privilege>"
    assert without_literals("'sk_live") == "…"
    assert without_literals(None) is None
    long = without_literals("SELECT " + ", ".join(f"'{SECRET}'" for _ in range(200)))
    assert long is not None and SECRET not in long and len(long) <= 300
    assert NOT_SHOWN.startswith("(query not shown")


def test_new_parameters_follow_the_highest_one_the_query_already_has() -> None:
    """$n must not repeat a parameter the query holds, or two values would read as one."""
    assert without_literals("SELECT f($12) WHERE k = 'secret'") == "SELECT f($12) WHERE k = $13"
    # after SET ... TO, a parameter is already no literal: it stays as written
    assert without_literals("SET app.key TO $1") == "SET app.key TO $1"


def test_a_settings_value_list_is_hidden_but_its_commas_stay() -> None:
    assert without_literals("ALTER ROLE app SET search_path = sk_a, sk_b") == (
        "ALTER ROLE app SET search_path = $1, $2"
    )


def test_a_long_query_is_cut_to_exactly_the_limit_without_a_trailing_space() -> None:
    assert without_literals("SELECT abcdef", limit=13) == "SELECT abcdef"
    assert without_literals("SELECT abcdef", limit=10) == "SELECT ab…"
    assert without_literals("SELECT a, b", limit=8) == "SELECT…"


def test_a_lexer_error_without_a_position_shows_nothing(monkeypatch) -> None:
    """pglast reports where it stopped as the error's second argument; without one,
    phasegate cannot tell what was read, so it shows nothing, and does not crash."""

    def fails(text: str) -> None:
        raise ParseError("unexpected end")

    monkeypatch.setattr(redact, "scan", fails)
    assert without_literals("SELECT 'sk_live'") == NOT_SHOWN


# -- item 11: passwords -----------------------------------------------------------------------


def with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def test_the_password_postgres_is_masked_and_nothing_else(tmp_path) -> None:
    """Masking used to replace every 'postgres' in the message: ***ql+psycopg://***:***@."""
    url = "postgresql://postgres:postgres@127.0.0.1:1/postgres"
    result = invoke("--json", "--database-url", url, "status", P)
    assert result.exit_code == 3, result.output
    shown = "postgresql+psycopg://postgres:***@127.0.0.1:1/postgres"
    assert f"cannot connect to {shown}" in result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["database"] == shown and f"cannot connect to {shown}" in error["message"]
    assert ":postgres@" not in result.output


@pytest.mark.db
def test_a_confirmation_shows_user_and_database_with_the_password_postgres(seeded_url) -> None:
    url = with_password(seeded_url, "postgres")  # trust auth: the password is not checked
    result = Phasegate(url)("expand", P, "--live-version", "1")  # no --yes, no terminal
    assert result.exit_code == 2, result.output
    # the URL as rendered, password masked: user, host (or socket) and database readable
    shown = make_url(url).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    assert "postgres:***@" in shown and f"on {shown} without" in result.stderr


def test_sslpassword_is_never_printed() -> None:
    url = "postgresql://postgres@127.0.0.1:1/nothing?sslpassword=hunter2-ssl&sslmode=disable"
    for args in (["status", P], ["--json", "status", P]):
        result = invoke("--database-url", url, *args)
        assert result.exit_code == 3, result.output
        assert "hunter2-ssl" not in result.output and "sslpassword=***" in result.stderr
    assert mask_url(url) == (
        "postgresql://postgres@127.0.0.1:1/nothing?sslmode=disable&sslpassword=***"
    )


def test_masking_finds_passwords_in_every_form() -> None:
    url = "postgresql://app:p%40ss%2Fword@db.example/prod?sslpassword=key-pw"
    text = (
        f"echo {url}; decoded p@ss/word; conninfo password='p@ss/word' sslpassword=key-pw; "
        "host db.example, database prod, user app"
    )
    assert scrub(text, url) == (
        "echo postgresql://app:***@db.example/prod?sslpassword=***; decoded ***; "
        "conninfo password='***' sslpassword=***; host db.example, database prod, user app"
    )


def test_a_url_sqlalchemy_cannot_parse_still_has_its_secrets_masked() -> None:
    """The port does not parse, so only the URL's shape says where the secrets are: from
    the user's ':' to the '@', and each password= or sslpassword= parameter."""
    url = "postgresql://app:pa/ss@[::1:5432/db?sslpassword=k3y&x=1"
    assert mask_url(url) == "<unparsable database URL>"
    assert scrub(f"cannot use {url}: pa/ss k3y; pa%2Fss", url) == (
        "cannot use postgresql://app:***@[::1:5432/db?sslpassword=***&x=1: *** ***; ***"
    )


@pytest.mark.parametrize(
    ("url", "password"),
    [
        # ':' and '@' in the password; '@', '?' and '://' in the query
        (
            "postgresql://app:p:w@ss@[::1:5432/db?application_name=x@y?z&sslrootcert=file://c",
            "p:w@ss",
        ),
        ("postgresql://Xavier:pw@[::1:5432/db", "pw"),
    ],
)
def test_an_unparsable_urls_password_is_found_by_its_shape(url: str, password: str) -> None:
    masked = url.replace(f":{password}@", ":***@", 1)
    assert scrub(f"cannot use {url}: {password}", url) == f"cannot use {masked}: ***"


def test_a_masked_url_keeps_everything_but_its_secrets() -> None:
    assert mask_url("postgresql://app:pw@db.example:6432/prod") == (
        "postgresql://app:***@db.example:6432/prod"
    )
    assert mask_url("postgresql://app:p:w@h/prod?password=qq&sslmode=require") == (
        "postgresql://app:***@h/prod?password=***&sslmode=require"
    )


def test_a_url_is_normalized_to_the_psycopg_driver_with_its_password() -> None:
    """The normalized URL is what phasegate connects with: the password must survive."""
    for scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        assert normalize_url(f"{scheme}://u:pw@h/db") == "postgresql+psycopg://u:pw@h/db"
    with pytest.raises(UsageError) as raised:
        normalize_url("mysql://u@h/db")
    assert str(raised.value) == (
        "phasegate works with PostgreSQL only, not 'mysql'; use postgresql://user@host:port/dbname"
    )
    with pytest.raises(UsageError) as raised:
        normalize_url("postgresql://h:[::1:5432/db")
    assert str(raised.value) == "it does not parse; expected postgresql://user@host:port/dbname"


@pytest.mark.db
def test_the_demo_passes_the_url_to_its_child_in_the_environment(pg_server, monkeypatch) -> None:
    """The demo's backfill child used to get --database-url URL: visible in `ps`."""
    from phasegate import demo

    started: list[tuple[list[str], dict[str, str] | None]] = []

    class Recorded(subprocess.Popen):  # the real child, its argv and env noted
        def __init__(self, args, *rest, **kw):
            started.append((list(args), kw.get("env")))
            super().__init__(args, *rest, **kw)

    monkeypatch.setattr(demo.subprocess, "Popen", Recorded)
    url = with_password(pg_server.url, "demo-secret-pw")
    result = CliRunner().invoke(
        cli, ["--database-url", url, "demo", "--rows", "3000"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "demo-secret-pw" not in result.output
    [(argv, env)] = started
    assert not any("demo-secret-pw" in arg or "postgresql" in arg for arg in argv), argv
    assert env is not None and "demo-secret-pw" in env["PHASEGATE_DATABASE_URL"]


@pytest.mark.db
def test_libpq_finds_a_password_left_out_of_the_url(pg_server, tmp_path, monkeypatch) -> None:
    """What the README advises (no test of a bug: it backs the documentation). Trust auth
    checks no password, but libpq reports the one it found and would have sent."""
    from phasegate import db

    # URL.set(password=None) leaves the password as it was: with a test server URL that
    # has one (CI's postgres:postgres@), libpq never looked for another
    url = make_url(pg_server.url)._replace(password=None).render_as_string(hide_password=False)
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:from-the-passfile\n")
    passfile.chmod(0o600)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with db.session(url) as session:
        assert session.raw.info.password == "from-the-passfile"
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    with db.session(url) as session:
        assert session.raw.info.password == "from-the-environment"


PASSWORD = "s3cret-pw"


@pytest.mark.db
def test_no_prompt_or_output_of_a_run_shows_the_password(seeded_url) -> None:
    """Confirmations print the URL outside any error path, where nothing scrubs it again:
    each is shown masked (user, host and database readable), and so is every other line
    of a whole run, text and JSON, and nothing in the ledger holds the password."""
    url = with_password(seeded_url, PASSWORD)
    masked = mask_url(url)
    assert PASSWORD not in masked and "postgres:***@" in masked
    phasegate = Phasegate(url)
    seen: list[str] = []

    def confirmed(*args: str, answer: str = "y", code: int = 0) -> None:
        exit_code, shown = on_a_terminal(url, *args, answer=answer)
        assert exit_code == code, shown
        assert f"on {masked}? [y/N]: {answer}" in shown, shown
        seen.append(shown)

    def run(*args: str, json_output: bool = False, code: int = 0) -> None:
        result = phasegate(*args, json_output=json_output)
        assert result.exit_code == code, result.output
        seen.append(result.output)

    for json_output in (False, True):
        run("status", P, json_output=json_output)
        run("preview", P, "--live-version", "1", json_output=json_output)
        run("gate", P, "--phase", "expand", "--live-version", "1", json_output=json_output)
    confirmed("expand", P, "--live-version", "1")
    confirmed("advance", P, "--to", "switch", "--live-version", "1")
    confirmed("contract", P, "--live-version", "2", answer="n", code=2)  # cancelled
    confirmed("rollback", P, "--live-version", "1")
    run("switch", P, "--live-version", "1", "--yes", json_output=True)
    run("contract", P, "--live-version", "2", "--yes")
    run("heartbeat", "--app", "bugtracker", "--version", "2", "--instance", "web-1")
    for json_output in (False, True):
        run("status", P, json_output=json_output)
        run("versions", "--app", "bugtracker", json_output=json_output)
        run("check-deploy", P, "--app-version", "2", json_output=json_output)
    for shown in (*seen, *ledger_text(seeded_url)):
        assert PASSWORD not in shown


@pytest.mark.db
def test_the_upgrade_confirmation_does_not_show_the_password(database_url) -> None:
    """`upgrade` on an empty database has revisions to apply, so it asks first."""
    url = with_password(database_url, PASSWORD)
    code, shown = on_a_terminal(url, "upgrade", answer="y")
    assert code == 0, shown
    assert f"Upgrade {mask_url(url)} to every revision that is safe now? [y/N]: y" in shown
    assert "applied" in shown and PASSWORD not in shown
    document = Phasegate(url)("upgrade", "--yes", json_output=True)
    assert document.exit_code == 0 and PASSWORD not in document.output


@pytest.mark.parametrize(
    ("url", "text", "expected"),
    [
        # the password is a word of the URL: masked where it stands as a password only
        (
            "postgresql://postgres:postgres@127.0.0.1:5432/postgres",
            'postgresql://postgres:postgres@127.0.0.1:5432/postgres: role "postgres", '
            "password=postgres, PostgreSQL 15",
            'postgresql://postgres:***@127.0.0.1:5432/postgres: role "postgres", '
            "password=***, PostgreSQL 15",
        ),
        # a password inside longer words (PostgreSQL, postgresql, password, pass_2) leaves
        # them be, and is masked wherever it stands alone
        (
            "postgresql://app:postgres@db/prod",
            "postgresql says: postgres is wrong; postgresql+psycopg://app:***@db/prod",
            "postgresql says: *** is wrong; postgresql+psycopg://app:***@db/prod",
        ),
        (
            "postgresql://app:Postgre@db/prod",
            "PostgreSQL says: Postgre is wrong",
            "PostgreSQL says: *** is wrong",
        ),
        (
            "postgresql://app:pass@db/prod",
            "password authentication failed; tried pass, 'pass' and pass_2",
            "password authentication failed; tried ***, '***' and pass_2",
        ),
        (
            "postgresql://app:sql@db/prod",
            "postgresql://app:sql@db/prod is PostgreSQL; sql",
            "postgresql://app:***@db/prod is PostgreSQL; ***",
        ),
        # the user name contains the password: the user name stays, the password goes
        (
            "postgresql://postgres:post@db/prod",
            'user "postgres" with post',
            'user "postgres" with ***',
        ),
        # regex metacharacters, URL-encoded and decoded forms, a JSON and a conninfo form
        (
            "postgresql://app:a.%2Bb%40c@db/prod",
            'a.+b@c axb@c a.%2Bb%40c {"password": "a.+b@c"} password = \'a.+b@c\'',
            '*** axb@c *** {"password": "***"} password = \'***\'',
        ),
        (
            "postgresql://prod:prod@db/prod",
            'database "prod" rejected "password": "prod"',
            'database "prod" rejected "password": "***"',
        ),
        # as a password in any case; the database's name stays, and so does `None`
        (
            "postgresql://prod:prod@db/prod",
            "PASSWORD=prod, Password: prod",
            "PASSWORD=***, Password: ***",
        ),
        (
            "postgresql://app:prod@db/prod",
            'database "prod" rejected password=prod, None',
            'database "prod" rejected password=***, None',
        ),
        # a secret inside another is masked after it: the longer goes whole
        (
            "postgresql://app:x9@db/prod?sslpassword=a-x9",
            "keys a-x9 and x9",
            "keys *** and ***",
        ),
        # a secret that starts and ends with punctuation needs no word boundary there
        ("postgresql://app:%23pw%23@db/prod", "tried x#pw#x", "tried x***x"),
        # SQLAlchemy cuts the password at its first '@': the rest goes, the head stays
        (
            "postgresql://app:se@cret@host/db",
            "se habla; app:***@cret@host",
            "se habla; app:******@host",
        ),
    ],
)
def test_a_password_is_masked_where_it_is_one_and_nothing_else_is(
    url: str, text: str, expected: str
) -> None:
    assert scrub(text, url) == expected


@pytest.mark.db
def test_psycopg_and_libpq_errors_never_show_the_password(pg_server) -> None:
    """What the server and libpq say about a failed connection, as phasegate shows it."""
    base = make_url(pg_server.url)
    for password in ("s3cret-pw", "p@ss w%rd", "role"):
        for url in (
            with_password(base.set(username="no_such_role").render_as_string(False), password),
            with_password(base.set(database="no_such_db").render_as_string(False), password),
        ):
            result = invoke("--database-url", url, "status", P)
            assert result.exit_code == 3, result.output
            assert "cannot connect" in result.stderr
            if password == "role":  # in the server's message ('role "no_such_role" does
                assert "no_such_role" in result.output or "no_such_db" in url  # not exist')
            else:
                assert password not in result.output


@pytest.mark.parametrize("password", ["é-pw", 'q"uote', "back\\slash", "it's"])
def test_a_password_escaped_in_json_a_repr_or_a_conninfo_is_masked(password: str) -> None:
    """--json errors are scrubbed as JSON text, where `é`, `"` and `\\` are escaped; libpq's
    conninfo escapes `'` and `\\`: the password must go in those forms too."""
    url = with_password("postgresql://app@127.0.0.1:1/prod", password)
    as_json, as_repr, conninfo = json.dumps({"pw": password}), repr(password), libpq_url(url)
    assert json.loads(scrub(as_json, url)) == {"pw": "***"}
    assert scrub(as_repr, url) in ("'***'", '"***"')
    assert scrub(conninfo, url) == "user=app password=*** host=127.0.0.1 port=1 dbname=prod"
    for args in (["--json", "status", P], ["status", P]):
        result = invoke("--database-url", url, *args)
        assert result.exit_code == 3, result.output
        decoded = json.loads(result.stdout) if args[0] == "--json" else result.output
        assert password not in json.dumps(decoded, ensure_ascii=False), decoded


@pytest.mark.parametrize(
    ("url", "text", "expected"),
    [
        # a password of six or more characters glued to other text is still the password
        (
            "postgresql://app:s3cretpw@db/prod",
            "dumped to /backups/s3cretpw_2026.sql and xs3cretpw",
            "dumped to /backups/***_2026.sql and x***",
        ),
        ("postgresql://app:s3cret@db/prod", "in xs3cret_1", "in x***_1"),  # six: long
        # unless the longer word is one of the URL's own (user, database, driver)
        (
            "postgresql://postgresql_admin:postgres@db/prod",
            "role postgresql_admin on PostgreSQL 15: postgres",
            "role postgresql_admin on PostgreSQL 15: ***",
        ),
    ],
)
def test_a_long_password_glued_inside_other_text_is_masked_there_too(
    url: str, text: str, expected: str
) -> None:
    """Only a short password (under six characters) is left inside longer words, where
    it is more likely a coincidence (`pass` in `password`) than the secret."""
    assert scrub(text, url) == expected
