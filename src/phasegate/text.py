"""Text from the database or a plan, made safe to show on a terminal.

A heartbeat's instance name, a role, another session's query: anyone who can write them
chooses their characters, and an escape sequence or a carriage return in them can erase
or rewrite what phasegate printed (a refusal overwritten by a forged "pass"). Two layers:
`terminal_safe` on every line the CLI prints makes control characters visible (`\\x1b`)
and keeps our own newlines and tabs; `one_line` at the source of a single-line field also
escapes newlines, so one value can never print a line of its own. JSON output needs
neither: `json.dumps` escapes control characters.
"""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls, plus the Unicode controls that move text on a
# terminal: bidirectional overrides and isolates ("Trojan Source") and line separators.
_BIDI_AND_SEPARATORS = "\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
_CONTROLS = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_CONTROLS_AND_BREAKS = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def terminal_safe(text: str) -> str:
    """`text` with every control character but newline and tab shown as an escape."""
    return _CONTROLS.sub(_visible, text)


def one_line(text: str) -> str:
    """A single-line field (a name, a version, a query): newlines and tabs escaped too."""
    return _CONTROLS_AND_BREAKS.sub(_visible, text)
