"""``python -m sslpipe sync-labels | push-predictions``: Label Studio to and from the catalog.

Examples::

    python -m sslpipe sync-labels --project 3
    python -m sslpipe sync-labels --project 3 --metadata-uri sqlite:///data/metadata.db
    python -m sslpipe push-predictions --project 3 --model image-classifier@production

Label Studio is ``--url``, else ``$LABEL_STUDIO_URL``; its API token is always
``$LABEL_STUDIO_API_KEY`` (never a flag, so that it stays out of shell history and process
lists). The metadata and blob stores are ``--metadata-uri`` / ``--blob-uri``, else those of
the pipeline configuration (``--config``, defaults in sslpipe/core/config.py). The registry is
``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the configuration's.

The report is printed as JSON on stdout. Exit codes: 0 success; 1 Label Studio, a store or
the registry failed; 2 a bad argument, configuration, project config or model reference.
Errors are one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sslpipe.cli.commands import PROG, command_parser
from sslpipe.cli.models import UsageError
from sslpipe.core.arguments import OneLineErrorParser
from sslpipe.data.labelstudio.client import URL_ENV
from sslpipe.data.labelstudio.tasks import DEFAULT_IMAGE_ID_FIELD

EPILOG = """\
examples:
  python -m sslpipe sync-labels --project 3
  python -m sslpipe sync-labels --project 3 --metadata-uri sqlite:///data/metadata.db
  python -m sslpipe push-predictions --project 3 --model image-classifier@production

environment: LABEL_STUDIO_API_KEY (the API token, required), LABEL_STUDIO_URL (default --url)
exit codes: 0 success, 1 Label Studio, a store or the registry failed, 2 bad argument
"""
NOTES = EPILOG.split("\n\n", 1)[1].rstrip()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--url", help=f"Label Studio URL (default: ${URL_ENV})")
    parser.add_argument("--config", type=Path, help="pipeline configuration YAML for store URIs")
    parser.add_argument(
        "--image-id-field",
        default=DEFAULT_IMAGE_ID_FIELD,
        help="task data field holding the image id; tasks without it use the last path "
        "component of data.image (default: image_id)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=PROG,
        description="Sync Label Studio labels into the metadata store; push predictions back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    sync = command_parser(
        commands,
        "sync-labels",
        examples=(
            f"{PROG} sync-labels --project 3",
            f"{PROG} sync-labels --project 3 --metadata-uri sqlite:///data/metadata.db",
        ),
        notes=NOTES,
    )
    _common(sync)
    sync.add_argument("--metadata-uri", help="metadata store (default: the configuration's)")
    push = command_parser(
        commands,
        "push-predictions",
        examples=(f"{PROG} push-predictions --project 3 --model image-classifier@production",),
        notes=NOTES,
    )
    _common(push)
    push.add_argument("--model", required=True, metavar="MODEL_REF", help="name, name/3, name@a")
    push.add_argument("--blob-uri", help="blob store of the images (default: the configuration's)")
    push.add_argument("--tracking-uri", help="MLflow registry (default: $MLFLOW_TRACKING_URI)")
    push.add_argument(
        "--model-version",
        help="Label Studio model_version of the predictions (default: the resolved 'name/3')",
    )
    return parser


def _config(args: argparse.Namespace) -> Any:
    from sslpipe.core.config import load_config

    return load_config(args.config)


def _url(args: argparse.Namespace) -> str:
    url: str | None = args.url or os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"no Label Studio URL: pass --url or set {URL_ENV}")
    return url


def _existing_metadata_store(uri: str) -> str:
    """``uri``, refused when it is a SQLite file that does not exist (opening it would create
    an empty store, and every task would look unmatched)."""
    parsed = urlparse(uri)
    path = Path(unquote(parsed.netloc + parsed.path))
    if parsed.scheme == "sqlite" and not path.is_file():
        raise UsageError(f"no metadata store at {path} ({uri}); pass --metadata-uri or --config")
    return uri


def cmd_sync_labels(args: argparse.Namespace) -> dict[str, Any]:
    from sslpipe.data.labelstudio.client import connect
    from sslpipe.data.labelstudio.sync import sync_labels
    from sslpipe.stores import open_metadata_store

    uri = _existing_metadata_store(args.metadata_uri or _config(args).metadata_uri)
    client = connect(_url(args))
    with open_metadata_store(uri) as store:
        report = sync_labels(client, args.project, store, image_id_field=args.image_id_field)
    return report.to_dict()


def _tracking_uri(args: argparse.Namespace) -> str:
    """As ``python -m sslpipe predict``, with the configuration's registry as the default."""
    from sslpipe.cli.models import tracking_uri

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _config(args).tracking_uri
    return tracking_uri(argparse.Namespace(tracking_uri=uri))


def cmd_push_predictions(args: argparse.Namespace) -> dict[str, Any]:
    import mlflow

    from sslpipe.cli.models import _quiet_predict_hint
    from sslpipe.data.labelstudio.client import connect
    from sslpipe.data.labelstudio.push import project_image_ids, push_predictions
    from sslpipe.models.registry import resolve_version
    from sslpipe.models.serving.blob_predictions import predict_images

    _quiet_predict_hint()

    blob_uri = args.blob_uri or _config(args).blob_uri
    mlflow.set_tracking_uri(_tracking_uri(args))
    name, version = resolve_version(args.model)
    client = connect(_url(args))
    ids = project_image_ids(client, args.project, image_id_field=args.image_id_field)
    predictions = predict_images(f"{name}/{version}", ids, blob_uri)
    report = push_predictions(
        client,
        args.project,
        predictions,
        model_version=args.model_version or f"{name}/{version}",
        image_id_field=args.image_id_field,
    )
    return {"model": args.model, "model_uri": f"models:/{name}/{version}", **report.to_dict()}


COMMANDS = {"sync-labels": cmd_sync_labels, "push-predictions": cmd_push_predictions}


def _say_error(err: BaseException) -> None:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; prints its report as JSON and returns the exit code."""
    from sslpipe.core.logs import log_to_stderr
    from sslpipe.data.labelstudio.client import LabelStudioError
    from sslpipe.stores.base import StoreError

    args = build_parser().parse_args(argv)
    log_to_stderr()
    try:
        report = COMMANDS[args.command](args)
    # ConfigError, PushError, ModelReferenceError and a bad URL are ValueErrors.
    except (UsageError, ValueError) as err:
        _say_error(err)
        return 2
    except (LabelStudioError, StoreError) as err:
        _say_error(err)
        return 1
    except Exception as err:
        if not _is_registry_error(err):
            raise
        _say_error(err)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    return 0


def _is_registry_error(err: Exception) -> bool:
    """Whether MLflow raised it (e.g. the tracking store is unreachable)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and isinstance(err, mlflow.exceptions.MlflowException)


if __name__ == "__main__":
    sys.exit(main())
