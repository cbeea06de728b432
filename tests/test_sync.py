"""Sync triggers' names and comments: how phasegate finds its own triggers again (pure).

The triggers' behaviour is tested against PostgreSQL in test_sync_order.py; these names
must stay unique, within PostgreSQL's 63 bytes, and readable back from the comment.
"""

from __future__ import annotations

import re

from phasegate import sync
from phasegate.plan import load_plan

from .conftest import ROOT


def test_a_jobs_old_object_name_is_readable_unique_and_fits_postgres() -> None:
    """PostgreSQL cuts identifiers at 63 bytes: a longer name would be found by no one."""
    assert re.fullmatch(r"sync_my_plan_a_b_[0-9a-f]{8}", sync.object_name("my-plan", "a-b"))
    assert sync.object_name("p", "x-y") != sync.object_name("p", "x_y")
    assert len(sync.object_name("p" * 80, "j")) == 63


def test_trigger_names_sort_by_ordinal_and_fit_postgres() -> None:
    assert sync.trigger_names("fn", 12) == ("~012_fn_ins", "~012_fn_upd")
    function = sync.function_name("p" * 80, "public.t")
    assert re.fullmatch(r"sync_p+_[0-9a-f]{8}", function)
    assert [len(name) for name in sync.trigger_names(function, 999)] == [63, 63]


def test_a_function_comment_names_the_plans_jobs_for_finding_them_again() -> None:
    plan = load_plan(ROOT / "plans" / "bug_root_cause.yaml")
    [jobs] = sync.table_groups(None, plan.jobs())
    comment = sync.owner_comment(plan.name, jobs, {"root_cause_id": "0"})
    digest = sync.expressions_digest(jobs[0])
    assert comment == (
        f"phasegate sync trigger of plan bug-root-cause, jobs bug-root-cause-id\n"
        f"expressions bug-root-cause-id {digest}\n"
        'column defaults {"root_cause_id": "0"}'
    )
    assert sync._owned_jobs(comment, plan.name) == {"bug-root-cause-id": digest}
    assert sync._owned_jobs(comment, "bug-root") == {}  # another plan's prefix
    # what versions before one function per table wrote
    old = "phasegate sync trigger of plan p, job a\nexpressions 0123"
    assert sync._owned_jobs(old, "p") == {"a": "0123"}
    assert sync._owned_jobs("phasegate sync trigger of plan p, job a", "p") == {"a": None}
