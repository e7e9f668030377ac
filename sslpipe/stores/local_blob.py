"""The embedded blob store: a local folder plays one blob container."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from sslpipe.io import atomic_path
from sslpipe.stores.base import BlobInfo, BlobNotFoundError, BlobStore, StoreError


def safe_blob_path(root: Path, name: str) -> Path:
    """The file for blob ``name`` under ``root``; refuses names that would leave ``root``."""
    pure = PurePosixPath(name)
    if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
        raise ValueError(
            f"unsafe blob name {name!r}: it must be a relative path inside the container"
        )
    return root.joinpath(*pure.parts)


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

    async def read(self, name: str) -> bytes:
        path = safe_blob_path(self.root, name)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # A folder, or a path through a file, is no blob either (as in a blob container).
            raise BlobNotFoundError(f"blob {name!r} not found in {self.uri}") from None

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
                    etag = hashlib.md5(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
                    yield BlobInfo(name=name, size=stat.st_size, etag=etag)
