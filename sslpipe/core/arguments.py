"""A command-line parser whose usage errors are one line, for every command of the library."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad argument as ``error: ... (see PROG --help)`` on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
