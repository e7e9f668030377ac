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

from sslpipe.core.metadata import describe_invalid, validate_document
from sslpipe.data.demo import DemoImage
from sslpipe.stores.base import BlobStore, MetadataStore, UpsertReport, blob_key
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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _parse_line(raw: bytes, where: str, *, first: bool) -> dict[str, Any]:
    """One line's document; IngestError naming ``where`` when it is not a usable JSON object."""
    try:
        # A byte-order mark (some Windows editors write one) may start the file, nowhere else.
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise IngestError(
            f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            "save the file as UTF-8"
        ) from None
    try:
        document = json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise IngestError(f"{where}: not valid JSON ({err.msg})") from None
    except ValueError as err:  # NaN, Infinity: Python extensions that JSON and Cosmos DB refuse
        raise IngestError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise IngestError(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(document, dict):
        raise IngestError(f"{where}: expected a JSON object, found {type(document)}")
    doc_id = document.get("id")
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise IngestError(f"{where}: the document has no string 'id' (the blob name)")
    try:
        # A \ud800 escape without its pair is valid JSON but no Unicode text: no store takes it.
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise IngestError(
            f"{where}: the text has an unpaired surrogate escape (e.g. \\ud800), not valid Unicode"
        ) from None
    return document


def _numbered_documents(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("file:line", document)`` for every non-blank line of a JSON-lines file."""
    try:
        handle = path.open("rb")
    except OSError as err:
        raise IngestError(f"cannot read the documents file {path}: {err.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield f"{path}:{number}", _parse_line(raw, f"{path}:{number}", first=number == 1)


def read_documents(path: Path) -> Iterator[dict[str, Any]]:
    """The documents of a JSON-lines file (UTF-8), one object per non-blank line.

    Raises:
        IngestError: naming the line when it is not UTF-8, not a JSON object (NaN and
            Infinity are not JSON) with a non-empty string ``id`` (the image's blob name), or
            has text that is not valid Unicode.
    """
    for _, document in _numbered_documents(path):
        yield document


def validate_documents(path: Path) -> int:
    """Read the whole file once before anything is written; returns the number of documents.

    Raises:
        IngestError: on the first bad line, on an id that occurs twice, or on two ids that name
            the same blob (``a.jpeg`` and ``./a.jpeg``: one image would count twice, and could
            land in the train and the test split).
    """
    seen: dict[str, tuple[str, str]] = {}  # blob key -> (id, file:line)
    for where, document in _numbered_documents(path):
        doc_id = document["id"]
        try:
            key = blob_key(doc_id)
        except ValueError:
            key = doc_id  # an unsafe name: skipped and reported when the images are loaded
        if key in seen:
            other, first = seen[key]
            if other == doc_id:
                raise IngestError(f"{where}: the id {doc_id!r} occurs more than once ({first})")
            raise IngestError(
                f"{where}: the id {doc_id!r} names the same blob {key!r} as the id {other!r} "
                f"({first})"
            )
        seen[key] = (doc_id, where)
    return len(seen)


def _valid_documents(
    numbered: list[tuple[str, dict[str, Any]]], report: IngestReport
) -> list[dict[str, Any]]:
    """The documents whose fields have the types the pipeline reads; the others are skipped
    and reported with their line and the reason (``invalid:<field>``)."""
    valid = []
    for where, document in numbered:
        _, reason = validate_document(document)
        if reason is None:
            valid.append(document)
        else:
            report.skip(document["id"], reason, f"{where}: {describe_invalid(document)}")
    return valid


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
    whole documents file is validated before anything is written. A document whose fields have
    the wrong types (see :class:`sslpipe.core.metadata.ImageDocument`), or whose image is missing,
    empty or has an unsafe name, is skipped and reported with the reason, not stored.

    Raises:
        IngestError: when the documents file is unreadable, has a bad line or a repeated id.
    """
    if not images_dir.is_dir():
        raise IngestError(f"the images folder {images_dir} does not exist")
    validate_documents(documents_path)
    report = IngestReport()

    async def run() -> None:
        try:
            for chunk in _chunks(_numbered_documents(documents_path), CHUNK):
                documents = _valid_documents(chunk, report)
                blobs, kept = _load_blobs(images_dir, documents, report)
                await _upload(blob_store, blobs, concurrency)
                report.blobs_written += len(blobs)
                report.add(metadata_store.upsert(kept))
        finally:
            await blob_store.close()

    asyncio.run(run())
    return report
