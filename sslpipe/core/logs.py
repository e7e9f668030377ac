"""Logging for steps: plain lines on stdout that the executor prefixes with the step name.

Commands whose stdout is a machine-readable report (``python -m sslpipe ingest`` and friends)
call :func:`log_to_stderr` first, so that their log lines never mix into the report.

:func:`quiet_third_party` turns down the INFO chatter of the libraries below us that says
nothing to the user (MLflow creating the tables of a new SQLite store, alembic's migrations);
their warnings and errors still come through.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
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


# Loggers whose INFO lines are housekeeping: the tables of a new MLflow SQLite store
# ("Creating initial MLflow database tables...", "Updating database tables") and alembic's
# migrations of it ("Context impl SQLiteImpl.", "Running upgrade ...").
QUIETED_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def quiet_third_party() -> None:
    """Show only warnings and errors of :data:`QUIETED_LOGGERS`.

    Call it after ``import mlflow``: older MLflow versions configure their loggers on import
    with ``dictConfig``, which resets the levels of the loggers below ``mlflow``.
    """
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    if not logging.getLogger("sslpipe").handlers:
        _configure(sys.stdout)
    return logging.getLogger(f"sslpipe.{name}")


def log_to_stderr() -> None:
    """Send the library's log lines to stderr (for commands that print a report on stdout)."""
    _configure(sys.stderr)


@contextlib.contextmanager
def quieted(logger: logging.Logger, level: int = logging.ERROR) -> Iterator[None]:
    """Show only ``level`` and above of ``logger`` (and the loggers below it) in this block."""
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
