"""data_prep: fetch the selected images from the blob store and resize them.

The number of downloads in flight is ``concurrency``, a property of the network (a blob store
10-30 ms away needs many requests in flight to keep a core busy), not of the machine: it is
shared out over one fetching process per usable core (:func:`_fetch`), whose shares add up to
``concurrency`` exactly, and each process takes the next row of the id list from a counter
they share, so that none idles while another has rows left. In each process the downloads run
in an event loop and every downloaded image is decoded and resized in a thread beside it, so
that decoding never holds up the downloads (PIL lets go of the GIL while it decodes) and no
process's decoding waits for another's downloads. The processes report each outcome to the
step's process, which journals it; images stream through and are never all held in memory
(at most ``concurrency`` downloads and a few decodes per process).

Re-running into the same output folder is incremental: an image of the previous run is reused,
without downloading its blob, when the previous manifest lists the same id with the same
blob_path and image_size, the image file is as that run left it, and the blob's ETag is
unchanged (one conditional request per blob). Changing image_size therefore refetches all.

Across runs (each in a new output folder) the same comes from the workspace's image cache
(:mod:`sslpipe.data.image_cache`, ``image_cache``: the local executor passes
``<workspace>/cache/images``; none on Azure ML): an image that is not in the output folder is
asked for with the ETag of its cache entry, and the entry's resized image is copied when the
blob is unchanged (counted as reused); every image resized is added to the cache. At the end
the cache is pruned to ``cache_max_bytes``, least recently used entries first.

A run that is killed (or loses its blob store) before it writes the manifest loses no finished
image either: each image, once written, is appended to ``.progress.jsonl`` in the output folder
(id, path, ETag, size, and the image file's size and modification time, so that a file changed
since is not trusted), and the next run reuses those images like the manifest's; the journal is
removed when the run finishes. An id that ids.csv repeats is fetched once, for its first row;
each further row is skipped as ``duplicate_id``.

Outputs (one folder):
    images/<blob_path>  the resized image (JPEG)
    manifest.csv     id, path (relative to the folder), label, width, height, blob_path,
                     image_size, etag (of the blob the image was made from), then every other
                     column of ids.csv but file_hash (labelled: split, repeats)
    skipped.csv      id, reason, detail for every image that could not be used
    selection.json   copied from the input, for lineage
    labels.json      copied from the input when there (connect_db's labelled mode)
    stats.json       counts (downloaded and reused too), skipped per reason, seconds, images/s
    packed/          every manifest image decoded into one uint8 array, in the manifest's order,
                     so that moco_train can cut its crops without decoding (packed_images)

On several nodes (``nodes`` > 1, an Azure ML job with ``distribution: pytorch`` and
``instance_count: nodes``) every node finds its RANK and WORLD_SIZE in the environment and
fetches only its shard: the ids whose stable hash (:func:`shard_of`) is its rank. By hash
rather than by position, so that an id keeps its shard when the id list changes and a re-run
still finds its images where its node left them. All nodes write into the same (mounted)
output folder; as ``manifest.csv`` cannot be written by several at once, each writes its part
    parts/manifest-RRRRR-of-NNNNN.csv, parts/skipped-RRRRR-of-NNNNN.csv
    parts/stats-RRRRR-of-NNNNN.json    written last: the shard is complete
(and, while it runs, its own progress journal, ``parts/.progress-RRRRR-of-NNNNN.jsonl``)
and then merges when it finds every part of the same run (:func:`_merge_parts`): the node
that finishes last writes the outputs above for the whole selection, byte for byte as one node
would, and checks ``max_skipped_fraction`` over the whole selection. Two nodes finishing
together may both merge: the merge is deterministic and written atomically, so that is
harmless. A part counts only when it belongs to the same run (a digest of the id list, the
parameters and the launcher's run id, :data:`RUN_ID_VARIABLES`), so a node that failed or
never started leaves no merged manifest behind it.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pandas as pd

from sslpipe.core.forked import Send, can_fork, run_forked
from sslpipe.core.io import (
    Journal,
    atomic_path,
    read_csv,
    read_journal,
    read_json,
    write_atomically,
    write_csv,
    write_json,
)
from sslpipe.core.logs import get_logger
from sslpipe.core.machine import usable_cores
from sslpipe.core.progress import bar as progress_bar
from sslpipe.core.uris import redact_uri
from sslpipe.data.image_cache import DEFAULT_CACHE_MAX_MB, CachedImage, ImageCache, prune
from sslpipe.data.images import UnusableImageError, write_resized
from sslpipe.data.packed_images import write_packed
from sslpipe.stores import BlobStore, open_blob_store
from sslpipe.stores.base import BlobNotFoundError, StoreError
from sslpipe.stores.local_blob import safe_blob_path

log = get_logger("data_prep")

MANIFEST_COLUMNS = ("id", "path", "label", "width", "height", "blob_path", "image_size", "etag")
# ids.csv columns that are not passed through to the manifest (the others are, after these).
_NOT_PASSED = ("file_hash", *MANIFEST_COLUMNS)
# Files of the selection folder copied into the output as they are.
_COPIED = ("selection.json", "labels.json")
# The counts of stats.json, summed over the nodes' parts.
_COUNTS = ("requested", "prepared", "downloaded", "reused")
PROGRESS_FILE = ".progress.jsonl"
"""The journal of the images a run has finished, in the output folder until the run ends."""
RUN_ID_VARIABLES = ("AZUREML_RUN_ID", "TORCHELASTIC_RUN_ID")
"""The launcher's id of the job, the same on every node (Azure ML, torchrun); the first set
one tells a part of this run from one that an earlier run left in the output folder."""


class TooManySkippedError(RuntimeError):
    """More images than allowed could not be used."""


class DataPrepNodesError(ValueError):
    """The launcher started another number of processes than ``data_prep.nodes``."""


def shard_of(image_id: str, count: int) -> int:
    """The shard of ``image_id`` among ``count``: its SHA-256, read as a number, modulo count.

    The same on every machine and in every run (unlike ``hash``), and balanced: of n ids each
    shard gets n / count, give or take a few times sqrt(n / count).
    """
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """This node's share of the id list: the ids of :func:`shard_of` ``rank`` of ``count``.

    ``run`` names the run (the same on every node of it), so that the parts of this run are
    told from those an earlier run left in the output folder. One node: the whole list.
    """

    rank: int = 0
    count: int = 1
    run: str = ""

    def part(self, output_dir: Path, kind: str, rank: int | None = None) -> Path:
        """The part file ``kind`` (manifest, skipped, stats) of this node or of ``rank``."""
        number = self.rank if rank is None else rank
        suffix = "json" if kind == "stats" else "csv"
        return output_dir / "parts" / f"{kind}-{number:05d}-of-{self.count:05d}.{suffix}"

    def journal(self, output_dir: Path) -> Path:
        """This node's progress journal (:data:`PROGRESS_FILE`; one per node on several)."""
        if self.count == 1:
            return output_dir / PROGRESS_FILE
        return output_dir / "parts" / f".progress-{self.rank:05d}-of-{self.count:05d}.jsonl"


def node_shard(nodes: int, fingerprint: str, environ: Mapping[str, str] | None = None) -> Shard:
    """This node's shard, from the launcher's RANK and WORLD_SIZE (:class:`DistEnv`).

    ``fingerprint`` stands for the id list and the parameters; with the launcher's run id
    (:data:`RUN_ID_VARIABLES`) it names the run. No process group is joined: the nodes only
    share the output folder.

    Raises:
        DataPrepNodesError: WORLD_SIZE is not ``nodes``.
        DistributedEnvError: the launcher's variables contradict each other.
    """
    env = os.environ if environ is None else environ
    if nodes == 1 and env.get("WORLD_SIZE", "").strip() in ("", "1"):
        return Shard()  # no launcher: nothing to read (and no torch to import)
    from sslpipe.models.training.distributed import DistEnv  # imports torch, only under a launcher

    launcher = DistEnv.from_env(env)
    if launcher.world_size != nodes:
        raise DataPrepNodesError(
            f"data_prep is configured for {nodes} node(s) (data_prep.nodes) but the launcher "
            f"started {launcher.world_size} process(es) (WORLD_SIZE); run it with distribution "
            "pytorch, one process per node on data_prep.nodes instances (as the pipeline does), "
            f"or set data_prep.nodes={launcher.world_size}"
        )
    run_id = next((env[name] for name in RUN_ID_VARIABLES if env.get(name, "none") != "none"), "")
    run = hashlib.sha256(f"{run_id}\n{fingerprint}".encode()).hexdigest()[:16]
    return Shard(launcher.rank, nodes, run)


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


def _previous_images(output_dir: Path, manifest_path: Path) -> dict[str, Previous]:
    """The images of the last finished run in ``output_dir`` by id, as its manifest lists them,
    keeping only those whose file is still as that run left it (a failed run since then may
    have replaced some: those are newer than the manifest). Empty when there is no manifest or
    it predates ETags. ``manifest_path`` is manifest.csv, or on several nodes a node's part."""
    if not manifest_path.is_file():
        return {}
    frame = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    if not set(MANIFEST_COLUMNS) <= set(frame.columns):
        log.info("%s has no ETags (an older run): every image is fetched", manifest_path)
        return {}
    finished = manifest_path.stat().st_mtime_ns
    previous: dict[str, Previous] = {}
    for row in frame.drop_duplicates("id").to_dict("records"):
        image = output_dir / row["path"]
        if not (row["etag"] and image.is_file() and image.stat().st_mtime_ns <= finished):
            continue
        try:
            width, height, size = int(row["width"]), int(row["height"]), int(row["image_size"])
        except ValueError:
            continue  # edited by hand: fetch it again
        previous[row["id"]] = Previous(
            row["path"], width, height, row["blob_path"], size, row["etag"]
        )
    return previous


def _journaled_images(output_dir: Path, journal_path: Path) -> dict[str, Previous]:
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


def _progress(outcome: Outcome, output_dir: Path, image_size: int) -> dict[str, Any]:
    """The journal line of a finished image (:func:`_journaled_images` reads it)."""
    assert outcome.path is not None
    stat = (output_dir / outcome.path).stat()
    return {
        "id": outcome.id, "path": outcome.path, "etag": outcome.etag, "width": outcome.width,
        "height": outcome.height, "blob_path": outcome.blob_path, "image_size": image_size,
        "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size,
    }  # fmt: skip


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
class _Job:
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


async def _download(job: _Job, row: dict[str, str]) -> Outcome | _Downloaded:
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


def _decode(job: _Job, blob: _Downloaded) -> Report:
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
    return outcome, _progress(outcome, job.out_dir, job.image_size)


async def _fetch_all(
    job: _Job,
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


class _SharedRows:
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


def _fetch_share(job: _Job, rows: _SharedRows, concurrency: int, send: Send, stop: Event) -> None:
    """A fetching process: ``concurrency`` downloads in flight in its own event loop, taking
    rows from ``rows`` (shared with the other processes), decoding in a thread beside it."""
    asyncio.run(_fetch_all(replace(job, concurrency=concurrency, decoders=1), rows, send, stop))


def _fetch(
    job: _Job, rows: list[dict[str, str]], processes: int, journal: Journal
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
            shared = _SharedRows(rows)
            run_forked(shares, partial(_fetch_share, job, shared), record, name="data_prep-fetch")
            return outcomes
        asyncio.run(_fetch_all(replace(job, decoders=max(1, processes)), rows, record))
    return outcomes


def run_data_prep(
    *,
    ids_dir: Path,
    blob_uri: str,
    output_dir: Path,
    image_size: int,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_skipped_fraction: float = 0.05,
    nodes: int = 1,
    environ: Mapping[str, str] | None = None,
    processes: int | None = None,
    image_cache: Path | None = None,
    cache_max_bytes: int = DEFAULT_CACHE_MAX_MB * 2**20,
) -> dict[str, Any]:
    """Fetch and resize every image in ``ids_dir/ids.csv``; returns the stats.

    Images that an earlier run prepared in ``output_dir``, or that the image cache folder
    ``image_cache`` holds (shared by runs, bounded by ``cache_max_bytes``; 0 or no folder: no
    cache), are reused when their blob is unchanged (see the module docstring);
    ``stats["downloaded"]`` and ``stats["reused"]`` count both kinds.

    With ``nodes`` > 1 this node fetches only its shard, found in the launcher's variables in
    ``environ`` (default ``os.environ``; see :func:`node_shard`), and writes its parts; the
    node that completes the set merges them (module docstring). The stats returned are those
    of the whole selection when this call merged, else those of its shard (with ``rank``).

    ``concurrency``: downloads in flight, whatever the number of processes (default
    :data:`DEFAULT_CONCURRENCY`). ``processes``: processes that fetch, decode and resize,
    together keeping ``concurrency`` downloads in flight (default: one per usable core, at most
    ``concurrency``; 1: this process, decoding in a thread).

    Raises:
        TooManySkippedError: when the skipped share of the whole selection exceeds
            ``max_skipped_fraction``; the skipped list is still written so the cause can be
            inspected. On several nodes it is raised by the merge (every node that merges).
        DataPrepNodesError: the launcher started another number of processes than ``nodes``.
    """
    ids_path = ids_dir / "ids.csv"
    table = read_csv(ids_path, required=("id", "blob_path"))
    fingerprint = hashlib.sha256(ids_path.read_bytes())
    fingerprint.update(f"{redact_uri(blob_uri)}\n{image_size}\n{nodes}".encode())
    shard = node_shard(nodes, fingerprint.hexdigest(), environ)
    if "label" not in table.columns:
        table["label"] = ""
    try:
        store = open_blob_store(blob_uri)
    except StoreError as err:
        raise StoreError(f"data_prep cannot open the blob store: {err}") from None
    output_dir.mkdir(parents=True, exist_ok=True)
    mine = table
    if shard.count > 1:
        owned = [shard_of(str(image_id), shard.count) == shard.rank for image_id in table["id"]]
        mine = table[owned]
        log.info("node %d of %d: %d of %d ids are its shard", shard.rank, shard.count,
                 len(mine), len(table))  # fmt: skip
    log.info(
        "fetching %d images from %s (concurrency %d)", len(mine), redact_uri(blob_uri), concurrency
    )
    started = time.perf_counter()
    repeated = mine["id"].astype(str).duplicated()
    duplicates = _duplicates(mine, repeated)
    rows = mine[~repeated][["id", "blob_path", "label"]].to_dict("records")
    previous = _previous_images(output_dir, output_dir / "manifest.csv")
    if shard.count > 1:
        # This node's part of an earlier run, which may never have been merged (another node
        # failed); it is no longer complete from here on (the stats first).
        previous |= _previous_images(output_dir, shard.part(output_dir, "manifest"))
        for kind in ("stats", "manifest", "skipped"):
            shard.part(output_dir, kind).unlink(missing_ok=True)
    journal_path = shard.journal(output_dir)
    journaled = _journaled_images(output_dir, journal_path)
    if journaled:
        log.info("%d images are journaled by a run that did not finish", len(journaled))
    previous |= journaled
    if previous:
        log.info("%d images of the previous run may be reused", len(previous))
    cache = None
    if image_cache is not None and cache_max_bytes > 0:
        cache = ImageCache(image_cache, blob_uri, image_size, cache_max_bytes)
        log.info("image cache: %s (at most %.0f MiB)", image_cache, cache_max_bytes / 2**20)
    job = _Job(store, output_dir, image_size, previous, concurrency, cache=cache)
    with Journal(journal_path) as journal:
        outcomes = _fetch(job, rows, processes or min(concurrency, usable_cores()), journal)
    if cache is not None:
        _prune_cache(cache)
    outcomes += duplicates
    seconds = time.perf_counter() - started
    extra = table[["id", *(c for c in table.columns if c not in _NOT_PASSED)]]
    manifest, skipped, stats = _tables(outcomes, extra, image_size, seconds)
    if shard.count == 1:
        try:
            stats = _finish(manifest, skipped, stats, ids_dir, output_dir, max_skipped_fraction)
        except TooManySkippedError:
            journal_path.unlink(missing_ok=True)  # finished, if failed: as without a journal
            raise
        journal_path.unlink(missing_ok=True)  # the manifest lists every image now
        return stats
    _log_stats(stats, f"node {shard.rank} of {shard.count}: ")
    stats |= {"rank": shard.rank, "nodes": shard.count, "run": shard.run}
    write_csv(shard.part(output_dir, "manifest"), manifest)
    write_csv(shard.part(output_dir, "skipped"), skipped)
    write_json(shard.part(output_dir, "stats"), stats)  # last: the part is complete
    journal_path.unlink(missing_ok=True)  # the part lists every image of the shard now
    merged = _merge_parts(output_dir, shard)
    if merged is None:
        return stats
    log.info("every shard of the run is complete: merging the %d parts", shard.count)
    return _finish(*merged, ids_dir, output_dir, max_skipped_fraction)


def _prune_cache(cache: ImageCache) -> None:
    """Bring the image cache back to its bound; a failure only costs later downloads."""
    try:
        done = prune(cache.root, cache.max_bytes)
    except OSError as err:
        log.warning("image cache: pruning %s failed: %s", cache.root, err)
        return
    log.info("image cache: %d images (%.1f MiB), %d least recently used removed",
             done.kept, done.kept_bytes / 2**20, done.removed)  # fmt: skip


def _duplicates(table: pd.DataFrame, repeated: pd.Series) -> list[Outcome]:
    """A ``duplicate_id`` outcome for each row of ``table`` that repeats an earlier row's id
    (``repeated``), naming both lines of ids.csv (the frame's index is the row number)."""
    if not repeated.any():
        return []  # the usual case: no pass over the rows
    ids = table["id"].astype(str)
    first_line = {image_id: int(str(index)) + 2 for index, image_id in ids[~repeated].items()}
    outcomes = []
    for index, row in table[repeated].iterrows():
        image_id, line = str(row["id"]), int(str(index)) + 2  # after the header, from 1
        detail = (
            f"ids.csv line {line} repeats the id of line {first_line[image_id]} "
            f"(blob {row['blob_path']!r}); only the first is fetched"
        )
        outcomes.append(Outcome(image_id, str(row["label"]), reason="duplicate_id", detail=detail))
    return outcomes


def _tables(
    outcomes: list[Outcome], extra: pd.DataFrame, image_size: int, seconds: float
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The manifest, the skipped list and the stats of ``outcomes``, sorted by id."""
    outcomes.sort(key=lambda o: o.id)
    good = [o for o in outcomes if o.reason is None]
    bad = [o for o in outcomes if o.reason is not None]
    manifest = pd.DataFrame(
        [(o.id, o.path, o.label, o.width, o.height, o.blob_path, image_size, o.etag) for o in good],
        columns=list(MANIFEST_COLUMNS),
    )
    if len(extra.columns) > 1:
        # The id list's own columns (split, repeats, ...) follow the image's, in their order.
        extra = extra.drop_duplicates("id").astype({"id": str})
        manifest = manifest.merge(extra, on="id", how="left", validate="many_to_one")
    skipped = pd.DataFrame(
        [(o.id, o.reason, o.detail) for o in bad], columns=["id", "reason", "detail"]
    )
    stats = {
        "requested": len(outcomes),
        "prepared": len(good),
        "downloaded": sum(o.downloaded for o in outcomes),
        "reused": sum(o.reused for o in outcomes),
        "skipped": dict(sorted(Counter(str(o.reason) for o in bad).items())),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(outcomes) / seconds, 1) if seconds > 0 else None,
    }
    return manifest, skipped, stats


def _merge_parts(
    output_dir: Path, shard: Shard
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]] | None:
    """The whole selection's manifest, skipped list and stats from the parts of ``shard.run``,
    as one node would have made them; None while a part of this run is missing."""
    parts = []
    for rank in range(shard.count):
        path = shard.part(output_dir, "stats", rank)
        part = read_json(path) if path.is_file() else {}
        if part.get("run") != shard.run:
            log.info("node %d of %d has not finished yet: the last node to finish merges",
                     rank, shard.count)  # fmt: skip
            return None
        parts.append(part)

    def union(kind: str) -> pd.DataFrame:
        frames = [
            pd.read_csv(shard.part(output_dir, kind, rank), dtype=str, keep_default_na=False)
            for rank in range(shard.count)
        ]
        return pd.concat(frames, ignore_index=True).sort_values("id", kind="stable")

    seconds = max(part["seconds"] for part in parts)  # the nodes ran side by side
    skipped: Counter[str] = Counter()
    for part in parts:
        skipped.update(part["skipped"])
    totals = {key: sum(part[key] for part in parts) for key in _COUNTS}
    stats = {
        **totals,
        "skipped": dict(sorted(skipped.items())),
        "seconds": seconds,
        "images_per_s": round(totals["requested"] / seconds, 1) if seconds > 0 else None,
        "nodes": shard.count,
    }
    return union("manifest"), union("skipped"), stats


def _log_stats(stats: dict[str, Any], node: str = "") -> None:
    log.info(
        "%sprepared %d of %d images (%d downloaded, %d reused) in %.1f s (%.1f images/s); "
        "skipped: %s",
        node,
        stats["prepared"],
        stats["requested"],
        stats["downloaded"],
        stats["reused"],
        stats["seconds"],
        stats["images_per_s"] or 0.0,
        stats["skipped"] or "none",
    )


def _finish(
    manifest: pd.DataFrame,
    skipped: pd.DataFrame,
    stats: dict[str, Any],
    ids_dir: Path,
    output_dir: Path,
    max_skipped: float,
) -> dict[str, Any]:
    """Write the outputs of the whole selection, the manifest last, unless too many skipped."""
    write_csv(output_dir / "skipped.csv", skipped)
    for name in _COPIED:
        if (ids_dir / name).is_file():
            with atomic_path(output_dir / name) as tmp:  # two merging nodes may copy at once
                shutil.copyfile(ids_dir / name, tmp)
        else:
            (output_dir / name).unlink(missing_ok=True)  # left by an earlier run
    write_json(output_dir / "stats.json", stats)
    _log_stats(stats)
    requested, bad = stats["requested"], len(skipped)
    fraction = bad / max(1, requested)
    if fraction > max_skipped or manifest.empty:
        listing = "; ".join(f"{row.id}: {row.reason}" for row in skipped.head(20).itertuples())
        raise TooManySkippedError(
            f"{bad} of {requested} images ({fraction:.1%}) could not be used, more than "
            f"the allowed {max_skipped:.1%} (data_prep.max_skipped_fraction): {listing}"
            f"{' …' if bad > 20 else ''}; full list in {output_dir / 'skipped.csv'}"
        )
    # Decoded once here, so that training cuts its crops without decoding (packed_images);
    # the manifest is written last: its presence means the step finished.
    packed = write_packed(output_dir, [str(path) for path in manifest["path"]])
    log.info("packed %d images for training into %s", len(manifest), packed)
    write_csv(output_dir / "manifest.csv", manifest)
    return stats
