"""data_prep against a blob store that takes a while to answer (issue 15, item 7).

Azure Blob Storage answers in 10-30 ms, so the step's speed is the number of downloads it keeps
in flight: that is ``concurrency``, whatever the number of fetching processes, and decoding an
image must not hold the next download up. Measured at the store: a test double that answers
after a fixed delay and counts the calls in flight over all processes, and the latency proxy of
the benchmarks (``benchmarks/latency_proxy.py``) in front of Azurite.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import pytest

from benchmarks.latency_proxy import LatencyProxy
from sslpipe.core.config import DataPrepConfig
from sslpipe.data import fetch
from sslpipe.data.fetch import DEFAULT_CONCURRENCY, concurrency_shares
from sslpipe.steps import data_prep
from sslpipe.steps.data_prep import run_data_prep
from sslpipe.stores.azure_blob import CONNECTION_STRING_ENV, AzureBlobStore
from sslpipe.stores.base import BlobInfo, BlobStore
from sslpipe.stores.local_blob import LocalFolderBlobStore


class InFlight:
    """Calls in flight over every process (in shared memory): the peak, and the time-weighted
    mean from the moment ``full`` were first in flight (every process started) to the last
    call's start (no row left to start)."""

    def __init__(self, full: int) -> None:
        context = multiprocessing.get_context("fork")
        self.full = full
        self._lock = context.Lock()
        self._now = context.Value("i", 0, lock=False)
        self._peak = context.Value("i", 0, lock=False)
        self._calls = context.Value("i", 0, lock=False)
        self._area = context.Value("d", 0.0, lock=False)  # calls x seconds so far
        self._changed = context.Value("d", 0.0, lock=False)
        self._full_at = context.Value("d", -1.0, lock=False)
        self._area_at_full = context.Value("d", 0.0, lock=False)
        self._last_start = context.Value("d", 0.0, lock=False)
        self._area_at_last_start = context.Value("d", 0.0, lock=False)

    def change(self, delta: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._area.value += self._now.value * (now - self._changed.value)
            self._changed.value = now
            self._now.value += delta
            if delta > 0:
                self._calls.value += 1
                self._last_start.value = now
                self._area_at_last_start.value = self._area.value
                self._peak.value = max(self._peak.value, self._now.value)
                if self._now.value >= self.full and self._full_at.value < 0:
                    self._full_at.value, self._area_at_full.value = now, self._area.value

    @property
    def peak(self) -> int:
        return int(self._peak.value)

    @property
    def calls(self) -> int:
        return int(self._calls.value)

    @property
    def mean_while_rows_were_left(self) -> float:
        seconds = self._last_start.value - self._full_at.value
        if self._full_at.value < 0 or seconds <= 0:
            return 0.0
        return float((self._area_at_last_start.value - self._area_at_full.value) / seconds)


class DelayedStore(BlobStore):
    """A local folder store whose every read answers ``delay_s`` late, counted in ``in_flight``."""

    def __init__(self, inner: LocalFolderBlobStore, delay_s: float, in_flight: InFlight) -> None:
        self.inner, self.delay_s, self.in_flight = inner, delay_s, in_flight
        self.uri, self.container = inner.uri, inner.container

    async def read_if_changed(self, name: str, etag: str | None) -> tuple[bytes | None, str]:
        self.in_flight.change(+1)
        try:
            await asyncio.sleep(self.delay_s)
            return await self.inner.read_if_changed(name, etag)
        finally:
            self.in_flight.change(-1)

    async def read(self, name: str) -> bytes:
        data, _ = await self.read_if_changed(name, None)
        assert data is not None
        return data

    async def write(self, name: str, data: bytes) -> None:
        await self.inner.write(name, data)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        async for info in self.inner.list(prefix):
            yield info


def _ids(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": names, "blob_path": names, "label": ""}).to_csv(
        folder / "ids.csv", index=False
    )
    return folder


@pytest.fixture
def slow_decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Each decode takes at least the first value of the list (seconds) longer, as a big photo
    would; sleeping, like PIL's decoding, lets go of the GIL."""
    extra = [0.0]
    real = fetch.write_resized

    def slow(data: bytes, target: Path, size: int) -> tuple[int, int]:
        time.sleep(extra[0])
        return real(data, target, size)

    monkeypatch.setattr(fetch, "write_resized", slow)
    yield extra


@pytest.mark.parametrize(
    ("concurrency", "processes", "decode_s"),
    [
        (5, 2, 0.01),  # shares of 3 + 2, not 3 + 3
        (2, 2, 0.05),  # one download per process: decoding must not hold the next one up
        (6, 4, 0.01),
        (4, 1, 0.02),  # one process, decoding in a thread
    ],
)
def test_the_downloads_in_flight_are_the_concurrency_whatever_the_processes(
    tmp_path: Path,
    make_image: Any,
    monkeypatch: pytest.MonkeyPatch,
    slow_decoding: list[float],
    concurrency: int,
    processes: int,
    decode_s: float,
) -> None:
    delay_s, count = 0.1, 10 * concurrency  # ten rounds of downloads
    blobs = LocalFolderBlobStore(tmp_path / "blobs")
    names = [f"img-{i:03d}.jpeg" for i in range(count)]
    for name in names:
        blobs.write_sync(name, make_image(size=(48, 36)))
    in_flight = InFlight(concurrency)
    store = DelayedStore(blobs, delay_s, in_flight)
    monkeypatch.setattr(data_prep, "open_blob_store", lambda uri: store)
    slow_decoding[0] = decode_s

    stats = run_data_prep(
        ids_dir=_ids(tmp_path / "ids", names), blob_uri=blobs.uri, output_dir=tmp_path / "out",
        image_size=24, concurrency=concurrency, processes=processes,
    )  # fmt: skip

    assert stats["prepared"] == count and in_flight.calls == count
    assert in_flight.peak == concurrency
    # While rows were left, every download slot was busy: no slot waited for a decode.
    assert in_flight.mean_while_rows_were_left >= 0.85 * concurrency, (
        f"{in_flight.mean_while_rows_were_left:.2f} downloads in flight on average of {concurrency}"
    )


def test_concurrency_is_shared_out_whole_over_the_processes() -> None:
    assert concurrency_shares(64, 16) == [4] * 16
    assert concurrency_shares(64, 2) == [32, 32]
    assert concurrency_shares(5, 2) == [3, 2]
    assert concurrency_shares(3, 8) == [1, 1, 1]  # never a process without a download
    assert concurrency_shares(7, 1) == [7]
    for concurrency in range(1, 70):
        for processes in range(1, 20):
            shares = concurrency_shares(concurrency, processes)
            assert sum(shares) == concurrency and min(shares) >= 1
            assert len(shares) == min(processes, concurrency)
            assert max(shares) - min(shares) <= 1


def test_the_default_concurrency_is_sized_for_the_network() -> None:
    assert DataPrepConfig().concurrency == DEFAULT_CONCURRENCY == 64


# --- through the benchmarks' latency proxy, in front of Azurite --------------------------------


@pytest.fixture
def container(azurite: dict[str, str]) -> Iterator[str]:
    """A fresh container of Azurite's, deleted afterwards."""
    from azure.storage.blob import BlobServiceClient

    name = f"latency-{uuid.uuid4().hex[:16]}"
    yield name
    with BlobServiceClient.from_connection_string(azurite["connection_string"]) as service:
        if service.get_container_client(name).exists():
            service.delete_container(name)


def test_through_a_20_ms_proxy_azurite_sees_the_concurrency_in_flight(
    azurite: dict[str, str],
    container: str,
    tmp_path: Path,
    make_image: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = urlparse(azurite["blob_endpoint"]).port
    assert port is not None
    names = [f"img-{i:03d}.jpeg" for i in range(60)]
    concurrency, delay_s = 5, 0.02
    with LatencyProxy(("127.0.0.1", port), delay_s) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}/{azurite['account_name']}"
        connection = azurite["connection_string"].replace(azurite["blob_endpoint"], endpoint)
        monkeypatch.setenv(CONNECTION_STRING_ENV, connection)
        uri = f"{endpoint}/{container}"
        store = AzureBlobStore.from_uri(uri, create=True)

        async def put() -> None:
            try:
                await asyncio.gather(*(store.write(n, make_image(size=(48, 36))) for n in names))
            finally:
                await store.close()

        asyncio.run(put())
        proxy.reset()
        started = time.perf_counter()
        stats = run_data_prep(
            ids_dir=_ids(tmp_path / "ids", names), blob_uri=uri, output_dir=tmp_path / "out",
            image_size=24, concurrency=concurrency, processes=2,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        seen = proxy.stats()

    assert stats["prepared"] == len(names)
    assert seen.requests == len(names) + 1  # and the check that the container exists
    assert seen.peak_in_flight == concurrency  # 3 + 2 over two processes
    assert seconds >= len(names) / concurrency * delay_s  # each request was held
