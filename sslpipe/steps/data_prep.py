"""data_prep: fetch the selected images from the blob store and resize them.

Downloads run concurrently (bounded by ``concurrency``) while decoding and resizing run in a
thread pool, so I/O and CPU overlap; images stream through and are never all held in memory.

Outputs (one folder):
    images/<id>      the resized image (JPEG)
    manifest.csv     id, path (relative to the folder), label, width, height, then every other
                     column of ids.csv but blob_path and file_hash (labelled: split, repeats)
    skipped.csv      id, reason, detail for every image that could not be used
    selection.json   copied from the input, for lineage
    labels.json      copied from the input when there (connect_db's labelled mode)
    stats.json       counts, skipped per reason, seconds, images/s
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sslpipe.images import UnusableImageError, decode_resized, encode_jpeg
from sslpipe.io import atomic_path, read_csv, write_csv, write_json
from sslpipe.logs import get_logger
from sslpipe.stores import BlobStore, open_blob_store
from sslpipe.stores.base import BlobNotFoundError, StoreError
from sslpipe.stores.local_blob import safe_blob_path
from sslpipe.uris import redact_uri

log = get_logger("data_prep")

MANIFEST_COLUMNS = ("id", "path", "label", "width", "height")
# ids.csv columns that are not passed through to the manifest (the others are, after these).
_NOT_PASSED = ("blob_path", "file_hash", *MANIFEST_COLUMNS)
# Files of the selection folder copied into the output as they are.
_COPIED = ("selection.json", "labels.json")


class TooManySkippedError(RuntimeError):
    """More images than allowed could not be used."""


@dataclass(frozen=True)
class Outcome:
    id: str
    label: str
    path: str | None = None
    width: int = 0
    height: int = 0
    reason: str | None = None
    detail: str = ""


def _process(data: bytes, target: Path, image_size: int) -> tuple[int, int]:
    image = decode_resized(data, image_size)
    with atomic_path(target) as tmp:
        tmp.write_bytes(encode_jpeg(image))
    return image.size


async def _fetch_one(
    store: BlobStore, row: dict[str, str], out_dir: Path, image_size: int, pool: ThreadPoolExecutor
) -> Outcome:
    image_id, label = row["id"], row.get("label", "")
    try:
        target = safe_blob_path(out_dir / "images", row["blob_path"])
    except ValueError as err:
        return Outcome(image_id, label, reason="unsafe_name", detail=str(err))
    try:
        data = await store.read(row["blob_path"])
    except BlobNotFoundError as err:
        return Outcome(image_id, label, reason="missing_blob", detail=str(err))
    try:
        loop = asyncio.get_running_loop()
        width, height = await loop.run_in_executor(pool, _process, data, target, image_size)
    except UnusableImageError as err:
        return Outcome(image_id, label, reason=err.reason, detail=str(err))
    relative = target.relative_to(out_dir).as_posix()
    return Outcome(image_id, label, path=relative, width=width, height=height)


async def _fetch_all(
    store: BlobStore,
    rows: Iterator[dict[str, str]],
    out_dir: Path,
    image_size: int,
    concurrency: int,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    workers = max(1, min(concurrency, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:

        async def worker() -> None:
            # Each worker pulls the next row when it is free: at most ``concurrency`` images
            # are in flight, however long the id list is.
            for row in rows:
                outcomes.append(await _fetch_one(store, row, out_dir, image_size, pool))

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            await store.close()
    return outcomes


def run_data_prep(
    *,
    ids_dir: Path,
    blob_uri: str,
    output_dir: Path,
    image_size: int,
    concurrency: int = 16,
    max_skipped_fraction: float = 0.05,
) -> dict[str, Any]:
    """Fetch and resize every image in ``ids_dir/ids.csv``; returns the stats.

    Raises:
        TooManySkippedError: when the skipped share exceeds ``max_skipped_fraction``; the
            skipped list is still written so the cause can be inspected.
    """
    table = read_csv(ids_dir / "ids.csv", required=("id", "blob_path"))
    if "label" not in table.columns:
        table["label"] = ""
    try:
        store = open_blob_store(blob_uri)
    except StoreError as err:
        raise StoreError(f"data_prep cannot open the blob store: {err}") from None
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "fetching %d images from %s (concurrency %d)", len(table), redact_uri(blob_uri), concurrency
    )
    started = time.perf_counter()
    rows = iter(table[["id", "blob_path", "label"]].to_dict("records"))
    outcomes = asyncio.run(_fetch_all(store, rows, output_dir, image_size, concurrency))
    seconds = time.perf_counter() - started
    extra = table[["id", *(c for c in table.columns if c not in _NOT_PASSED)]]
    return _write_outputs(outcomes, extra, ids_dir, output_dir, seconds, max_skipped_fraction)


def _write_outputs(
    outcomes: list[Outcome],
    extra: pd.DataFrame,
    ids_dir: Path,
    output_dir: Path,
    seconds: float,
    max_skipped: float,
) -> dict[str, Any]:
    outcomes.sort(key=lambda o: o.id)
    good = [o for o in outcomes if o.reason is None]
    bad = [o for o in outcomes if o.reason is not None]
    manifest = pd.DataFrame(
        [(o.id, o.path, o.label, o.width, o.height) for o in good], columns=list(MANIFEST_COLUMNS)
    )
    if len(extra.columns) > 1:
        # The id list's own columns (split, repeats, ...) follow the image's, in their order.
        extra = extra.drop_duplicates("id").astype({"id": str})
        manifest = manifest.merge(extra, on="id", how="left", validate="many_to_one")
    skipped = pd.DataFrame(
        [(o.id, o.reason, o.detail) for o in bad], columns=["id", "reason", "detail"]
    )
    stats = {
        "requested": len(outcomes),
        "prepared": len(good),
        "skipped": dict(sorted(Counter(str(o.reason) for o in bad).items())),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(outcomes) / seconds, 1) if seconds > 0 else None,
    }
    write_csv(output_dir / "skipped.csv", skipped)
    for name in _COPIED:
        if (ids_dir / name).is_file():
            shutil.copyfile(ids_dir / name, output_dir / name)
        else:
            (output_dir / name).unlink(missing_ok=True)  # left by an earlier run
    write_json(output_dir / "stats.json", stats)
    log.info(
        "prepared %d of %d images in %.1f s (%.1f images/s); skipped: %s",
        len(good),
        len(outcomes),
        seconds,
        stats["images_per_s"] or 0.0,
        stats["skipped"] or "none",
    )
    fraction = len(bad) / max(1, len(outcomes))
    if fraction > max_skipped or not good:
        listing = "; ".join(f"{o.id}: {o.reason}" for o in bad[:20])
        raise TooManySkippedError(
            f"{len(bad)} of {len(outcomes)} images ({fraction:.1%}) could not be used, more than "
            f"the allowed {max_skipped:.1%} (data_prep.max_skipped_fraction): {listing}"
            f"{' …' if len(bad) > 20 else ''}; full list in {output_dir / 'skipped.csv'}"
        )
    # The manifest is written last: its presence means the step finished.
    write_csv(output_dir / "manifest.csv", manifest)
    return stats
