"""data_prep across runs: the workspace's image cache (sslpipe.data.image_cache, issue 16 item 3).

Each run writes into a new output folder, as every local run does; only the cache is shared.
The main scenario runs against the local folder store and against Azurite (conditional GETs);
two runs at once are real processes (the component's entry point, as the executor starts it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sslpipe.data.image_cache import IMAGE_CACHE_ENV, CachedImage, ImageCache, main, prune
from sslpipe.steps.data_prep import run_data_prep
from sslpipe.stores.base import BlobStore
from tests.steps.blob_containers import CONTAINERS, BlobContainer, in_local_folder

REPO = Path(__file__).resolve().parents[2]
IDS = [f"img{i}.jpeg" for i in range(6)]
SIZE = 24


class Catalog(BlobContainer):
    """A blob container (local folder or Azurite), an id list and a cache folder."""

    def __init__(self, root: Path, blob_uri: str, open_store: Callable[[], BlobStore]) -> None:
        super().__init__(root, blob_uri, open_store)
        self.cache = root / "workspace" / "cache" / "images"

    def ids(self, ids: list[str]) -> Path:
        ids_dir = self.root / "ids"
        ids_dir.mkdir(exist_ok=True)
        frame = pd.DataFrame({"id": ids, "blob_path": ids, "label": "x"})
        frame.to_csv(ids_dir / "ids.csv", index=False)
        return ids_dir

    def prep(self, out: str, ids: list[str], *, cached: bool = True, **kwargs: Any) -> Any:
        """data_prep of ``ids`` into the new folder ``out``, with the shared cache or none."""
        if cached:
            kwargs.setdefault("image_cache", self.cache)
        kwargs.setdefault("image_size", SIZE)
        return run_data_prep(ids_dir=self.ids(ids), blob_uri=self.blob_uri,
                             output_dir=self.root / out, **kwargs)  # fmt: skip


@pytest.fixture(params=CONTAINERS)
def catalog(
    request: pytest.FixtureRequest, tmp_path: Path, make_image: Callable[..., bytes]
) -> Iterator[Catalog]:
    """Six 40x30 images (32x24 at image_size 24), prepared once into ``first`` with the cache."""
    made: Catalog = request.param(Catalog, tmp_path, request)
    made.put({name: make_image(color=(20 * i, 100, 50)) for i, name in enumerate(IDS)})
    stats = made.prep("first", IDS)
    assert (stats["downloaded"], stats["reused"], stats["prepared"]) == (6, 0, 6)
    yield made


def _outputs(folder: Path) -> dict[str, bytes]:
    """What later steps read: the manifest, the skipped list and every image, by name."""
    files = {name: (folder / name).read_bytes() for name in ("manifest.csv", "skipped.csv")}
    return files | {p.name: p.read_bytes() for p in sorted((folder / "images").rglob("*.jpeg"))}


def _entries(cache_dir: Path) -> dict[str, CachedImage]:
    """Every entry file's blob name and content, failing on any that is not sound."""
    entries = {}
    for path in sorted(cache_dir.rglob("*.img")):
        data = path.read_bytes()
        header = json.loads(data.split(b"\n", 2)[1])
        cache = ImageCache(cache_dir, header["store"], header["image_size"], 1)
        entry = cache.parse(data, header["name"])
        assert entry is not None and cache.path(header["name"]) == path, path
        entries[header["name"]] = entry
    return entries


def test_a_new_run_in_a_new_folder_downloads_only_new_and_changed_blobs(
    catalog: Catalog, make_image: Callable[..., bytes]
) -> None:
    catalog.put({"img1.jpeg": make_image(size=(60, 30), color=(0, 0, 255)),
                 "new.jpeg": make_image(size=(30, 60))})  # fmt: skip
    ids = [*IDS, "new.jpeg"]
    stats = catalog.prep("second", ids)
    assert (stats["downloaded"], stats["reused"], stats["prepared"]) == (2, 5, 7)
    assert json.loads((catalog.root / "second" / "stats.json").read_text()) == stats
    # Byte for byte what a run without any cache makes, the same ETags in the manifest.
    without = catalog.prep("uncached", ids, cached=False)
    assert (without["downloaded"], without["reused"]) == (7, 0)
    assert _outputs(catalog.root / "second") == _outputs(catalog.root / "uncached")
    manifest = pd.read_csv(catalog.root / "second" / "manifest.csv", dtype=str).set_index("id")
    assert manifest.loc["img1.jpeg", "width"] == "48" and manifest.loc["new.jpeg", "height"] == "48"
    assert set(_entries(catalog.cache)) == set(ids)  # one entry a blob: the changed one replaced
    stats = catalog.prep("third", ids)
    assert (stats["downloaded"], stats["reused"]) == (0, 7)


def test_another_image_size_is_another_entry(catalog: Catalog) -> None:
    stats = catalog.prep("small", IDS, image_size=12)
    assert (stats["downloaded"], stats["reused"]) == (6, 0)
    assert set(pd.read_csv(catalog.root / "small" / "manifest.csv")["height"]) == {12}
    assert len(list(catalog.cache.rglob("*.img"))) == 12
    assert catalog.prep("again", IDS)["reused"] == 6  # the 24 px entries are still there


def test_a_damaged_entry_is_never_used_and_is_fetched_again(catalog: Catalog) -> None:
    cache = ImageCache(catalog.cache, catalog.blob_uri, SIZE, 2**30)
    flipped = bytearray(cache.path("img2.jpeg").read_bytes())
    flipped[-100] ^= 0xFF  # a bit of the JPEG itself: the header still looks right
    cache.path("img2.jpeg").write_bytes(bytes(flipped))
    truncated = cache.path("img3.jpeg").read_bytes()
    cache.path("img3.jpeg").write_bytes(truncated[: len(truncated) // 2])
    # Another blob's (sound) entry in its place: the header names another key.
    cache.path("img4.jpeg").write_bytes(cache.path("img5.jpeg").read_bytes())
    cache.path("img0.jpeg").write_bytes(b"")
    stats = catalog.prep("second", IDS)
    assert (stats["downloaded"], stats["reused"]) == (4, 2)
    assert _outputs(catalog.root / "second") == _outputs(catalog.root / "first")
    assert set(_entries(catalog.cache)) == set(IDS)  # rewritten whole
    assert catalog.prep("third", IDS)["reused"] == 6


def test_the_cache_is_bounded_and_keeps_the_most_recently_used(catalog: Catalog) -> None:
    cache = ImageCache(catalog.cache, catalog.blob_uri, SIZE, 2**30)
    old = time.time() - 3600
    for number, name in enumerate(IDS):  # written in the order of their names, long ago
        os.utime(cache.path(name), (old + number, old + number))
    used = cache.get("img0.jpeg")  # a hit marks it used now
    assert used is not None and (used.width, used.height) == (32, 24)
    keep = ["img0.jpeg", "img3.jpeg", "img4.jpeg", "img5.jpeg"]
    bound = sum(cache.path(name).stat().st_size for name in keep)
    stats = catalog.prep("second", IDS[3:], cache_max_bytes=bound)  # uses 3, 4 and 5
    assert (stats["downloaded"], stats["reused"]) == (0, 3)
    assert sorted(_entries(catalog.cache)) == keep  # 1 and 2 were used least recently
    stats = catalog.prep("third", IDS, cache_max_bytes=bound)
    assert (stats["downloaded"], stats["reused"]) == (2, 4)
    assert _outputs(catalog.root / "third") == _outputs(catalog.root / "first")
    # All six used just now, in an order the fetch decides: any of them may go, not too many.
    assert sum(p.stat().st_size for p in catalog.cache.rglob("*.img")) <= bound
    assert len(_entries(catalog.cache)) >= 3


def test_a_run_adds_at_most_the_bound(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, "file:///blobs", SIZE, 2500)
    for number in range(5):
        cache.put(f"b{number}", CachedImage("etag", 4, 3, bytes(1000)))
    assert len(list(tmp_path.rglob("*.img"))) == 2  # 2 x (1000 + header) <= 2500


def test_a_bound_of_zero_turns_the_cache_off(catalog: Catalog) -> None:
    for out in ("one", "two"):
        stats = catalog.prep(out, IDS, image_cache=catalog.root / "off", cache_max_bytes=0)
        assert stats["downloaded"] == 6
    assert not (catalog.root / "off").exists()


def test_a_cache_that_cannot_be_written_costs_downloads_only(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    (catalog.root / "a-file").write_bytes(b"")
    for out in ("one", "two"):
        stats = catalog.prep(out, IDS, image_cache=catalog.root / "a-file" / "cache",
                             processes=1)  # fmt: skip
        assert (stats["downloaded"], stats["prepared"]) == (6, 6)
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 2  # once a run


def test_prune_removes_the_least_recently_used_and_stale_temporary_files(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, "file:///blobs", SIZE, 2**30)
    now = time.time()
    for number in range(6):
        cache.put(f"b{number}", CachedImage(f"e{number}", 4, 3, bytes(100 * (number + 1))))
        os.utime(cache.path(f"b{number}"), (now - 600 + number, now - 600 + number))
    os.utime(cache.path("b0"), (now, now))  # used last
    stale = cache.path("b0").with_name(".b0.img.1-2.tmp")  # left by a killed writer
    stale.write_bytes(b"x")
    os.utime(stale, (now - 7200, now - 7200))
    fresh = stale.with_name(".b0.img.3-4.tmp")  # a writer at work
    fresh.write_bytes(b"x")
    sizes = {n: cache.path(f"b{n}").stat().st_size for n in range(6)}
    done = prune(tmp_path, sizes[0] + sizes[5] + sizes[4])
    assert (done.removed, done.kept) == (3, 3)
    assert {n for n in range(6) if cache.path(f"b{n}").exists()} == {0, 4, 5}
    assert not stale.exists() and fresh.exists()
    assert done.kept_bytes == sizes[0] + sizes[5] + sizes[4]
    main([str(tmp_path), "--max-mb", "0"])  # the command: empty it
    assert not list(tmp_path.rglob("*.img"))
    assert prune(tmp_path / "missing", 0).kept == 0


# --- two runs at once, as processes ------------------------------------------------------------

COUNT = 60
# The component's entry point, started once every process has imported it (argv[1] runs at
# once: a folder for the gate and their count), with every blob read delayed, so that the runs
# overlap.
SLOW_ENTRY_POINT = """
import asyncio, os, pathlib, runpy, sys, time
sys.path.insert(0, os.getcwd())
import components.data_prep.main
from sslpipe.stores.local_blob import LocalFolderBlobStore

read_if_changed = LocalFolderBlobStore.read_if_changed

async def slow(self, name, etag):
    await asyncio.sleep(0.03)
    return await read_if_changed(self, name, etag)

LocalFolderBlobStore.read_if_changed = slow
gate, count = pathlib.Path(sys.argv[1]), int(sys.argv[2])
(gate / str(os.getpid())).touch()
while len(list(gate.iterdir())) < count:
    time.sleep(0.005)
sys.argv = ["data_prep", *sys.argv[3:]]
runpy.run_module("components.data_prep.main", run_name="__main__")
"""


def _run_together(catalog: Catalog, outs: list[str]) -> list[dict[str, Any]]:
    """data_prep's entry point into each of ``outs`` at once (the cache from the variable the
    executor sets); the stats of each, after checking that they overlapped in time."""
    env = {**os.environ, IMAGE_CACHE_ENV: str(catalog.cache), "PYTHONPATH": str(REPO)}
    ids_dir = catalog.root / "ids"
    gate = catalog.root / f"gate-{'-'.join(outs)}"
    gate.mkdir()
    flags = [str(gate), str(len(outs)), "--selection", str(ids_dir), "--blob_uri",
             catalog.blob_uri, "--image_size", str(SIZE), "--concurrency", "2"]  # fmt: skip
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SLOW_ENTRY_POINT, *flags, "--data", str(catalog.root / out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out in outs
    ]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    spans = []
    for out in outs:
        times = [p.stat().st_mtime for p in (catalog.root / out / "images").iterdir()]
        spans.append((min(times), max(times)))
    assert max(start for start, _ in spans) < min(end for _, end in spans), "did not overlap"
    return [json.loads((catalog.root / out / "stats.json").read_text()) for out in outs]


def test_two_runs_at_once_share_the_cache_and_both_are_right(
    tmp_path: Path, make_image: Callable[..., bytes]
) -> None:
    catalog = in_local_folder(Catalog, tmp_path)
    names = [f"n{i:02d}.jpeg" for i in range(COUNT)]
    catalog.put({n: make_image(size=(40 + i % 7, 30), color=(4 * i, 9, 90)) for i, n in
                 enumerate(names)})  # fmt: skip
    catalog.ids(names)
    cold = _run_together(catalog, ["a", "b"])  # both fill the empty cache, same entries at once
    for stats in cold:
        assert stats["prepared"] == stats["downloaded"] + stats["reused"] == COUNT
    reference = catalog.prep("reference", names, cached=False)
    assert reference["downloaded"] == COUNT
    for out in ("a", "b"):
        assert _outputs(catalog.root / out) == _outputs(catalog.root / "reference")
    assert set(_entries(catalog.cache)) == set(names)  # none lost, none torn

    changed = {n: make_image(size=(50, 30), color=(200, 0, i)) for i, n in enumerate(names[:5])}
    added = {f"m{i}.jpeg": make_image(size=(30, 50)) for i in range(5)}
    catalog.put(changed | added)
    catalog.ids([*names, *added])
    warm = _run_together(catalog, ["c", "d"])
    for stats in warm:
        assert stats["prepared"] == stats["downloaded"] + stats["reused"] == COUNT + 5
        assert stats["reused"] >= COUNT - 5 and stats["downloaded"] <= 10
    assert sum(stats["downloaded"] for stats in warm) >= 10  # each new blob fetched once at least
    catalog.prep("reference2", [*names, *added], cached=False)
    for out in ("c", "d"):
        assert _outputs(catalog.root / out) == _outputs(catalog.root / "reference2")
    assert set(_entries(catalog.cache)) == {*names, *added}
    stats = catalog.prep("e", [*names, *added])
    assert (stats["downloaded"], stats["reused"]) == (0, COUNT + 5)


def _version(name: str, etag: str) -> bytes:
    """The content of blob ``name`` at ``etag``: of a length that differs by version."""
    seed = f"{name}/{etag}".encode()
    return seed * (50 + 40 * int(etag[1:]))


def _writer(root: Path, seconds: float, offset: int) -> None:
    cache = ImageCache(root, "file:///blobs", SIZE, 2**40)
    deadline, number = time.monotonic() + seconds, offset
    while time.monotonic() < deadline:
        name, etag = f"b{number % 8}", f"v{number % 5}"
        cache.put(name, CachedImage(etag, 4, 3, _version(name, etag)))
        number += 1


def _pruner(root: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        prune(root, 4000)
        time.sleep(0.005)


def test_entries_written_pruned_and_read_at_once_are_whole(tmp_path: Path) -> None:
    """Two writers replace the same entries with other versions while a third process prunes;
    every read here gets a whole entry (its content is its version's) or none."""
    seconds, context = 2.0, get_context("fork")
    others = [context.Process(target=_writer, args=(tmp_path, seconds, n)) for n in (0, 3)]
    others.append(context.Process(target=_pruner, args=(tmp_path, seconds)))
    for process in others:
        process.start()
    cache = ImageCache(tmp_path, "file:///blobs", SIZE, 0)
    hits, versions = 0, set()
    reads = 0
    deadline, give_up = time.monotonic() + seconds, time.monotonic() + 60
    while time.monotonic() < deadline or (reads < 1000 and time.monotonic() < give_up):
        for number in range(8):
            path, name = cache.path(f"b{number}"), f"b{number}"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            reads += 1
            entry = cache.parse(data, name)
            assert entry is not None, f"a torn or mixed entry: {len(data)} bytes"
            assert entry.jpeg == _version(name, entry.etag)
            hits += 1
            versions.add(entry.etag)
    for process in others:
        process.join(60)
        assert process.exitcode == 0
    assert hits > 100 and len(versions) > 1  # entries were replaced while being read
