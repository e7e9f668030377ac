"""The workspace's cache of resized images, shared by the data_prep runs of a workspace.

Why: every local run writes into a new output folder, so data_prep's incremental fetch (one
conditional request per blob, module docstring of :mod:`sslpipe.steps.data_prep`) found no
earlier image to compare with and downloaded the whole catalog again. With this cache a run
asks the store with the ETag of the cached image and, when the blob is unchanged, copies the
cached image instead of downloading and resizing the blob.

Entries: one file per (blob store, blob name, resize parameters), named by their SHA-256
(``<root>/<2 hex>/<64 hex>.img``): the store's URI without credentials, the blob name, the
shorter side and a digest of the code that resizes (``sslpipe/data/images.py`` and Pillow's
version, so that a change there never serves images resized the old way). The file holds a
header line (JSON: that key, the blob's ETag, width, height, the JPEG's length and SHA-256)
and the resized JPEG. An entry
serves only the ETag it records, confirmed by the store, so it is in effect keyed by (store,
blob, ETag, resize parameters); a changed blob replaces it. A file whose header names another
key or whose JPEG has another length or SHA-256 (truncated, corrupted) is never used: it is
removed and the blob is fetched again.

Two runs at once: an entry is written under a name of its process and thread and renamed
(:func:`sslpipe.core.io.write_atomically`), so a reader sees a whole old file or a whole new one,
two runs writing one entry both leave a whole one, and entries never share a file, so none is
lost. Pruning unlinks whole files; a reader that loses the race reads nothing and fetches.

Bound: ``max_bytes`` (``data_prep.cache_max_mb``). Each hit sets the entry's modification time,
so the least recently used entries are those modified longest ago. A run adds at most
``max_bytes`` of entries (its processes share that budget) and, when it ends, removes the least
recently used ones until the cache holds at most ``max_bytes`` (:func:`prune`, also
``python -m sslpipe.data.image_cache DIR --max-mb N``). Entries are one file each, for they are
small; the cache's size is the sum of their lengths.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from sslpipe.core.io import write_atomically
from sslpipe.core.logs import get_logger
from sslpipe.core.uris import redact_uri

log = get_logger("image_cache")

IMAGE_CACHE_ENV = "SSLPIPE_IMAGE_CACHE"
"""The cache folder, set by the local executor for every step (``<workspace>/cache/images``);
unset (Azure ML) means no cache."""
DEFAULT_CACHE_MAX_MB = 4096
"""``data_prep.cache_max_mb`` by default: some 1.5 million images of 72 px (about 3 KB each)."""
_MAGIC = b"sslpipe-image-cache 1\n"
_SUFFIX = ".img"
STALE_TMP_S = 3600.0
"""A temporary file older than this was left by a killed writer: pruning removes it."""


def image_cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The cache folder that :data:`IMAGE_CACHE_ENV` names, else None."""
    value = (os.environ if environ is None else environ).get(IMAGE_CACHE_ENV, "").strip()
    return Path(value) if value else None


@functools.cache
def _resize_digest() -> str:
    """A digest of the code that resizes (sslpipe/data/images.py and Pillow's version): a change
    makes every earlier entry a miss, so that a run never mixes old and new resizing."""
    # The file rather than the module: the executor imports this one without PIL.
    digest = hashlib.sha256(Path(__file__).with_name("images.py").read_bytes())
    digest.update(importlib.metadata.version("pillow").encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CachedImage:
    """A cache entry that passed its checks: the resized JPEG of the blob at ``etag``."""

    etag: str
    width: int
    height: int
    jpeg: bytes


@dataclass(frozen=True)
class ImageCache:
    """The entries of one blob store at one image size, under ``root``.

    Forked processes share the write budget (``max_bytes``), so build it before forking.
    """

    root: Path
    store: str
    image_size: int
    max_bytes: int
    _left: Synchronized[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", redact_uri(self.store).rstrip("/"))
        object.__setattr__(self, "_left", multiprocessing.Value("q", self.max_bytes))

    def _key(self, name: str) -> dict[str, str | int]:
        return {"store": self.store, "name": name, "image_size": self.image_size,
                "resize": _resize_digest()}  # fmt: skip

    def path(self, name: str) -> Path:
        """The entry file of blob ``name`` (present or not)."""
        digest = hashlib.sha256(json.dumps(self._key(name), sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}{_SUFFIX}"

    def get(self, name: str) -> CachedImage | None:
        """The entry of blob ``name`` when there is a sound one (and marks it used), else None;
        a damaged one is removed."""
        path = self.path(name)
        try:
            data = path.read_bytes()
        except OSError:
            return None  # not cached (or pruned just now)
        entry = self.parse(data, name)
        if entry is None:
            log.warning("image cache: %s (blob %r) is damaged: fetched again", path, name)
            with contextlib.suppress(OSError):  # else rewritten after the fetch, or left unused
                path.unlink()
            return None
        with contextlib.suppress(OSError):  # pruned or replaced meanwhile: what was read is whole
            os.utime(path)  # used now: last in line for pruning
        return entry

    def parse(self, data: bytes, name: str) -> CachedImage | None:
        """The entry that ``data`` holds when it is a sound entry of blob ``name``, else None."""
        if not data.startswith(_MAGIC):
            return None
        header_line, _, jpeg = data[len(_MAGIC) :].partition(b"\n")
        try:
            header = json.loads(header_line)
            key = self._key(name)
            sound = {k: header[k] for k in key} == key and header["bytes"] == len(jpeg)
            if not sound or header["sha256"] != hashlib.sha256(jpeg).hexdigest():
                return None
            width, height = int(header["width"]), int(header["height"])
            return CachedImage(str(header["etag"]), width, height, jpeg)
        except (ValueError, KeyError, TypeError):
            return None  # not JSON, or not this step's header

    def put(self, name: str, entry: CachedImage) -> None:
        """Store ``entry`` for blob ``name`` unless this run's budget is spent. A failure to
        write (a full disk) is logged once and ends this run's writes, never raised: the cache
        only saves work."""
        header = {**self._key(name), "etag": entry.etag, "width": entry.width,
                  "height": entry.height, "bytes": len(entry.jpeg),
                  "sha256": hashlib.sha256(entry.jpeg).hexdigest()}  # fmt: skip
        data = _MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + entry.jpeg
        with self._left.get_lock():
            if self._left.value < len(data):
                return
            self._left.value -= len(data)
        try:
            write_atomically(self.path(name), data)
        except OSError as err:
            with self._left.get_lock():
                if self._left.value > 0:  # the first failure of this run: say it once
                    log.warning("image cache: cannot write %s: %s", self.path(name), err)
                self._left.value = 0


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune` did."""

    removed: int
    freed_bytes: int
    kept: int
    kept_bytes: int


def _files(root: Path) -> Iterator[os.DirEntry[str]]:
    if not root.is_dir():
        return
    for folder in os.scandir(root):
        if folder.is_dir(follow_symlinks=False):
            yield from (f for f in os.scandir(folder.path) if f.is_file(follow_symlinks=False))


def prune(root: Path, max_bytes: int, *, now: float | None = None) -> Pruned:
    """Remove the least recently used entries under ``root`` until they hold at most
    ``max_bytes``, and temporary files older than :data:`STALE_TMP_S` (killed writers).

    Safe while other runs use the cache: they lose at most entries they then fetch again.
    """
    now = time.time() if now is None else now
    entries: list[tuple[int, int, str]] = []
    for file in _files(root):
        try:
            stat = file.stat(follow_symlinks=False)
            if file.name.endswith(_SUFFIX):
                entries.append((stat.st_mtime_ns, stat.st_size, file.path))
            elif file.name.endswith(".tmp") and now - stat.st_mtime > STALE_TMP_S:
                os.unlink(file.path)
        except FileNotFoundError:
            continue  # removed by another run meanwhile
    entries.sort()  # least recently used first
    total = sum(size for _, size, _ in entries)
    removed = freed = 0
    for _, size, path in entries:
        if total - freed <= max_bytes:
            break
        Path(path).unlink(missing_ok=True)
        removed, freed = removed + 1, freed + size
    return Pruned(removed, freed, len(entries) - removed, total - freed)


def main(argv: list[str] | None = None) -> None:
    """``python -m sslpipe.data.image_cache [DIR] --max-mb N``: prune the cache to N MiB."""
    parser = argparse.ArgumentParser(
        prog="python -m sslpipe.data.image_cache",
        description="Remove the least recently used images of the workspace's image cache.",
    )
    parser.add_argument("dir", nargs="?", type=Path, default=Path(".sslpipe/cache/images"))
    parser.add_argument("--max-mb", type=int, required=True, help="MiB to keep (0: empty it)")
    args = parser.parse_args(argv)
    done = prune(args.dir, max(0, args.max_mb) * 2**20)
    print(f"{args.dir}: removed {done.removed} images ({done.freed_bytes / 2**20:.1f} MiB); "
          f"kept {done.kept} ({done.kept_bytes / 2**20:.1f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
