"""The image filter: validation of its fields and its one-line command argument form."""

from __future__ import annotations

import json
import shlex

import pytest
from pydantic import ValidationError

from sslpipe.core.filters import ImageFilter, filter_argument, parse_taxonomy_path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("A", ("A",)),
        ("A/B", ("A", "B")),
        (["A", "B"], ("A", "B")),
        (("A", "B", "C"), ("A", "B", "C")),
        ("Bad & Wäsche/Geberit AquaClean", ("Bad & Wäsche", "Geberit AquaClean")),
    ],
)
def test_a_taxonomy_path_is_accepted_as_a_list_or_as_slash_separated_text(
    value: str | list[str], expected: tuple[str, ...]
) -> None:
    assert parse_taxonomy_path(value) == expected


@pytest.mark.parametrize("value", ["", "A//B", "/A", "A/", [], ["A", ""], ["A", "  "], ["A", 3]])
def test_an_empty_path_or_level_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="is empty or has an empty level"):
        parse_taxonomy_path(value)  # type: ignore[arg-type]


def test_the_default_filter_keeps_sharp_kept_images_of_any_labelling() -> None:
    image_filter = ImageFilter()
    assert image_filter.exclude_blurred is True
    assert image_filter.sortout == ["Keep"]
    assert image_filter.labelled == "any"
    assert image_filter.include_labels == [] and image_filter.exclude_labels == []
    assert image_filter.min_annotators == 0
    assert image_filter.require_review is False
    assert image_filter.limit is None
    assert image_filter.needs_labels is False


def test_label_filters_accept_lists_slash_text_a_single_path_and_null() -> None:
    image_filter = ImageFilter.model_validate(
        {"include_labels": ["Even/2", ["Odd"]], "exclude_labels": "Odd/3"}
    )
    assert image_filter.include_labels == [("Even", "2"), ("Odd",)]
    assert image_filter.exclude_labels == [("Odd", "3")]
    assert ImageFilter.model_validate({"include_labels": None}).include_labels == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"include_labels": 3}, "expected a list of taxonomy paths, found int"),
        ({"exclude_labels": ["Even//2"]}, "is empty or has an empty level"),
        ({"labelled": "maybe"}, "labelled"),
        ({"min_annotators": -1}, "greater than or equal to 0"),
        ({"limit": 0}, "greater than or equal to 1"),
        ({"exclude_blurry": True}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_filters_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ImageFilter.model_validate(data)


def test_the_filter_is_frozen() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        ImageFilter().limit = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "needs_labels"),
    [
        ({"include_labels": [["A"]]}, True),
        ({"labelled": "labelled"}, True),
        ({"min_annotators": 2}, True),
        ({"labelled": "unlabelled"}, False),
        ({"exclude_labels": [["A"]]}, False),
    ],
)
def test_needs_labels_says_whether_only_annotated_images_can_match(
    data: dict[str, object], needs_labels: bool
) -> None:
    assert ImageFilter.model_validate(data).needs_labels is needs_labels


TRICKY = ImageFilter(
    include_labels=[["it's"], ["'; DROP TABLE documents; --"], ["Bad & Wäsche", "日本"]],
    exclude_labels=[['say "hi"', "a\\b"]],
    sortout=["Keep", "O'Neil"],
    limit=7,
)


def test_the_filter_argument_is_one_line_json_without_single_quotes() -> None:
    argument = filter_argument(TRICKY)
    assert "'" not in argument and "\n" not in argument
    assert json.loads(argument)["limit"] == 7


def test_the_filter_argument_round_trips_to_an_equal_filter() -> None:
    assert ImageFilter.model_validate_json(filter_argument(TRICKY)) == TRICKY
    assert ImageFilter.model_validate_json(filter_argument(ImageFilter())) == ImageFilter()


def test_the_filter_argument_survives_single_quotes_on_a_command_line() -> None:
    argument = filter_argument(TRICKY)
    words = shlex.split(f"python -m components.connect_db.main --filter '{argument}' --x 1")
    assert words[4] == argument
    assert ImageFilter.model_validate_json(words[4]) == TRICKY
