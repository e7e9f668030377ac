"""The retraining guard: skip a training step when nothing it learns from has changed.

A scheduled retraining run compares two fingerprints with the tags of the latest registered
version of the model it would produce:

    data   the prepared data: every manifest row's id, label, split and repeats, and a hash of
           the image file (so a re-uploaded image with new pixels counts as new data);
    setup  what else determines the model: the training settings and, for a classifier, the
           backbone it was trained on (a new backbone version means retraining).

Both equal: the step writes ``skipped.json`` instead of training and says why; the latest
version stays what downstream services load. Anything else (no registered version, a version
without the tags, a changed fingerprint) trains, and the new version carries both tags.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sslpipe.core.io import file_sha256, read_csv, read_optional_json, write_json

SKIPPED_FILE = "skipped.json"
DATA_TAG = "lineage.data_fingerprint"
SETUP_TAG = "lineage.setup_fingerprint"
_ROW_FIELDS = ("id", "label", "split", "repeats")


def data_fingerprint(data_dir: Path) -> str:
    """A hash of a data_prep output: ids, labels, splits, repeats and image contents.

    Independent of the manifest's row order, of its other columns (blob ETags, paths) and of
    when the images were fetched; 16 hex digits.

    Raises:
        ValueError: ``manifest.csv`` lacks the ``id`` or ``path`` column.
        FileNotFoundError: an image that the manifest lists is missing.
    """
    data_dir = Path(data_dir)
    manifest = read_csv(data_dir / "manifest.csv", required=("id", "path"))
    rows = []
    for record in manifest.to_dict("records"):
        fields = [str(record.get(name, "")) for name in _ROW_FIELDS]
        rows.append("\t".join([*fields, file_sha256(data_dir / str(record["path"]))]))
    digest = hashlib.sha256()
    for row in sorted(rows):
        digest.update(row.encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def setup_fingerprint(setup: Mapping[str, Any]) -> str:
    """A hash of the JSON-serialisable training setup (settings, backbone identity)."""
    text = json.dumps(setup, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class GuardDecision:
    """Whether to train, why, and the latest registered version it was compared with."""

    skip: bool
    reason: str
    data_fingerprint: str
    setup_fingerprint: str
    previous: dict[str, str] | None = None  # {name, version, uri} of the latest version


def _latest_version(model_name: str) -> Any:
    from sslpipe.models.registry import ModelReferenceError, resolve_version
    from sslpipe.models.training.tracking import require_mlflow

    mlflow = require_mlflow("the retraining guard (skip_unchanged)")
    try:
        name, version = resolve_version(model_name)
    except ModelReferenceError:
        return None
    return mlflow.MlflowClient().get_model_version(name, version)


def decide(model_name: str, *, data: str, setup: str) -> GuardDecision:
    """Compare the fingerprints with the latest version of ``model_name`` in the registry.

    The registry is wherever MLflow tracking points (call ``configure_tracking`` first).
    """
    latest = _latest_version(model_name)
    if latest is None:
        return GuardDecision(False, f"no registered version of {model_name!r} yet", data, setup)
    previous = {
        "name": str(latest.name),
        "version": str(latest.version),
        "uri": f"models:/{latest.name}/{latest.version}",
    }
    tags = dict(latest.tags or {})
    where = previous["uri"]
    if DATA_TAG not in tags or SETUP_TAG not in tags:
        reason = f"{where} records no fingerprints ({DATA_TAG}, {SETUP_TAG})"
        return GuardDecision(False, reason, data, setup, previous)
    changed = [
        f"{what} {tags[tag]} -> {now}"
        for what, tag, now in (("data", DATA_TAG, data), ("setup", SETUP_TAG, setup))
        if tags[tag] != now
    ]
    if changed:
        reason = f"changed since {where}: {'; '.join(changed)}"
        return GuardDecision(False, reason, data, setup, previous)
    reason = f"data {data} and setup {setup} unchanged since {where}"
    return GuardDecision(True, reason, data, setup, previous)


def write_skipped(model_dir: Path, decision: GuardDecision, *, step: str) -> None:
    """Mark ``model_dir`` as a skipped training: downstream steps read it with read_skipped."""
    write_json(Path(model_dir) / SKIPPED_FILE, {"step": step, **asdict(decision)})


def read_skipped(model_dir: Path) -> dict[str, Any] | None:
    """The skip record of a model folder, or None when the step trained."""
    record = read_optional_json(Path(model_dir) / SKIPPED_FILE)
    return record or None
