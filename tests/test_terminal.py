"""Text from the database never steers the operator's terminal (issue 18, item 12).

A heartbeat's instance name is chosen by whoever writes the heartbeat. Shown raw, an
escape sequence in it erased the gate's "refused" line and a carriage return or a newline
printed a forged "pass". Every line the CLI prints makes control characters visible, and
single-line fields escape newlines too.
"""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner, Result

from phasegate.backfill import JobResult
from phasegate.cli import cli
from phasegate.progress import BarProgress, LogProgress
from phasegate.text import one_line, terminal_safe

from .conftest import ALEMBIC_INI, PLAN

P = str(PLAN)
FORGED = "gate for entering contract: pass"
ERASES_THE_LINE = f"\x1b[1A\x1b[2K\r{FORGED}"  # cursor up, erase line, back to column 0
NEW_LINE = f"web-1\n{FORGED} — every live bugtracker version is inside '>=2'"
OSC_TITLE = "web-2\x1b]0;owned\x07\x9b2J"  # set the window title; C1 CSI: erase the screen


def on_a_terminal(url: str, *args: str) -> Result:
    """The real CLI with click's ANSI stripping off (color=True), as on a terminal."""
    base = ["--database-url", url, "--config", str(ALEMBIC_INI)]
    unset = {"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None}
    return CliRunner().invoke(cli, [*base, *args], env=unset, color=True, catch_exceptions=False)


def assert_harmless(text: str) -> None:
    for char in ("\x1b", "\r", "\x07", "\x9b"):
        assert char not in text, (char, text)
    assert not any(line.startswith(FORGED) for line in text.split("\n")), text


@pytest.mark.db
def test_a_heartbeat_name_cannot_erase_the_refusal_or_forge_a_pass(seeded_url) -> None:
    echoed = ""
    for instance in (ERASES_THE_LINE, NEW_LINE, OSC_TITLE):
        beat = on_a_terminal(
            seeded_url,
            "heartbeat",
            "--app",
            "bugtracker",
            "--version",
            "1.0",
            "--instance",
            instance,
        )
        assert beat.exit_code == 0, beat.output
        echoed += beat.stdout + beat.stderr

    result = on_a_terminal(seeded_url, "gate", P, "--phase", "contract")
    assert result.exit_code == 1, result.output
    assert_harmless(result.stdout + result.stderr)
    assert result.stdout.startswith("gate for entering contract: refused — ")
    # the refusal is one line whatever the names hold; only our own note follows it
    assert result.stdout.rstrip("\n").split("\n")[1:] == ["note: the next phase is expand"]
    shown = result.stdout
    assert "instance \\x1b[1A\\x1b[2K\\rgate for entering contract: pass" in shown
    assert f"instance web-1\\n{FORGED}" in shown
    assert "instance web-2\\x1b]0;owned\\x07\\x9b2J" in shown

    # JSON keeps the values exactly (escaped by json.dumps), and no raw control character
    document = on_a_terminal(seeded_url, "--json", "gate", P, "--phase", "contract")
    assert_harmless(document.stdout)
    decision = json.loads(document.stdout)
    instances = {o["instance"] for o in decision["observed"]}
    assert {ERASES_THE_LINE, NEW_LINE, OSC_TITLE} <= instances
    assert decision["passed"] is False and "\n" not in decision["message"]

    listing = on_a_terminal(seeded_url, "versions", "--app", "bugtracker")
    assert listing.exit_code == 0, listing.output
    assert_harmless(listing.stdout + listing.stderr)
    assert "\\x1b[1A" in listing.stdout and f"web-1\\n{FORGED}" in listing.stdout
    assert_harmless(echoed)  # `heartbeat` itself echoes the instance it was given


def test_terminal_safe_keeps_our_layout_and_shows_every_control_character() -> None:
    assert terminal_safe("a\n\tb") == "a\n\tb"
    assert terminal_safe("\x1b[2J\r\x00\x07\x08\x7f\x9b\x85") == (
        "\\x1b[2J\\r\\x00\\x07\\x08\\x7f\\x9b\\x85"
    )
    # Unicode that moves text: bidi override ("Trojan Source"), line separator
    assert terminal_safe("ok\u202etxt.exe\u2028x") == "ok\\u202etxt.exe\\u2028x"
    assert terminal_safe("naïve — 100 % “quoted” 日本") == "naïve — 100 % “quoted” 日本"
    assert one_line("a\nb\tc\rd") == "a\\nb\\tc\\rd"


def test_progress_escapes_control_characters_and_rich_markup() -> None:
    from rich.console import Console

    result = JobResult(name="[bold red]x\x1b[2J", kind="sql", status="done", rows=1)
    stream = io.StringIO()
    BarProgress(Console(file=stream, force_terminal=True, color_system=None)).job_finished(result)
    assert "job [bold red]x\\x1b[2J: 1 row written" in stream.getvalue()
    assert "\x1b[2J" not in stream.getvalue()
    lines = io.StringIO()
    LogProgress(lines).job_finished(result)
    assert lines.getvalue().startswith("job [bold red]x\\x1b[2J: 1 row written")
