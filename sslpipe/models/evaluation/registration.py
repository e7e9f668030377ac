"""Registering an evaluated classifier: run parameters and metrics, the model version with its
lineage tags, and the ``candidate`` alias when the quality gate passed (the MLflow registry)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslpipe.models.evaluation.metrics import CANDIDATE_ALIAS
from sslpipe.models.evaluation.report import BASELINES, Baseline, json_inline
from sslpipe.models.registry import (
    ModelReferenceError,
    parse_reference,
    register_classifier,
    set_alias,
)
from sslpipe.models.training import tracking

_MAX_TAG = 5000  # MLflow tag values are limited in length (5000 characters on older stores)


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json_inline(value)
    return text if len(text) <= _MAX_TAG else text[: _MAX_TAG - 1] + "…"


def _backbone_reference(lineage: dict[str, Any]) -> dict[str, str]:
    """``backbone.name`` / ``backbone.version`` (and ``uri``, ``source``, ``kind``) from the
    classifier's lineage: a ``backbone`` dict (classifier_train's form), a reference string,
    or ``backbone_name`` + ``backbone_version`` keys."""
    found: dict[str, str] = {}
    source = lineage.get("backbone")
    if isinstance(source, dict):
        for key in ("name", "version", "uri", "source", "kind"):
            if source.get(key) is not None:
                found[key] = str(source[key])
    elif isinstance(source, str):
        try:
            name, version, alias = parse_reference(source.removeprefix("models:/"))
        except ModelReferenceError:
            found["name"] = source  # e.g. "torchvision:resnet18"
        else:
            found["name"] = name
            if version or alias:
                found["version"] = version or f"@{alias}"
    for key in ("name", "version", "uri"):
        value = lineage.get(f"backbone_{key}")
        if value is not None:
            found[key] = str(value)
    return {f"backbone.{k}": v for k, v in found.items()}


def _metric_key(label: str) -> str:
    return re.sub(r"[^\w\-./ ]", "_", label)


def version_tags(
    *, metrics: dict[str, Any], gate: dict[str, Any], data: dict[str, Any], model: dict[str, Any]
) -> dict[str, str]:
    lineage = model.get("lineage") or {}
    tags = {f"lineage.{k}": _tag_value(v) for k, v in lineage.items() if v is not None}
    tags.update(_backbone_reference(lineage))
    tags.update(
        {
            "model.architecture": _tag_value(model["backbone"]),
            "model.classes": _tag_value(metrics["classes"]),
            "model.image_size": str(model["image_size"]),
            "data.split_counts": _tag_value(data["split_counts"]),
            "data.num_test": str(metrics["num_images"]),
            "test.macro_f1": f"{metrics['macro_f1']:.6f}",
            "test.weighted_f1": f"{metrics['weighted_f1']:.6f}",
            "test.accuracy": f"{metrics['accuracy']:.6f}",
            "gate.min_macro_f1": str(gate["min_macro_f1"]),
            "gate.passed": str(gate["passed"]).lower(),
        }
    )
    if data.get("filter") is not None:
        tags["data.filter"] = _tag_value(data["filter"])
    if data.get("label_level") is not None:
        tags["data.label_level"] = str(data["label_level"])
    return tags


def run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_weighted_f1": metrics["weighted_f1"],
        "test_macro_precision": metrics["macro_avg"]["precision"],
        "test_macro_recall": metrics["macro_avg"]["recall"],
    }
    for label, m in metrics["per_class"].items():
        out[f"test_f1.{_metric_key(label)}"] = m["f1"]
    return out


def register_evaluation(
    run: tracking.TrackingRun,
    *,
    model_dir: Path,
    model_name: str,
    metrics: dict[str, Any],
    gate: dict[str, Any],
    data: dict[str, Any],
    model: dict[str, Any],
    baselines: Sequence[Baseline],
) -> dict[str, Any]:
    """In ``run``: log parameters and metrics, register the classifier with lineage
    tags, and set the ``candidate`` alias when the gate passed."""
    run.log_params(
        {
            "model_name": model_name,
            "min_macro_f1": gate["min_macro_f1"],
            "num_test": metrics["num_images"],
            **{key: "" for key, _, _ in BASELINES},
            **{b.key: str(b.dir) for b in baselines},
        }
    )
    run.log_metrics(run_metrics(metrics))
    registered = register_classifier(
        model_dir,
        name=model_name,
        tags=version_tags(metrics=metrics, gate=gate, data=data, model=model),
        description=(
            f"{model['backbone'].get('name', 'image')} classifier, {len(metrics['classes'])} "
            f"classes; test macro-F1 {metrics['macro_f1']:.4f}, accuracy {metrics['accuracy']:.4f}"
        ),
    )
    alias = None
    if gate["passed"]:
        set_alias(model_name, registered["version"], CANDIDATE_ALIAS)
        alias = CANDIDATE_ALIAS
    run.set_tags({"gate.passed": str(gate["passed"]).lower(), "registered.uri": registered["uri"]})
    return {**registered, "alias": alias}
