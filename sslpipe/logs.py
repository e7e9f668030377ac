"""Logging for steps: plain lines on stdout that the executor prefixes with the step name.

Commands whose stdout is a machine-readable report (``python -m sslpipe ingest`` and friends)
call :func:`log_to_stderr` first, so that their log lines never mix into the report.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def _configure(stream: TextIO) -> None:
    root = logging.getLogger("sslpipe")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_FORMAT)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    if not logging.getLogger("sslpipe").handlers:
        _configure(sys.stdout)
    return logging.getLogger(f"sslpipe.{name}")


def log_to_stderr() -> None:
    """Send the library's log lines to stderr (for commands that print a report on stdout)."""
    _configure(sys.stderr)
