"""Allow ``python -m autoseg``."""

from autoseg.cli import run

run()
