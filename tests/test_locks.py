"""Lock classification (phasegate.locks) beyond the statement table in test_lint.py."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from phasegate.locks import locks_of


def locks(statement: str) -> list[tuple[str, str]]:
    return [(lock.mode, lock.table) for lock in locks_of(parse_sql(statement)[0].stmt)]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        # a plain refresh blocks even reads; CONCURRENTLY still blocks writes (EXCLUSIVE)
        ("REFRESH MATERIALIZED VIEW m", [("ACCESS EXCLUSIVE", "m")]),
        ("REFRESH MATERIALIZED VIEW s.m WITH NO DATA", [("ACCESS EXCLUSIVE", "s.m")]),
        ("REFRESH MATERIALIZED VIEW CONCURRENTLY s.m", [("EXCLUSIVE", "s.m")]),
    ],
)
def test_refreshing_a_materialized_view_locks_it(
    statement: str, expected: list[tuple[str, str]]
) -> None:
    assert locks(statement) == expected


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        # a later, weaker subcommand does not lower the lock an earlier one takes
        ("ALTER TABLE t ADD COLUMN x int, VALIDATE CONSTRAINT c", [("ACCESS EXCLUSIVE", "t")]),
        ("ALTER TABLE t VALIDATE CONSTRAINT c, ADD COLUMN x int", [("ACCESS EXCLUSIVE", "t")]),
        # a LIKE clause among the columns: the foreign key still locks its table
        (
            "CREATE TABLE c (LIKE p INCLUDING ALL, id int REFERENCES q (id))",
            [("SHARE ROW EXCLUSIVE", "q")],
        ),
    ],
)
def test_a_statement_of_several_parts_takes_its_strongest_lock_per_table(
    statement: str, expected: list[tuple[str, str]]
) -> None:
    assert locks(statement) == expected
