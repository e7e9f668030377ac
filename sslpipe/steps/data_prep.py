"""data_prep: fetch the selected images from the blob store and resize them.

The number of downloads in flight is ``concurrency``, a property of the network (a blob store
10-30 ms away needs many requests in flight to keep a core busy), not of the machine: it is
shared out over one fetching process per usable core (:func:`~sslpipe.data.fetch.fetch`), whose
shares add up to ``concurrency`` exactly, and each process takes the next row of the id list
from a counter they share, so that none idles while another has rows left. In each process the
downloads run in an event loop and every downloaded image is decoded and resized in a thread
beside it, so that decoding never holds up the downloads (PIL lets go of the GIL while it
decodes) and no process's decoding waits for another's downloads. The processes report each
outcome to the step's process, which journals it; images stream through and are never all held
in memory (at most ``concurrency`` downloads and a few decodes per process).

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
fetches only its shard: the ids whose stable hash (:func:`~sslpipe.data.shards.shard_of`) is
its rank. By hash rather than by position, so that an id keeps its shard when the id list
changes and a re-run still finds its images where its node left them. All nodes write into the
same (mounted) output folder; as ``manifest.csv`` cannot be written by several at once, each
writes its part
    parts/manifest-RRRRR-of-NNNNN.csv, parts/skipped-RRRRR-of-NNNNN.csv
    parts/stats-RRRRR-of-NNNNN.json    written last: the shard is complete
(and, while it runs, its own progress journal, ``parts/.progress-RRRRR-of-NNNNN.jsonl``)
and then merges when it finds every part of the same run (:func:`_merge_parts`): the node that
finishes last writes the outputs above for the whole selection, byte for byte as one node
would, and checks ``max_skipped_fraction`` over the whole selection. Two nodes finishing
together may both merge: the merge is deterministic and written atomically, so that is
harmless. A part counts only when it belongs to the same run (a digest of the id list, the
parameters and the launcher's run id, :data:`RUN_ID_VARIABLES`), so a node
that failed or never started leaves no merged manifest behind it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from sslpipe.core.io import (
    Journal,
    atomic_path,
    read_csv,
    read_json,
    write_csv,
    write_json,
)
from sslpipe.core.logs import get_logger
from sslpipe.core.machine import usable_cores
from sslpipe.core.uris import redact_uri
from sslpipe.data.fetch import (
    DEFAULT_CONCURRENCY,
    FetchJob,
    Outcome,
    Previous,
    fetch,
    journaled_images,
)
from sslpipe.data.image_cache import DEFAULT_CACHE_MAX_MB, ImageCache, prune
from sslpipe.data.packed_images import write_packed
from sslpipe.data.shards import PROGRESS_FILE as PROGRESS_FILE
from sslpipe.data.shards import Shard, shard_of
from sslpipe.stores import open_blob_store
from sslpipe.stores.base import StoreError

log = get_logger("data_prep")

MANIFEST_COLUMNS = ("id", "path", "label", "width", "height", "blob_path", "image_size", "etag")
# ids.csv columns that are not passed through to the manifest (the others are, after these).
_NOT_PASSED = ("file_hash", *MANIFEST_COLUMNS)
# Files of the selection folder copied into the output as they are.
_COPIED = ("selection.json", "labels.json")
# The counts of stats.json, summed over the nodes' parts.
_COUNTS = ("requested", "prepared", "downloaded", "reused")


RUN_ID_VARIABLES = ("AZUREML_RUN_ID", "TORCHELASTIC_RUN_ID")
"""The launcher's id of the job, the same on every node (Azure ML, torchrun); the first set
one tells a part of this run from one that an earlier run left in the output folder."""


class DataPrepNodesError(ValueError):
    """The launcher started another number of processes than ``data_prep.nodes``."""


class TooManySkippedError(RuntimeError):
    """More images than allowed could not be used."""


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
    ``environ`` (default ``os.environ``; see :func:`node_shard`), and
    writes its parts; the node that completes the set merges them (module docstring). The stats
    returned are those of the whole selection when this call merged, else those of its shard
    (with ``rank``).

    ``concurrency``: downloads in flight, whatever the number of processes (default
    :data:`~sslpipe.data.fetch.DEFAULT_CONCURRENCY`). ``processes``: processes that fetch,
    decode and resize, together keeping ``concurrency`` downloads in flight (default: one per
    usable core, at most ``concurrency``; 1: this process, decoding in a thread).

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
    journaled = journaled_images(output_dir, journal_path)
    if journaled:
        log.info("%d images are journaled by a run that did not finish", len(journaled))
    previous |= journaled
    if previous:
        log.info("%d images of the previous run may be reused", len(previous))
    cache = None
    if image_cache is not None and cache_max_bytes > 0:
        cache = ImageCache(image_cache, blob_uri, image_size, cache_max_bytes)
        log.info("image cache: %s (at most %.0f MiB)", image_cache, cache_max_bytes / 2**20)
    job = FetchJob(store, output_dir, image_size, previous, concurrency, cache=cache)
    with Journal(journal_path) as journal:
        outcomes = fetch(job, rows, processes or min(concurrency, usable_cores()), journal)
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
