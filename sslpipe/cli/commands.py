"""The ``python -m sslpipe`` commands: their table, and a parser whose usage errors are one line.

:data:`EVERY_COMMAND` is the one list of every command (name, the module whose ``main(argv)``
runs it, a one-line summary): :data:`RUN`, the pipeline runner (``python execute.py``), and
:data:`COMMANDS`, those beside the pipelines. ``python -m sslpipe --help`` prints it without
importing those modules; each module's parser takes its commands' help from it
(:func:`summary`), and a test checks that the table and the modules' parsers name the same
commands.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "python -m sslpipe"


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # its ``main(argv)`` runs the command, ``argv`` starting with the name
    group: str  # heading in ``python -m sslpipe --help``
    summary: str  # one line: the command's help in every listing
    tracking_uri: bool = False  # takes ``--tracking-uri`` (also before the command name)
    entry: str = "main"  # the module's function that runs it, given ``argv``


PIPELINES = "pipelines"
MODELS = "registered models (MLflow registry)"
CATALOG = "the catalog (metadata and blob stores)"
LABEL_STUDIO = "Label Studio"

COMMANDS: tuple[Command, ...] = (
    Command(
        "promote",
        "sslpipe.cli.models",
        MODELS,
        "set an alias (default: production) on a model version",
        tracking_uri=True,
    ),
    Command(
        "predict",
        "sslpipe.cli.models",
        MODELS,
        "label every image in a folder with a registered classifier",
        tracking_uri=True,
    ),
    Command(
        "embed",
        "sslpipe.cli.models",
        MODELS,
        "embeddings of every image in a folder with a registered backbone",
        tracking_uri=True,
    ),
    Command(
        "ingest",
        "sslpipe.cli.data",
        CATALOG,
        "load a folder of images and a JSON-lines file of documents into the stores",
    ),
    Command(
        "install-udf",
        "sslpipe.cli.data",
        CATALOG,
        "create or update the Cosmos DB UDF filterDocumentsByLabels (the seed's filter)",
    ),
    Command(
        "sync-labels",
        "sslpipe.cli.labelstudio",
        LABEL_STUDIO,
        "set the documents' labels from a Label Studio project's annotations",
    ),
    Command(
        "push-predictions",
        "sslpipe.cli.labelstudio",
        LABEL_STUDIO,
        "a registered classifier's predictions into a project as pre-annotations",
        tracking_uri=True,
    ),
)
RUN = Command(
    "run",
    "sslpipe.cli.pipelines",
    PIPELINES,
    "run a pipeline locally or on Azure ML (what `python execute.py` runs)",
    entry="run_command",
)
EVERY_COMMAND: tuple[Command, ...] = (*COMMANDS, RUN)
BY_NAME = {command.name: command for command in EVERY_COMMAND}


def summary(name: str) -> str:
    """The one-line description of command ``name``."""
    return BY_NAME[name].summary


def command_parser(
    commands: Any,  # what ``add_subparsers`` returned
    name: str,
    *,
    examples: tuple[str, ...] = (),
    notes: str = "",
    parents: tuple[argparse.ArgumentParser, ...] = (),
) -> argparse.ArgumentParser:
    """Add command ``name`` to ``commands``: its summary is the help in the listing and the
    description of ``python -m sslpipe NAME --help``, followed by its examples."""
    sections = ["\n".join(["examples:", *(f"  {e}" for e in examples)])] if examples else []
    epilog = "\n\n".join([*sections, *([notes] if notes else [])])
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary(name),
        description=f"{summary(name)}.",
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=list(parents),
    )
    return parser


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE``: the layered configuration of every command
    that reads one (:func:`sslpipe.core.config.load_config`)."""
    parser.add_argument("--config", type=Path, help="a YAML configuration file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one configuration key (repeatable), e.g. stores.metadata_uri=cosmos://…",
    )
