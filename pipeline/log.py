"""Log lines for every splitexit process: a timestamp, a level and the module, on stderr.

    2026-11-26 03:24:28,123 INFO    pipeline.up: broker and 2 workers ready (1.2 s)

`splitexit -v` (debug) or `--log-level` sets the level, else SPLITEXIT_LOG_LEVEL, else info;
another name is an error (taken as info, a typo would hide the debug lines asked for).
`setup` writes the level back to the environment so that the processes a launcher spawns
log the same way (they call `setup()` first thing). Results a command is asked for (a
report, a table) are printed to stdout, not logged.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup", "LEVELS", "ENV"]

LEVELS = ("debug", "info", "warning", "error")
ENV = "SPLITEXIT_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(level: str | None = None) -> None:
    """Log at `level`, else $SPLITEXIT_LOG_LEVEL, else info; ValueError for another name."""
    source = "log level" if level else ENV
    given = level or os.environ.get(ENV) or "info"
    level = given.strip().lower()
    if level not in LEVELS:
        raise ValueError(f"{source} {given!r}: choose one of {', '.join(LEVELS)}")
    os.environ[ENV] = level
    logging.basicConfig(format=FORMAT, level=level.upper(), stream=sys.stderr, force=True)
