"""Test metrics of a classifier and the quality gate: pure functions of labels and predictions.

Every number comes from scikit-learn (``classification_report(output_dict=True,
zero_division=0)`` and ``confusion_matrix``), so the metrics equal scikit-learn's by
construction. The quality gate decides the ``candidate`` alias; it never fails the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

CANDIDATE_ALIAS = "candidate"
"""The alias a registered classifier gets when it passes the quality gate."""


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


def quality_gate(metrics: dict[str, Any], min_macro_f1: float) -> dict[str, Any]:
    """``{"min_macro_f1", "macro_f1", "passed"}``: passed when the test macro-F1 reaches
    ``min_macro_f1``."""
    passed = metrics["macro_f1"] >= min_macro_f1
    return {"min_macro_f1": float(min_macro_f1), "macro_f1": metrics["macro_f1"], "passed": passed}
