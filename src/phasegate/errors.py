"""Exceptions that carry the CLI exit code they map to.

The exit codes are a contract with deploy pipelines (see README):
0 done/pass, 1 refused, 2 usage or invalid plan, 3 database/runtime failure, 4 busy.
Keeping the code on the exception lets the core stay free of any CLI import.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_FAILURE = 3
EXIT_BUSY = 4


class PhasegateError(Exception):
    """Base class: a message for humans plus structured details for `--json`."""

    exit_code = EXIT_FAILURE
    kind = "failure"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.details}


class UsageError(PhasegateError):
    """The command line or a plan is wrong; nothing was touched."""

    exit_code = EXIT_USAGE
    kind = "usage"


class Refused(PhasegateError):
    """A gate or precondition said no; the database is unchanged by the refused step."""

    exit_code = EXIT_REFUSED
    kind = "refused"


class RuntimeFailure(PhasegateError):
    """The database or a migration failed; the ledger says where to resume."""

    exit_code = EXIT_FAILURE
    kind = "failure"


class Interrupted(RuntimeFailure):
    """A stop was asked for (SIGINT/SIGTERM): what was committed stays, resume later.

    Exit 3 like any failure, but reported as a stop, not as something that went wrong.
    """

    kind = "interrupted"


class Busy(PhasegateError):
    """Another orchestrator holds the advisory lock."""

    exit_code = EXIT_BUSY
    kind = "busy"


class Fenced(RuntimeFailure):
    """This process lost the orchestrator lock, or another run has begun since it started:
    it stops and writes nothing more (exit 3)."""

    kind = "fenced"


class SessionLost(RuntimeFailure):
    """The session's server connection is gone; a command never carries on on another."""

    kind = "database"
