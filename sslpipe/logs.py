"""Logging for steps: plain lines on stdout that the executor prefixes with the step name."""

from __future__ import annotations

import logging
import sys


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(f"sslpipe.{name}")
    if not logging.getLogger("sslpipe").handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root = logging.getLogger("sslpipe")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logger
