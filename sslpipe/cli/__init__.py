"""The command line: ``python -m sslpipe COMMAND`` (the ``sslpipe`` script) runs every command.

``python -m sslpipe --help`` lists every command with a one-line description (the table is
:data:`sslpipe.cli.commands.EVERY_COMMAND`); ``python -m sslpipe COMMAND --help`` describes
one. Each command is run by a function of its module (``main(argv)``, ``argv`` starting with
the command's name):

- pipelines (sslpipe/cli/pipelines.py): ``run``, the runner behind ``python execute.py``
- models (sslpipe/cli/models.py): ``promote``, ``predict``, ``embed``
- the catalog (sslpipe/cli/data.py): ``ingest``, ``install-udf``
- Label Studio (sslpipe/cli/labelstudio.py): ``sync-labels``, ``push-predictions``

The Azure ML components' entry points parse their flags with sslpipe/cli/component.py.
This module imports only the standard library, so that ``--help`` and the components start
fast; a command's module is imported when it runs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence

from sslpipe.cli.commands import (
    BY_NAME,
    EVERY_COMMAND,
    PROG,
    RUN,
    Command,
)
from sslpipe.core.arguments import OneLineErrorParser

TRACKING_URI = "--tracking-uri"


def _listing() -> str:
    width = max(len(command.name) for command in EVERY_COMMAND) + 2
    lines = ["commands:"]
    # The pipelines first: the project's main command.
    for group in dict.fromkeys([RUN.group, *(command.group for command in EVERY_COMMAND)]):
        lines.append(f"  {group}:")
        lines += [
            f"    {command.name:<{width}}{command.summary}"
            for command in EVERY_COMMAND
            if command.group == group
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options before COMMAND (the command's own arguments go to its module's parser)."""
    takers = ", ".join(c.name for c in EVERY_COMMAND if c.tracking_uri)
    parser = OneLineErrorParser(
        prog=PROG,
        usage=f"{PROG} [-h] [{TRACKING_URI} URI] COMMAND [ARGUMENTS ...]",
        description="Run a pipeline (`run`, as `python execute.py` does), or work with its "
        "models, catalog and labels.\n\n" + _listing(),
        epilog=f"`{PROG} COMMAND --help` describes one command: its arguments and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        TRACKING_URI,
        metavar="URI",
        help=f"the MLflow registry of {takers} (also accepted after the command)",
    )
    return parser


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` cut before the command name: the options before it and the rest."""
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        index += 2 if argv[index] == TRACKING_URI else 1
    return list(argv[:index]), list(argv[index:])


def _unknown(name: str) -> str:
    names = [command.name for command in EVERY_COMMAND]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown command '{name}'{hint}. The commands are: {', '.join(names)}"


def _command_argv(command: Command, rest: list[str], tracking_uri: str | None) -> list[str]:
    if tracking_uri is None:
        return [command.name, *rest]
    if command.module == "sslpipe.cli.models":
        return [TRACKING_URI, tracking_uri, command.name, *rest]
    # After the name, so that a --tracking-uri given after it too (later) wins, as it does above.
    return [command.name, TRACKING_URI, tracking_uri, *rest]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m sslpipe`` with ``argv`` (default: the process's arguments)."""
    parser = build_parser()
    head, rest = _split(sys.argv[1:] if argv is None else argv)
    options = parser.parse_args(head)  # --help, a bad option: printed, exits
    if not rest:
        parser.error(f"no command given. The commands are: {', '.join(BY_NAME)}")
    name, *arguments = rest
    command = BY_NAME.get(name)
    if command is None:
        parser.error(_unknown(name))
    if options.tracking_uri is not None and not command.tracking_uri:
        parser.error(
            f"{TRACKING_URI} applies to "
            f"{', '.join(c.name for c in EVERY_COMMAND if c.tracking_uri)}, not to {name}"
        )
    run = getattr(importlib.import_module(command.module), command.entry)
    code: int = run(_command_argv(command, arguments, options.tracking_uri))
    return code
