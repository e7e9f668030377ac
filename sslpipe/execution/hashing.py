"""Content hashing for step reuse.

Reuse decisions must depend on *what* a step reads, not on *where* it lives, so inputs are
hashed by content: a file by its bytes, a folder by its sorted relative file names and their
bytes. Two folders with identical files therefore hash the same even when they sit in
different run folders, which is what lets a downstream step be reused after an upstream
step re-ran and produced byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from sslpipe.core.io import file_sha256

hash_file = file_sha256
"""The hex SHA-256 of one file's contents, read in chunks."""


def _is_skipped_code_entry(name: str, *, is_dir: bool) -> bool:
    """Return True for entries that never influence what code does (caches, VCS, venvs)."""
    if is_dir:
        return name.startswith(".") or name == "__pycache__"
    return name.endswith((".pyc", ".pyo"))


def iter_files(root: Path, *, code_only: bool = False) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix name, path)`` for every file under ``root``, sorted by name.

    Symbolic links are followed, to folders as to files: a step reads through them, so an edit
    under a linked folder must change the hash. A link back to a folder that is already being
    walked (a cycle) is not descended into again, which keeps the walk finite.

    ``code_only`` skips ``__pycache__``, ``*.pyc`` and dot-folders (``.git``, ``.venv``...),
    whose contents change without the code changing.
    """
    entries: list[tuple[str, Path]] = []
    ancestors: dict[str, str] = {}  # walked folder -> its real path, to recognise cycles
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        ancestors[dirpath] = os.path.realpath(dirpath)
        above = _real_ancestors(dirpath, root, ancestors)
        if code_only:
            # Pruning in place stops os.walk from descending into skipped folders at all.
            dirnames[:] = [d for d in dirnames if not _is_skipped_code_entry(d, is_dir=True)]
            filenames = [f for f in filenames if not _is_skipped_code_entry(f, is_dir=False)]
        dirnames[:] = [
            d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in above
        ]
        for filename in filenames:
            path = Path(dirpath) / filename
            entries.append((path.relative_to(root).as_posix(), path))
    yield from sorted(entries)


def _real_ancestors(dirpath: str, root: Path, ancestors: dict[str, str]) -> set[str]:
    """Real paths of ``dirpath`` and of every walked folder above it, up to ``root``."""
    found = set()
    current = Path(dirpath)
    while True:
        found.add(ancestors.get(str(current)) or os.path.realpath(current))
        if current == Path(root) or current == current.parent:
            return found
        current = current.parent


def _hash_entries(entries: Iterable[tuple[str, Path]]) -> str:
    """Hash a listing of (name, file): names and per-file digests, separated unambiguously."""
    hasher = hashlib.sha256()
    for name, path in entries:
        hasher.update(name.encode("utf-8"))
        hasher.update(b"\0")
        hasher.update(_file_digest(path).encode("utf-8"))
        hasher.update(b"\n")
    return hasher.hexdigest()


def _file_digest(path: Path) -> str:
    """A file's content hash; a dangling link's target, so that it counts without failing."""
    if path.is_symlink() and not path.exists():
        return "dangling link to " + os.readlink(path)
    return hash_file(path)


def hash_path(path: Path) -> str:
    """Return a content hash of a file or a folder.

    A file hashes to the sha256 of its bytes (what ``sha256sum`` prints); a folder to a
    sha256 over its files' relative names and contents, sorted so that the result does not
    depend on the file system's order. Empty sub-folders do not count.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    if path.is_dir():
        return _hash_entries(iter_files(path))
    raise FileNotFoundError(f"cannot hash {path}: it does not exist")


def hash_code(dirs: Iterable[Path]) -> str:
    """Return one hash over the code in ``dirs`` (folders or single files), in the given order.

    Skips ``__pycache__``, ``*.pyc`` and dot-folders. Each root is hashed separately and then
    combined with its position, so moving a file from one root to another changes the hash.
    """
    hasher = hashlib.sha256()
    for index, root in enumerate(dirs):
        root = Path(root)
        if root.is_file():
            digest = hash_file(root)
        elif root.is_dir():
            digest = _hash_entries(iter_files(root, code_only=True))
        else:
            raise FileNotFoundError(f"cannot hash code at {root}: it does not exist")
        hasher.update(f"{index}:{digest}\n".encode("ascii"))
    return hasher.hexdigest()


def hash_text(text: str) -> str:
    """Return the hex digest of a string (used for cache keys over canonical JSON)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
