"""Another session's query, without its literals: what phasegate may show and store.

When a lock wait runs out, phasegate names the sessions that blocked it, with their
query from pg_stat_activity. That text is someone else's and may hold secrets in its
literals (`... WHERE api_key = 'sk_live_...'`), and phasegate keeps its errors for ever
in the ledger. PostgreSQL's own lexer (pglast.parser.scan) finds the constants, which
become `$1`, `$2` ... as in pg_stat_statements; comments go too. The rest stays as
written, so the statement is still recognisable.

Text the lexer cannot read to the end (pg_stat_activity cuts a query at
track_activity_query_size, maybe inside a string) keeps only the whole tokens before the
place it stopped, then `…`. No character of the input reaches the output except as part
of a token the lexer read completely and did not classify as a constant or comment.
"""

from __future__ import annotations

import re

from pglast.parser import ParseError, Token, scan

_CONSTANTS = {"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"}
_COMMENTS = {"SQL_COMMENT", "C_COMMENT"}
# what pg_stat_activity shows instead of a query: no literal in it
_PLACEHOLDER = re.compile(r"<[a-z ]+>")
# `SET name TO value` and `ALTER ROLE|DATABASE|SYSTEM ... SET name = value`: the value may
# be a bare word (an identifier to the lexer), and a setting can hold a secret
_SETTING_STATEMENTS = ("SET", "ALTER")
_MAX_ATTEMPTS = 20
NOT_SHOWN = "(query not shown: it could not be read without its literals)"


def without_literals(query: str | None, limit: int = 300) -> str | None:
    """`query` with every constant replaced by `$n` and comments dropped, at most `limit`
    characters long; None stays None."""
    if query is None:
        return None
    text = query.strip()
    if not text or _PLACEHOLDER.fullmatch(text):
        return text
    end, cut = len(text), False
    for _ in range(_MAX_ATTEMPTS):  # each attempt reads a shorter prefix
        try:
            tokens = scan(text[:end])
            break
        except ParseError as exc:
            location = exc.args[1] if len(exc.args) > 1 else None
            if not isinstance(location, int) or not 0 <= location < end:
                return NOT_SHOWN
            end, cut = location, True
        except Exception:  # whatever else the lexer says: show nothing rather than guess
            return NOT_SHOWN
    else:
        return NOT_SHOWN
    shown = (_rebuild(text, tokens) + (" …" if cut else "")).lstrip()
    return shown if len(shown) <= limit else shown[: limit - 1].rstrip() + "…"


def _rebuild(text: str, tokens: list[Token]) -> str:
    """The tokens as written, one space where the text had whitespace or a comment."""
    params = [int(text[t.start + 1 : t.end + 1]) for t in tokens if t.name == "PARAM"]
    number = max(params, default=0)
    pieces: list[str] = []
    statement: list[str] = []  # the token names of the statement so far
    hide_rest = False
    previous_end = 0
    for token in tokens:
        if token.name in _COMMENTS:
            continue
        if token.start > previous_end and pieces:
            pieces.append(" ")
        previous_end = token.end + 1
        word = text[token.start : token.end + 1]
        if word == ";":
            statement, hide_rest = [], False
            pieces.append(word)
            continue
        statement.append(word.upper())
        hidden = hide_rest and token.name != "PARAM" and not token.name.startswith("ASCII_")
        if token.name in _CONSTANTS or hidden:
            number += 1
            pieces.append(f"${number}")
        else:
            pieces.append(word)
        if statement[0] in _SETTING_STATEMENTS and word.upper() in ("=", "TO"):
            hide_rest = "SET" in statement  # the value after SET name = / TO
    return "".join(pieces)
