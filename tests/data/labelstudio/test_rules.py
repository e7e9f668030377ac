"""The pure rules of the Label Studio sync and push (no server needed)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from sslpipe.core.metadata import validate_document
from sslpipe.data.labelstudio.push import (
    PredictionRow,
    PushError,
    TaxonomyControl,
    label_path,
    plan_push,
    prediction_result,
    prediction_rows,
    taxonomy_control,
)
from sslpipe.data.labelstudio.sync import image_labels, outcome
from sslpipe.data.labelstudio.tasks import task_image_id, tasks_by_image


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"image_id": "a.jpeg", "image": "https://x/other.jpeg"}, "a.jpeg"),
        ({"image_id": 17, "image": "https://x/other.jpeg"}, "17"),
        ({"image_id": "", "image": "https://x/images/b.jpeg"}, "b.jpeg"),
        (
            {"image": "https://acct.blob.core.windows.net/c/a%20b%C3%A4.jpeg?sv=1&sig=x"},
            "a bä.jpeg",
        ),
        ({"image": "azure-blob://images/x/y.jpeg"}, "y.jpeg"),
        ({"image": "s3://bucket/deep/key.png#frag"}, "key.png"),
        ({"image": "/data/local-files/?d=images/sub/z%201.jpeg"}, "z 1.jpeg"),
        ({"image": "/data/upload/1/8f2a11c3-y.jpeg"}, "8f2a11c3-y.jpeg"),
        ({"image": "https://x/images/"}, None),
        ({"image": ""}, None),
        ({"text": "no image"}, None),
        ({"image_id": True, "image": "https://x/t.jpeg"}, "t.jpeg"),
    ],
)
def test_the_task_image_id_rule(data: dict[str, Any], expected: str | None) -> None:
    assert task_image_id({"id": 1, "data": data}) == expected


def test_another_image_id_field_can_be_named() -> None:
    task = {"id": 1, "data": {"blob": "k.jpeg", "image": "https://x/other.jpeg"}}
    assert task_image_id(task, image_id_field="blob") == "k.jpeg"
    assert task_image_id(task) == "other.jpeg"


def test_tasks_are_grouped_by_image() -> None:
    tasks = [
        {"id": 1, "data": {"image_id": "a"}},
        {"id": 2, "data": {"image": "https://x/a"}},
        {"id": 3, "data": {"image": "https://x/"}},
    ]
    groups, without = tasks_by_image(tasks)
    assert {k: [t["id"] for t in v] for k, v in groups.items()} == {"a": [1, 2]}
    assert [t["id"] for t in without] == [3]


def annotation(user: Any, *paths: list[str], **extra: Any) -> dict[str, Any]:
    result = [{"type": "taxonomy", "value": {"taxonomy": [list(p) for p in paths]}}]
    return {"id": extra.pop("id", 1), "completed_by": user, "result": result, **extra}


def test_export_format_annotators_merge_across_tasks_and_sort() -> None:
    tasks = [
        {
            "id": 1,
            "annotations": [
                annotation({"id": 709, "email": "b@x"}, ["B", "y"], ["A"]),
                annotation(706, ["B", "y"]),
                annotation("ext@x", ["C"]),
            ],
        },
        {"id": 2, "annotations": [annotation(709, ["A"], ["A", "z"])]},
    ]
    labels, skipped = image_labels(tasks)
    assert labels.labels_with_taxonomy == [
        {"annotator_id": 706, "taxonomy": [["B", "y"]]},
        {"annotator_id": 709, "taxonomy": [["A"], ["A", "z"], ["B", "y"]]},
        {"annotator_id": "ext@x", "taxonomy": [["C"]]},
    ]
    assert (labels.total_annotations, labels.has_review, skipped) == (3, False, [])
    document = {"id": "x", **labels.fields()}
    assert validate_document(document)[1] is None


@pytest.mark.parametrize(
    ("annotations", "task_extra", "reviewed"),
    [
        ([annotation(1, ["A"], ground_truth=True)], {}, True),
        ([annotation(1, ["A"], reviews=[{"accepted": True}])], {}, True),
        ([annotation(1, ["A"], reviews=[{"accepted": False}])], {}, False),
        ([annotation(1, ["A"])], {"reviews_accepted": 1}, True),
        ([annotation(1, ["A"], ground_truth=True, was_cancelled=True)], {}, False),
        ([annotation(1, ["A"])], {}, False),
    ],
)
def test_what_counts_as_a_review(
    annotations: list[dict[str, Any]], task_extra: dict[str, Any], reviewed: bool
) -> None:
    labels, _ = image_labels([{"id": 1, "annotations": annotations, **task_extra}])
    assert labels.has_review is reviewed


def test_skipped_annotations_carry_their_reason() -> None:
    task = {
        "id": 5,
        "annotations": [
            annotation(1, ["A"], id=10, was_cancelled=True),
            annotation(None, ["A"], id=11),
            annotation(2, id=12),
            annotation(3, ["A", ""], id=13),  # an empty level is no path
            {"id": 14, "completed_by": 4, "result": [{"type": "choices", "value": {}}]},
        ],
    }
    labels, skipped = image_labels([task])
    assert labels.labels_with_taxonomy == []
    assert [(s.annotation_id, s.reason) for s in skipped] == [
        (10, "cancelled"),
        (11, "no_annotator"),
        (12, "no_taxonomy"),
        (13, "no_taxonomy"),
        (14, "no_taxonomy"),
    ]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({}, {"labels_with_taxonomy": [{"annotator_id": 1}]}, "created"),
        ({"labels_with_taxonomy": []}, {"labels_with_taxonomy": [1]}, "created"),
        ({"labels_with_taxonomy": [1]}, {"labels_with_taxonomy": [2]}, "updated"),
        ({"labels_with_taxonomy": [1]}, {"labels_with_taxonomy": []}, "updated"),
        ({}, {"labels_with_taxonomy": [], "total_annotations": 0, "has_review": False}, "updated"),
        (
            {"labels_with_taxonomy": [], "total_annotations": 0, "has_review": False},
            {"labels_with_taxonomy": [], "total_annotations": 0, "has_review": False},
            "unchanged",
        ),
    ],
)
def test_outcomes(before: dict[str, Any], after: dict[str, Any], expected: str) -> None:
    assert outcome(before, after) == expected


# --- push --------------------------------------------------------------------------------------

PROJECT: dict[str, Any] = {
    "id": 3,
    "title": "t",
    "parsed_label_config": {
        "taxonomy": {"type": "Taxonomy", "to_name": ["image"], "labels": ["Even", "2", "Odd"]},
        "other": {"type": "Choices", "to_name": ["image"], "labels": ["x"]},
    },
}


def test_the_taxonomy_control_is_found_or_refused() -> None:
    assert taxonomy_control(PROJECT) == TaxonomyControl(
        "taxonomy", "image", frozenset({"Even", "2", "Odd"})
    )
    with pytest.raises(PushError, match=r"project 3 \('t'\) has no Taxonomy control named 'x'"):
        taxonomy_control(PROJECT, name="x")
    two = {
        "id": 4,
        "parsed_label_config": {n: PROJECT["parsed_label_config"]["taxonomy"] for n in "ab"},
    }
    with pytest.raises(PushError, match=r"has 2 Taxonomy controls .*\['a', 'b'\].*pass its name"):
        taxonomy_control(two)


def test_prediction_rows_take_ids_or_paths_and_refuse_repeats() -> None:
    rows = prediction_rows(
        pd.DataFrame({"path": ["sub/a.jpeg", "b.jpeg"], "label": ["Even/2", None]})
    )
    assert rows == [
        PredictionRow("a.jpeg", "Even/2", None, None),
        PredictionRow("b.jpeg", None, None, None),
    ]
    with pytest.raises(PushError, match=r"need an 'id' .* found \['label', 'x'\]"):
        prediction_rows(pd.DataFrame({"x": [1], "label": ["a"]}))
    with pytest.raises(PushError, match=r"repeat image ids: \['a'\]"):
        prediction_rows(pd.DataFrame({"id": ["a", "a"], "label": ["x", "y"]}))


def test_the_plan_creates_replaces_and_leaves_alone() -> None:
    control = TaxonomyControl("taxonomy", "image", frozenset({"Even", "2", "Odd"}))
    same = {"id": 50, "model_version": "m", "score": 0.5, "result": []}
    rows = [
        PredictionRow("a", "Even/2", 0.5, None),
        PredictionRow("b", "Odd", 0.7, None),
        PredictionRow("c", "Odd", None, None),
        PredictionRow("gone", "Odd", 0.1, None),
        PredictionRow("bad", None, None, "OSError: truncated"),
        PredictionRow("blue", "Blue", 0.9, None),
    ]
    same["result"] = prediction_result(control, label_path("Even/2"))
    groups: dict[str, list[dict[str, Any]]] = {
        "a": [{"id": 1, "predictions": [same, {"id": 51, "model_version": "other"}]}],
        "b": [{"id": 2, "predictions": [{"id": 60, "model_version": "m", "score": 0.7}]}],
        "c": [
            {"id": 3},
            {
                "id": 4,
                "predictions": [{"id": 70, "model_version": "m"}, {"id": 71, "model_version": "m"}],
            },
        ],
    }
    plan = plan_push(rows, groups, control, "m")
    assert dict(plan.outcomes) == {"unchanged": 1, "replaced": 2, "created": 1}
    assert [p["task"] for p in plan.create] == [2, 3, 4]
    assert plan.delete == [60, 70, 71]
    assert plan.unmatched == ["gone"]
    assert [(s.image_id, s.reason) for s in plan.skipped] == [
        ("bad", "error"),
        ("blue", "not_in_taxonomy"),
    ]
