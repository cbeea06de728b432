"""Failpoints: named places where a test may make phasegate pause, to kill it right there.

`PHASEGATE_FAILPOINTS="after-revision:6c55e0560fd4=5,before-revision:a41c7e9d2b58=5"` makes
the orchestrator sleep that many seconds at those points; unset (always, outside the
fault suite), `reach` is a dictionary lookup that does nothing. The fault suite uses them
so a kill -9 lands exactly "between revisions" or "inside switch", not wherever a timer
happened to fire.
"""

from __future__ import annotations

import os
import time

ENV = "PHASEGATE_FAILPOINTS"


def _points() -> dict[str, float]:
    points = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, seconds = item.strip().partition("=")
        if name:
            try:
                points[name] = float(seconds or 0)
            except ValueError:
                continue
    return points


def reach(name: str) -> None:
    """Pause here if the environment asks for it (tests only)."""
    pause = _points().get(name)
    if pause:
        time.sleep(pause)
