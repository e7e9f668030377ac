"""The store interfaces every backend implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sslpipe.core.filters import ImageFilter


class StoreError(RuntimeError):
    """A store could not be opened or answered with an error; the message names the store."""


class BlobNotFoundError(StoreError, KeyError):
    """The named blob does not exist in the container."""


@dataclass(frozen=True)
class UpsertReport:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


class MetadataStore(abc.ABC):
    """A collection of JSON metadata documents, one per image, keyed by ``id``."""

    uri: str

    @abc.abstractmethod
    def upsert(self, documents: Iterable[dict[str, Any]]) -> UpsertReport:
        """Insert or replace documents by id."""

    @abc.abstractmethod
    def count(self) -> int:
        """Number of documents in the store."""

    @abc.abstractmethod
    def get(self, doc_id: str) -> dict[str, Any] | None:
        """The raw document with this id, or None."""

    @abc.abstractmethod
    def select(self, image_filter: ImageFilter) -> Iterator[dict[str, Any]]:
        """Raw documents matching the filter, ordered by id.

        Implementations may be lenient about documents with missing or mistyped fields (they
        are validated and counted by the caller) but must never paste filter values into query
        text.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class BlobInfo:
    name: str
    size: int
    etag: str


def blob_key(name: str) -> str:
    """The canonical form of blob name ``name``: its ``/``-separated parts, without ``.`` parts
    or repeated slashes (``x/./y.jpeg`` -> ``x/y.jpeg``), as every store names the blob.

    Raises:
        ValueError: for names that would leave the container (absolute, ``..``, backslashes,
            NUL) or name no blob at all (empty, ``.``).
    """
    pure = PurePosixPath(name)
    if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
        raise ValueError(
            f"unsafe blob name {name!r}: it must be a relative path inside the container"
        )
    return "/".join(pure.parts)


class BlobStore(abc.ABC):
    """One container of image blobs, accessed asynchronously.

    Blob names are checked and made canonical with :func:`blob_key`. An ETag is an opaque
    string that changes whenever the blob's content changes.
    """

    uri: str
    container: str

    @abc.abstractmethod
    async def read(self, name: str) -> bytes:
        """The blob's bytes; raises BlobNotFoundError when it does not exist."""

    @abc.abstractmethod
    async def write(self, name: str, data: bytes) -> None:
        """Create or replace a blob."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        """Blobs whose name starts with ``prefix``."""

    async def info(self, name: str) -> BlobInfo:
        """The blob's name, size and ETag; raises BlobNotFoundError when it does not exist.

        This default scans ``list(name)``; stores override it with a direct look-up.
        """
        key = blob_key(name)
        async for found in self.list(key):
            if found.name == key:
                return found
        raise BlobNotFoundError(f"blob {name!r} not found in {self.uri}")

    async def read_if_changed(self, name: str, etag: str | None) -> tuple[bytes | None, str]:
        """``(None, etag)`` when the blob's ETag is still ``etag``, else ``(bytes, new etag)``.

        ``etag=None`` always reads. Raises BlobNotFoundError when the blob does not exist. This
        default asks :meth:`info` first and then reads, so a change in between is only seen on
        the next call (the ETag returned is never newer than the bytes); stores override it
        with one conditional request.
        """
        current = (await self.info(name)).etag
        if etag is not None and current == etag:
            return None, current
        return await self.read(name), current

    def set_max_concurrency(self, requests: int) -> None:  # noqa: B027 - optional hook
        """Prepare for up to ``requests`` calls in flight at once (e.g. size a connection
        pool); call it before the first request."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
