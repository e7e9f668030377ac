"""data_prep: fetch the selected images from the blob store and resize them.

Downloads run concurrently (bounded by ``concurrency``) while decoding and resizing run in a
thread pool, so I/O and CPU overlap; images stream through and are never all held in memory.

Re-running into the same output folder is incremental: an image of the previous run is reused,
without downloading its blob, when the previous manifest lists the same id with the same
blob_path and image_size, the image file is as that run left it, and the blob's ETag is
unchanged (one conditional request per blob). Changing image_size therefore refetches all.

Outputs (one folder):
    images/<blob_path>  the resized image (JPEG)
    manifest.csv     id, path (relative to the folder), label, width, height, blob_path,
                     image_size, etag (of the blob the image was made from), then every other
                     column of ids.csv but file_hash (labelled: split, repeats)
    skipped.csv      id, reason, detail for every image that could not be used
    selection.json   copied from the input, for lineage
    labels.json      copied from the input when there (connect_db's labelled mode)
    stats.json       counts (downloaded and reused too), skipped per reason, seconds, images/s
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

MANIFEST_COLUMNS = ("id", "path", "label", "width", "height", "blob_path", "image_size", "etag")
# ids.csv columns that are not passed through to the manifest (the others are, after these).
_NOT_PASSED = ("file_hash", *MANIFEST_COLUMNS)
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
    blob_path: str = ""
    etag: str = ""
    downloaded: bool = False  # the blob's bytes were fetched (whatever came of them)
    reused: bool = False  # the previous run's image was kept


@dataclass(frozen=True)
class Previous:
    """An image that the previous finished run prepared, as its manifest lists it."""

    path: str
    width: int
    height: int
    blob_path: str
    image_size: int
    etag: str


def _previous_images(output_dir: Path) -> dict[str, Previous]:
    """The images of the last finished run in ``output_dir`` by id, as its manifest lists them,
    keeping only those whose file is still as that run left it (a failed run since then may
    have replaced some: those are newer than the manifest). Empty when there is no manifest or
    it predates ETags."""
    manifest_path = output_dir / "manifest.csv"
    if not manifest_path.is_file():
        return {}
    frame = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    if not set(MANIFEST_COLUMNS) <= set(frame.columns):
        log.info("%s has no ETags (an older run): every image is fetched", manifest_path)
        return {}
    finished = manifest_path.stat().st_mtime_ns
    previous: dict[str, Previous] = {}
    for row in frame.drop_duplicates("id").to_dict("records"):
        image = output_dir / row["path"]
        if not (row["etag"] and image.is_file() and image.stat().st_mtime_ns <= finished):
            continue
        try:
            width, height, size = int(row["width"]), int(row["height"]), int(row["image_size"])
        except ValueError:
            continue  # edited by hand: fetch it again
        previous[row["id"]] = Previous(
            row["path"], width, height, row["blob_path"], size, row["etag"]
        )
    return previous


def _known_etag(before: Previous | None, blob_path: str, path: str, image_size: int) -> str | None:
    """The ETag the previous image was made from when it is reusable for this row, else None."""
    if before is None:
        return None
    same = (before.blob_path, before.path, before.image_size) == (blob_path, path, image_size)
    return before.etag if same else None


def _process(data: bytes, target: Path, image_size: int) -> tuple[int, int]:
    image = decode_resized(data, image_size)
    with atomic_path(target) as tmp:
        tmp.write_bytes(encode_jpeg(image))
    return image.size


@dataclass(frozen=True)
class _Job:
    """What every fetch of one run shares."""

    store: BlobStore
    out_dir: Path
    image_size: int
    pool: ThreadPoolExecutor
    previous: dict[str, Previous]


async def _fetch_one(job: _Job, row: dict[str, str]) -> Outcome:
    """The image of one id-list row: reused from the previous run when its blob is unchanged,
    else downloaded and resized; or the reason it is skipped."""
    image_id, label, blob_path = row["id"], row.get("label", ""), row["blob_path"]
    try:
        target = safe_blob_path(job.out_dir / "images", blob_path)
    except ValueError as err:
        return Outcome(image_id, label, reason="unsafe_name", detail=str(err))
    relative = target.relative_to(job.out_dir).as_posix()
    before = job.previous.get(image_id)
    known = _known_etag(before, blob_path, relative, job.image_size)
    try:
        data, etag = await job.store.read_if_changed(blob_path, known)
    except BlobNotFoundError as err:
        return Outcome(image_id, label, reason="missing_blob", detail=str(err))
    if data is None and before is not None:
        return Outcome(image_id, label, relative, before.width, before.height,
                       blob_path=blob_path, etag=etag, reused=True)  # fmt: skip
    assert data is not None  # read_if_changed(name, None) always reads
    try:
        loop = asyncio.get_running_loop()
        width, height = await loop.run_in_executor(job.pool, _process, data, target, job.image_size)
    except UnusableImageError as err:
        return Outcome(image_id, label, reason=err.reason, detail=str(err), downloaded=True)
    return Outcome(image_id, label, relative, width, height,
                   blob_path=blob_path, etag=etag, downloaded=True)  # fmt: skip


async def _fetch_all(
    store: BlobStore,
    rows: Iterator[dict[str, str]],
    out_dir: Path,
    image_size: int,
    concurrency: int,
    previous: dict[str, Previous],
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    workers = max(1, min(concurrency, os.cpu_count() or 1))
    store.set_max_concurrency(concurrency)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        job = _Job(store, out_dir, image_size, pool, previous)

        async def worker() -> None:
            # Each worker pulls the next row when it is free: at most ``concurrency`` images
            # are in flight, however long the id list is.
            for row in rows:
                outcomes.append(await _fetch_one(job, row))

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

    Images that an earlier run prepared in ``output_dir`` are reused when their blob is
    unchanged (see the module docstring); ``stats["downloaded"]`` and ``stats["reused"]`` count
    both kinds.

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
    previous = _previous_images(output_dir)
    if previous:
        log.info("%d images of the previous run may be reused", len(previous))
    outcomes = asyncio.run(_fetch_all(store, rows, output_dir, image_size, concurrency, previous))
    seconds = time.perf_counter() - started
    extra = table[["id", *(c for c in table.columns if c not in _NOT_PASSED)]]
    return _write_outputs(
        outcomes, extra, ids_dir, output_dir, image_size, seconds, max_skipped_fraction
    )


def _write_outputs(
    outcomes: list[Outcome],
    extra: pd.DataFrame,
    ids_dir: Path,
    output_dir: Path,
    image_size: int,
    seconds: float,
    max_skipped: float,
) -> dict[str, Any]:
    outcomes.sort(key=lambda o: o.id)
    good = [o for o in outcomes if o.reason is None]
    bad = [o for o in outcomes if o.reason is not None]
    manifest = pd.DataFrame(
        [(o.id, o.path, o.label, o.width, o.height, o.blob_path, image_size, o.etag) for o in good],
        columns=list(MANIFEST_COLUMNS),
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
        "downloaded": sum(o.downloaded for o in outcomes),
        "reused": sum(o.reused for o in outcomes),
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
        "prepared %d of %d images (%d downloaded, %d reused) in %.1f s (%.1f images/s); "
        "skipped: %s",
        len(good),
        len(outcomes),
        stats["downloaded"],
        stats["reused"],
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
