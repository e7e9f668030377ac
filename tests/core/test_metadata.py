"""Metadata documents: validated one by one, bad ones reported with a short stable reason."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sslpipe.core.metadata import Annotation, ImageDocument, describe_invalid, validate_document

SEED_DOCUMENT: dict[str, Any] = {
    "id": "0b9a.jpeg",
    "uri_orig": "catalog/0b9a.jpeg",
    "file_hash": "abc123",
    "text": None,
    "is_blurred": False,
    "resolution_width": 640,
    "sortout": "Keep",
    "sortout_testset": False,
    "has_imagerecognition_labels": True,
    "labels_with_taxonomy": [
        {"annotator_id": 701, "taxonomy": [["Even", "4"]], "created_at": "2024-01-01"},
        {"annotator_id": "anna@example.com", "taxonomy": [["Even", "4"], ["Even", "6"]]},
    ],
    "total_annotations": 2,
    "has_review": True,
}


def test_a_seed_document_validates_and_keeps_the_fields_the_pipeline_reads() -> None:
    document, reason = validate_document(SEED_DOCUMENT)
    assert reason is None and document is not None
    assert document.id == "0b9a.jpeg"
    assert document.file_hash == "abc123"
    assert document.is_blurred is False and document.has_review is True
    assert document.sortout == "Keep"
    assert document.labels_with_taxonomy[1].taxonomy == [("Even", "4"), ("Even", "6")]


def test_integer_and_text_annotator_ids_both_become_text() -> None:
    document = ImageDocument.model_validate(SEED_DOCUMENT)
    assert document.annotator_ids == {"701", "anna@example.com"}


def test_a_minimal_document_is_just_an_id() -> None:
    document, reason = validate_document({"id": "x"})
    assert reason is None and document is not None
    assert document.labels_with_taxonomy == [] and document.annotator_ids == set()
    assert document.is_blurred is None and document.sortout is None


def test_null_labels_mean_no_labels() -> None:
    document, _ = validate_document({"id": "x", "labels_with_taxonomy": None})
    assert document is not None and document.labels_with_taxonomy == []


def test_unknown_fields_are_ignored() -> None:
    document, reason = validate_document({"id": "x", "face_rects": [[1, 2, 3, 4]], "new": {}})
    assert reason is None and document is not None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({}, "invalid:id"),
        ({"id": ""}, "invalid:id"),
        ({"id": 5}, "invalid:id"),
        ({"id": None}, "invalid:id"),
        ({"id": "x", "is_blurred": "maybe"}, "invalid:is_blurred"),
        ({"id": "x", "is_blurred": 1}, "invalid:is_blurred"),
        ({"id": "x", "is_blurred": "true"}, "invalid:is_blurred"),
        ({"id": "x", "has_review": "yes"}, "invalid:has_review"),
        ({"id": "x", "sortout": 3}, "invalid:sortout"),
        ({"id": "x", "total_annotations": "many"}, "invalid:total_annotations"),
        ({"id": "x", "labels_with_taxonomy": "Even/4"}, "invalid:labels_with_taxonomy"),
        (
            {"id": "x", "labels_with_taxonomy": [{"taxonomy": [["A"]]}]},
            "invalid:labels_with_taxonomy",
        ),
        (
            {"id": "x", "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": [[]]}]},
            "invalid:labels_with_taxonomy",
        ),
        (
            {"id": "x", "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": [["A", ""]]}]},
            "invalid:labels_with_taxonomy",
        ),
        (
            {"id": "x", "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": "A/B"}]},
            "invalid:labels_with_taxonomy",
        ),
        (
            {"id": "x", "labels_with_taxonomy": [{"annotator_id": True, "taxonomy": []}]},
            "invalid:labels_with_taxonomy",
        ),
        (
            {"id": "x", "labels_with_taxonomy": [{"annotator_id": "", "taxonomy": []}]},
            "invalid:labels_with_taxonomy",
        ),
        ([{"id": "x"}], "invalid:not_an_object"),
        (None, "invalid:not_an_object"),
        ("x", "invalid:not_an_object"),
    ],
)
def test_an_invalid_document_gives_a_short_reason_naming_the_field(raw: Any, reason: str) -> None:
    assert validate_document(raw) == (None, reason)


def test_describe_invalid_is_one_line_with_the_id_and_the_nested_field() -> None:
    raw = {"id": "x.jpeg", "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": [["A", ""]]}]}
    message = describe_invalid(raw)
    assert message.startswith("document 'x.jpeg': field 'labels_with_taxonomy.0.taxonomy': ")
    assert "empty level" in message and "\n" not in message


def test_describe_invalid_without_an_id_or_an_object() -> None:
    assert describe_invalid({}).startswith("document None: field 'id': ")
    assert describe_invalid(["x"]).startswith("document None:")


def test_describe_invalid_of_a_valid_document_says_valid() -> None:
    assert describe_invalid(SEED_DOCUMENT) == "valid"


def test_an_annotation_refuses_a_boolean_annotator() -> None:
    with pytest.raises(ValidationError, match="annotator_id must be a non-empty string or integer"):
        Annotation.model_validate({"annotator_id": False})


def test_documents_are_frozen() -> None:
    document = ImageDocument.model_validate(SEED_DOCUMENT)
    with pytest.raises(ValidationError, match="frozen"):
        document.id = "y"  # type: ignore[misc]
