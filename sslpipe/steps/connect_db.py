"""connect_db: select images from the metadata store and write the id list.

Two modes:
    all        every selected image, its label resolved when possible (empty otherwise); the
               MoCo pipeline's selection (the labels feed its kNN monitor)
    labelled   only images with a decided label (the others dropped and counted per reason),
               split into train/val/test stratified by label and balanced (sslpipe.data.labelled);
               the classifier pipeline's selection

Outputs (one folder):
    ids.csv          all: id, blob_path, file_hash, label (resolved at ``labels.level``, empty if
                     none); labelled: id, blob_path, file_hash, label, split, repeats
    labels.json      labelled only: classes, index, level, class_weights
    containers.json  image id -> blob container, as the seed's mapping
    selection.json   the mode, the filter, the stores (URIs without secrets), counts, skipped
                     per reason; labelled: dropped per reason, split, counts per split and class
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from sslpipe.core.config import LabelsConfig
from sslpipe.core.filters import ImageFilter
from sslpipe.core.io import write_csv, write_json
from sslpipe.core.logs import get_logger
from sslpipe.core.metadata import describe_invalid, validate_document
from sslpipe.core.uris import redact_uri
from sslpipe.data.labelled import build_labelled_set, drop_undecided
from sslpipe.data.labels import resolve_label
from sslpipe.stores import open_blob_store, open_metadata_store

log = get_logger("connect_db")

ID_COLUMNS = ("id", "blob_path", "file_hash", "label")
# select_documents adds why a label was not decided, and the test-set pin.
DOCUMENT_COLUMNS = (*ID_COLUMNS, "label_reason", "sortout_testset")
MODES = ("all", "labelled")
Mode = Literal["all", "labelled"]


class EmptySelectionError(ValueError):
    """The filter selected no usable image."""


def select_documents(
    raw_documents: Iterable[Any], *, label_level: int = 1, min_agreement: float = 0.0
) -> tuple[pd.DataFrame, Counter[str]]:
    """Validate documents and resolve their labels; return the table and the skip counts.

    The table has :data:`DOCUMENT_COLUMNS`: ``label`` is empty when none was decided and
    ``label_reason`` then says why (see :func:`sslpipe.data.labels.resolve_label`);
    ``sortout_testset`` is the document's flag (false when absent). Invalid documents and
    repeated ids are skipped and counted per reason (``invalid:<field>``, ``duplicate_id``).
    """
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for raw in raw_documents:
        document, reason = validate_document(raw)
        if document is None:
            skipped[reason or "invalid"] += 1
            if skipped[reason or "invalid"] <= 5:
                log.warning("skipping %s", describe_invalid(raw))
            continue
        if document.id in seen:
            skipped["duplicate_id"] += 1
            continue
        seen.add(document.id)
        decision = resolve_label(
            document.labels_with_taxonomy, level=label_level, min_agreement=min_agreement
        )
        rows.append(
            {
                "id": document.id,
                "blob_path": document.id,
                "file_hash": document.file_hash or "",
                "label": decision.label or "",
                "label_reason": decision.reason or "",
                "sortout_testset": bool(document.sortout_testset),
            }
        )
    return pd.DataFrame(rows, columns=list(DOCUMENT_COLUMNS)), skipped


def select_images(
    raw_documents: Iterable[Any], *, label_level: int = 1, min_agreement: float = 0.0
) -> tuple[pd.DataFrame, Counter[str]]:
    """:func:`select_documents` with only the id-list columns (:data:`ID_COLUMNS`)."""
    table, skipped = select_documents(
        raw_documents, label_level=label_level, min_agreement=min_agreement
    )
    return table[list(ID_COLUMNS)], skipped


def _labels_config(labels: LabelsConfig | None, label_level: int | None) -> LabelsConfig:
    labels = labels or LabelsConfig()
    if label_level is None or label_level == labels.level:
        return labels
    if labels != LabelsConfig():
        raise ValueError(
            f"label_level={label_level} contradicts labels.level={labels.level}; give one"
        )
    return LabelsConfig(level=label_level)


def _nonzero(counts: dict[str, int]) -> dict[str, int] | str:
    return {k: v for k, v in counts.items() if v} or "none"


def run_connect_db(
    *,
    metadata_uri: str,
    blob_uri: str,
    image_filter: ImageFilter,
    output_dir: Path,
    mode: Mode = "all",
    labels: LabelsConfig | None = None,
    label_level: int | None = None,
) -> dict[str, Any]:
    """Select images by ``image_filter`` and write the id list; returns the selection stats.

    ``labels`` sets the label level and agreement (both modes) and the split and balance
    (``labelled`` mode); ``label_level`` is a shortcut for ``LabelsConfig(level=...)``.

    Raises:
        EmptySelectionError: when nothing usable was selected (nothing is written then).
        sslpipe.data.labelled.LabelledSetError: in ``labelled`` mode, when the decided labels cannot
            make a split (fewer than 2 classes, or a class too small; nothing is written then).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    config = _labels_config(labels, label_level)
    with open_metadata_store(metadata_uri) as store:
        total = store.count()
        table, skipped = select_documents(
            store.select(image_filter),
            label_level=config.level,
            min_agreement=config.min_agreement,
        )
    container = open_blob_store(blob_uri).container
    if table.empty:
        raise EmptySelectionError(
            f"the filter selected no usable image out of {total} documents in "
            f"{redact_uri(metadata_uri)} (skipped: {dict(skipped) or 'none'}); "
            f"filter: {image_filter.model_dump_json()}"
        )
    decided, undecided = drop_undecided(table)
    stats: dict[str, Any] = {
        "mode": mode,
        "filter": image_filter.model_dump(mode="json"),
        "label_level": config.level,
        "min_agreement": config.min_agreement,
        "metadata_store": redact_uri(metadata_uri),
        "blob_store": redact_uri(blob_uri),
        "documents_in_store": total,
        "selected": len(table),
        "labelled": len(decided),
        "classes": decided["label"].value_counts().sort_index().to_dict(),
        "skipped": dict(sorted(skipped.items())),
    }
    label_map: dict[str, Any] | None = None
    if mode == "all":
        ids = table[list(ID_COLUMNS)]
    else:
        # Undecided labels first (every reason, zeros included), then invalid documents.
        stats["dropped"] = dict(undecided) | dict(sorted(skipped.items()))
        if decided.empty:
            raise EmptySelectionError(
                f"none of the {len(table)} selected images has a label decided at level "
                f"{config.level} (labels.min_agreement {config.min_agreement}); dropped: "
                f"{_nonzero(stats['dropped'])}; filter: {image_filter.model_dump_json()}"
            )
        ids, label_map, split_stats = build_labelled_set(decided, config)
        stats.update(split_stats)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(output_dir / "ids.csv", ids)
    if label_map is None:
        (output_dir / "labels.json").unlink(missing_ok=True)  # left by an earlier labelled run
    else:
        write_json(output_dir / "labels.json", label_map)
    write_json(output_dir / "containers.json", dict.fromkeys(ids["id"], container))
    write_json(output_dir / "selection.json", stats)
    log.info(
        "selected %d of %d documents (%d labelled, %d classes); skipped: %s",
        len(table),
        total,
        len(decided),
        len(stats["classes"]),
        dict(skipped) or "none",
    )
    if mode == "labelled":
        log.info(
            "labelled mode: %d images written; dropped: %s; per split and class: %s",
            len(ids),
            _nonzero(stats["dropped"]),
            stats["counts_before_oversampling"],
        )
    return stats
