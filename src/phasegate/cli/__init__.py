"""The command line: `cli` (the click group) and `main` (the entry point).

Importing the package registers every command on the group.
"""

from phasegate.cli import deploy, phases, read, versions  # noqa: F401 (they register commands)
from phasegate.cli.app import cli, main

__all__ = ["cli", "main"]
