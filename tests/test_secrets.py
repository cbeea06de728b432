"""Secrets stay out of phasegate's output, ledger and command lines (issue 18, items 10, 11).

Item 10: when a lock wait runs out, the blocking sessions are named with their query, and
that text (another session's, literals included) went to the terminal, the --json error,
`plan_state.error` and the event log for ever. It is now kept without its literals.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from phasegate.db import libpq_url
from phasegate.redact import NOT_SHOWN, without_literals

from .conftest import PLAN
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
