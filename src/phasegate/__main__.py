"""`python -m phasegate` runs the CLI."""

from phasegate.cli import main

main()
