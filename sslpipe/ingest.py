"""Loading images and their metadata documents into the configured stores.

Two sources: the demo catalog (:func:`ingest_images`) and a user's folder of images plus a
JSON-lines file of metadata documents (:func:`ingest_folder`). Either way the blobs are written
before their documents, so a document never points at an image that is not there yet, and the
work goes in chunks so memory does not grow with the size of the catalog.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslpipe.demo import DemoImage
from sslpipe.stores.base import BlobStore, MetadataStore, UpsertReport
from sslpipe.stores.local_blob import safe_blob_path

CHUNK = 256  # documents (and their images) handled at once


class IngestError(ValueError):
    """The documents file cannot be ingested; the message names the line and the reason."""


@dataclass
class IngestReport:
    """What an ingestion did: documents per outcome, blobs written, and what was skipped."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    blobs_written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_items: list[dict[str, str]] = field(default_factory=list)

    def add(self, report: UpsertReport) -> None:
        self.created += report.created
        self.updated += report.updated
        self.unchanged += report.unchanged

    def skip(self, item: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.skipped_items.append({"item": item, "reason": reason, "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": {
                "created": self.created,
                "updated": self.updated,
                "unchanged": self.unchanged,
            },
            "blobs_written": self.blobs_written,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_items": self.skipped_items,
        }


async def _upload(
    blob_store: BlobStore, blobs: Sequence[tuple[str, bytes]], concurrency: int
) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str, data: bytes) -> None:
        async with gate:
            await blob_store.write(name, data)

    await asyncio.gather(*(one(name, data) for name, data in blobs))


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ingest_images(
    images: Iterable[DemoImage],
    metadata_store: MetadataStore,
    blob_store: BlobStore,
    *,
    concurrency: int = 16,
) -> UpsertReport:
    """Upload every image's bytes, then upsert its document; returns the documents' outcomes."""
    total = IngestReport()

    async def run() -> None:
        try:
            for chunk in _chunks(images, CHUNK):
                await _upload(blob_store, [(i.blob_name, i.data) for i in chunk], concurrency)
                total.add(metadata_store.upsert(i.document for i in chunk))
        finally:
            await blob_store.close()

    asyncio.run(run())
    return UpsertReport(created=total.created, updated=total.updated, unchanged=total.unchanged)


def read_documents(path: Path) -> Iterator[dict[str, Any]]:
    """The documents of a JSON-lines file, one object per non-blank line.

    Raises:
        IngestError: naming the line when it is not a JSON object with a non-empty string
            ``id`` (the image's blob name).
    """
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise IngestError(f"cannot read the documents file {path}: {err.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                document = json.loads(line)
            except json.JSONDecodeError as err:
                raise IngestError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(document, dict):
                raise IngestError(f"{where}: expected a JSON object, found {type(document)}")
            doc_id = document.get("id")
            if not isinstance(doc_id, str) or not doc_id.strip():
                raise IngestError(f"{where}: the document has no string 'id' (the blob name)")
            yield document


def validate_documents(path: Path) -> int:
    """Read the whole file once before anything is written; returns the number of documents.

    Raises:
        IngestError: on the first bad line, or on an id that occurs twice.
    """
    seen: set[str] = set()
    for document in read_documents(path):
        if document["id"] in seen:
            raise IngestError(f"{path}: the id {document['id']!r} occurs more than once")
        seen.add(document["id"])
    return len(seen)


def _load_blobs(
    images_dir: Path, documents: list[dict[str, Any]], report: IngestReport
) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
    """The (blob name, bytes) of every document whose image file exists, and those documents."""
    blobs, kept = [], []
    for document in documents:
        name = document["id"]
        try:
            data = safe_blob_path(images_dir, name).read_bytes()
        except ValueError as err:
            report.skip(name, "unsafe_name", str(err))
            continue
        except FileNotFoundError:
            report.skip(name, "missing_image", f"no file {images_dir / name}")
            continue
        if not data:
            report.skip(name, "empty_image", f"{images_dir / name} has zero bytes")
            continue
        blobs.append((name, data))
        kept.append(document)
    return blobs, kept


def ingest_folder(
    images_dir: Path,
    documents_path: Path,
    metadata_store: MetadataStore,
    blob_store: BlobStore,
    *,
    concurrency: int = 16,
) -> IngestReport:
    """Load ``documents_path`` (JSON lines) and the images they name from ``images_dir``.

    A document's ``id`` is its image's blob name and its file name under ``images_dir``. The
    whole documents file is validated before anything is written. A document whose image is
    missing, empty or has an unsafe name is skipped and reported, not stored.

    Raises:
        IngestError: when the documents file is unreadable, has a bad line or a repeated id.
    """
    if not images_dir.is_dir():
        raise IngestError(f"the images folder {images_dir} does not exist")
    validate_documents(documents_path)
    report = IngestReport()

    async def run() -> None:
        try:
            for chunk in _chunks(read_documents(documents_path), CHUNK):
                blobs, kept = _load_blobs(images_dir, chunk, report)
                await _upload(blob_store, blobs, concurrency)
                report.blobs_written += len(blobs)
                report.add(metadata_store.upsert(kept))
        finally:
            await blob_store.close()

    asyncio.run(run())
    return report
