"""Label Studio -> metadata documents: the labels people gave become each image's document fields.

For every task of a project (all pages), the task's image id (:mod:`sslpipe.data.labelstudio.tasks`)
names the metadata document, whose three derived fields (REFERENCE §2) are set from the task's
annotations; every other field is kept:

``labels_with_taxonomy``
    one ``{"annotator_id", "taxonomy"}`` entry per annotator, ``annotator_id`` being the
    annotation's ``completed_by`` user id (an int; the export format's ``{"id", "email"}`` object
    gives its ``id``) and ``taxonomy`` the sorted, distinct paths of all ``taxonomy`` results of
    that annotator's annotations; entries sorted by annotator id;
``total_annotations``
    the number of annotators, as the seed defines it ("the number of annotators that annotated
    the image") and as ``min_annotators`` filters count;
``has_review``
    whether a counted annotation is reviewed. Open-source Label Studio 1.23 has no review
    workflow: its API has no reviews (``/api/annotation-reviews/`` is Enterprise only and
    answers 404), and the expert's mark it does have is the annotation flag ``ground_truth``
    (the star in the labeling UI, "Label as ground truth" in the Data Manager). So a review
    is an annotation with ``ground_truth: true``; where an Enterprise server sends review
    fields, an accepted review (``reviews[].accepted`` on an annotation, or the task's
    ``reviews_accepted`` > 0) counts too.

Annotations are skipped, and counted per reason, when cancelled (``was_cancelled``, a skipped
task), without a ``completed_by`` user, or without a non-empty taxonomy path. A document whose
tasks now have no counted annotation gets empty labels (labels removed in Label Studio are
removed here too). An image shown by several tasks gets the union of their annotations.

Everything is read first (all tasks, then the matching documents), and the changed documents
are written with one ``upsert``: a failure while reading changes nothing. The output is a
function of Label Studio's state only, so a second sync reports every document unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sslpipe.core.uris import redact_uri
from sslpipe.data.labelstudio.client import LabelStudioClient
from sslpipe.data.labelstudio.tasks import DEFAULT_IMAGE_ID_FIELD, image_ref, tasks_by_image
from sslpipe.stores.base import MetadataStore

LABEL_FIELDS = ("labels_with_taxonomy", "total_annotations", "has_review")
SKIP_REASONS = ("cancelled", "no_annotator", "no_taxonomy")
Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class UnmatchedTask:
    """A task whose image matches no document (``image_id`` None: the task names no image)."""

    task_id: int
    image_id: str | None
    image: Any


@dataclass(frozen=True)
class SkippedAnnotation:
    task_id: int
    annotation_id: int | None
    reason: str


@dataclass(frozen=True)
class ImageLabels:
    """The derived document fields of one image."""

    labels_with_taxonomy: list[dict[str, Any]]
    total_annotations: int
    has_review: bool

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LABEL_FIELDS}


@dataclass(frozen=True)
class SyncReport:
    """What a sync did. ``created``: documents without labels before that have some now;
    ``updated``: other documents whose label fields changed; ``unchanged``: the rest of the
    matched documents. ``skipped``: the skipped annotations of the matched tasks."""

    project_id: int
    tasks: int
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    unmatched: list[UnmatchedTask] = field(default_factory=list)
    skipped: list[SkippedAnnotation] = field(default_factory=list)
    metadata_store: str = ""

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        counts = Counter(s.reason for s in self.skipped)
        return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, with the counts of unmatched tasks and skipped
        annotations per reason beside their lists."""
        data = asdict(self)
        data["unmatched_count"] = len(self.unmatched)
        data["skipped_by_reason"] = self.skipped_by_reason
        return data


# --- pure: annotations -> document fields ------------------------------------------------------


def annotator_id(annotation: Mapping[str, Any]) -> int | str | None:
    """The ``completed_by`` user id (an int from the API, an ``{"id", ...}`` object in exports)."""
    user = annotation.get("completed_by")
    if isinstance(user, Mapping):
        user = user.get("id")
    if isinstance(user, bool) or not isinstance(user, int | str) or user == "":
        return None
    return user


def taxonomy_paths(annotation: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The non-empty paths of the annotation's ``taxonomy`` results (paths with an empty or
    non-text level are dropped)."""
    paths = []
    for result in annotation.get("result") or []:
        if not isinstance(result, Mapping) or result.get("type") != "taxonomy":
            continue
        for path in (result.get("value") or {}).get("taxonomy") or []:
            if isinstance(path, list) and path and all(isinstance(p, str) and p for p in path):
                paths.append(tuple(path))
    return paths


def is_review(annotation: Mapping[str, Any], task: Mapping[str, Any]) -> bool:
    """Whether a counted annotation counts as reviewed (see the module docstring)."""
    if annotation.get("ground_truth") is True:
        return True
    reviews = annotation.get("reviews") or []
    accepted = any(isinstance(r, Mapping) and r.get("accepted") is True for r in reviews)
    return accepted or (task.get("reviews_accepted") or 0) > 0


def _skip_reason(annotation: Mapping[str, Any]) -> str | None:
    if annotation.get("was_cancelled"):
        return "cancelled"
    if annotator_id(annotation) is None:
        return "no_annotator"
    if not taxonomy_paths(annotation):
        return "no_taxonomy"
    return None


def _annotator_order(annotator: int | str) -> tuple[int, int, str]:
    # User ids (ints) first, numerically; any other id after them, as text.
    return (0, annotator, "") if isinstance(annotator, int) else (1, 0, str(annotator))


def image_labels(tasks: Sequence[Mapping[str, Any]]) -> tuple[ImageLabels, list[SkippedAnnotation]]:
    """The derived fields of an image from its tasks' annotations, and the skipped annotations.

    Deterministic: annotators sorted by id, each one's paths distinct and sorted.
    """
    paths: dict[int | str, set[tuple[str, ...]]] = {}
    skipped: list[SkippedAnnotation] = []
    reviewed = False
    for task in tasks:
        for annotation in task.get("annotations") or []:
            reason = _skip_reason(annotation)
            if reason is not None:
                skipped.append(SkippedAnnotation(int(task["id"]), annotation.get("id"), reason))
                continue
            user = annotator_id(annotation)
            assert user is not None  # _skip_reason checked it
            paths.setdefault(user, set()).update(taxonomy_paths(annotation))
            reviewed = reviewed or is_review(annotation, task)
    labels = [
        {"annotator_id": user, "taxonomy": [list(p) for p in sorted(paths[user])]}
        for user in sorted(paths, key=_annotator_order)
    ]
    return ImageLabels(labels, len(labels), reviewed), skipped


def with_labels(document: Mapping[str, Any], labels: ImageLabels) -> dict[str, Any]:
    """A copy of ``document`` with its derived fields set from ``labels``."""
    return {**document, **labels.fields()}


def outcome(before: Mapping[str, Any], after: Mapping[str, Any]) -> Outcome:
    """``unchanged`` when the derived fields are equal; ``created`` when the document had no
    labels and has some now; ``updated`` otherwise."""
    if all(before.get(name) == after.get(name) for name in LABEL_FIELDS):
        return "unchanged"
    if not before.get("labels_with_taxonomy") and after.get("labels_with_taxonomy"):
        return "created"
    return "updated"


# --- the sync ----------------------------------------------------------------------------------


def _unmatched(
    tasks: Iterable[Mapping[str, Any]], image_id: str | None, image_id_field: str
) -> list[UnmatchedTask]:
    return [
        UnmatchedTask(int(t["id"]), image_id, image_ref(t, image_id_field=image_id_field))
        for t in tasks
    ]


def sync_labels(
    client: LabelStudioClient,
    project_id: int,
    metadata_store: MetadataStore,
    *,
    image_id_field: str = DEFAULT_IMAGE_ID_FIELD,
) -> SyncReport:
    """Set the derived label fields of the documents shown by the project's tasks.

    Returns the :class:`SyncReport`: documents created / updated / unchanged, the tasks whose
    image matches no document (sorted by task id), and the skipped annotations.

    Raises:
        LabelStudioError: Label Studio cannot be reached or refuses (nothing was written).
        StoreError: the metadata store fails (nothing was written before the final upsert).
    """
    tasks = client.tasks(project_id)
    groups, without_image = tasks_by_image(tasks, image_id_field=image_id_field)
    unmatched = _unmatched(without_image, None, image_id_field)
    skipped: list[SkippedAnnotation] = []
    counts: Counter[str] = Counter()
    changed: list[dict[str, Any]] = []
    for image_id in sorted(groups):
        document = metadata_store.get(image_id)
        if document is None:
            unmatched.extend(_unmatched(groups[image_id], image_id, image_id_field))
            continue
        labels, skipped_here = image_labels(groups[image_id])
        skipped.extend(skipped_here)
        updated = with_labels(document, labels)
        result = outcome(document, updated)
        counts[result] += 1
        if result != "unchanged":
            changed.append(updated)
    if changed:
        metadata_store.upsert(changed)
    return SyncReport(
        project_id=project_id,
        tasks=len(tasks),
        created=counts["created"],
        updated=counts["updated"],
        unchanged=counts["unchanged"],
        unmatched=sorted(unmatched, key=lambda u: u.task_id),
        skipped=sorted(skipped, key=lambda s: (s.task_id, s.annotation_id or 0)),
        metadata_store=redact_uri(metadata_store.uri),
    )
