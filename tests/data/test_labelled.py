"""The labelled set: undecided labels counted, stratified split with pinned test images,
oversampling of the train split, class weights and the label map."""

from __future__ import annotations

import pandas as pd
import pytest

from sslpipe.core.config import LabelsConfig
from sslpipe.data.labelled import (
    LABELLED_COLUMNS,
    SPLITS,
    LabelledSetError,
    TooFewImagesError,
    add_repeats,
    allocate,
    build_labelled_set,
    class_weights,
    drop_undecided,
    label_map,
    oversample_repeats,
    parse_split,
    split_by_label,
    split_counts,
)

SHARES = (0.6, 0.2, 0.2)


def make_table(sizes: dict[str, int], pinned: dict[str, int] | None = None) -> pd.DataFrame:
    """``sizes[label]`` images per class, ids ``<label>-<nn>``; the first ``pinned[label]`` of a
    class have ``sortout_testset`` true."""
    pinned = pinned or {}
    rows = [
        {
            "id": f"{label}-{i:03d}",
            "blob_path": f"{label}-{i:03d}",
            "file_hash": "",
            "label": label,
            "sortout_testset": i < pinned.get(label, 0),
        }
        for label, n in sizes.items()
        for i in range(n)
    ]
    return pd.DataFrame(rows)


def per_class(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{label: {split: images}}``."""
    counts = split_counts(frame)
    labels = sorted(set(frame["label"]))
    return {label: {s: counts[s][label] for s in SPLITS} for label in labels}


def assignment(frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(frame["id"], frame["split"], strict=True))


# --- parse_split -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shares"),
    [("0.6,0.2,0.2", (0.6, 0.2, 0.2)), (" 0.8, 0.2 ,0 ", (0.8, 0.2, 0.0)), ("1,0,0", (1, 0, 0))],
)
def test_the_split_text_is_three_shares(text: str, shares: tuple[float, float, float]) -> None:
    assert parse_split(text) == shares


@pytest.mark.parametrize("text", ["0.6,0.4", "0.6;0.2;0.2", "a,b,c", "", "0.5,0.2,0.2,0.1"])
def test_a_malformed_split_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected three comma-separated shares"):
        parse_split(text)


# --- drop_undecided ----------------------------------------------------------------------------


def test_undecided_labels_are_dropped_and_counted_per_reason() -> None:
    table = pd.DataFrame(
        {
            "id": list("abcdefg"),
            "label": ["X", "", "", "", "Y", "", ""],
            "label_reason": ["", "tie", "tie", "low_agreement", "", "unlabelled", "too_shallow"],
        }
    )
    decided, dropped = drop_undecided(table)
    assert list(decided["id"]) == ["a", "e"]
    assert dropped == {"unlabelled": 1, "too_shallow": 1, "tie": 2, "low_agreement": 1}


def test_every_reason_is_counted_even_when_nothing_is_dropped() -> None:
    _, dropped = drop_undecided(pd.DataFrame({"id": ["a"], "label": ["X"]}))
    assert dict(dropped) == {"unlabelled": 0, "too_shallow": 0, "tie": 0, "low_agreement": 0}


# --- allocate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10, 11, 23, 50, 101])
@pytest.mark.parametrize("shares", [SHARES, (0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (0.8, 0.2, 0.0)])
def test_allocated_counts_sum_to_the_class_and_are_within_one_of_the_target(
    n: int, shares: tuple[float, float, float]
) -> None:
    counts = allocate(n, shares)
    assert sum(counts) == n
    assert counts[0] >= 1
    # One image per split can cost more than one image of train's target only when a split's
    # target is below one image (n=3 at 0.7/0.15/0.15: 1, 1, 1 against 2.1, 0.45, 0.45).
    minimums_bind = any(0 < n * share < 1 for share in shares)
    for count, share in zip(counts, shares, strict=True):
        assert (count >= 1) if share > 0 else (count == 0)
        if not minimums_bind:
            assert abs(count - n * share) < 1, counts


def test_pinned_images_count_toward_test_and_the_rest_comes_close_to_the_shares() -> None:
    assert allocate(20, SHARES, pinned=3) == (12, 4, 4)  # 3 pinned + 1 drawn
    assert allocate(20, SHARES, pinned=4) == (12, 4, 4)
    assert allocate(10, SHARES, pinned=5) == (4, 1, 5)  # test over its share: train keeps most
    assert allocate(3, SHARES, pinned=1) == (1, 1, 1)


def test_allocating_below_the_minimum_raises() -> None:
    with pytest.raises(TooFewImagesError, match=r"2 images cannot fill"):
        allocate(2, SHARES)
    with pytest.raises(TooFewImagesError, match=r"3 images cannot fill"):
        allocate(3, SHARES, pinned=2)


# --- split_by_label ----------------------------------------------------------------------------

SIZES = {"A": 50, "B": 23, "C": 7, "D": 3}


def test_each_class_is_split_within_one_image_of_its_target_shares() -> None:
    frame = split_by_label(make_table(SIZES), shares=SHARES, seed=0)
    assert set(frame["split"]) == set(SPLITS)
    for label, counts in per_class(frame).items():
        assert sum(counts.values()) == SIZES[label]
        for split, share in zip(SPLITS, SHARES, strict=True):
            assert abs(counts[split] - SIZES[label] * share) <= 1, (label, split, counts)
            assert counts[split] >= 1


def test_other_shares_are_honoured_per_class() -> None:
    shares = (0.5, 0.1, 0.4)
    frame = split_by_label(make_table({"A": 40, "B": 20}), shares=shares, seed=3)
    assert per_class(frame) == {
        "A": {"train": 20, "val": 4, "test": 16},
        "B": {"train": 10, "val": 2, "test": 8},
    }


def test_the_split_is_the_same_for_the_same_seed_and_any_input_order() -> None:
    table = make_table(SIZES)
    first = split_by_label(table, seed=7)
    again = split_by_label(table, seed=7)
    shuffled = split_by_label(table.sample(frac=1.0, random_state=1), seed=7)
    reversed_rows = split_by_label(table.iloc[::-1], seed=7)
    assert assignment(first) == assignment(again) == assignment(shuffled)
    assert assignment(first) == assignment(reversed_rows)
    assert list(first["id"]) == sorted(table["id"])  # the output is sorted by id


def test_a_different_seed_gives_a_different_split_with_the_same_counts() -> None:
    table = make_table(SIZES)
    first, second = split_by_label(table, seed=0), split_by_label(table, seed=1)
    assert assignment(first) != assignment(second)
    assert per_class(first) == per_class(second)


def test_a_class_is_split_the_same_whatever_other_classes_there_are() -> None:
    alone = split_by_label(make_table({"A": 30, "B": 5}), seed=4)
    with_more = split_by_label(make_table({"A": 30, "B": 5, "C": 12}), seed=4)
    a_alone = {k: v for k, v in assignment(alone).items() if k.startswith("A-")}
    a_with_more = {k: v for k, v in assignment(with_more).items() if k.startswith("A-")}
    assert a_alone == a_with_more


def test_pinned_sortout_testset_images_are_all_in_test_and_count_toward_it() -> None:
    table = make_table({"A": 20, "B": 10}, pinned={"A": 3, "B": 5})
    frame = split_by_label(table, seed=0)
    assert set(frame.loc[frame["sortout_testset"], "split"]) == {"test"}
    assert per_class(frame) == {
        "A": {"train": 12, "val": 4, "test": 4},
        "B": {"train": 4, "val": 1, "test": 5},
    }


def test_without_the_pin_column_sortout_testset_images_are_split_like_the_others() -> None:
    table = make_table({"A": 20, "B": 10}, pinned={"A": 20, "B": 10})
    frame = split_by_label(table, seed=0, pin_column=None)
    assert per_class(frame)["A"] == {"train": 12, "val": 4, "test": 4}
    with pytest.raises(ValueError, match=r"no 'sortout_testset' column"):
        split_by_label(table.drop(columns="sortout_testset"))


def test_a_class_with_too_few_images_is_one_error_naming_it_and_the_fix() -> None:
    table = make_table({"A": 20, "Rare": 2, "Single": 1})
    with pytest.raises(TooFewImagesError) as err:
        split_by_label(table)
    message = str(err.value)
    assert "class 'Rare' has 2 images, fewer than the 3 splits that need one" in message
    assert "class 'Single' has 1 image," in message
    assert "'A'" not in message
    assert "filter.exclude_labels" in message and "labels.level" in message
    assert "add labels" in message


def test_two_images_are_enough_when_the_test_share_is_zero() -> None:
    frame = split_by_label(make_table({"A": 10, "B": 2}), shares=(0.8, 0.2, 0.0))
    assert per_class(frame)["B"] == {"train": 1, "val": 1, "test": 0}
    with pytest.raises(TooFewImagesError, match=r"'B' has 1 image, fewer than the 2 splits"):
        split_by_label(make_table({"A": 10, "B": 1}), shares=(0.8, 0.2, 0.0))


def test_a_class_whose_images_are_pinned_to_test_says_so() -> None:
    table = make_table({"A": 20, "B": 3}, pinned={"B": 2})
    with pytest.raises(TooFewImagesError, match=r"'B' has 3 images, 2 of them pinned to test") as e:
        split_by_label(table)
    assert "labels.pin_sortout_testset=false" in str(e.value)


def test_repeated_ids_are_refused() -> None:
    table = make_table({"A": 5})
    with pytest.raises(ValueError, match=r"repeats ids: \['A-000'\]"):
        split_by_label(pd.concat([table, table.iloc[:1]]))


# --- balance -----------------------------------------------------------------------------------


def test_oversampling_brings_every_train_class_to_the_majority_and_leaves_val_and_test() -> None:
    frame = split_by_label(make_table(SIZES), seed=0)
    balanced, weights = add_repeats(frame, balance="oversample", seed=0)
    assert weights is None
    before, after = split_counts(balanced), split_counts(balanced, weights="repeats")
    majority = max(before["train"].values())
    assert majority == 30
    assert after["train"] == dict.fromkeys(SIZES, majority)
    assert after["val"] == before["val"] and after["test"] == before["test"]
    not_train = balanced[balanced["split"] != "train"]
    assert set(not_train["repeats"]) == {1}
    assert set(balanced.loc[balanced["label"] == "A", "repeats"]) == {1}  # the majority class
    train_d = balanced[(balanced["split"] == "train") & (balanced["label"] == "D")]
    assert len(train_d) == 1 and list(train_d["repeats"]) == [30]  # one image drawn 29 times
    assert (balanced["repeats"] >= 1).all() and balanced["repeats"].dtype == "int64"


def test_oversampling_draws_with_replacement_deterministically_per_seed() -> None:
    frame = split_by_label(make_table({"A": 100, "B": 20}), seed=0)
    train_b = (frame["split"] == "train") & (frame["label"] == "B")
    first = oversample_repeats(frame, seed=0)
    assert first.equals(oversample_repeats(frame, seed=0))
    shuffled = frame.sample(frac=1.0, random_state=2)
    assert oversample_repeats(shuffled, seed=0).sort_index().equals(first)
    assert not first[train_b].equals(oversample_repeats(frame, seed=1)[train_b])
    assert first[train_b].sum() == 60 and first[train_b].max() > 2  # 12 images, 48 draws


def test_class_weights_are_n_train_over_classes_times_class_count() -> None:
    table = pd.DataFrame(
        {
            "id": [f"i{i}" for i in range(12)],
            "label": ["A"] * 6 + ["B"] * 3 + ["A", "B", "B"],
            "split": ["train"] * 9 + ["val", "test", "test"],
        }
    )
    assert class_weights(table) == {"A": pytest.approx(0.75), "B": pytest.approx(1.5)}
    balanced, weights = add_repeats(table, balance="class_weight")
    assert weights == class_weights(table)
    assert set(balanced["repeats"]) == {1}
    balanced, weights = add_repeats(table, balance="none")
    assert weights is None and set(balanced["repeats"]) == {1}
    with pytest.raises(ValueError, match=r"unknown balance 'smote'"):
        add_repeats(table, balance="smote")  # type: ignore[arg-type]


def test_the_label_map_sorts_classes_and_indexes_them() -> None:
    assert label_map(["b", "a", "b", "c"], level=2, weights={"a": 1.0}) == {
        "classes": ["a", "b", "c"],
        "index": {"a": 0, "b": 1, "c": 2},
        "level": 2,
        "class_weights": {"a": 1.0},
    }


# --- build_labelled_set ------------------------------------------------------------------------


def test_the_labelled_set_has_the_id_columns_the_label_map_and_the_stats() -> None:
    table = make_table({"B": 10, "A": 20}, pinned={"A": 1})
    config = LabelsConfig(level=2, split=(0.5, 0.25, 0.25), seed=3)
    ids, labels, stats = build_labelled_set(table, config)
    assert list(ids.columns) == list(LABELLED_COLUMNS)
    assert list(ids["id"]) == sorted(table["id"])
    assert labels == {"classes": ["A", "B"], "index": {"A": 0, "B": 1}, "level": 2,
                      "class_weights": None}  # fmt: skip
    assert stats["split"] == {"train": 0.5, "val": 0.25, "test": 0.25}
    assert stats["split_seed"] == 3 and stats["balance"] == "oversample"
    assert stats["pin_sortout_testset"] is True and stats["pinned_to_test"] == 1
    assert stats["counts_before_oversampling"] == {
        "train": {"A": 10, "B": 5},
        "val": {"A": 5, "B": 3},
        "test": {"A": 5, "B": 2},
    }
    assert stats["counts_after_oversampling"]["train"] == {"A": 10, "B": 10}
    assert stats["class_weights"] is None


def test_the_labelled_set_with_class_weights_puts_them_in_the_label_map() -> None:
    table = make_table({"A": 20, "B": 10})
    _, labels, stats = build_labelled_set(table, LabelsConfig(balance="class_weight"))
    assert labels["class_weights"] == stats["class_weights"]
    assert labels["class_weights"] == {"A": pytest.approx(0.75), "B": pytest.approx(1.5)}
    assert stats["counts_after_oversampling"] == stats["counts_before_oversampling"]


def test_pinning_can_be_switched_off() -> None:
    table = make_table({"A": 20, "B": 10}, pinned={"A": 20})
    _, _, stats = build_labelled_set(table, LabelsConfig(pin_sortout_testset=False))
    assert stats["pinned_to_test"] == 0
    assert stats["counts_before_oversampling"]["train"]["A"] == 12


def test_a_single_class_cannot_make_a_classifier() -> None:
    with pytest.raises(LabelledSetError, match=r"at least 2 classes.*\('A': 9\)"):
        build_labelled_set(make_table({"A": 9}), LabelsConfig())
