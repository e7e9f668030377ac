"""Row 6: data_prep under 20 ms of latency per request (issue 15, item 7).

Loopback Azurite answers in well under a millisecond, which hides how the step behaves against
Azure Blob Storage, 10-30 ms away, where its speed is the number of downloads it keeps in
flight. Here every request goes through :class:`benchmarks.latency_proxy.LatencyProxy` in front
of Azurite, which holds it for ``DELAY_S`` (20 ms) and counts the requests in flight. The
inputs are row 1's photo-like 640x480 JPEGs in the Azurite container ``bench-photos``
(:mod:`benchmarks.bench_data_prep`). Contestants, each in a fresh child process, interleaved,
all through the same proxy with the same number of requests in flight (data_prep's default
concurrency, ``DataPrepConfig().concurrency``):

- project:   ``run_data_prep`` as a user runs it (default concurrency and processes, image
             size 112) into an empty folder;
- reference: download only with azure-storage-blob's async client, the way its documentation
             shows (``BlobServiceClient`` from a connection string, ``download_blob`` then
             ``readall``, under ``asyncio.gather``), bytes discarded: the target's reference;
- plain:     download only with plain aiohttp GETs and a SAS (no SDK pipeline; the way
             data_prep itself downloads): a reference for where the CPU goes, in the notes.

Once more, outside the repeats, the project with 16 fetching processes (the layout of a 16-core
machine, ``concurrency / 16`` downloads each) shows that the requests in flight at the proxy
do not depend on the number of processes. Throughput is images / seconds of the work itself,
measured inside the child (process start and imports excluded).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from benchmarks.bench_data_prep import (
    CONTAINER,
    IMAGE_SIZE,
    _azurite_cpu_s,
    _fresh,
    _upload_missing,
    blob_name,
    ensure_photos,
    selection_folder,
)
from benchmarks.common import (
    CACHE,
    cpu_seconds,
    in_child,
    interleaved,
    log,
    median,
    row,
    server,
    spread,
)
from benchmarks.latency_proxy import LatencyProxy

DELAY_S = 0.020  # added to every request: Azure Blob Storage answers in 10-30 ms
TARGET = 0.8  # of the download-only reference's images/s
WIDE_PROCESSES = 16  # the fetching processes of a 16-core machine
FULL = {"images": 2000, "repeats": 3}
QUICK = {"images": 200, "repeats": 2}


def project(
    ids_dir: str, blob_uri: str, output_dir: str, concurrency: int, processes: int | None
) -> dict[str, Any]:
    """The project's data_prep step (in a child process)."""
    import sslpipe.stores.azure_blob  # noqa: F401  imported before the clock, like the others'
    from sslpipe.steps.data_prep import run_data_prep

    out = _fresh(output_dir)
    cpu, started = cpu_seconds(), time.perf_counter()
    stats = run_data_prep(
        ids_dir=Path(ids_dir), blob_uri=blob_uri, output_dir=out, image_size=IMAGE_SIZE,
        concurrency=concurrency, processes=processes,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return {"images": stats["prepared"], "seconds": seconds, "cpu_s": cpu_seconds() - cpu}


def _rate(result: dict[str, Any]) -> float:
    return float(result["images"] / result["seconds"])


def run(quick: bool) -> list[dict[str, Any]]:
    from sslpipe.core.config import DataPrepConfig

    sizes = QUICK if quick else FULL
    count, repeats = sizes["images"], sizes["repeats"]
    concurrency = DataPrepConfig().concurrency
    azurite = server("azurite")
    paths = ensure_photos(count)
    uploaded = asyncio.run(_upload_missing(azurite["connection_string"], paths))
    if uploaded:
        log(f"uploaded {uploaded} photos to the Azurite container {CONTAINER}")
    port = urlparse(azurite["blob_endpoint"]).port
    assert port is not None
    names = [blob_name(i) for i in range(count)]
    ids_dir = str(selection_folder(count))
    out = CACHE / "latency" / "out"

    with LatencyProxy(("127.0.0.1", port), DELAY_S) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}/{azurite['account_name']}"
        connection = azurite["connection_string"].replace(azurite["blob_endpoint"], endpoint)
        env = {"AZURE_STORAGE_CONNECTION_STRING": connection}
        blob_uri = f"{endpoint}/{CONTAINER}"

        def through_proxy(function: str, **kwargs: Any) -> Callable[[], dict[str, Any]]:
            def measure() -> dict[str, Any]:
                proxy.reset()
                azurite_cpu = _azurite_cpu_s()
                result = in_child(function, env=env, **kwargs)
                seen = proxy.stats()
                return result | {
                    "server_cpu_s": _azurite_cpu_s() - azurite_cpu,
                    "requests": seen.requests,
                    "peak_in_flight": seen.peak_in_flight,
                    "mean_in_flight": seen.mean_in_flight,
                    "proxy_cpu_s": seen.cpu_s,
                }

            return measure

        def project_with(processes: int | None) -> Callable[[], dict[str, Any]]:
            return through_proxy(
                "benchmarks.bench_latency:project", ids_dir=ids_dir, blob_uri=blob_uri,
                output_dir=str(out), concurrency=concurrency, processes=processes,
            )  # fmt: skip

        log(f"latency: {count} images through a {DELAY_S * 1000:.0f} ms proxy, "
            f"{concurrency} in flight, {repeats} interleaved repeats")  # fmt: skip
        results = interleaved(
            repeats,
            {
                "project": project_with(None),
                "reference": through_proxy(
                    "benchmarks.bench_data_prep:ceiling", connection_string=connection,
                    names=names, concurrency=concurrency,
                ),
                "plain": through_proxy(
                    "benchmarks.bench_data_prep:plain_get", blob_endpoint=endpoint,
                    account_name=azurite["account_name"], account_key=azurite["account_key"],
                    names=names, concurrency=concurrency,
                ),
            },
        )  # fmt: skip
        wide = project_with(WIDE_PROCESSES)()

    for result in [*results["project"], wide]:
        if result["images"] != count:
            raise RuntimeError(f"data_prep prepared {result['images']} of {count} images")
    rates = {name: [_rate(r) for r in runs] for name, runs in results.items()}
    project_rate, reference_rate, plain_rate = (
        median(rates[name]) for name in ("project", "reference", "plain")
    )
    share = project_rate / reference_rate

    def flight(runs: list[dict[str, Any]]) -> str:
        mean = median(r["mean_in_flight"] for r in runs)
        return f"mean {mean:.1f}, peak {max(r['peak_in_flight'] for r in runs)}"

    def cpu(runs: list[dict[str, Any]]) -> str:
        client = median(r["cpu_s"] / r["images"] * 1000 for r in runs)
        azurite_ms = median(r["server_cpu_s"] / r["images"] * 1000 for r in runs)
        proxy_ms = median(r["proxy_cpu_s"] / r["requests"] * 1000 for r in runs)
        return f"{client:.2f}+{azurite_ms:.2f}+{proxy_ms:.2f}"

    def busy(runs: list[dict[str, Any]]) -> float:
        """Cores kept busy by the client, Azurite and the proxy together while it ran."""
        return median(
            (r["cpu_s"] + r["server_cpu_s"] + r["proxy_cpu_s"]) / r["seconds"] for r in runs
        )

    bound = concurrency / DELAY_S
    cores = len(os.sched_getaffinity(0))
    limits = f"; the project reaches {project_rate / bound:.0%} of the latency's limit"
    if busy(results["project"]) >= 0.75 * cores:
        limits += ", with its cores busy: bound by CPU here, not by the latency"
    inputs = (
        f"{count} JPEGs 640x480 (~65 KB) to {IMAGE_SIZE} px through a loopback proxy adding "
        f"{DELAY_S * 1000:.0f} ms to every request, {concurrency} requests in flight "
        f"(data_prep's default concurrency; at most {bound:,.0f} img/s at that latency); "
        f"{repeats} interleaved repeats"
    )
    notes = (
        f"{inputs}; project {spread(rates['project'])}, reference {spread(rates['reference'])} "
        f"img/s; requests in flight at the proxy: project {flight(results['project'])}, "
        f"reference {flight(results['reference'])}; with {WIDE_PROCESSES} fetching processes "
        f"(a 16-core machine's layout, one run): {_rate(wide):.0f} img/s, in flight "
        f"{flight([wide])}; plain aiohttp GETs with a SAS (no SDK, no decoding): "
        f"{spread(rates['plain'])} img/s, project/plain {project_rate / plain_rate:.2f}x, in "
        f"flight {flight(results['plain'])}; CPU ms per image (client+Azurite+proxy): project "
        f"{cpu(results['project'])}, reference {cpu(results['reference'])}, plain "
        f"{cpu(results['plain'])}; cores busy with the three: project "
        f"{busy(results['project']):.2f}, reference {busy(results['reference']):.2f}, plain "
        f"{busy(results['plain']):.2f} of {cores}{limits}"
    )
    return [
        row(
            f"6. data_prep under {DELAY_S * 1000:.0f} ms latency vs async download-only "
            "(rate: project/reference)",
            project=project_rate, baseline=reference_rate, unit="img/s", higher_is_better=True,
            target=f">= {TARGET}x", met=share >= TARGET, notes=notes,
        )
    ]  # fmt: skip
