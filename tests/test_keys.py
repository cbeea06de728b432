"""The SQL a walk's key becomes, and how its values are stored (pure).

A backfill walks a table in key order and saves where it stopped in the ledger; a wrong
cast, a lost column or a key that does not read back as written skips or repeats rows.
The walks themselves are tested against PostgreSQL in test_backfill_engine.py.
"""

from __future__ import annotations

import pytest
from psycopg import sql

from phasegate.keys import Key, decode, encode

ONE = Key(("id",), ("bigint",), "primary key")
TWO = Key(("org", "created"), ("text", "timestamp with time zone"), "key: [org, created]")


def text(composable: sql.Composable) -> str:
    return composable.as_string(None)


def test_a_one_column_key_is_a_bare_typed_value() -> None:
    assert text(ONE.tuple()) == '"id"' and text(ONE.tuple("b")) == '"b"."id"'
    assert text(ONE.literal(("42",))) == "'42'::bigint"
    assert text(ONE.placeholder("lo")) == "%(lo0)s::bigint"
    assert ONE.params("lo", ("42",)) == {"lo0": "42"}
    assert text(ONE.variables("v")) == '"v0"'
    assert text(ONE.as_text_array()) == 'json_build_array("id"::text)'
    assert text(ONE.stored(sql.SQL("a"))) == "(a ->> 0)"
    assert ONE.signature == "id bigint" and ONE.describe() == "id (primary key)"


def test_a_composite_key_is_a_row_compared_column_by_column() -> None:
    assert text(TWO.tuple("b")) == '("b"."org", "b"."created")'
    assert text(TWO.names()) == '"org", "created"'
    assert text(TWO.literal(("acme", "2024-01-01"))) == (
        "ROW('acme'::text, '2024-01-01'::timestamp with time zone)"
    )
    assert text(TWO.placeholder("lo")) == ("ROW(%(lo0)s::text, %(lo1)s::timestamp with time zone)")
    assert TWO.params("lo", ("acme", "2024-01-01")) == {"lo0": "acme", "lo1": "2024-01-01"}
    assert text(TWO.order()) == '"org", "created"'
    assert text(TWO.order(descending=True, alias="b")) == '"b"."org" DESC, "b"."created" DESC'
    assert text(TWO.variables("v")) == '("v0", "v1")'
    assert text(TWO.declarations("v")) == '"v0" text, "v1" timestamp with time zone'
    assert text(TWO.declarations("v", "; ")) == '"v0" text; "v1" timestamp with time zone'
    assert text(TWO.stored(sql.SQL("a"))) == "(a)::text"
    assert TWO.signature == "org text, created timestamp with time zone"
    assert TWO.describe() == "org, created (key: [org, created])"


def test_a_date_or_time_key_travels_as_iso_8601_whatever_the_datestyle() -> None:
    assert text(TWO.as_text_array("b")) == (
        'json_build_array("b"."org"::text, to_json("b"."created") #>> \'{}\')'
    )
    assert text(TWO.as_text_array(prefix="v")) == (
        'json_build_array("v0"::text, to_json("v1") #>> \'{}\')'
    )


def test_a_stored_key_reads_back_as_written() -> None:
    assert encode(None) is None and decode(None, ONE) is None
    assert encode(("42",)) == "42" and decode("42", ONE) == ("42",)
    stored = encode(('é, "x"', "2024-01-01"))
    assert stored == '["é, \\"x\\"", "2024-01-01"]'  # as json_build_array(...)::text writes it
    assert decode(stored, TWO) == ('é, "x"', "2024-01-01")


def test_a_stored_value_of_another_width_than_the_key_is_refused_not_cut_to_fit() -> None:
    """A ledger value saved under another key (its columns changed since) must not become
    a bound made of some of its values: that would skip or repeat rows."""
    for value in [("acme",), ("acme", "2024-01-01", "extra")]:
        with pytest.raises(ValueError):
            TWO.literal(value)
