"""Sync triggers' names and comments: how phasegate finds its own triggers again (pure).

The triggers' behaviour is tested against PostgreSQL in test_sync_order.py; these names
must stay unique, within PostgreSQL's 63 bytes, and readable back from the comment.
"""

from __future__ import annotations

import re

from phasegate import sync
from phasegate.plan import Job, load_plan

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


def job(name: str = "j", table: str = "t", **fields: object) -> Job:
    return Job.model_validate({"name": name, "table": table, "where": "true", **fields})


def test_a_jobs_digest_changes_with_its_table_set_or_sync_down_and_not_their_order() -> None:
    """`outdated` compares it with the one in the installed function's comment: an edit
    must show, and the same expressions listed in another order must not."""
    base = job(set={"a": "x", "b": "y"}, sync={"down": {"c": "a", "d": "b"}})
    edited = [
        job(table="u", set={"a": "x", "b": "y"}, sync={"down": {"c": "a", "d": "b"}}),
        job(set={"a": "x", "b": "z"}, sync={"down": {"c": "a", "d": "b"}}),
        job(set={"a": "x", "b": "y"}, sync={"down": {"c": "a", "d": "a"}}),
        job(set={"a": "x", "b": "y"}),
    ]
    digests = {sync.expressions_digest(other) for other in [base, *edited]}
    assert len(digests) == 1 + len(edited)
    reordered = job(set={"b": "y", "a": "x"}, sync={"down": {"d": "b", "c": "a"}})
    assert sync.expressions_digest(reordered) == sync.expressions_digest(base)


def test_names_and_digests_read_the_same_as_installed_by_earlier_versions() -> None:
    """Functions are found again by name, and edits told by digest, in databases where an
    earlier phasegate installed them: the same plan must give the same ones."""
    assert sync.function_name("my-plan", "public.Orders") == "sync_my_plan_public_Orders_7cd4f33f"
    assert sync.expressions_digest(job(set={"a": "1"})) == "c58ff13104fd58ef"
    assert sync.expressions_digest(job(set={"a": "1"}, sync={"down": {"b": "a"}})) == (
        "f48af2f6141340e2"
    )


def test_a_comment_naming_several_jobs_reads_back_each_with_its_digest() -> None:
    """Even a job named like a word of the comment's other lines (`defaults`)."""
    jobs = [job("defaults", set={"a": "1"}), job("other", set={"b": "2"})]
    comment = sync.owner_comment("p", jobs, {"x": "0"})
    assert sync._owned_jobs(comment, "p") == {
        "defaults": sync.expressions_digest(jobs[0]),
        "other": sync.expressions_digest(jobs[1]),
    }
