"""evaluate: test metrics of a classifier, a report, registration and the quality gate.

Inputs:
    model      a classifier folder (``sslpipe.classifier/v1``: classifier.pt, classifier.json)
    data       a labelled data_prep folder (manifest.csv with a ``split`` column, labels.json,
               selection.json); only the ``test`` split is used
    baseline          optional: the seed's baseline's evaluate output folder (the same
                      network, random init, frozen, head only), compared in the report
    baseline_scratch  optional: the stronger baseline's evaluate output folder (the same
                      network trained from scratch with the labels, two-stage)
Outputs (``output_dir``):
    metrics.json               per-class precision/recall/F1/support, macro and weighted
                               averages, accuracy, confusion matrix, gate decision, lineage,
                               and each baseline's headline numbers (``baseline``,
                               ``baseline_scratch``; None when not given)
    classification_report.csv  the same table as scikit-learn's classification report
    predictions.csv            one row per test image: id, path, label, predicted, confidence
    confusion_matrix.png       counts, true classes on rows, predicted classes on columns
    report.md                  data, model lineage, the table, the gate decision (and one
                               comparison table: a column per model, given baselines only)
    registered_model.json      {name, version, uri, run_id, alias} when registered

When classifier_train skipped training (the retraining guard left ``skipped.json`` instead of
a classifier), the output is that ``skipped.json`` and a ``report.md`` that says so; nothing is
evaluated or registered, and the registered version stays.

Every number comes from scikit-learn (``classification_report(output_dict=True,
zero_division=0)`` and ``confusion_matrix``), so the metrics equal scikit-learn's by
construction. The quality gate decides the ``candidate`` alias; it never fails the step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from sslpipe import tracking
from sslpipe.config import EvaluateConfig
from sslpipe.io import atomic_open, atomic_path, read_csv, read_json, write_csv, write_json
from sslpipe.logs import get_logger
from sslpipe.registry import (
    ModelReferenceError,
    parse_reference,
    register_classifier,
    set_alias,
)
from sslpipe.retrain_guard import SKIPPED_FILE, read_skipped

log = get_logger("evaluate")

CANDIDATE_ALIAS = "candidate"
OUTPUT_FILES = (
    "metrics.json",
    "classification_report.csv",
    "predictions.csv",
    "confusion_matrix.png",
    "report.md",
)
_DEFAULTS = EvaluateConfig()
_MAX_TAG = 5000  # MLflow tag values are limited in length (5000 characters on older stores)

# evaluate's baseline inputs in report order: (input / metrics.json key, column title, short name)
BASELINES = (
    ("baseline", "random init, frozen, head only (the seed's baseline)", "seed's baseline"),
    ("baseline_scratch", "from scratch, two-stage (supervised)", "from scratch"),
)


@dataclass(frozen=True)
class Baseline:
    """A baseline's evaluation, read from its evaluate output folder."""

    key: str  # the evaluate input and metrics.json key: "baseline" or "baseline_scratch"
    title: str  # its column in the report
    short: str  # its name in the difference column
    dir: Path
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- metrics


def compute_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]
) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, macro and weighted averages, accuracy and
    the confusion matrix (rows: true class, columns: predicted class), from scikit-learn.

    Raises:
        ValueError: no samples, lengths differ, or a label is not one of ``classes``.
    """
    labels = [str(c) for c in classes]
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no test images to evaluate")
    for name, values in (("true", y_true), ("predicted", y_pred)):
        unknown = sorted(set(values) - set(labels))
        if unknown:
            raise ValueError(
                f"{name} label(s) {unknown} are not among the classifier's classes {labels}"
            )
    report = classification_report(
        list(y_true), list(y_pred), labels=labels, output_dict=True, zero_division=0
    )

    def row(entry: dict[str, Any]) -> dict[str, Any]:
        return {
            "precision": float(entry["precision"]),
            "recall": float(entry["recall"]),
            "f1": float(entry["f1-score"]),
            "support": int(entry["support"]),
        }

    matrix = confusion_matrix(list(y_true), list(y_pred), labels=labels)
    macro, weighted = row(report["macro avg"]), row(report["weighted avg"])
    return {
        "classes": labels,
        "num_images": len(y_true),
        "per_class": {label: row(report[label]) for label in labels},
        "accuracy": float(report["accuracy"]),
        "macro_avg": macro,
        "weighted_avg": weighted,
        "macro_f1": macro["f1"],
        "weighted_f1": weighted["f1"],
        "confusion_matrix": matrix.tolist(),
    }


def report_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """scikit-learn's classification-report layout: one row per class, then accuracy (F1
    column, total support), macro avg and weighted avg."""
    rows = [
        (label, m["precision"], m["recall"], m["f1"], m["support"])
        for label, m in metrics["per_class"].items()
    ]
    rows.append(("accuracy", None, None, metrics["accuracy"], metrics["num_images"]))
    for name, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        m = metrics[key]
        rows.append((name, m["precision"], m["recall"], m["f1"], m["support"]))
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1-score", "support"])


def plot_confusion_matrix(path: Path, matrix: Sequence[Sequence[int]], classes: list[str]) -> None:
    """Counts in cells, true classes on the rows, predicted classes on the columns."""
    counts = np.asarray(matrix, dtype=int)
    side = max(4.0, 0.6 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (test split)")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                color="white" if counts[i, j] > threshold else "black",
            )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- inputs


def load_test_split(data_dir: Path) -> pd.DataFrame:
    """The manifest rows of the test split (each image once)."""
    manifest = read_csv(data_dir / "manifest.csv", required=("id", "path", "label", "split"))
    test = manifest[manifest["split"] == "test"].drop_duplicates(subset="id")
    if test.empty:
        counts = manifest["split"].value_counts().to_dict()
        raise ValueError(
            f"{data_dir / 'manifest.csv'}: no images in the test split (splits: {counts}); "
            "give the test split a share (labels.split) or pin test images"
        )
    unlabelled = int((test["label"] == "").sum())
    if unlabelled:
        raise ValueError(f"{data_dir / 'manifest.csv'}: {unlabelled} test image(s) have no label")
    return test.reset_index(drop=True)


def _split_counts(data_dir: Path) -> dict[str, int]:
    manifest = read_csv(data_dir / "manifest.csv", required=("id", "split"))
    unique = manifest.drop_duplicates(subset="id")
    return {str(k): int(v) for k, v in unique["split"].value_counts().sort_index().items()}


def _optional_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def load_baselines(dirs: dict[str, Path | None]) -> list[Baseline]:
    """The given baselines (``dirs``: input name -> folder or None), in report order."""
    unknown = set(dirs) - {key for key, _, _ in BASELINES}
    if unknown:
        raise ValueError(f"unknown baseline input(s) {sorted(unknown)}")
    return [
        Baseline(key, title, short, Path(folder), load_baseline(Path(folder)))
        for key, title, short in BASELINES
        if (folder := dirs.get(key)) is not None
    ]


def load_baseline(baseline_dir: Path) -> dict[str, Any]:
    path = baseline_dir / "metrics.json"
    if not path.is_file():
        raise ValueError(
            f"baseline {baseline_dir} is not an evaluate output folder: metrics.json is missing"
        )
    baseline: dict[str, Any] = read_json(path)
    missing = [k for k in ("per_class", "macro_f1", "weighted_f1", "accuracy") if k not in baseline]
    if missing:
        raise ValueError(f"baseline {path}: missing {missing}; was it written by evaluate?")
    return baseline


# --------------------------------------------------------------------------- report


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _diff(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "—"
    return f"{value - baseline:+.4f}"


def _json_inline(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def gate_sentence(gate: dict[str, Any], registered: dict[str, Any] | None) -> str:
    comparison = ">=" if gate["passed"] else "<"
    head = (
        f"test macro-F1 {gate['macro_f1']:.4f} {comparison} min_macro_f1 {gate['min_macro_f1']:.4f}"
    )
    if registered is None:
        action = "registration disabled: no model version registered, no alias set"
    elif gate["passed"]:
        action = (
            f"alias `{CANDIDATE_ALIAS}` set on `{registered['name']}` version "
            f"{registered['version']}"
        )
    else:
        action = (
            f"`{registered['name']}` version {registered['version']} registered WITHOUT the "
            f"`{CANDIDATE_ALIAS}` alias"
        )
    return f"{'PASSED' if gate['passed'] else 'NOT PASSED'}: {head}; {action}"


def render_report(
    *,
    metrics: dict[str, Any],
    gate: dict[str, Any],
    registered: dict[str, Any] | None,
    data: dict[str, Any],
    model: dict[str, Any],
    baselines: Sequence[Baseline] = (),
) -> str:
    lines = ["# Classifier evaluation", ""]
    lines += ["## Quality gate", "", f"**{gate_sentence(gate, registered)}**", ""]

    lines += ["## Data", ""]
    lines.append(f"- folder: `{data['dir']}`")
    lines.append(f"- test images evaluated: {metrics['num_images']}")
    if data["skipped"]:
        lines.append(f"- test images skipped (unreadable): {len(data['skipped'])}")
    lines.append(f"- split sizes: {_json_inline(data['split_counts'])}")
    if data.get("label_level") is not None:
        lines.append(f"- label level: {data['label_level']}")
    if data.get("filter") is not None:
        lines.append(f"- filter: `{_json_inline(data['filter'])}`")
    lines.append("")

    lines += ["## Model", ""]
    lines.append(f"- folder: `{model['dir']}`")
    lines.append(
        f"- architecture: {model['backbone'].get('name')}"
        f"{' (small stem)' if model['backbone'].get('small_stem') else ''}, "
        f"image size {model['image_size']} px, {len(metrics['classes'])} classes"
    )
    if registered is not None:
        lines.append(f"- registered: `{registered['uri']}` (MLflow run `{registered['run_id']}`)")
    lineage = model.get("lineage") or {}
    if lineage:
        lines += ["", "| lineage | value |", "|---|---|"]
        for key, value in lineage.items():
            shown = value if isinstance(value, str) else _json_inline(value)
            lines.append(f"| {_cell(key)} | {_cell(shown)} |")
    lines.append("")

    lines += ["## Test metrics", ""]
    lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for _, r in report_table(metrics).iterrows():
        name = _cell(r["class"])
        if name in {"accuracy", "macro avg", "weighted avg"}:
            name = f"**{name}**"
        precision = None if pd.isna(r["precision"]) else float(r["precision"])
        recall = None if pd.isna(r["recall"]) else float(r["recall"])
        lines.append(
            f"| {name} | {_num(precision)} | {_num(recall)} | {_num(float(r['f1-score']))} "
            f"| {int(r['support'])} |"
        )
    lines += ["", f"Accuracy: **{metrics['accuracy']:.4f}** on {metrics['num_images']} images.", ""]
    lines += ["![confusion matrix](confusion_matrix.png)", ""]

    if baselines:
        lines += _comparison(metrics, model, baselines)
    return "\n".join(lines)


def _model_title(model: dict[str, Any]) -> str:
    """The evaluated model's column: a classifier on a pre-trained (MoCo) backbone, or not."""
    backbone = (model.get("lineage") or {}).get("backbone")
    kind = backbone.get("kind") if isinstance(backbone, dict) else None
    source = backbone.get("source") if isinstance(backbone, dict) else backbone
    random_init = kind == "torchvision" or str(source or "").startswith("torchvision:")
    return "this model" if random_init else "MoCo classifier"


def _comparison(
    metrics: dict[str, Any], model: dict[str, Any], baselines: Sequence[Baseline]
) -> list[str]:
    """One table, a column per model (this one, then each baseline) and, after each baseline,
    this model's difference to it; per-class F1, macro F1, weighted F1 and accuracy."""
    ours_title = _model_title(model)
    heading = (
        "Comparison with the baselines" if len(baselines) > 1 else "Comparison with the baseline"
    )
    lines = [f"## {heading}", ""]
    lines.append(f"- {ours_title}: `{model['dir']}`" + _model_notes({"model": model}))
    for b in baselines:
        lines.append(f"- {b.title}: `{b.dir}`" + _model_notes(b.metrics))
    header = ["metric", ours_title]
    for b in baselines:
        header += [b.title, f"difference ({ours_title} − {b.short})"]
    lines += [
        "",
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]

    def row(title: str, ours: float | None, theirs: list[float | None]) -> str:
        cells = [title, _num(ours) or "—"]
        for value in theirs:
            cells += [_num(value) or "—", _diff(ours, value)]
        return "| " + " | ".join(cells) + " |"

    names = list(metrics["per_class"])
    for b in baselines:
        names += [c for c in b.metrics.get("per_class", {}) if c not in names]
    for label in names:
        ours = metrics["per_class"].get(label, {}).get("f1")
        theirs = [b.metrics.get("per_class", {}).get(label, {}).get("f1") for b in baselines]
        lines.append(row(f"F1 {_cell(label)}", ours, theirs))
    for title, key in (
        ("**macro F1**", "macro_f1"),
        ("**weighted F1**", "weighted_f1"),
        ("**accuracy**", "accuracy"),
    ):
        lines.append(row(title, metrics[key], [b.metrics.get(key) for b in baselines]))
    lines.append("")
    return lines


def _model_notes(evaluation: dict[str, Any]) -> str:
    """What a compared model was (from its evaluate metrics.json): its registered URI, its
    backbone and its training mode, when it recorded them."""
    notes = []
    registered = evaluation.get("registered") or {}
    if registered.get("uri"):
        notes.append(f"`{registered['uri']}`")
    lineage = (evaluation.get("model") or {}).get("lineage") or {}
    backbone = lineage.get("backbone")
    source = backbone.get("source") if isinstance(backbone, dict) else backbone
    if source:
        notes.append(f"backbone `{source}`")
    if lineage.get("mode"):
        notes.append(f"mode `{lineage['mode']}`")
    return f" ({', '.join(notes)})" if notes else ""


# --------------------------------------------------------------------------- MLflow


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else _json_inline(value)
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


# --------------------------------------------------------------------------- the step


def run_evaluate(
    *,
    model_dir: Path,
    data_dir: Path,
    output_dir: Path,
    min_macro_f1: float = _DEFAULTS.min_macro_f1,
    model_name: str = _DEFAULTS.model_name,
    baseline_dir: Path | None = None,
    baseline_scratch_dir: Path | None = None,
    register: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate the classifier on the test split, write the report, register and gate it.

    ``baseline_dir`` (the seed's baseline: random init, frozen, head only) and
    ``baseline_scratch_dir`` (from scratch, two-stage) are other evaluate output folders; each
    one given gets a column in the report's comparison table.

    Returns:
        ``{"metrics", "gate", "registered"}``; ``registered`` is None when ``register`` is
        false, else ``{name, version, uri, run_id, alias}`` (alias None below the gate).
    """
    model_dir, data_dir, output_dir = Path(model_dir), Path(data_dir), Path(output_dir)
    skipped_training = read_skipped(model_dir)
    if skipped_training is not None:
        return _report_skipped_training(output_dir, skipped_training)
    if register:
        try:
            parse_reference(f"{model_name}/1")
        except ModelReferenceError:
            raise ValueError(
                f"model_name {model_name!r} is not a valid registered model name "
                "(letters, digits, '_', '-', '.'; starting with a letter or digit)"
            ) from None
    baselines = load_baselines({"baseline": baseline_dir, "baseline_scratch": baseline_scratch_dir})
    # Imported here: defining the serving classes makes MLflow warn about type hints.
    from sslpipe.serving.classifier import ClassifierPredictor

    predictor = ClassifierPredictor.from_dir(model_dir, batch_size=batch_size)
    config = predictor.config
    test = load_test_split(data_dir)
    labels_json = _optional_json(data_dir / "labels.json") or {}
    selection = _optional_json(data_dir / "selection.json") or {}
    if labels_json.get("classes") and set(labels_json["classes"]) != set(predictor.classes):
        log.warning(
            "the data's classes %s differ from the classifier's %s",
            labels_json["classes"],
            predictor.classes,
        )
    log.info(
        "evaluating %s on %d test images of %s (%d classes)",
        model_dir,
        len(test),
        data_dir,
        len(predictor.classes),
    )

    probs, errors = predictor.predict_proba([data_dir / p for p in test["path"]])
    predictions = predictor.frame(probs, errors)
    readable = predictions["error"].isna().to_numpy()
    skipped = [
        {"id": i, "path": p, "error": e}
        for i, p, e, ok in zip(test["id"], test["path"], errors, readable, strict=True)
        if not ok
    ]
    for row in skipped:
        log.warning("skipped unreadable test image %s: %s", row["path"], row["error"])
    y_true = list(test["label"][readable])
    y_pred = [str(p) for p in predictions["label"][readable]]
    metrics = compute_metrics(y_true, y_pred, predictor.classes)
    metrics["skipped"] = skipped

    passed = metrics["macro_f1"] >= min_macro_f1
    gate = {"min_macro_f1": float(min_macro_f1), "macro_f1": metrics["macro_f1"], "passed": passed}
    data = {
        "dir": str(data_dir),
        "split_counts": _split_counts(data_dir),
        "label_level": labels_json.get("level"),
        "filter": selection.get("filter"),
        "skipped": skipped,
    }
    model = {
        "dir": str(model_dir),
        "backbone": config.get("backbone", {}),
        "image_size": config.get("image_size"),
        "lineage": config.get("lineage") or {},
    }

    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(output_dir / "classification_report.csv", report_table(metrics))
    write_csv(
        output_dir / "predictions.csv",
        pd.DataFrame(
            {
                "id": test["id"],
                "path": test["path"],
                "label": test["label"],
                "predicted": predictions["label"],
                "confidence": predictions["confidence"],
                "error": predictions["error"],
            }
        ),
    )
    plot_confusion_matrix(
        output_dir / "confusion_matrix.png", metrics["confusion_matrix"], metrics["classes"]
    )
    log.info(
        "test accuracy %.4f, macro-F1 %.4f, weighted-F1 %.4f on %d images",
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["weighted_f1"],
        metrics["num_images"],
    )

    registered: dict[str, Any] | None = None
    if register:
        tracker = tracking.MlflowTracker()  # the registry is MLflow's
        tracker.configure()
        with tracker.start_run(run_name="evaluate", tags={"sslpipe.step": "evaluate"}) as run:
            registered = _register(
                run,
                model_dir=model_dir,
                model_name=model_name,
                metrics=metrics,
                gate=gate,
                data=data,
                model=model,
                baselines=baselines,
            )
            _write_outputs(output_dir, metrics, gate, registered, data, model, baselines)
            for name in OUTPUT_FILES:
                run.log_artifact(output_dir / name, artifact_path="evaluation")
        log.info("registered %s (version %s)", registered["uri"], registered["version"])
    else:
        _write_outputs(output_dir, metrics, gate, None, data, model, baselines)

    sentence = gate_sentence(gate, registered)
    if passed:
        log.info("quality gate %s", sentence)
    else:
        log.warning("quality gate %s", sentence)
    return {"metrics": metrics, "gate": gate, "registered": registered}


def _report_skipped_training(output_dir: Path, skipped: dict[str, Any]) -> dict[str, Any]:
    """The outputs of an evaluation without a new model: the guard's record and a report."""
    previous = skipped.get("previous") or {}
    kept = f"`{previous['uri']}`" if previous.get("uri") else "the registered version"
    write_json(output_dir / SKIPPED_FILE, skipped)
    with atomic_open(output_dir / "report.md") as f:
        f.write(
            "# Classifier evaluation\n\n"
            f"**Training skipped: {_cell(skipped['reason'])}.** Nothing was evaluated or "
            f"registered; {kept} stays the latest version.\n"
        )
    log.info("nothing to evaluate: training was skipped (%s)", skipped["reason"])
    return {"metrics": None, "gate": None, "registered": None, "skipped": skipped["reason"]}


def _write_outputs(
    output_dir: Path,
    metrics: dict[str, Any],
    gate: dict[str, Any],
    registered: dict[str, Any] | None,
    data: dict[str, Any],
    model: dict[str, Any],
    baselines: Sequence[Baseline],
) -> None:
    given = {b.key: b for b in baselines}
    summary = {
        **metrics,
        "gate": gate,
        "registered": registered,
        "data": {k: v for k, v in data.items() if k != "skipped"},
        "model": model,
        **{
            key: (
                {
                    "dir": str(given[key].dir),
                    "macro_f1": given[key].metrics["macro_f1"],
                    "weighted_f1": given[key].metrics["weighted_f1"],
                    "accuracy": given[key].metrics["accuracy"],
                }
                if key in given
                else None
            )
            for key, _, _ in BASELINES
        },
    }
    write_json(output_dir / "metrics.json", summary)
    report = render_report(
        metrics=metrics,
        gate=gate,
        registered=registered,
        data=data,
        model=model,
        baselines=baselines,
    )
    with atomic_open(output_dir / "report.md") as f:
        f.write(report)
    if registered is not None:
        write_json(output_dir / "registered_model.json", registered)


def _register(
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
