"""Label resolution: a majority vote over annotators of their taxonomy paths cut at a level."""

from __future__ import annotations

import pytest

from sslpipe.core.metadata import Annotation
from sslpipe.data.labels import LabelDecision, cut_label, resolve_label


def ann(annotator: str | int, *paths: list[str]) -> Annotation:
    return Annotation.model_validate({"annotator_id": annotator, "taxonomy": list(paths)})


@pytest.mark.parametrize(
    ("path", "level", "expected"),
    [
        (["Even", "4"], 1, "Even"),
        (["Even", "4"], 2, "Even/4"),
        (("A", "B", "C"), 2, "A/B"),
        (["Even"], 2, None),
        (["Even", "4"], 3, None),
    ],
)
def test_cut_label_joins_the_first_levels_or_is_none_when_too_shallow(
    path: list[str], level: int, expected: str | None
) -> None:
    assert cut_label(path, level) == expected


def test_no_annotations_means_unlabelled() -> None:
    assert resolve_label([]) == LabelDecision(None, 0.0, "unlabelled")


def test_a_single_annotator_decides_with_full_agreement() -> None:
    assert resolve_label([ann(1, ["Even", "4"])]) == LabelDecision("Even", 1.0)
    assert resolve_label([ann(1, ["Even", "4"])], level=2) == LabelDecision("Even/4", 1.0)


def test_the_majority_wins_and_agreement_is_its_share_of_annotators() -> None:
    decision = resolve_label(
        [ann(1, ["Odd", "3"]), ann(2, ["Odd", "3"]), ann(3, ["Odd", "5"])], level=2
    )
    assert decision.label == "Odd/3"
    assert decision.agreement == pytest.approx(2 / 3)
    assert decision.reason is None


def test_annotators_who_disagree_below_the_level_still_agree_at_it() -> None:
    annotations = [ann(1, ["Odd", "3"]), ann(2, ["Odd", "5"])]
    assert resolve_label(annotations, level=1) == LabelDecision("Odd", 1.0)
    assert resolve_label(annotations, level=2).reason == "tie"


def test_a_tie_decides_nothing() -> None:
    decision = resolve_label([ann(1, ["Even", "4"]), ann(2, ["Odd", "5"])])
    assert decision.label is None
    assert decision.reason == "tie"
    assert decision.agreement == pytest.approx(0.5)


def test_a_three_way_tie_decides_nothing() -> None:
    annotations = [ann(1, ["A"]), ann(2, ["B"]), ann(3, ["C"])]
    assert resolve_label(annotations).reason == "tie"


def test_an_annotator_with_several_labels_splits_their_vote() -> None:
    # Annotator 1 gives A and B (half a vote each), annotator 2 gives B: B wins 1.5 to 0.5.
    decision = resolve_label([ann(1, ["A"], ["B"]), ann(2, ["B"])])
    assert decision.label == "B"
    assert decision.agreement == pytest.approx(0.75)


def test_a_split_vote_alone_is_a_tie() -> None:
    assert resolve_label([ann(1, ["A"], ["B"])]).reason == "tie"


def test_several_paths_with_the_same_label_at_the_level_are_one_vote() -> None:
    decision = resolve_label(
        [ann(1, ["Even", "2"], ["Even", "4"]), ann(2, ["Odd", "3"]), ann(3, ["Even"])]
    )
    assert decision == LabelDecision("Even", pytest.approx(2 / 3))


def test_the_same_annotator_listed_twice_still_has_one_vote() -> None:
    # Two annotation entries by annotator 1 must not outvote annotator 2: it is a tie.
    decision = resolve_label([ann(1, ["A"]), ann(1, ["A"]), ann(2, ["B"])])
    assert decision.label is None and decision.reason == "tie"
    # ... and an annotator's entries together split one vote.
    decision = resolve_label([ann(1, ["A"]), ann(1, ["B"]), ann(2, ["B"])])
    assert decision.label == "B" and decision.agreement == pytest.approx(0.75)


def test_integer_and_text_ids_of_the_same_annotator_are_one_annotator() -> None:
    assert resolve_label([ann(7, ["A"]), ann("7", ["A"]), ann(8, ["B"])]).reason == "tie"


def test_annotators_without_a_path_deep_enough_do_not_vote() -> None:
    decision = resolve_label([ann(1, ["Even"]), ann(2, ["Even", "4"])], level=2)
    assert decision == LabelDecision("Even/4", 1.0)


def test_when_no_path_is_deep_enough_the_reason_is_too_shallow() -> None:
    assert resolve_label([ann(1, ["Even"])], level=2) == LabelDecision(None, 0.0, "too_shallow")


def test_min_agreement_refuses_a_weak_majority() -> None:
    annotations = [ann(1, ["A"]), ann(2, ["A"]), ann(3, ["B"])]
    weak = resolve_label(annotations, min_agreement=0.75)
    assert weak.label is None and weak.reason == "low_agreement"
    assert weak.agreement == pytest.approx(2 / 3)
    assert resolve_label(annotations, min_agreement=2 / 3).label == "A"  # reaching it is enough
    assert resolve_label(annotations, min_agreement=0.5).label == "A"


def test_the_vote_does_not_depend_on_the_order_of_annotators() -> None:
    annotations = [ann(1, ["A"], ["B"]), ann(2, ["B"]), ann(3, ["C"]), ann(4, ["B"])]
    assert resolve_label(annotations) == resolve_label(list(reversed(annotations)))
