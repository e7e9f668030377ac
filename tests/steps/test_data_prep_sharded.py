"""data_prep on several nodes: each fetches its hash shard, the last one merges the parts.

The nodes are processes (or calls) with RANK and WORLD_SIZE set, as Azure ML's PyTorch
distribution sets them, writing into one output folder over a local-folder blob store; no
process group is involved. Their merged output must be the one node's, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipelines import PIPELINES
from sslpipe.core.config import load_config
from sslpipe.data.shards import shard_of
from sslpipe.execution import PipelineGraph, PipelineGraphError
from sslpipe.models.training.distributed import DistributedEnvError
from sslpipe.steps.data_prep import DataPrepNodesError, TooManySkippedError, run_data_prep
from sslpipe.stores.local_blob import LocalFolderBlobStore

REPO = Path(__file__).resolve().parents[2]
NODES = 3
GOOD = [f"img{i:02d}.jpeg" for i in range(24)]
BROKEN = ["missing.jpeg", "text.jpeg"]  # no blob; not an image


def launcher(rank: int, run: str = "run-1", nodes: int = NODES) -> dict[str, str]:
    """What Azure ML's PyTorch distribution sets on node ``rank`` (one process per node)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(nodes),
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "10.0.0.4",
        "MASTER_PORT": "6105",
        "AZUREML_RUN_ID": run,
    }


class Catalog:
    """A local blob folder, a labelled id list over it, and data_prep runs into ``root/name``."""

    def __init__(self, root: Path, make_image: Callable[..., bytes]) -> None:
        self.root, self.blobs = root, LocalFolderBlobStore(root / "blobs")
        for i, name in enumerate(GOOD):
            self.blobs.write_sync(name, make_image(size=(40 + i, 30), color=(10 * i, 90, 40)))
        self.blobs.write_sync("text.jpeg", b"not an image\n")
        self.ids_dir = root / "ids"
        self.write_ids([*GOOD, *BROKEN])

    def write_ids(self, ids: list[str]) -> None:
        self.ids_dir.mkdir(exist_ok=True)
        pd.DataFrame(
            {
                "id": ids,
                "blob_path": ids,
                "file_hash": [f"hash-{i}" for i in ids],
                "label": ["Even" if n % 2 else "Odd" for n in range(len(ids))],
                "split": ["train", "train", "val", "test"] * (len(ids) // 4)
                + ["train"] * (len(ids) % 4),
                "repeats": [1 + n % 3 for n in range(len(ids))],
            }
        ).to_csv(self.ids_dir / "ids.csv", index=False)
        (self.ids_dir / "selection.json").write_text('{"mode": "labelled"}', encoding="utf-8")
        labels = {"classes": ["Even", "Odd"], "index": {"Even": 0, "Odd": 1}}
        (self.ids_dir / "labels.json").write_text(json.dumps(labels), encoding="utf-8")

    def prep(self, name: str, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("max_skipped_fraction", 0.1)
        return run_data_prep(
            ids_dir=self.ids_dir,
            blob_uri=self.blobs.root.as_uri(),
            output_dir=self.root / name,
            image_size=24,
            **kwargs,
        )

    def node(self, name: str, rank: int, run: str = "run-1", **kwargs: Any) -> dict[str, Any]:
        return self.prep(name, nodes=NODES, environ=launcher(rank, run), **kwargs)


@pytest.fixture
def catalog(tmp_path: Path, make_image: Callable[..., bytes]) -> Catalog:
    return Catalog(tmp_path, make_image)


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def part(folder: Path, kind: str, rank: int) -> Path:
    suffix = "json" if kind == "stats" else "csv"
    return folder / "parts" / f"{kind}-{rank:05d}-of-{NODES:05d}.{suffix}"


def part_ids(folder: Path, rank: int) -> set[str]:
    frames = [pd.read_csv(part(folder, kind, rank), dtype=str) for kind in ("manifest", "skipped")]
    return set(frames[0]["id"]) | set(frames[1]["id"])


# --- the shards ---------------------------------------------------------------------------------


def test_the_shard_is_the_ids_sha256_modulo_the_node_count() -> None:
    for image_id in ["a.jpeg", "img00.jpeg", "ü/ß.png", ""]:
        digest = hashlib.sha256(image_id.encode("utf-8")).hexdigest()
        assert shard_of(image_id, 5) == int(digest[:16], 16) % 5
    assert {shard_of(image_id, 1) for image_id in GOOD} == {0}


def test_shards_are_balanced_and_an_id_keeps_its_shard_when_the_list_grows() -> None:
    ids = [f"catalog/{n:06d}.jpeg" for n in range(6000)]
    counts = Counter(shard_of(image_id, 4) for image_id in ids[:3000])
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(count - 750) < 75 for count in counts.values()), counts  # 10 %, ~3.6 sigma
    before = {image_id: shard_of(image_id, 4) for image_id in ids[:3000]}
    assert {image_id: shard_of(image_id, 4) for image_id in ids if image_id in before} == before


# --- several nodes, one output ------------------------------------------------------------------


def test_three_node_processes_make_the_one_node_output_byte_for_byte(catalog: Catalog) -> None:
    out = catalog.root / "nodes"
    argv = [sys.executable, "-m", "components.data_prep.main", "--selection", str(catalog.ids_dir)]
    argv += ["--blob_uri", catalog.blobs.root.as_uri(), "--data", str(out), "--image_size", "24"]
    argv += ["--max_skipped_fraction", "0.1", "--nodes", str(NODES)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    nodes = [
        subprocess.Popen(
            argv,
            cwd=REPO,
            env=env | launcher(rank),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(NODES)
    ]  # side by side, as on Azure ML
    logs = [node.communicate(timeout=120)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0] * NODES, logs
    assert sum("merging the 3 parts" in log for log in logs) >= 1, logs

    single = catalog.prep("single")
    merged = files(out)
    parts = {name: data for name, data in merged.items() if name.startswith("parts/")}
    assert sorted(parts) == sorted(
        part(out, kind, rank).relative_to(out).as_posix()
        for kind in ("manifest", "skipped", "stats")
        for rank in range(NODES)
    )
    one = files(catalog.root / "single")
    assert {k: v for k, v in merged.items() if k not in parts and k != "stats.json"} == {
        k: v for k, v in one.items() if k != "stats.json"
    }  # manifest.csv, skipped.csv, selection.json, labels.json and every image
    stats = json.loads(merged["stats.json"])
    assert stats.pop("nodes") == NODES
    for key in ("seconds", "images_per_s"):
        stats.pop(key), single.pop(key)
    assert stats == single
    assert (single["prepared"], single["skipped"]) == (24, {"missing_blob": 1, "not_an_image": 1})

    # Disjoint, covering, balanced shards, each fetched by its own node.
    shards = [part_ids(out, rank) for rank in range(NODES)]
    assert set().union(*shards) == set(GOOD + BROKEN) and sum(map(len, shards)) == 26
    assert all(
        shard_of(image_id, NODES) == rank for rank in range(NODES) for image_id in shards[rank]
    )
    assert all(5 <= len(shard) <= 13 for shard in shards), [len(s) for s in shards]
    downloaded = [
        json.loads(parts[part(out, "stats", r).relative_to(out).as_posix()])["downloaded"]
        for r in range(3)
    ]
    assert downloaded == [len(shard - {"missing.jpeg"}) for shard in shards]


def test_no_manifest_until_every_node_of_the_run_has_finished(catalog: Catalog) -> None:
    out = catalog.root / "data"
    for rank in (0, 2):  # node 1 failed, or has not started
        stats = catalog.node("data", rank)
        assert stats["rank"] == rank and "nodes" in stats
    assert not (out / "manifest.csv").exists() and not (out / "stats.json").exists()
    assert part(out, "stats", 0).is_file() and not part(out, "stats", 1).exists()

    stats = catalog.node("data", 1)  # the last one merges
    assert "rank" not in stats and stats["nodes"] == NODES and stats["requested"] == 26
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert sorted(manifest["id"]) == GOOD


def test_parts_of_an_earlier_run_are_not_merged_into_a_new_one(catalog: Catalog) -> None:
    out = catalog.root / "data"
    for rank in range(NODES):
        catalog.node("data", rank, run="run-1")
    finished = (out / "manifest.csv").read_bytes(), (out / "manifest.csv").stat().st_mtime_ns
    for rank in (0, 1):  # node 2 of run 2 fails: its part of run 1 is still there
        catalog.node("data", rank, run="run-2")
    assert part(out, "stats", 2).is_file()
    assert ((out / "manifest.csv").read_bytes(), (out / "manifest.csv").stat().st_mtime_ns) == (
        finished
    )  # run 1's manifest, as one node's failed re-run leaves it; nothing claims run 2 done
    assert catalog.node("data", 2, run="run-2")["nodes"] == NODES


def test_a_rerun_downloads_only_the_changed_blob_on_its_node(
    catalog: Catalog, make_image: Callable[..., bytes]
) -> None:
    out = catalog.root / "data"
    for rank in range(NODES):
        catalog.node("data", rank, run="run-1")
    changed = "img07.jpeg"
    owner = shard_of(changed, NODES)
    catalog.blobs.write_sync(changed, make_image(size=(60, 30), color=(0, 0, 255)))
    times = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    for rank in range(NODES):
        catalog.node("data", rank, run="run-2")
    # Each node downloads the changed blob when it is in its shard, and text.jpeg (skipped, so
    # never reused); the others are reused.
    downloaded = [
        json.loads(part(out, "stats", rank).read_text())["downloaded"] for rank in range(3)
    ]
    text_owner = shard_of("text.jpeg", NODES)
    assert downloaded == [int(r == owner) + int(r == text_owner) for r in range(NODES)]
    merged = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert (merged["downloaded"], merged["reused"], merged["prepared"]) == (2, 23, 24)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert {name for name in after if after[name] != times[name]} == {changed}
    row = pd.read_csv(out / "manifest.csv", dtype=str).set_index("id").loc[changed]
    assert (row["width"], row["height"]) == ("48", "24")


def test_a_node_reuses_its_own_part_when_the_run_was_never_merged(catalog: Catalog) -> None:
    out = catalog.root / "data"
    catalog.node("data", 0, run="run-1")  # nodes 1 and 2 failed: no manifest.csv
    assert not (out / "manifest.csv").exists()
    again = catalog.node("data", 0, run="run-2")
    assert again["downloaded"] == int(shard_of("text.jpeg", NODES) == 0)  # skipped: not reused
    assert again["reused"] == again["prepared"] > 0


# --- the skipped limit --------------------------------------------------------------------------


def missing_in(shard: int, count: int) -> list[str]:
    """``count`` names of absent blobs that all fall in ``shard``."""
    names = (f"absent-{n}.jpeg" for n in range(1000))
    return [name for name in names if shard_of(name, NODES) == shard][:count]


def test_the_skipped_limit_is_over_the_whole_selection_not_each_shard(catalog: Catalog) -> None:
    absent = missing_in(0, 2)
    catalog.write_ids([*GOOD, *absent])  # 2 of 26 (7.7 %), but a third or so of shard 0
    for rank in range(NODES):
        stats = catalog.node("data", rank, max_skipped_fraction=0.1)
    assert stats["skipped"] == {"missing_blob": 2}
    assert (catalog.root / "data" / "manifest.csv").is_file()


def test_too_many_skipped_over_all_nodes_fails_the_merge_without_a_manifest(
    catalog: Catalog,
) -> None:
    out = catalog.root / "data"
    catalog.write_ids([*GOOD, *missing_in(1, 3)])  # 3 of 27 (11.1 %), all on node 1
    for rank in (0, 1):
        catalog.node("data", rank, max_skipped_fraction=0.1)
    with pytest.raises(TooManySkippedError, match=r"3 of 27 images \(11\.1%\).*absent-"):
        catalog.node("data", 2, max_skipped_fraction=0.1)
    assert not (out / "manifest.csv").exists()
    assert len(pd.read_csv(out / "skipped.csv")) == 3  # kept for inspection


# --- the launcher -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "environ", "match"),
    [
        (3, launcher(0, nodes=2), r"configured for 3 node\(s\).*set data_prep.nodes=2"),
        (3, {}, r"configured for 3 node\(s\).*started 1 process"),
        (1, launcher(1), r"configured for 1 node\(s\).*started 3 process"),
    ],
)
def test_a_launcher_with_another_process_count_is_refused(
    catalog: Catalog, nodes: int, environ: dict[str, str], match: str
) -> None:
    with pytest.raises(DataPrepNodesError, match=match):
        catalog.prep("data", nodes=nodes, environ=environ)
    assert not (catalog.root / "data").exists()


def test_contradicting_launcher_variables_are_refused(catalog: Catalog) -> None:
    with pytest.raises(DistributedEnvError, match=r"RANK=3 is outside 0\.\.2"):
        catalog.prep("data", nodes=NODES, environ=launcher(3))


def test_the_local_executor_refuses_data_prep_on_several_machines(tmp_path: Path) -> None:
    config = load_config(None, [f"workspace={tmp_path}", "data_prep.nodes=3"])
    with pytest.raises(PipelineGraphError, match=r"data_prep.*asks for 3 machines"):
        PipelineGraph.from_pipeline_job(PIPELINES["moco"](config))


def test_the_component_without_a_launcher_fails_with_one_line(catalog: Catalog) -> None:
    argv = [sys.executable, "-m", "components.data_prep.main", "--selection", str(catalog.ids_dir)]
    argv += ["--blob_uri", catalog.blobs.root.as_uri(), "--data", str(catalog.root / "data")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [*argv, "--nodes", "2"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "configured for 2 node(s)" in done.stderr and "data_prep.nodes=1" in done.stderr
    assert not (catalog.root / "data").exists()
