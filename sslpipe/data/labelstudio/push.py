"""Classifier predictions -> Label Studio pre-annotations (predictions of type ``taxonomy``).

A prediction row (``id``, ``label``, ``confidence``, ``error``: the registered classifier's
output, :mod:`sslpipe.models.serving.classifier`, with the image id added) goes to every task
showing that image (the task -> image id rule of :mod:`sslpipe.data.labelstudio.tasks`). Its label
is a taxonomy path cut at the classifier's level and joined with ``/`` (:mod:`sslpipe.data.labels`),
so ``"Even/4"`` becomes the path ``["Even", "4"]``; its confidence becomes the score.

Per ``model_version`` a task holds one prediction: a task that already has exactly this
prediction is left alone (``unchanged``), otherwise the new one is created and the earlier
ones of the same ``model_version`` are deleted (``replaced``). Predictions of other model
versions are never touched. New predictions are created before old ones are deleted, so a
failure in between leaves duplicates that the next push removes, never a task without one.

Rows are skipped, per reason, when the image could not be read (``error``), have no label
(``no_label``) or a label whose levels are not choices of the project's taxonomy
(``not_in_taxonomy``; checked when the labeling config lists its choices).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from sslpipe.data.labels import LABEL_SEPARATOR
from sslpipe.data.labelstudio.client import NOTHING_CHANGED, LabelStudioClient
from sslpipe.data.labelstudio.tasks import DEFAULT_IMAGE_ID_FIELD, task_image_id, tasks_by_image

PUSH_SKIP_REASONS = ("error", "no_label", "not_in_taxonomy")
CREATE_BATCH = 500  # predictions per import request


class PushError(ValueError):
    """The predictions or the project cannot be pushed; the message says which and why."""


@dataclass(frozen=True)
class TaxonomyControl:
    """The project's Taxonomy tag: its name, the object it labels and its choices (empty when
    they are loaded from elsewhere, e.g. ``apiUrl``)."""

    from_name: str
    to_name: str
    choices: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PredictionRow:
    image_id: str
    label: str | None
    score: float | None
    error: str | None


@dataclass(frozen=True)
class SkippedPrediction:
    image_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class PushReport:
    """What a push did, per task: ``created`` (no earlier prediction of this model version),
    ``replaced``, ``unchanged``; ``deleted``: earlier predictions removed; ``unmatched``: image
    ids of rows that no task shows."""

    project_id: int
    model_version: str
    tasks: int
    predictions: int
    created: int = 0
    replaced: int = 0
    unchanged: int = 0
    deleted: int = 0
    unmatched: list[str] = field(default_factory=list)
    skipped: list[SkippedPrediction] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data, with the counts of unmatched and skipped rows per reason."""
        counts = Counter(s.reason for s in self.skipped)
        return {
            **asdict(self),
            "unmatched_count": len(self.unmatched),
            "skipped_by_reason": {r: counts.get(r, 0) for r in PUSH_SKIP_REASONS},
        }


@dataclass
class _Plan:
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[int] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    unmatched: list[str] = field(default_factory=list)
    skipped: list[SkippedPrediction] = field(default_factory=list)


# --- the project's taxonomy tag ----------------------------------------------------------------


def taxonomy_control(project: Mapping[str, Any], *, name: str | None = None) -> TaxonomyControl:
    """The project's Taxonomy control (the one named ``name``, or the only one).

    Raises:
        PushError: the project has no Taxonomy control, several and no ``name``, or not ``name``.
    """
    tags = project.get("parsed_label_config") or {}
    found = {
        tag_name: tag
        for tag_name, tag in tags.items()
        if isinstance(tag, Mapping) and tag.get("type") == "Taxonomy"
    }
    where = f"project {project.get('id')} ({project.get('title')!r})"
    if name is not None and name not in found:
        raise PushError(f"{where} has no Taxonomy control named {name!r}; it has {sorted(found)}")
    if name is None and len(found) != 1:
        raise PushError(
            f"{where} has {len(found)} Taxonomy controls in its labeling config "
            f"({sorted(found)}); expected one" + ("; pass its name" if found else "")
        )
    tag_name = name or next(iter(found))
    tag = found[tag_name]
    to_names = tag.get("to_name") or []
    if not to_names:
        raise PushError(f"{where}: the Taxonomy control {tag_name!r} labels no object (toName)")
    return TaxonomyControl(tag_name, str(to_names[0]), frozenset(tag.get("labels") or []))


def label_path(label: str) -> list[str]:
    """``"Even/4"`` -> ``["Even", "4"]`` (the classifier's label is a path joined with ``/``)."""
    return label.split(LABEL_SEPARATOR)


def prediction_result(control: TaxonomyControl, path: Sequence[str]) -> list[dict[str, Any]]:
    """The ``result`` of a taxonomy prediction choosing ``path``."""
    return [
        {
            "from_name": control.from_name,
            "to_name": control.to_name,
            "type": "taxonomy",
            "value": {"taxonomy": [list(path)]},
        }
    ]


# --- prediction rows ---------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return str(value)


def _score(value: Any) -> float | None:
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(score) else score


def prediction_rows(predictions: pd.DataFrame) -> list[PredictionRow]:
    """The rows of a predictions table: image ids from ``id`` (else the last component of
    ``path``, as ``python -m sslpipe predict`` writes), ``label``, optional ``confidence`` and
    ``error``.

    Raises:
        PushError: a column is missing or an image id repeats.
    """
    columns = set(predictions.columns)
    if "label" not in columns or not columns & {"id", "path"}:
        raise PushError(
            f"predictions need an 'id' (image id) or 'path' column and a 'label' column; "
            f"found {sorted(map(str, columns))}"
        )
    if "id" in columns:
        ids = [str(v) for v in predictions["id"]]
    else:
        ids = [str(v).replace("\\", "/").rpartition("/")[2] for v in predictions["path"]]
    repeated = sorted({i for i, n in Counter(ids).items() if n > 1})
    if repeated:
        raise PushError(f"predictions repeat image ids: {repeated[:5]}")
    n = len(predictions)
    scores = predictions["confidence"] if "confidence" in columns else [None] * n
    errors = predictions["error"] if "error" in columns else [None] * n
    return [
        PredictionRow(image_id, _text(label), _score(score), _text(error))
        for image_id, label, score, error in zip(
            ids, predictions["label"], scores, errors, strict=True
        )
    ]


def _skip(row: PredictionRow, control: TaxonomyControl) -> SkippedPrediction | None:
    if row.error is not None:
        return SkippedPrediction(row.image_id, "error", row.error)
    if row.label is None:
        return SkippedPrediction(row.image_id, "no_label")
    unknown = [level for level in label_path(row.label) if level not in control.choices]
    if control.choices and unknown:
        return SkippedPrediction(row.image_id, "not_in_taxonomy", f"{row.label!r}: {unknown}")
    return None


# --- the plan: what to create and delete -------------------------------------------------------


def _result_key(result: Any) -> list[tuple[Any, ...]]:
    return [
        (
            r.get("from_name"),
            r.get("to_name"),
            r.get("type"),
            json.dumps(r.get("value"), sort_keys=True),
        )
        for r in result or []
        if isinstance(r, Mapping)
    ]


def _same(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    old, new = existing.get("score"), wanted.get("score")
    same_score = (old is None and new is None) or (
        old is not None and new is not None and math.isclose(old, new, rel_tol=1e-9)
    )
    return same_score and _result_key(existing.get("result")) == _result_key(wanted["result"])


def plan_push(
    rows: Sequence[PredictionRow],
    groups: Mapping[str, Sequence[Mapping[str, Any]]],
    control: TaxonomyControl,
    model_version: str,
) -> _Plan:
    """Which predictions to create and delete so that each matched task holds exactly the
    row's prediction for ``model_version``."""
    plan = _Plan()
    for row in rows:
        skip = _skip(row, control)
        if skip is not None:
            plan.skipped.append(skip)
            continue
        if row.image_id not in groups:
            plan.unmatched.append(row.image_id)
            continue
        assert row.label is not None  # _skip checked it
        for task in groups[row.image_id]:
            wanted = {
                "task": int(task["id"]),
                "result": prediction_result(control, label_path(row.label)),
                "score": row.score,
                "model_version": model_version,
            }
            earlier = [
                p for p in task.get("predictions") or [] if p.get("model_version") == model_version
            ]
            if len(earlier) == 1 and _same(earlier[0], wanted):
                plan.outcomes["unchanged"] += 1
                continue
            plan.outcomes["replaced" if earlier else "created"] += 1
            plan.create.append(wanted)
            plan.delete.extend(int(p["id"]) for p in earlier)
    return plan


def _apply(client: LabelStudioClient, project_id: int, plan: _Plan) -> None:
    """Create the new predictions (in batches), then delete the earlier ones."""
    created = 0
    for start in range(0, len(plan.create), CREATE_BATCH):
        batch = plan.create[start : start + CREATE_BATCH]
        done = (
            NOTHING_CHANGED
            if created == 0
            else f"{created} of {len(plan.create)} new predictions were created; push again "
            "to finish"
        )
        created += client.import_predictions(project_id, batch, changed=done)
    for deleted, prediction_id in enumerate(plan.delete):
        done = (
            f"all {created} new predictions were created and {deleted} of the "
            f"{len(plan.delete)} earlier ones deleted; push again to finish"
        )
        client.delete_prediction(prediction_id, changed=done)


def push_predictions(
    client: LabelStudioClient,
    project_id: int,
    predictions: pd.DataFrame,
    *,
    model_version: str,
    image_id_field: str = DEFAULT_IMAGE_ID_FIELD,
    control: str | None = None,
) -> PushReport:
    """Make each task's prediction for ``model_version`` the one of its image's row.

    ``control`` names the Taxonomy tag when the labeling config has several. Returns the
    :class:`PushReport`.

    Raises:
        PushError: the table or the project's labeling config does not fit (nothing written).
        LabelStudioError: Label Studio cannot be reached or refuses; the message says what had
            been written.
    """
    if not model_version.strip():
        raise PushError("model_version must not be empty: it tells predictions of models apart")
    rows = prediction_rows(predictions)
    tag = taxonomy_control(client.project(project_id), name=control)
    tasks = client.tasks(project_id)
    groups, _ = tasks_by_image(tasks, image_id_field=image_id_field)
    plan = plan_push(rows, groups, tag, model_version)
    _apply(client, project_id, plan)
    return PushReport(
        project_id=project_id,
        model_version=model_version,
        tasks=len(tasks),
        predictions=len(rows),
        created=plan.outcomes["created"],
        replaced=plan.outcomes["replaced"],
        unchanged=plan.outcomes["unchanged"],
        deleted=len(plan.delete),
        unmatched=sorted(plan.unmatched),
        skipped=plan.skipped,
    )


# --- computing predictions for a project's images ----------------------------------------------


def project_image_ids(
    client: LabelStudioClient, project_id: int, *, image_id_field: str = DEFAULT_IMAGE_ID_FIELD
) -> list[str]:
    """The distinct image ids of the project's tasks, sorted (tasks without one left out)."""
    ids = {task_image_id(t, image_id_field=image_id_field) for t in client.tasks(project_id)}
    return sorted(i for i in ids if i is not None)
