"""Allow ``python -m autoseg``."""

from autoseg.cli import main

raise SystemExit(main())
