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

The step composes :mod:`sslpipe.models.evaluation`: the metrics and the gate
(:mod:`~sslpipe.models.evaluation.metrics`, scikit-learn's numbers by construction), the report
(:mod:`~sslpipe.models.evaluation.report`) and registration
(:mod:`~sslpipe.models.evaluation.registration`). The quality gate decides the ``candidate`` alias;
it never fails the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sslpipe.core.config import EvaluateConfig
from sslpipe.core.io import atomic_open, read_csv, read_json, write_csv, write_json
from sslpipe.core.logs import get_logger
from sslpipe.models.evaluation.metrics import (
    CANDIDATE_ALIAS,
    compute_metrics,
    quality_gate,
    report_table,
)
from sslpipe.models.evaluation.registration import register_evaluation, run_metrics, version_tags
from sslpipe.models.evaluation.report import (
    BASELINES,
    Baseline,
    gate_sentence,
    load_baseline,
    load_baselines,
    plot_confusion_matrix,
    render_report,
    render_skipped_report,
)
from sslpipe.models.registry import ModelReferenceError, parse_reference
from sslpipe.models.training import tracking
from sslpipe.models.training.retrain_guard import SKIPPED_FILE, read_skipped

__all__ = [  # the step, and the parts it composes (importable from here as before)
    "BASELINES",
    "CANDIDATE_ALIAS",
    "OUTPUT_FILES",
    "Baseline",
    "compute_metrics",
    "gate_sentence",
    "load_baseline",
    "load_baselines",
    "load_test_split",
    "plot_confusion_matrix",
    "render_report",
    "report_table",
    "run_evaluate",
    "run_metrics",
    "version_tags",
]

log = get_logger("evaluate")

OUTPUT_FILES = (
    "metrics.json",
    "classification_report.csv",
    "predictions.csv",
    "confusion_matrix.png",
    "report.md",
)
_DEFAULTS = EvaluateConfig()


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
    from sslpipe.models.serving.classifier import ClassifierPredictor

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

    gate = quality_gate(metrics, min_macro_f1)
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
            registered = register_evaluation(
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
    if gate["passed"]:
        log.info("quality gate %s", sentence)
    else:
        log.warning("quality gate %s", sentence)
    return {"metrics": metrics, "gate": gate, "registered": registered}


def _report_skipped_training(output_dir: Path, skipped: dict[str, Any]) -> dict[str, Any]:
    """The outputs of an evaluation without a new model: the guard's record and a report."""
    write_json(output_dir / SKIPPED_FILE, skipped)
    with atomic_open(output_dir / "report.md") as f:
        f.write(render_skipped_report(skipped))
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
