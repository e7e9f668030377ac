"""Row 1: data_prep throughput from Azurite on loopback (issue 6).

Inputs: photo-like 640x480 JPEGs of about 65 KB (smooth gradients, shapes, sensor-like noise,
quality 85, 4:2:0), generated once into the cache and uploaded once to the Azurite container
``bench-photos``. Three contestants, each in a fresh child process, interleaved:

- project:  ``sslpipe.steps.data_prep.run_data_prep`` on a connect_db-like selection folder,
            image_size 112, concurrency 16 (the default before issue 15; row 6 measures
            the default under latency), into an empty output folder;
- baseline: sequential synchronous download (azure-storage-blob's sync client), full PIL
            decode, resize of the shorter side to 112, save as JPEG (the seed's way);
- ceiling:  download only (azure-storage-blob's async client, same concurrency, no decode).

Throughput is images / seconds of the work itself, measured inside the child (imports and
process start excluded). Peak memory is the PSS of the child's process tree (its decoding
processes included), sampled, at two sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import (
    TreeMemory,
    cpu_seconds,
    current_rss_mib,
    in_child,
    interleaved,
    log,
    median,
    row,
    server,
    servers,
    spread,
)

WIDTH, HEIGHT = 640, 480
QUALITY = 85
NOISE = 9.5  # sensor-like noise (standard deviation); sets the file size to about 65 KB
IMAGE_SIZE = 112
CONCURRENCY = 16  # data_prep.concurrency's default until issue 15 (now 64: bench_latency.py)
CONTAINER = "bench-photos"
FULL = {"images": 2000, "small": 500, "repeats": 3}
QUICK = {"images": 200, "small": 60, "repeats": 2}


def _dir() -> Path:
    return common.CACHE / "data_prep"


def blob_name(index: int) -> str:
    return f"photo-{index:05d}.jpeg"


# --- inputs


def photo(index: int) -> bytes:
    """A deterministic photo-like JPEG: gradients, filled shapes, blur, then noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    pixels = np.empty((HEIGHT, WIDTH, 3), np.float32)
    for channel in range(3):
        a, b, phase = rng.uniform(-1, 1, 3)
        pixels[..., channel] = (
            128 + 60 * np.sin(a * x / 90 + b * y / 70 + phase * 6) + rng.uniform(-40, 40)
        )
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        box = (x0, y0, x0 + int(rng.integers(20, 260)), y0 + int(rng.integers(20, 200)))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.standard_normal((HEIGHT, WIDTH, 3), dtype=np.float32) * NOISE
    noisy = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def _write_photo(index: int) -> None:
    target = _dir() / "photos" / blob_name(index)
    partial = target.with_suffix(".part")
    partial.write_bytes(photo(index))
    partial.replace(target)


def ensure_photos(count: int) -> list[Path]:
    """The first ``count`` photos in the cache, generating the missing ones."""
    folder = _dir() / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / blob_name(i)).is_file()]
    if missing:
        log(f"generating {len(missing)} photo-like JPEGs into {folder} (once)")
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_write_photo, missing, chunksize=16))
    return [folder / blob_name(i) for i in range(count)]


async def _upload_missing(connection_string: str, paths: list[Path]) -> int:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob.aio import BlobServiceClient

    async with BlobServiceClient.from_connection_string(connection_string) as service:
        container = service.get_container_client(CONTAINER)
        with contextlib.suppress(ResourceExistsError):
            await container.create_container()
        present = {blob.name async for blob in container.list_blobs(name_starts_with="photo-")}
        todo = iter([p for p in paths if p.name not in present])
        uploaded = 0

        async def worker() -> None:
            nonlocal uploaded
            for path in todo:
                await container.upload_blob(path.name, path.read_bytes(), overwrite=True)
                uploaded += 1

        await asyncio.gather(*(worker() for _ in range(16)))
    return uploaded


def selection_folder(count: int) -> Path:
    """A connect_db-like selection folder (ids.csv, selection.json) of the first ``count``."""
    import pandas as pd

    folder = _dir() / f"selection-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [blob_name(i) for i in range(count)]
    frame = pd.DataFrame({"id": names, "blob_path": names, "file_hash": "", "label": ""})
    frame.to_csv(folder / "ids.csv", index=False)
    (folder / "selection.json").write_text('{"mode": "all", "benchmark": true}\n')
    return folder


# --- the contestants (each runs in a child process)


def _fresh(folder: str) -> Path:
    path = Path(folder)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def project(ids_dir: str, blob_uri: str, output_dir: str, concurrency: int) -> dict[str, Any]:
    """The project's data_prep step."""
    import sslpipe.stores.azure_blob  # noqa: F401  imported before the clock, like the others'
    from sslpipe.steps.data_prep import run_data_prep

    out = _fresh(output_dir)
    imported = current_rss_mib()
    cpu, started = cpu_seconds(), time.perf_counter()
    with TreeMemory() as memory:
        stats = run_data_prep(
            ids_dir=Path(ids_dir),
            blob_uri=blob_uri,
            output_dir=out,
            image_size=IMAGE_SIZE,
            concurrency=concurrency,
        )
    seconds = time.perf_counter() - started
    return {
        "images": stats["prepared"],
        "seconds": seconds,
        "cpu_s": cpu_seconds() - cpu,
        "rss_before_mib": imported,
        "tree_pss_mib": memory.peak_mib,
    }


def baseline(connection_string: str, names: list[str], output_dir: str) -> dict[str, Any]:
    """Sequential synchronous download, full decode, resize, save."""
    from azure.storage.blob import BlobServiceClient
    from PIL import Image

    out = _fresh(output_dir)
    service = BlobServiceClient.from_connection_string(connection_string)
    container = service.get_container_client(CONTAINER)
    cpu, started = cpu_seconds(), time.perf_counter()
    with TreeMemory() as memory:
        for name in names:
            data = container.download_blob(name).readall()
            image = Image.open(io.BytesIO(data)).convert("RGB")
            scale = IMAGE_SIZE / min(image.size)
            size = (round(image.size[0] * scale), round(image.size[1] * scale))
            image = image.resize(size, Image.Resampling.BILINEAR)
            image.save(out / name, format="JPEG", quality=95)
    seconds = time.perf_counter() - started
    service.close()
    return {
        "images": len(names),
        "seconds": seconds,
        "cpu_s": cpu_seconds() - cpu,
        "tree_pss_mib": memory.peak_mib,
    }


def ceiling(connection_string: str, names: list[str], concurrency: int) -> dict[str, Any]:
    """Download only: the async client, ``concurrency`` downloads in flight, bytes discarded."""
    from azure.storage.blob.aio import BlobServiceClient

    async def download_all() -> int:
        total = 0
        todo = iter(names)
        async with BlobServiceClient.from_connection_string(connection_string) as service:
            container = service.get_container_client(CONTAINER)

            async def worker() -> None:
                nonlocal total
                for name in todo:
                    downloader = await container.download_blob(name)
                    total += len(await downloader.readall())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total

    cpu, started = cpu_seconds(), time.perf_counter()
    size = asyncio.run(download_all())
    seconds = time.perf_counter() - started
    return {"images": len(names), "seconds": seconds, "bytes": size, "cpu_s": cpu_seconds() - cpu}


def plain_get(
    blob_endpoint: str, account_name: str, account_key: str, names: list[str], concurrency: int
) -> dict[str, Any]:
    """Download only, without the SDK's per-request pipeline: aiohttp GETs with a read-only
    container SAS made once (a reference for where the client's CPU goes, not a target)."""
    import datetime as dt

    import aiohttp
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        account_name,
        CONTAINER,
        account_key=account_key,
        permission=ContainerSasPermissions(read=True),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2),
    )
    base = f"{blob_endpoint}/{CONTAINER}"

    async def download_all() -> int:
        total = 0
        todo = iter(names)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                nonlocal total
                for name in todo:
                    async with session.get(f"{base}/{name}?{sas}") as response:
                        response.raise_for_status()
                        total += len(await response.read())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total

    cpu, started = cpu_seconds(), time.perf_counter()
    size = asyncio.run(download_all())
    seconds = time.perf_counter() - started
    return {"images": len(names), "seconds": seconds, "bytes": size, "cpu_s": cpu_seconds() - cpu}


def _azurite_cpu_s() -> float:
    """CPU seconds Azurite has used so far (user + system), or NaN when its pid is unknown."""
    try:
        pid = int((servers().state_dir() / "azurite.pid").read_text())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def _with_server_cpu(result: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``result()`` plus ``server_cpu_s``, the CPU Azurite spent meanwhile."""
    before = _azurite_cpu_s()
    measured = result()
    return measured | {"server_cpu_s": _azurite_cpu_s() - before}


def _cpu_per_image(runs: list[dict[str, Any]]) -> str:
    client = median(r["cpu_s"] / r["images"] * 1000 for r in runs)
    server_ms = median(r["server_cpu_s"] / r["images"] * 1000 for r in runs)
    return f"{client:.2f}+{server_ms:.2f}"


# --- the row


def _rate(result: dict[str, Any]) -> float:
    return float(result["images"] / result["seconds"])


def run(quick: bool) -> list[dict[str, Any]]:
    sizes = QUICK if quick else FULL
    count, small, repeats = sizes["images"], sizes["small"], sizes["repeats"]
    azurite = server("azurite")
    paths = ensure_photos(count)
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    uploaded = asyncio.run(_upload_missing(azurite["connection_string"], paths))
    if uploaded:
        log(f"uploaded {uploaded} photos to the Azurite container {CONTAINER}")
    blob_uri = f"{azurite['blob_endpoint']}/{CONTAINER}"
    env = {"AZURE_STORAGE_CONNECTION_STRING": azurite["connection_string"]}
    names = [blob_name(i) for i in range(count)]
    out = _dir() / "out"
    connection = azurite["connection_string"]

    def contestant(function: str, **kwargs: Any) -> Callable[[], dict[str, Any]]:
        target = f"benchmarks.bench_data_prep:{function}"
        return lambda: _with_server_cpu(partial(in_child, target, **kwargs))

    def project_on(images: int) -> Callable[[], dict[str, Any]]:
        return contestant(
            "project", env=env, ids_dir=str(selection_folder(images)), blob_uri=blob_uri,
            output_dir=str(out / "project"), concurrency=CONCURRENCY,
        )  # fmt: skip

    log(f"data_prep: {count} images, {repeats} interleaved repeats")
    results = interleaved(
        repeats,
        {
            "project": project_on(count),
            "baseline": contestant(
                "baseline", connection_string=connection, names=names,
                output_dir=str(out / "baseline"),
            ),
            "ceiling": contestant(
                "ceiling", connection_string=connection, names=names, concurrency=CONCURRENCY
            ),
            "plain": contestant(
                "plain_get", blob_endpoint=azurite["blob_endpoint"],
                account_name=azurite["account_name"], account_key=azurite["account_key"],
                names=names, concurrency=CONCURRENCY,
            ),
        },
    )  # fmt: skip
    for result in results["project"]:
        if result["images"] != count:
            raise RuntimeError(f"data_prep prepared {result['images']} of {count} images")
    rates = {name: [_rate(r) for r in runs] for name, runs in results.items()}
    project_rate, baseline_rate, ceiling_rate = (
        median(rates[name]) for name in ("project", "baseline", "ceiling")
    )
    extra = ""
    if not quick:
        wide = contestant("ceiling", connection_string=connection, names=names, concurrency=64)
        extra = f"; at concurrency 64 (one run): {_rate(wide()):.0f} img/s"
    # Peak memory must not grow with the number of images: the same step on fewer of them.
    small_runs = [project_on(small)() for _ in range(repeats)]
    peak_large = median(r["tree_pss_mib"] for r in results["project"])
    peak_small = median(r["tree_pss_mib"] for r in small_runs)
    main_peak = median(r["peak_rss_mib"] for r in results["project"])
    import_rss = median(r["rss_before_mib"] for r in results["project"])
    baseline_peak = median(r["tree_pss_mib"] for r in results["baseline"])
    cpu = {name: _cpu_per_image(runs) for name, runs in results.items()}
    inputs = f"{count} JPEGs 640x480, mean {mean_kb:.0f} KB, to 112 px; {repeats} repeats"
    speedup = project_rate / baseline_rate
    share = project_rate / ceiling_rate
    growth = peak_large / peak_small
    return [
        row(
            "1. data_prep throughput vs sequential download+decode (rate: project/baseline)",
            project=project_rate, baseline=baseline_rate, unit="img/s", higher_is_better=True,
            target=">= 4x", met=speedup >= 4.0,
            notes=f"{inputs}; project {spread(rates['project'])}, baseline "
            f"{spread(rates['baseline'])} img/s; concurrency {CONCURRENCY}; CPU ms per image "
            f"(client+Azurite): project {cpu['project']}, baseline {cpu['baseline']}",
        ),
        row(
            "1. data_prep vs download-only ceiling (rate: project/ceiling)",
            project=project_rate, baseline=ceiling_rate, unit="img/s", higher_is_better=True,
            target=">= 0.7x", met=share >= 0.7,
            notes=f"ceiling: azure-storage-blob async client, concurrency {CONCURRENCY}, no "
            f"decode: {spread(rates['ceiling'])} img/s{extra}; CPU ms per image "
            f"(client+Azurite) {cpu['ceiling']}; reference, plain aiohttp GETs with a SAS "
            f"(no SDK pipeline): {spread(rates['plain'])} img/s, CPU {cpu['plain']}",
        ),
        row(
            f"1. data_prep peak memory, {count} vs {small} images (ratio: small/large)",
            project=peak_large, baseline=peak_small, unit="MiB", higher_is_better=False,
            target="flat (>= 0.9x)", met=growth <= 1.0 / 0.9,
            notes="peak PSS of the step's whole process tree (main process and its decoding "
            "processes, sampled every 50 ms), medians; the main process alone peaks at "
            f"{main_peak:.0f} MiB RSS, {import_rss:.0f} MiB of it once sslpipe.steps.data_prep "
            f"is imported; the sequential baseline peaks at {baseline_peak:.0f} MiB PSS",
        ),
    ]  # fmt: skip
