"""connect_db: select images from the metadata store and write the id list.

Outputs (one folder):
    ids.csv          id, blob_path, file_hash, label (resolved at ``label_level``, empty if none)
    containers.json  image id -> blob container, as the seed's mapping
    selection.json   the filter, the stores (URIs without secrets), counts, skipped per reason
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from sslpipe.filters import ImageFilter
from sslpipe.io import write_csv, write_json
from sslpipe.labels import resolve_label
from sslpipe.logs import get_logger
from sslpipe.metadata import describe_invalid, validate_document
from sslpipe.stores import open_blob_store, open_metadata_store
from sslpipe.uris import redact_uri

log = get_logger("connect_db")

ID_COLUMNS = ("id", "blob_path", "file_hash", "label")


class EmptySelectionError(ValueError):
    """The filter selected no usable image."""


def select_images(
    raw_documents: list[dict[str, Any]] | Any, *, label_level: int = 1
) -> tuple[pd.DataFrame, Counter[str]]:
    """Validate documents and resolve their labels; return the id table and skip counts."""
    rows: list[dict[str, str]] = []
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
        decision = resolve_label(document.labels_with_taxonomy, level=label_level)
        rows.append(
            {
                "id": document.id,
                "blob_path": document.id,
                "file_hash": document.file_hash or "",
                "label": decision.label or "",
            }
        )
    return pd.DataFrame(rows, columns=list(ID_COLUMNS)), skipped


def run_connect_db(
    *,
    metadata_uri: str,
    blob_uri: str,
    image_filter: ImageFilter,
    output_dir: Path,
    label_level: int = 1,
) -> dict[str, Any]:
    """Select images by ``image_filter`` and write the id list; returns the selection stats.

    Raises:
        EmptySelectionError: when nothing usable was selected (nothing is written then).
    """
    with open_metadata_store(metadata_uri) as store:
        total = store.count()
        table, skipped = select_images(store.select(image_filter), label_level=label_level)
    container = open_blob_store(blob_uri).container
    if table.empty:
        raise EmptySelectionError(
            f"the filter selected no usable image out of {total} documents in "
            f"{redact_uri(metadata_uri)} (skipped: {dict(skipped) or 'none'}); "
            f"filter: {image_filter.model_dump_json()}"
        )
    labelled = table[table["label"] != ""]
    stats = {
        "filter": image_filter.model_dump(mode="json"),
        "label_level": label_level,
        "metadata_store": redact_uri(metadata_uri),
        "blob_store": redact_uri(blob_uri),
        "documents_in_store": total,
        "selected": len(table),
        "labelled": len(labelled),
        "classes": labelled["label"].value_counts().sort_index().to_dict(),
        "skipped": dict(sorted(skipped.items())),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(output_dir / "ids.csv", table)
    write_json(output_dir / "containers.json", dict.fromkeys(table["id"], container))
    write_json(output_dir / "selection.json", stats)
    log.info(
        "selected %d of %d documents (%d labelled, %d classes); skipped: %s",
        len(table),
        total,
        len(labelled),
        len(stats["classes"]),
        dict(skipped) or "none",
    )
    return stats
