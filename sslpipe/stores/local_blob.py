"""The embedded blob store: a local folder plays one blob container."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from stat import S_ISREG

from sslpipe.core.io import atomic_path
from sslpipe.stores.base import BlobInfo, BlobNotFoundError, BlobStore, StoreError, blob_key

# A folder, or a path through a file, is no blob either (as in a blob container).
_NOT_A_BLOB = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def safe_blob_path(root: Path, name: str) -> Path:
    """The file for blob ``name`` under ``root``; refuses names that would leave ``root``."""
    return root.joinpath(*blob_key(name).split("/"))


def file_etag(stat: os.stat_result) -> str:
    """The ETag of a file from its metadata alone (size, modification time, inode): cheap, and
    it changes on every write, in place or by replacing the file."""
    return hashlib.md5(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode()).hexdigest()


class LocalFolderBlobStore(BlobStore):
    """Blobs as files under ``root``; the folder name is the container name."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = Path(root).resolve()
        self.container = self.root.name
        self.uri = self.root.as_uri()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StoreError(f"blob folder {self.root} does not exist")

    def _not_found(self, name: str) -> BlobNotFoundError:
        return BlobNotFoundError(f"blob {name!r} not found in {self.uri}")

    async def read(self, name: str) -> bytes:
        path = safe_blob_path(self.root, name)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except _NOT_A_BLOB:
            raise self._not_found(name) from None

    async def info(self, name: str) -> BlobInfo:
        """The blob's name, size and ETag from one ``stat``; BlobNotFoundError when absent."""
        key = blob_key(name)
        try:
            stat = await asyncio.to_thread(safe_blob_path(self.root, key).stat)
        except _NOT_A_BLOB:
            raise self._not_found(name) from None
        if not S_ISREG(stat.st_mode):
            raise self._not_found(name)
        return BlobInfo(name=key, size=stat.st_size, etag=file_etag(stat))

    async def read_if_changed(self, name: str, etag: str | None) -> tuple[bytes | None, str]:
        """``(None, etag)`` when the file's ETag is still ``etag``, else ``(bytes, new etag)``.

        The ETag is taken before reading, so a write in between is fetched again next time.
        """
        current = (await self.info(name)).etag
        if etag is not None and current == etag:
            return None, current
        return await self.read(name), current

    async def write(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self.write_sync, name, data)

    def write_sync(self, name: str, data: bytes) -> None:
        """Write a blob from synchronous code (e.g. building a catalog)."""
        path = safe_blob_path(self.root, name)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        for dirpath, _, files in os.walk(self.root):
            for file_name in sorted(files):
                if file_name.startswith("."):
                    continue
                path = Path(dirpath) / file_name
                name = path.relative_to(self.root).as_posix()
                if name.startswith(prefix):
                    stat = path.stat()
                    yield BlobInfo(name=name, size=stat.st_size, etag=file_etag(stat))
