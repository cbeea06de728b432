"""Realistic values shared by the seed script and the simulated app instances.

One list, so seeded rows and app writes tell the same story: a handful of common root causes,
a long tail, and one typo'd duplicate ("race conditon") that a curated table would merge.
"""

from __future__ import annotations

# (root cause, relative weight): uneven on purpose, like real bug trackers.
ROOT_CAUSES: tuple[tuple[str, int], ...] = (
    ("off-by-one error", 18),
    ("null pointer dereference", 16),
    ("race condition", 13),
    ("unhandled timezone", 10),
    ("missing database index", 9),
    ("stale cache entry", 8),
    ("unvalidated user input", 7),
    ("wrong default configuration", 6),
    ("integer overflow", 4),
    ("deadlock", 4),
    ("memory leak", 3),
    ("race conditon", 2),
)

ROOT_CAUSE_NAMES: tuple[str, ...] = tuple(name for name, _ in ROOT_CAUSES)
ROOT_CAUSE_WEIGHTS: tuple[int, ...] = tuple(weight for _, weight in ROOT_CAUSES)

PEOPLE: tuple[str, ...] = (
    "ada",
    "grace",
    "linus",
    "margaret",
    "ken",
    "barbara",
    "dennis",
    "frances",
    "guido",
    "radia",
)
