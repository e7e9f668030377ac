"""The store interfaces every backend implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sslpipe.filters import ImageFilter


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


class BlobStore(abc.ABC):
    """One container of image blobs, accessed asynchronously."""

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

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
