"""Fetching blobs and resizing them, for data_prep: many downloads in flight in an event loop,
decoding in a thread beside it, shared out over forked processes (see
:mod:`sslpipe.steps.data_prep` for why, and for the reuse of earlier runs' images)."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from sslpipe.core.forked import Send, can_fork, run_forked
from sslpipe.core.io import Journal, read_journal, write_atomically
from sslpipe.core.logs import get_logger
from sslpipe.core.progress import bar as progress_bar
from sslpipe.data.image_cache import CachedImage, ImageCache
from sslpipe.data.images import UnusableImageError, write_resized
from sslpipe.stores import BlobStore
from sslpipe.stores.base import BlobNotFoundError
from sslpipe.stores.local_blob import safe_blob_path

log = get_logger("data_prep")


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


def journal_line(outcome: Outcome, output_dir: Path, image_size: int) -> dict[str, Any]:
    """The journal line of a finished image (:func:`journaled_images` reads it)."""
    assert outcome.path is not None
    stat = (output_dir / outcome.path).stat()
    return {
        "id": outcome.id, "path": outcome.path, "etag": outcome.etag, "width": outcome.width,
        "height": outcome.height, "blob_path": outcome.blob_path, "image_size": image_size,
        "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size,
    }  # fmt: skip


def journaled_images(output_dir: Path, journal_path: Path) -> dict[str, Previous]:
    """The images that a killed run finished, as its journal lists them (the last line of an
    id wins), keeping only those whose file has the size and modification time the journal
    recorded: a later run that rewrote one without finishing it leaves it untrusted."""
    previous: dict[str, Previous] = {}
    for record in read_journal(journal_path):
        try:
            image = output_dir / str(record["path"])
            stat = image.stat()
            if (stat.st_mtime_ns, stat.st_size) != (record["mtime_ns"], record["bytes"]):
                previous.pop(str(record["id"]), None)
                continue
            previous[str(record["id"])] = Previous(
                str(record["path"]), int(record["width"]), int(record["height"]),
                str(record["blob_path"]), int(record["image_size"]), str(record["etag"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, OSError):
            continue  # gone, or not a line this step wrote: fetch it again
    return previous


def _known_etag(before: Previous | None, blob_path: str, path: str, image_size: int) -> str | None:
    """The ETag the previous image was made from when it is reusable for this row, else None."""
    if before is None:
        return None
    same = (before.blob_path, before.path, before.image_size) == (blob_path, path, image_size)
    return before.etag if same else None


DEFAULT_CONCURRENCY = 64
"""Downloads in flight by default (``data_prep.concurrency``), sized for the network rather
than the cores: the images/s wanted times the seconds a request takes. At 20 ms a request
(Azure Blob Storage answers in 10-30 ms), 64 in flight fetch up to 3,200 images/s, about what
7 cores decode and resize (some 2 ms of CPU an image); a farther store or more cores want more."""


@dataclass(frozen=True)
class FetchJob:
    """What every fetch of one run shares."""

    store: BlobStore
    out_dir: Path
    image_size: int
    previous: dict[str, Previous]
    concurrency: int  # downloads in flight in one event loop
    decoders: int = 1  # threads beside the event loop that decode, resize and write
    cache: ImageCache | None = None  # the workspace's resized images, shared by runs


@dataclass(frozen=True)
class _Downloaded:
    """A blob downloaded for one row, to be decoded and resized into ``target``."""

    id: str
    label: str
    blob_path: str
    target: Path
    relative: str
    data: bytes
    etag: str
    cached: CachedImage | None = None  # data is this cache entry's image: write it as it is


# What a fetch reports: its outcome, and the journal line of an image it wrote (else None).
Report = tuple[Outcome, dict[str, Any] | None]


async def _download(job: FetchJob, row: dict[str, str]) -> Outcome | _Downloaded:
    """The blob of one id-list row, to be decoded; or, when nothing is left to do for it, its
    outcome: the previous run's image reused (its blob is unchanged) or the reason it is
    skipped."""
    image_id, label, blob_path = row["id"], row.get("label", ""), row["blob_path"]
    try:
        target = safe_blob_path(job.out_dir / "images", blob_path)
    except ValueError as err:
        return Outcome(image_id, label, reason="unsafe_name", detail=str(err))
    relative = target.relative_to(job.out_dir).as_posix()
    before = job.previous.get(image_id)
    known = _known_etag(before, blob_path, relative, job.image_size)
    cached = job.cache.get(blob_path) if known is None and job.cache is not None else None
    try:
        data, etag = await job.store.read_if_changed(blob_path, cached.etag if cached else known)
    except BlobNotFoundError as err:
        return Outcome(image_id, label, reason="missing_blob", detail=str(err))
    if data is None and cached is not None:  # written by a decoding thread, off this loop
        return _Downloaded(image_id, label, blob_path, target, relative, cached.jpeg, etag, cached)
    if data is None and before is not None:
        return Outcome(image_id, label, relative, before.width, before.height,
                       blob_path=blob_path, etag=etag, reused=True)  # fmt: skip
    assert data is not None  # read_if_changed(name, None) always reads
    return _Downloaded(image_id, label, blob_path, target, relative, data, etag)


def _decode(job: FetchJob, blob: _Downloaded) -> Report:
    """Decode, resize and write a downloaded blob (in a decoding thread), or write the cached
    image it stands for: its report."""
    if blob.cached is not None:
        write_atomically(blob.target, blob.data)
        width, height = blob.cached.width, blob.cached.height
    else:
        try:
            width, height = write_resized(blob.data, blob.target, job.image_size)
        except UnusableImageError as err:
            failed = Outcome(blob.id, blob.label, reason=err.reason, detail=str(err),
                             downloaded=True)  # fmt: skip
            return failed, None
        if job.cache is not None:  # the JPEG just written, read back from the page cache
            resized = CachedImage(blob.etag, width, height, blob.target.read_bytes())
            job.cache.put(blob.blob_path, resized)
    downloaded = blob.cached is None
    outcome = Outcome(blob.id, blob.label, blob.relative, width, height, blob_path=blob.blob_path,
                      etag=blob.etag, downloaded=downloaded, reused=not downloaded)  # fmt: skip
    return outcome, journal_line(outcome, job.out_dir, job.image_size)


async def _fetch_all(
    job: FetchJob,
    rows: Iterable[dict[str, str]],
    report: Callable[[Report], None],
    stop: Event | None = None,
) -> None:
    """Fetch every row with ``job.concurrency`` downloads in flight, decoding in
    ``job.decoders`` threads, and report each outcome as it comes; no new row is started once
    ``stop`` is set.

    Each download, once its blob has come, is handed to the decoding threads through a short
    queue and its worker starts the next row at once, so that decoding never holds up the
    downloads; the queue is full only when decoding is the bottleneck, and then it throttles
    the downloads (at most ``concurrency`` + 2 * ``decoders`` blobs are held at any time).
    """
    job.store.set_max_concurrency(job.concurrency)
    todo = iter(rows)
    downloaded: asyncio.Queue[_Downloaded | None] = asyncio.Queue(maxsize=job.decoders)

    async def downloader() -> None:
        for row in todo:
            got = await _download(job, row)
            if isinstance(got, Outcome):
                report((got, None))
            else:
                await downloaded.put(got)
            if stop is not None and stop.is_set():
                return

    async def downloads() -> None:
        await asyncio.gather(*(downloader() for _ in range(job.concurrency)))
        for _ in range(job.decoders):
            await downloaded.put(None)  # no more blobs: each decoder ends

    async def decoder(pool: Executor) -> None:
        loop = asyncio.get_running_loop()
        while (blob := await downloaded.get()) is not None:
            report(await loop.run_in_executor(pool, _decode, job, blob))

    with ThreadPoolExecutor(max_workers=job.decoders, thread_name_prefix="decode") as pool:
        tasks = [asyncio.create_task(downloads())]
        tasks += [asyncio.create_task(decoder(pool)) for _ in range(job.decoders)]
        try:
            await asyncio.gather(*tasks)  # the first failure, as it was raised
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await job.store.close()


class SharedRows:
    """The rows of a run, handed out one at a time to whichever forked process asks first
    (through a counter in shared memory), so that every process has rows while any are left."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows
        self._next = multiprocessing.get_context("fork").Value("q", 0)

    def __iter__(self) -> Iterator[dict[str, str]]:
        while True:
            with self._next.get_lock():
                index = self._next.value
                self._next.value = index + 1
            if index >= len(self.rows):
                return
            yield self.rows[index]


def concurrency_shares(concurrency: int, processes: int) -> list[int]:
    """``concurrency`` shared out over at most ``processes`` processes: as equal as can be,
    every share at least 1, and adding up to ``concurrency``."""
    count = max(1, min(processes, concurrency))
    return [concurrency // count + (number < concurrency % count) for number in range(count)]


def _fetch_share(
    job: FetchJob, rows: SharedRows, concurrency: int, send: Send, stop: Event
) -> None:
    """A fetching process: ``concurrency`` downloads in flight in its own event loop, taking
    rows from ``rows`` (shared with the other processes), decoding in a thread beside it."""
    asyncio.run(_fetch_all(replace(job, concurrency=concurrency, decoders=1), rows, send, stop))


def fetch(
    job: FetchJob, rows: list[dict[str, str]], processes: int, journal: Journal
) -> list[Outcome]:
    """Every row's outcome; the images written are journaled as they come.

    With ``processes`` > 1 (on Linux) that many forked processes fetch, each with its share of
    ``job.concurrency`` (:func:`concurrency_shares`: together they keep ``job.concurrency``
    downloads in flight) in its own event loop and a decoding thread, taking the next row from
    a shared counter; nothing but the small reports crosses processes (sending the blobs to
    decoding processes cost more CPU than the decoding saved). Else one event loop here,
    decoding in ``processes`` threads.
    """
    outcomes: list[Outcome] = []
    shown = progress_bar(desc="fetching", total=len(rows), unit="img")  # sslpipe.core.progress

    def record(report: Report) -> None:
        outcome, progress = report
        outcomes.append(outcome)
        shown.update()
        if progress is not None:
            journal.append(progress)

    shares = concurrency_shares(job.concurrency, min(processes, len(rows)))
    with shown:
        if len(shares) > 1 and can_fork():
            log.info("%d fetching processes, downloads in flight: %s", len(shares),
                     " + ".join(map(str, shares)))  # fmt: skip
            shared = SharedRows(rows)
            run_forked(shares, partial(_fetch_share, job, shared), record, name="data_prep-fetch")
            return outcomes
        asyncio.run(_fetch_all(replace(job, decoders=max(1, processes)), rows, record))
    return outcomes
