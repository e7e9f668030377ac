"""``python -m sslpipe ingest|install-udf``: load catalogs into the configured stores.

Examples::

    python -m sslpipe ingest --images photos/ --documents metadata.jsonl
    python -m sslpipe ingest --images photos/ --documents docs.jsonl --config my.yaml
    python -m sslpipe install-udf --config configs/azure.yaml

The stores are the configuration's (``stores.metadata_uri``, ``stores.blob_uri``; the embedded
default when unset), read with the same ``--config`` and ``--set`` layers as ``execute.py``.
Credentials come from the environment (``SSLPIPE_COSMOS_KEY``,
``AZURE_STORAGE_CONNECTION_STRING``, ...) or Azure identity.

Exit codes: 0 success; 1 a store failed or documents were skipped; 2 a bad argument or input
file. Errors are one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sslpipe.cli.commands import PROG, command_parser, config_arguments
from sslpipe.core.arguments import OneLineErrorParser
from sslpipe.core.config import ConfigError, PipelineConfig, load_config
from sslpipe.core.logs import log_to_stderr
from sslpipe.core.uris import redact_uri
from sslpipe.data.ingest import IngestError, ingest_folder
from sslpipe.stores import StoreError, open_blob_store, open_metadata_store

STORES = """\
stores: the configuration's stores.metadata_uri and stores.blob_uri (the embedded default in
.sslpipe/ when unset); credentials from the environment or Azure identity
exit codes: 0 success, 1 a store failed or documents were skipped, 2 bad argument or input"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    ingest = command_parser(
        commands,
        "ingest",
        examples=(
            f"{PROG} ingest --images photos/ --documents metadata.jsonl",
            f"{PROG} ingest --images photos/ --documents docs.jsonl --config my.yaml",
        ),
        notes=STORES,
    )
    ingest.add_argument("--images", type=Path, required=True, help="folder of image files")
    ingest.add_argument(
        "--documents",
        type=Path,
        required=True,
        help="JSON lines, one metadata document per image; its 'id' is the image's file name",
    )
    ingest.add_argument("--concurrency", type=int, default=16, help="parallel blob uploads")
    config_arguments(ingest)
    udf = command_parser(
        commands,
        "install-udf",
        examples=(f"{PROG} install-udf --config configs/azure.yaml",),
        notes=STORES,
    )
    config_arguments(udf)
    return parser


def _config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def cmd_ingest(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    config = _config(args)
    config.workspace_dir.mkdir(parents=True, exist_ok=True)
    with open_metadata_store(config.metadata_uri) as store:
        blobs = open_blob_store(config.blob_uri, create=True)
        report = ingest_folder(
            args.images, args.documents, store, blobs, concurrency=args.concurrency
        )
    summary = report.as_dict() | {
        "metadata_uri": redact_uri(config.metadata_uri),
        "blob_uri": redact_uri(config.blob_uri),
    }
    print(json.dumps(summary, indent=2))
    return 1 if report.skipped else 0


def cmd_install_udf(args: argparse.Namespace) -> int:
    from sslpipe.stores.cosmos import CosmosMetadataStore, install_udf

    config = _config(args)
    with open_metadata_store(config.metadata_uri) as store:
        if not isinstance(store, CosmosMetadataStore):
            raise ConfigError(
                f"install-udf needs a Cosmos DB metadata store (cosmos://…), "
                f"not {redact_uri(config.metadata_uri)}"
            )
        outcome = install_udf(store)
    print(f"filterDocumentsByLabels: {outcome} in {redact_uri(config.metadata_uri)}")
    return 0


COMMANDS = {"ingest": cmd_ingest, "install-udf": cmd_install_udf}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr()
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, IngestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
