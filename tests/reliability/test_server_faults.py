"""Faults in the servers (issue 7, item 4).

- Azurite killed (SIGKILL) during data_prep and restarted: the step's retries carry it through
  and it finishes with every image; with retries that give up before the restart, it fails
  with one clear StoreError naming the container and the blob (no key), leaves no manifest, and
  a re-run after the restart downloads only the images the failed run had not finished. Each
  scenario runs its own Azurite (own port and data folder) so the shared one is not disturbed,
  behind a slow proxy so that the kill lands in the middle of the run.
- connect_db through an HTTPS proxy in front of the Cosmos-compatible server that answers 429
  with ``x-ms-retry-after-ms`` and 503 at random (seeded) writes exactly the id list it writes
  without the proxy.
- Label Studio unreachable: proven by tests/data/labelstudio/test_sync.py
  (``test_an_unreachable_label_studio_changes_nothing`` and
  ``test_the_sync_command_exits_1_with_one_line_when_label_studio_is_down``): the sync fails
  with one line naming the URL, and the metadata documents are unchanged.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import pytest
from PIL import Image

from sslpipe.core.filters import ImageFilter
from sslpipe.core.io import read_journal
from sslpipe.steps import data_prep
from sslpipe.steps.connect_db import run_connect_db
from sslpipe.steps.data_prep import PROGRESS_FILE, run_data_prep
from sslpipe.stores import StoreError
from sslpipe.stores.azure_blob import CONNECTION_STRING_ENV, AzureBlobStore
from sslpipe.stores.cosmos import KEY_ENV, CosmosMetadataStore
from tests.conftest import DocumentMaker, _servers_module
from tests.faults import CuttingProxy, FaultProxy

pytestmark = [
    pytest.mark.servers,
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]

REPO = Path(__file__).resolve().parents[2]
COUNT = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OwnAzurite:
    """An Azurite of this test's own (port, data folder), which the test may kill and restart
    without disturbing the session's; started with infra/servers.py's command line."""

    def __init__(self, data: Path) -> None:
        servers = _servers_module()
        self.port, self.data = _free_port(), data
        self.account, self.key = servers.AZURITE_ACCOUNT, servers.AZURITE_KEY
        self.binary = str(servers._node_bin("azurite-blob"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--skipApiVersionCheck", "--disableTelemetry", "--loose",
                   "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                   "--location", str(self.data), "--silent"]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=self.data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{self.port}/{self.account}?comp=list"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "Azurite exited while starting"
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                time.sleep(0.2)
        raise AssertionError("Azurite did not start within 60 s")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture()
def own_azurite(azurite: dict[str, str], tmp_path: Path) -> Iterator[OwnAzurite]:
    """A running Azurite of the test's own (``azurite`` only makes sure it is installed)."""
    server = OwnAzurite(tmp_path / "azurite")
    server.start()
    yield server
    server.kill()


class SlowBlobs:
    """COUNT images in a container of ``own_azurite``, reached through a slow proxy."""

    def __init__(self, server: OwnAzurite, proxy: CuttingProxy, root: Path) -> None:
        endpoint = f"http://127.0.0.1:{proxy.port}/{server.account}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={server.account};"
            f"AccountKey={server.key};BlobEndpoint={endpoint};"
        )
        self.uri = f"{endpoint}/faults-{uuid.uuid4().hex[:12]}"
        self.ids_dir = root / "ids"
        self.ids_dir.mkdir()
        names = [f"img{i:02d}.jpeg" for i in range(COUNT)]
        frame = pd.DataFrame({"id": names, "blob_path": names, "label": "x"})
        frame.to_csv(self.ids_dir / "ids.csv", index=False)

    def put(self) -> None:
        store = AzureBlobStore.from_uri(self.uri, create=True)

        async def scenario() -> None:
            try:
                for i in range(COUNT):
                    buffer = io.BytesIO()
                    Image.new("RGB", (40, 30), (8 * i, 90, 200)).save(buffer, format="JPEG")
                    await store.write(f"img{i:02d}.jpeg", buffer.getvalue())
            finally:
                await store.close()

        asyncio.run(scenario())


@pytest.fixture()
def slow_blobs(
    own_azurite: OwnAzurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SlowBlobs]:
    with CuttingProxy("127.0.0.1", own_azurite.port) as proxy:
        blobs = SlowBlobs(own_azurite, proxy, tmp_path)
        monkeypatch.setenv(CONNECTION_STRING_ENV, blobs.connection_string)
        blobs.put()
        # Azurite keeps its blob index in memory and saves it now and then: let a graceful
        # restart save it, so that the kill below cannot lose the uploads themselves.
        os.killpg(own_azurite.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
        own_azurite.process.wait()  # type: ignore[union-attr]
        own_azurite.start()
        proxy.slow_down(0.15)
        yield blobs


def _journaled(out: Path) -> int:
    return len({record["id"] for record in read_journal(out / PROGRESS_FILE)})


def _wait_for(condition: Any, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert process is None or process.poll() is None, f"the step ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within 120 s"
        time.sleep(0.01)


def test_data_prep_retries_through_an_azurite_restart_and_finishes(
    own_azurite: OwnAzurite, slow_blobs: SlowBlobs, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    argv = [sys.executable, "-m", "components.data_prep.main", "--selection",
            str(slow_blobs.ids_dir), "--blob_uri", slow_blobs.uri, "--data", str(out),
            "--image_size", "24", "--concurrency", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    log = tmp_path / "data_prep.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=sink)
        try:
            _wait_for(lambda: _journaled(out) >= 5, "5 images", process)
            own_azurite.kill()
            time.sleep(2)  # down for a while: every request in between fails
            own_azurite.start()
            returncode = process.wait(timeout=180)
        finally:
            if process.poll() is None:
                process.kill()
    text = log.read_text(errors="replace")
    assert returncode == 0, text[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["prepared"], stats["downloaded"], stats["skipped"]) == (COUNT, COUNT, {})
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert sorted(manifest["id"]) == [f"img{i:02d}.jpeg" for i in range(COUNT)]
    assert not (out / PROGRESS_FILE).exists()


def test_data_prep_that_gives_up_fails_clearly_and_resumes_after_the_restart(
    own_azurite: OwnAzurite, slow_blobs: SlowBlobs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "data"

    def impatient(uri: str) -> AzureBlobStore:  # gives up within a second
        return AzureBlobStore.from_uri(uri, retry_total=1, backoff_s=0.05, download_attempts=1)

    monkeypatch.setattr(data_prep, "open_blob_store", impatient)

    def kill_after_5() -> None:
        _wait_for(lambda: _journaled(out) >= 5, "5 images")
        own_azurite.kill()

    killer = threading.Thread(target=kill_after_5, daemon=True)
    killer.start()
    with pytest.raises(StoreError) as err:
        run_data_prep(ids_dir=slow_blobs.ids_dir, blob_uri=slow_blobs.uri, output_dir=out,
                      image_size=24, concurrency=2)  # fmt: skip
    killer.join(timeout=10)
    message = str(err.value)
    assert slow_blobs.uri in message and "cannot read blob 'img" in message
    assert own_azurite.key not in message and "\n" not in message
    assert not (out / "manifest.csv").exists()  # nothing a next step could take as complete
    finished = _journaled(out)
    assert 5 <= finished < COUNT

    own_azurite.start()
    monkeypatch.undo()
    monkeypatch.setenv(CONNECTION_STRING_ENV, slow_blobs.connection_string)
    stats = run_data_prep(ids_dir=slow_blobs.ids_dir, blob_uri=slow_blobs.uri, output_dir=out,
                          image_size=24, concurrency=2)  # fmt: skip
    assert (stats["reused"], stats["downloaded"]) == (finished, COUNT - finished)
    assert stats["prepared"] == COUNT and not (out / PROGRESS_FILE).exists()


# --- Cosmos: throttling and outages at random --------------------------------------------------


class RandomFaultProxy(FaultProxy):
    """An HTTPS proxy to the Cosmos server that answers requests at random (seeded) with 429
    (``x-ms-retry-after-ms``) or 503 instead of forwarding them; never more than ``streak``
    faults in a row, so that the SDK's retries always get through."""

    def __init__(
        self, upstream: str, cert: Path, key: Path, *, seed: int = 7, rate: float = 0.4
    ) -> None:
        self.random, self.rate, self.streak = random.Random(seed), rate, 2
        self.injected: list[int] = []
        self.forwarded = 0
        self._in_a_row = 0
        self._lock = threading.Lock()
        super().__init__(upstream, cert=cert, key=key)

    def fault(self, method: str, path: str) -> int | None:
        if method == "GET" and path == "/":
            return None  # the account document: the SDK reads it once, outside its retries
        with self._lock:
            if self._in_a_row < self.streak and self.random.random() < self.rate:
                self._in_a_row += 1
                status = 429 if self.random.random() < 0.5 else 503
                self.injected.append(status)
                return status
            self._in_a_row = 0
            self.forwarded += 1
            return None

    def fault_headers(self, status: int) -> list[tuple[str, str]]:
        return [("x-ms-retry-after-ms", "15")] if status == 429 else []


def _documents(make_document: DocumentMaker) -> list[dict[str, Any]]:
    """60 documents: labelled, unlabelled, blurred and sorted-out ones, with quotes in labels."""
    documents = []
    for i in range(60):
        labels = [(700 + i % 3, ["Even" if i % 2 == 0 else "Odd", f"{i % 10}"])] if i % 4 else []
        documents.append(make_document(
            f"doc-{i:03d}.jpeg", *labels, is_blurred=i % 7 == 0,
            sortout="Sort Out" if i % 11 == 0 else "Keep",
        ))  # fmt: skip
    return documents


def test_connect_db_through_random_throttling_and_outages_selects_exactly(
    cosmos_server: dict[str, str],
    make_document: DocumentMaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database, container = "faults", f"docs-{uuid.uuid4().hex[:8]}"
    store = CosmosMetadataStore(
        cosmos_server["endpoint"], database, container, credential=cosmos_server["key"]
    )
    documents = _documents(make_document)
    with store:
        store.upsert(documents)
    monkeypatch.setenv(KEY_ENV, cosmos_server["key"])
    package = _servers_module().state_dir() / "node" / "node_modules" / "@vercel"
    certificate = package / "cosmosdb-server"  # its self-signed pair serves the proxy too
    proxy = RandomFaultProxy(
        cosmos_server["endpoint"], certificate / "cert.pem", certificate / "key.pem"
    )
    image_filter = ImageFilter(exclude_blurred=True, sortout=["Keep"])
    blob_uri = (tmp_path / "blobs").as_uri()
    (tmp_path / "blobs").mkdir()
    try:
        direct_port = urlparse(cosmos_server["endpoint"]).port
        for name, port in (("direct", direct_port), ("faulty", proxy.port)):
            run_connect_db(
                metadata_uri=f"cosmos://127.0.0.1:{port}/{database}/{container}",
                blob_uri=blob_uri, image_filter=image_filter, output_dir=tmp_path / name,
            )  # fmt: skip
    finally:
        proxy.close()
    assert 429 in proxy.injected and 503 in proxy.injected, proxy.injected
    direct = (tmp_path / "direct" / "ids.csv").read_bytes()
    assert (tmp_path / "faulty" / "ids.csv").read_bytes() == direct
    expected = sorted(d["id"] for d in documents if not d["is_blurred"] and d["sortout"] == "Keep")
    assert list(pd.read_csv(tmp_path / "faulty" / "ids.csv", dtype=str)["id"]) == expected
    selection = json.loads((tmp_path / "faulty" / "selection.json").read_text())
    assert selection["documents_in_store"] == len(documents)
