"""``python -m sslpipe``: work with registered models (promote, predict, embed).

Examples::

    python -m sslpipe promote image-classifier@candidate            # -> @production
    python -m sslpipe promote image-classifier/3 --alias staging
    python -m sslpipe predict image-classifier@production photos/ --output predictions.csv
    python -m sslpipe embed moco-backbone photos/ --output embeddings.npz

Models are referred to as ``name`` (latest version), ``name/3`` or ``name@alias``. The registry
is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the workspace's
``sqlite:///.sslpipe/mlflow.db``.

Exit codes: 0 success; 1 nothing could be predicted or embedded, or the registry failed; 2 a
bad reference, folder or argument. Errors are one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sslpipe.cli.commands import PROG, command_parser
from sslpipe.core.arguments import OneLineErrorParser
from sslpipe.models.serving.blob_predictions import CHUNK

DEFAULT_TRACKING_URI = "sqlite:///.sslpipe/mlflow.db"
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
EPILOG = """\
examples:
  python -m sslpipe promote image-classifier@candidate            # -> @production
  python -m sslpipe promote image-classifier/3 --alias staging
  python -m sslpipe predict image-classifier@production photos/ --output predictions.csv
  python -m sslpipe embed moco-backbone photos/ --output embeddings.npz

exit codes: 0 success, 1 nothing could be predicted or embedded, 2 bad reference or argument
"""
REFERENCES = """\
models: name (latest version), name/3 or name@alias; registry: --tracking-uri, else
$MLFLOW_TRACKING_URI, else sqlite:///.sslpipe/mlflow.db
exit codes: 0 success, 1 nothing could be predicted or embedded, 2 bad reference or argument"""


class UsageError(Exception):
    """A bad argument: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    common = OneLineErrorParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        default=argparse.SUPPRESS,
        help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or "
        f"{DEFAULT_TRACKING_URI})",
    )
    parser = OneLineErrorParser(
        prog=PROG,
        description="Promote registered models, predict labels and compute embeddings.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    promote = command_parser(
        commands,
        "promote",
        parents=(common,),
        examples=(
            f"{PROG} promote image-classifier@candidate            # -> @production",
            f"{PROG} promote image-classifier/3 --alias staging",
        ),
        notes=REFERENCES,
    )
    promote.add_argument("model", metavar="MODEL_REF", help="name, name/3 or name@alias")
    promote.add_argument("--alias", default="production", help="alias to set (production)")

    predict = command_parser(
        commands,
        "predict",
        parents=(common,),
        examples=(f"{PROG} predict image-classifier@production photos/ --output predictions.csv",),
        notes=REFERENCES,
    )
    predict.add_argument("model", metavar="MODEL_REF", help="registered classifier")
    predict.add_argument("input", metavar="INPUT_FOLDER", type=Path, help="searched recursively")
    predict.add_argument(
        "--output",
        type=Path,
        default=Path("predictions.csv"),
        help="CSV: path, label, confidence, probabilities (JSON), error",
    )

    embed = command_parser(
        commands,
        "embed",
        parents=(common,),
        examples=(f"{PROG} embed moco-backbone photos/ --output embeddings.npz",),
        notes=REFERENCES,
    )
    embed.add_argument("model", metavar="BACKBONE_REF", help="registered backbone")
    embed.add_argument("input", metavar="INPUT_FOLDER", type=Path, help="searched recursively")
    embed.add_argument(
        "--output",
        type=Path,
        default=Path("embeddings.npz"),
        help="npz: paths (N,), embeddings (N, D) float32, L2-normalised",
    )
    return parser


def tracking_uri(args: argparse.Namespace) -> str:
    uri: str = (
        getattr(args, "tracking_uri", None)
        or os.environ.get("MLFLOW_TRACKING_URI")
        or DEFAULT_TRACKING_URI
    )
    if uri.startswith("sqlite:///"):
        # Opening a missing sqlite file would silently create an empty registry.
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise UsageError(
                f"no MLflow store at {path} ({uri}); pass --tracking-uri or set MLFLOW_TRACKING_URI"
            )
    return uri


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by suffix), sorted; hidden files skipped."""
    if not folder.is_dir():
        raise UsageError(f"input folder {folder} does not exist or is not a folder")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _relative(paths: Sequence[Path], folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in paths]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_promote(args: argparse.Namespace) -> int:
    from sslpipe.models.registry import promote

    result = promote(args.model, alias=args.alias)
    moved = (
        f" (was version {result['previous']})"
        if result["previous"] not in (None, result["version"])
        else ""
    )
    print(f"{result['uri']} -> {result['name']} version {result['version']}{moved}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from sslpipe.core.io import write_csv
    from sslpipe.models.registry import load_classifier
    from sslpipe.models.serving.classifier import PROB_PREFIX

    files = image_files(args.input)
    model = load_classifier(args.model)
    frames = [
        model.predict([str(p) for p in files[start : start + CHUNK]])
        for start in range(0, len(files), CHUNK)
    ]
    result = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["label", "confidence", "error"])
    )
    prob_columns = [c for c in result.columns if c.startswith(PROB_PREFIX)]
    probabilities = [
        None
        if error is not None
        else json.dumps({c.removeprefix(PROB_PREFIX): float(row[c]) for c in prob_columns})
        for (_, row), error in zip(result.iterrows(), result["error"], strict=True)
    ]
    table = pd.DataFrame(
        {
            "path": _relative(files, args.input),
            "label": result["label"].tolist(),
            "confidence": result["confidence"].tolist(),
            "probabilities": probabilities,
            "error": result["error"].tolist(),
        },
        columns=["path", "label", "confidence", "probabilities", "error"],
    )
    write_csv(args.output, table)
    failed = int(table["error"].notna().sum())
    for path, error in zip(table["path"], table["error"], strict=True):
        if error is not None and not pd.isna(error):
            _say(f"warning: {path}: {error}")
    _say(
        f"predicted {len(table) - failed} of {len(table)} images with {args.model}"
        f"{f' ({failed} unreadable)' if failed else ''}: {args.output}"
    )
    if len(table) == failed:
        _say(f"error: no image could be predicted in {args.input}")
        return 1
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from sslpipe.core.io import atomic_path
    from sslpipe.models.registry import load_embedder
    from sslpipe.models.serving.classifier import describe_error
    from sslpipe.models.serving.embedder import to_pil

    files = image_files(args.input)
    model = load_embedder(args.model)
    kept: list[Path] = []
    vectors: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            vectors.append(np.asarray(model.predict(batch), dtype=np.float32))
            batch.clear()

    for path in files:
        try:
            pixels = np.asarray(to_pil(path))
        except Exception as err:  # any unreadable file is skipped, the others go on
            _say(f"warning: {path.relative_to(args.input).as_posix()}: {describe_error(err)}")
            continue
        batch.append(pixels)
        kept.append(path)
        if len(batch) == CHUNK:
            flush()
    flush()
    if not kept:
        _say(f"error: no image could be embedded in {args.input}")
        return 1
    embeddings = np.concatenate(vectors).astype(np.float32)
    with atomic_path(args.output) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            paths=np.array(_relative(kept, args.input), dtype=str),
            embeddings=embeddings,
            root=np.array(str(args.input.resolve())),
            model=np.array(args.model),
        )
    _say(
        f"embedded {len(kept)} of {len(files)} images with {args.model}: "
        f"{embeddings.shape} float32 -> {args.output}"
    )
    return 0


COMMANDS: dict[str, Any] = {"promote": cmd_promote, "predict": cmd_predict, "embed": cmd_embed}


def _quiet_predict_hint() -> None:
    """Drop MLflow's advice to add type hints to ``predict`` (the models take no hints on
    purpose). MLflow re-enables its own UserWarnings with ``simplefilter("once")`` around that
    check, so a filter cannot silence it; the display hook can."""
    show = warnings.showwarning

    def showwarning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if "type hints to the `predict` method" not in str(message):
            show(message, category, *args, **kwargs)

    warnings.showwarning = showwarning


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_predict_hint()
    try:
        uri = tracking_uri(args)
        import mlflow

        from sslpipe.models.registry import ModelReferenceError

        mlflow.set_tracking_uri(uri)
        try:
            code: int = COMMANDS[args.command](args)
        except ModelReferenceError as err:
            raise UsageError(str(err)) from None
        except mlflow.exceptions.MlflowException as err:  # e.g. the store is unreachable
            _say(f"error: {' '.join(err.message.split())}")
            return 1
        return code
    except UsageError as err:
        _say(f"error: {' '.join(str(err).split())}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
