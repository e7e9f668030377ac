"""connect_db's labelled mode: the classifier's labelled set, split and balanced.

Pure functions over the id table (a DataFrame with one row per image and at least the columns
``id`` and ``label``):

* :func:`drop_undecided` keeps the images whose label was decided and counts the others per
  reason (``unlabelled``, ``too_shallow``, ``tie``, ``low_agreement``);
* :func:`split_by_label` puts each image in ``train``, ``val`` or ``test``, stratified by label,
  with images marked ``sortout_testset`` pinned to ``test``;
* :func:`add_repeats` balances the train split: random oversampling of the minority classes
  up to the majority count, represented as a ``repeats`` count per image (no image is copied);
* :func:`class_weights` gives the weights of a class-weighted loss instead.

Everything is deterministic for a seed and independent of the input's row order: rows are
sorted by id first, and every class draws from its own random stream (seeded by the seed and
the class name), so adding a class does not reshuffle the others.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from sslpipe.core.config import LabelsConfig

SPLITS: tuple[str, str, str] = ("train", "val", "test")
LABEL_DROP_REASONS: tuple[str, ...] = ("unlabelled", "too_shallow", "tie", "low_agreement")
LABELLED_COLUMNS: tuple[str, ...] = ("id", "blob_path", "file_hash", "label", "split", "repeats")
PIN_COLUMN = "sortout_testset"

Balance = Literal["oversample", "class_weight", "none"]
Shares = tuple[float, float, float]

# Separate random streams for the split and the oversampling of the same class.
_SPLIT_STREAM, _OVERSAMPLE_STREAM = 0, 1


class LabelledSetError(ValueError):
    """The labelled images cannot make a train/val/test set; the message says how to fix it."""


class TooFewImagesError(LabelledSetError):
    """A class has too few images to appear in every split that has a share."""


def parse_split(text: str) -> Shares:
    """``"0.6,0.2,0.2"`` -> ``(0.6, 0.2, 0.2)`` (train, val, test shares).

    Only the format is checked here; :class:`~sslpipe.core.config.LabelsConfig` checks the shares.

    Raises:
        ValueError: unless ``text`` is three comma-separated numbers.
    """
    parts = [part.strip() for part in str(text).split(",")]
    try:
        if len(parts) != 3:
            raise ValueError(text)
        train, val, test = (float(part) for part in parts)
    except ValueError:
        raise ValueError(
            f"split {text!r}: expected three comma-separated shares train,val,test "
            "such as '0.6,0.2,0.2'"
        ) from None
    return train, val, test


def _rng(seed: int, label: str, stream: int) -> np.random.Generator:
    entropy = [seed % 2**64, zlib.crc32(label.encode("utf-8")), stream]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _is_true(values: pd.Series) -> np.ndarray:
    """True where a value is true; missing values (None, NaN) are false."""
    return values.eq(True).to_numpy(dtype=bool)


def drop_undecided(
    table: pd.DataFrame, *, reason_column: str = "label_reason"
) -> tuple[pd.DataFrame, Counter[str]]:
    """The rows with a decided (non-empty) label, and the others counted per reason.

    Every reason of :data:`LABEL_DROP_REASONS` is counted, zero included; a row without a label
    and without a reason counts as ``unlabelled``.
    """
    decided = table["label"].astype(str) != ""
    counts: Counter[str] = Counter(dict.fromkeys(LABEL_DROP_REASONS, 0))
    if reason_column in table.columns:
        reasons = table.loc[~decided, reason_column].astype(str).replace("", "unlabelled")
    else:
        reasons = pd.Series(["unlabelled"] * int((~decided).sum()), dtype=str)
    counts.update(reasons.tolist())
    return table[decided].reset_index(drop=True), counts


def minimum_split_counts(shares: Shares, pinned: int = 0) -> tuple[int, int, int]:
    """The fewest images of a class per split: one in train, one in every split with a share,
    and every pinned image in test."""
    train = 1
    val = 1 if shares[1] > 0 else 0
    test = max(1 if shares[2] > 0 else 0, pinned)
    return train, val, test


def allocate(n: int, shares: Shares, *, pinned: int = 0) -> tuple[int, int, int]:
    """How many of a class's ``n`` images go to train, val and test.

    The counts are as close as possible to ``n * shares`` (least squares, so each within one
    image of its target when the minimums allow it) while respecting
    :func:`minimum_split_counts`: ``pinned`` images must be in test, and count toward it.

    Raises:
        TooFewImagesError: when ``n`` is below the sum of the minimums.
    """
    counts = list(minimum_split_counts(shares, pinned))
    if sum(counts) > n:
        raise TooFewImagesError(f"{n} images cannot fill the minimum split counts {counts}")
    targets = [n * share for share in shares]
    for _ in range(n - sum(counts)):
        # Adding one where the deficit is largest is optimal for the squared error; a tie
        # goes to the earlier split (train, then val), rounded so float noise cannot decide.
        deficits = [round(targets[i] - counts[i], 9) for i in range(3)]
        counts[max(range(3), key=lambda i: (deficits[i], -i))] += 1
    return counts[0], counts[1], counts[2]


def _check_class_sizes(sizes: dict[str, tuple[int, int]], shares: Shares) -> None:
    """One error naming every class that cannot fill its splits."""
    problems = []
    for label, (n, pinned) in sizes.items():
        needed = minimum_split_counts(shares, pinned)
        if n >= sum(needed):
            continue
        nonzero = [s for s, share in zip(SPLITS, shares, strict=True) if share > 0]
        text = f"class {label!r} has {n} image{'s' if n != 1 else ''}"
        if pinned and n >= len(nonzero):
            text += (
                f", {pinned} of them pinned to test (sortout_testset), which leaves too few for "
                f"{' and '.join(s for s in nonzero if s != 'test')}"
            )
        else:
            text += f", fewer than the {len(nonzero)} splits that need one ({', '.join(nonzero)})"
        problems.append(text)
    if problems:
        raise TooFewImagesError(
            f"{'; '.join(problems)}. Drop the class with filter.exclude_labels, lower "
            "labels.level to merge it into its parent, add labels"
            + (
                ", or set labels.pin_sortout_testset=false"
                if "pinned" in " ".join(problems)
                else ""
            )
        )


def split_by_label(
    table: pd.DataFrame,
    *,
    shares: Shares = (0.6, 0.2, 0.2),
    seed: int = 0,
    pin_column: str | None = PIN_COLUMN,
) -> pd.DataFrame:
    """A copy of ``table`` sorted by id, with a ``split`` column (train, val or test).

    Each class is split on its own (stratified) per :func:`allocate`; rows whose ``pin_column``
    is true go to test and count toward its share; the other rows of the class are shuffled
    with the class's random stream and cut into train, val and test.

    Raises:
        TooFewImagesError: naming every class too small for the splits that have a share.
        ValueError: when ids repeat or ``pin_column`` is missing.
    """
    if table["id"].duplicated().any():
        repeated = sorted(table.loc[table["id"].duplicated(), "id"].astype(str))[:5]
        raise ValueError(f"the id table repeats ids: {repeated}")
    if pin_column is not None and pin_column not in table.columns:
        raise ValueError(f"the id table has no {pin_column!r} column to pin test images with")
    frame = table.sort_values("id", kind="stable").reset_index(drop=True)
    pinned = _is_true(frame[pin_column]) if pin_column is not None else np.zeros(len(frame), bool)
    groups = {str(k): v for k, v in frame.groupby("label", sort=True).indices.items()}
    _check_class_sizes({k: (len(v), int(pinned[v].sum())) for k, v in groups.items()}, shares)
    split = np.full(len(frame), "", dtype=object)
    for label, rows in groups.items():
        rows = np.sort(rows)  # by id, as the frame is
        fixed, free = rows[pinned[rows]], rows[~pinned[rows]]
        n_train, n_val, _ = allocate(len(rows), shares, pinned=len(fixed))
        free = free[_rng(seed, label, _SPLIT_STREAM).permutation(len(free))]
        split[free[:n_train]] = "train"
        split[free[n_train : n_train + n_val]] = "val"
        split[free[n_train + n_val :]] = "test"
        split[fixed] = "test"
    frame["split"] = split
    return frame


def oversample_repeats(table: pd.DataFrame, *, seed: int = 0) -> pd.Series:
    """How often each row is seen per epoch when the train split is randomly oversampled.

    Each minority class of the train split draws (majority count - its count) extra images from
    its own train images, with replacement, from the class's random stream; a row's repeats is
    1 + the times it was drawn. Val and test rows are 1. Aligned with ``table``'s index.
    """
    repeats = pd.Series(1, index=table.index, dtype="int64")
    train = table[table["split"] == "train"]
    if train.empty:
        return repeats
    sizes = train["label"].value_counts()
    majority = int(sizes.max())
    for label, rows in train.sort_values("id", kind="stable").groupby("label", sort=True):
        extra = majority - len(rows)
        if extra <= 0:
            continue
        draws = _rng(seed, str(label), _OVERSAMPLE_STREAM).integers(0, len(rows), size=extra)
        repeats.loc[rows.index] = 1 + np.bincount(draws, minlength=len(rows))
    return repeats


def class_weights(table: pd.DataFrame) -> dict[str, float]:
    """``n_train / (n_classes * n_train_c)`` per class, from the train split."""
    sizes = table.loc[table["split"] == "train", "label"].astype(str).value_counts()
    total, classes = int(sizes.sum()), len(sizes)
    return {str(label): total / (classes * int(sizes[label])) for label in sorted(sizes.index)}


def add_repeats(
    table: pd.DataFrame, *, balance: Balance = "oversample", seed: int = 0
) -> tuple[pd.DataFrame, dict[str, float] | None]:
    """A copy of ``table`` with a ``repeats`` column, and the class weights (or None).

    ``oversample``: repeats per :func:`oversample_repeats`; ``class_weight``: repeats 1 and the
    weights per :func:`class_weights`; ``none``: repeats 1, no weights.
    """
    frame = table.copy()
    if balance == "oversample":
        frame["repeats"] = oversample_repeats(frame, seed=seed)
        return frame, None
    if balance not in ("class_weight", "none"):
        raise ValueError(f"unknown balance {balance!r}; expected oversample, class_weight or none")
    frame["repeats"] = 1
    return frame, class_weights(frame) if balance == "class_weight" else None


def split_counts(table: pd.DataFrame, *, weights: str | None = None) -> dict[str, dict[str, int]]:
    """``{split: {label: images}}`` for every split and class (zeros included).

    With ``weights="repeats"`` each row counts as many times as it is repeated.
    """
    labels = sorted(set(table["label"].astype(str)))
    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(labels, 0) for s in SPLITS}
    values = table[weights] if weights else pd.Series(1, index=table.index)
    for (split, label), total in values.groupby([table["split"], table["label"]]).sum().items():
        counts[str(split)][str(label)] = int(total)
    return counts


def label_map(
    labels: Sequence[str], *, level: int, weights: dict[str, float] | None = None
) -> dict[str, Any]:
    """The classifier's label map: sorted classes, their indices, the level and the weights."""
    classes = sorted(set(labels))
    return {
        "classes": classes,
        "index": {label: i for i, label in enumerate(classes)},
        "level": level,
        "class_weights": weights,
    }


def build_labelled_set(
    table: pd.DataFrame, config: LabelsConfig
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Split and balance the decided images of ``table``.

    Returns the id table (:data:`LABELLED_COLUMNS`, sorted by id), the label map and the stats
    (shares, seed, pinned count, balance, counts per split and class before and after
    oversampling).

    Raises:
        LabelledSetError: with fewer than two classes.
        TooFewImagesError: naming every class too small to be split.
    """
    labels = sorted(set(table["label"].astype(str)))
    if len(labels) < 2:
        found = ", ".join(f"{label!r}: {n}" for label, n in table["label"].value_counts().items())
        raise LabelledSetError(
            f"a classifier needs at least 2 classes; the labelled images have {len(labels)} "
            f"({found or 'none'}). Widen the filter (filter.include_labels) or raise labels.level"
        )
    pin = PIN_COLUMN if config.pin_sortout_testset and PIN_COLUMN in table.columns else None
    split = split_by_label(table, shares=config.split, seed=config.seed, pin_column=pin)
    balanced, weights = add_repeats(split, balance=config.balance, seed=config.seed)
    pinned = int(_is_true(balanced[PIN_COLUMN]).sum()) if pin else 0
    stats = {
        "split": dict(zip(SPLITS, config.split, strict=True)),
        "split_seed": config.seed,
        "pin_sortout_testset": config.pin_sortout_testset,
        "pinned_to_test": pinned,
        "balance": config.balance,
        "counts_before_oversampling": split_counts(balanced),
        "counts_after_oversampling": split_counts(balanced, weights="repeats"),
        "class_weights": weights,
    }
    return (
        balanced[list(LABELLED_COLUMNS)],
        label_map(labels, level=config.level, weights=weights),
        stats,
    )
