"""Small file helpers shared by every step: atomic writes and tabular/JSON I/O.

Every file a step produces is written to a temporary name in the same folder and then renamed,
so a run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd  # imported where a table is read: the image workers never need it


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, as :func:`atomic_path` does, for the many
    small files of a step (the images): the temporary name is this process's and thread's
    rather than a random one, which saves an open and a close per file (a third of the cost
    of writing a 6 KB image on ext4)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # the first file of its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that atomically replaces ``path`` when closed cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's contents, read in 1 MiB chunks (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_optional_json(path: Path) -> dict[str, Any]:
    """The JSON object at ``path``, or an empty dict when an optional file is absent."""
    return dict(read_json(path)) if path.is_file() else {}


def read_folder_config(folder: Path, file_name: str, expected_format: str, kind: str) -> Any:
    """The JSON config of a model folder, checked to be of ``expected_format``.

    Raises:
        ValueError: when the file is missing or of another format, naming the folder.
    """
    config_path = Path(folder) / file_name
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a {kind} folder: {file_name} is missing")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != expected_format:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path}: format {found!r} is not {expected_format!r}")
    return config


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV without its index, atomically."""
    with atomic_open(path) as f:
        frame.to_csv(f, index=False)


def read_csv(path: Path, *, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV written by a step, checking that the columns the reader needs are there."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a CSV file written by an earlier step")
    import pandas as pd

    frame = pd.read_csv(
        path, dtype={"id": str, "blob_path": str, "label": str}, keep_default_na=False
    )
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)}. "
            "Was it written by a different version of the pipeline?"
        )
    return frame


class Journal:
    """An append-only file of JSON lines that records progress as it is made, so that a run
    killed at any moment leaves every finished item on disk for the next run to pick up.

    Each :meth:`append` writes one whole line with one ``write`` call before it returns, so the
    line survives the process being killed (it is in the kernel's hands); ``fsync`` follows at
    most every ``sync_every_s`` seconds (and on :meth:`close`), which bounds what a lost
    machine can lose without paying a sync per line on slow (network) file systems. A line cut
    short by a lost machine is ignored by :func:`read_journal`. The file is created on the
    first append.
    """

    def __init__(self, path: Path, *, sync_every_s: float = 1.0) -> None:
        self.path, self.sync_every_s = path, sync_every_s
        self._fd: int | None = None
        self._synced = 0.0

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._synced = time.monotonic()
        os.write(self._fd, line)
        if time.monotonic() - self._synced >= self.sync_every_s:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a :class:`Journal`, oldest first; none when the file is absent. Lines
    that are not a whole JSON object (cut short by a crash) are left out."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and line.endswith("\n"):
                records.append(record)
    return records
