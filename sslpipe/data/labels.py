"""Label resolution: from several annotators' taxonomy paths to one label per image.

The image's label is its taxonomy path cut at ``level`` (1 = first level, as the seed's
first-level classifier), decided by a majority vote over its annotators.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sslpipe.core.metadata import Annotation

LABEL_SEPARATOR = "/"


@dataclass(frozen=True)
class LabelDecision:
    """The outcome of resolving one image's annotations.

    ``label`` is None when no label could be decided; ``reason`` then says why
    (``unlabelled``, ``too_shallow``, ``tie`` or ``low_agreement``).
    """

    label: str | None
    agreement: float
    reason: str | None = None


def cut_label(path: Sequence[str], level: int) -> str | None:
    """The path cut at ``level`` as ``"A/B"``, or None when the path is shallower than ``level``."""
    if len(path) < level:
        return None
    return LABEL_SEPARATOR.join(path[:level])


def resolve_label(
    annotations: Sequence[Annotation], *, level: int = 1, min_agreement: float = 0.0
) -> LabelDecision:
    """Majority vote over annotators of their paths cut at ``level``.

    Each annotator has one vote; an annotator who gave several different labels at this level
    splits the vote equally between them. The winner must have strictly more votes than the
    runner-up (otherwise ``tie``) and its share of annotators must reach ``min_agreement``.
    """
    # An annotator listed in several entries still has one vote, split over all their labels.
    by_annotator: dict[str, set[str | None]] = {}
    for annotation in annotations:
        by_annotator.setdefault(annotation.annotator_id, set()).update(
            cut_label(p, level) for p in annotation.taxonomy
        )
    votes: Counter[str] = Counter()
    voters = 0
    for given in by_annotator.values():
        labels = given - {None}
        if not labels:
            continue
        voters += 1
        for label in labels:
            votes[str(label)] += 1.0 / len(labels)  # type: ignore[assignment]
    if not annotations:
        return LabelDecision(None, 0.0, "unlabelled")
    if not votes:
        return LabelDecision(None, 0.0, "too_shallow")
    ranked = votes.most_common(2)
    top_label, top_votes = ranked[0]
    agreement = top_votes / voters
    if len(ranked) > 1 and abs(ranked[1][1] - top_votes) < 1e-9:
        return LabelDecision(None, agreement, "tie")
    if agreement + 1e-9 < min_agreement:
        return LabelDecision(None, agreement, "low_agreement")
    return LabelDecision(top_label, agreement)
