"""The evaluation report: Markdown (data, model lineage, the metrics table, the gate decision,
the comparison with the baselines), the confusion-matrix figure, and the baselines read from
their evaluate output folders.

Files in, text and files out: nothing here needs a model registry or MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sslpipe.core.io import atomic_path, read_json
from sslpipe.models.evaluation.metrics import CANDIDATE_ALIAS, report_table

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


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _diff(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "—"
    return f"{value - baseline:+.4f}"


def json_inline(value: Any) -> str:
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
    lines.append(f"- split sizes: {json_inline(data['split_counts'])}")
    if data.get("label_level") is not None:
        lines.append(f"- label level: {data['label_level']}")
    if data.get("filter") is not None:
        lines.append(f"- filter: `{json_inline(data['filter'])}`")
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
            shown = value if isinstance(value, str) else json_inline(value)
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


def render_skipped_report(skipped: dict[str, Any]) -> str:
    """The report of an evaluation without a new model (the retraining guard skipped training)."""
    previous = skipped.get("previous") or {}
    kept = f"`{previous['uri']}`" if previous.get("uri") else "the registered version"
    return (
        "# Classifier evaluation\n\n"
        f"**Training skipped: {_cell(skipped['reason'])}.** Nothing was evaluated or "
        f"registered; {kept} stays the latest version.\n"
    )
