"""Human durations for phasegate's own waits (`--wait 5m`, `heartbeat_ttl = "2min"`).

PostgreSQL settings such as `lock_timeout` take PostgreSQL's own syntax and are passed
through as text; this module only reads the durations phasegate itself sleeps on.
"""

from __future__ import annotations

import re

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def parse_duration(text: str) -> float:
    """Seconds in `text`: a number with an optional unit (ms, s, m/min, h); bare means s.

    Raises ValueError with a message that shows how to write one.
    """
    match = _PATTERN.fullmatch(text.lower())
    if not match or match.group(2) not in ("", *_UNITS):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 5m, 1h or 500ms")
    return float(match.group(1)) * _UNITS.get(match.group(2), 1.0)


def format_duration(seconds: float) -> str:
    """A short human form: 45 s, 3 min 20 s, 2 h 5 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
