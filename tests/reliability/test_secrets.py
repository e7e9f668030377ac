"""Secrets (issue 7, item 5): connection strings, account keys, SAS tokens, the Cosmos DB key
and the Label Studio token never appear in what sslpipe writes or says.

- The moco and classifier pipelines and an Azure ML dry run, with recognisable fake secrets in
  every credential variable sslpipe reads, leave none of them in any file of the workspace
  (run records, step logs, outputs, the MLflow database and artifacts, the pipeline YAML; inside
  zip archives such as torch files too) or on the console.
- A store that fails to open (a closed port) names the store and the reason, never the SAS
  signature, key or token: in the exception, its chain, the log records and the CLI's stderr.
- TLS verification is off only for loopback: opening a Cosmos DB store at any other host with
  verification disabled is refused before any connection is made.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import socket
import subprocess
import sys
import traceback
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from sslpipe.data.labelstudio.client import TOKEN_ENV, LabelStudioError, connect
from sslpipe.stores import StoreError, azure_blob, cosmos
from sslpipe.stores.sqlite import SQLiteMetadataStore
from tests.execution.test_azureml import AZURE_STORES
from tests.test_execute_e2e import TINY

ROOT = Path(__file__).resolve().parents[2]
_TAG = uuid.uuid4().hex[:12]


def _key(label: str) -> str:
    """A valid base64 account key whose text is unique to this test session."""
    return base64.b64encode(f"sslpipe-fake-{label}-{_TAG}-".encode().ljust(64, b"k")).decode()


ACCOUNT_KEY = _key("connection-string-account-key")
STORAGE_KEY = _key("storage-key")
SAS_SIGNATURE = f"FakeSasSig{_TAG}Zz%2B%2F%3D"  # percent-encoded base64, as in real SAS tokens
SAS_TOKEN = f"sv=2024-05-04&ss=b&srt=co&sp=rl&se=2099-01-01T00%3A00%3A00Z&sig={SAS_SIGNATURE}"
COSMOS_KEY = _key("cosmos-key")
LABEL_STUDIO_TOKEN = f"fakeLabelStudioToken{_TAG}"
CLIENT_SECRET = f"fakeAzureClientSecret{_TAG}"

SECRET_ENV = {
    "AZURE_STORAGE_CONNECTION_STRING": (
        "DefaultEndpointsProtocol=https;AccountName=sslpipefake;"
        f"AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net"
    ),
    azure_blob.ACCOUNT_KEY_ENV: STORAGE_KEY,
    azure_blob.SAS_TOKEN_ENV: SAS_TOKEN,
    cosmos.KEY_ENV: COSMOS_KEY,
    TOKEN_ENV: LABEL_STUDIO_TOKEN,
    "AZURE_CLIENT_SECRET": CLIENT_SECRET,
}
SECRETS = [ACCOUNT_KEY, STORAGE_KEY, SAS_SIGNATURE, COSMOS_KEY, LABEL_STUDIO_TOKEN, CLIENT_SECRET]


def _needles(secrets: list[str]) -> list[bytes]:
    """The longest run of letters and digits of each secret: it is in the secret as written,
    percent-encoded (a key in a URL) and decoded (a SAS signature), and long enough (at least
    16 characters, unique per session) that no match is chance."""
    runs = [max(re.findall(r"[A-Za-z0-9]+", secret), key=len) for secret in secrets]
    assert all(len(run) >= 16 for run in runs), runs
    return sorted(run.encode() for run in runs)


NEEDLES = _needles(SECRETS)


def _leaks(data: bytes, where: str) -> Iterator[str]:
    for needle in NEEDLES:
        if needle in data:
            yield f"{where}: {needle.decode()[:24]}…"
    if data[:4] == b"PK\x03\x04":  # a zip archive (torch files, MLflow artifacts): its members
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    yield from _leaks(archive.read(member), f"{where}!{member}")
        except zipfile.BadZipFile:
            pass


def find_secrets(root: Path) -> tuple[list[str], list[Path]]:
    """The places under ``root`` where any secret occurs, and every file that was searched."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    found = [leak for p in files for leak in _leaks(p.read_bytes(), str(p.relative_to(root)))]
    return found, files


def test_the_search_finds_a_secret_anywhere_it_could_hide(tmp_path: Path) -> None:
    """The searcher itself: plain, percent-encoded, decoded and inside a zip member."""
    (tmp_path / "a.txt").write_text(f"x={quote(COSMOS_KEY, safe='')}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.log").write_text(f"sig={SAS_SIGNATURE.replace('%2B', '+')}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.pkl", LABEL_STUDIO_TOKEN * 3)
    (tmp_path / "model.pt").write_bytes(buffer.getvalue())
    (tmp_path / "clean.json").write_text("{}")
    found, files = find_secrets(tmp_path)
    assert len(files) == 4
    assert {leak.split(":")[0] for leak in found} == {"a.txt", "sub/b.log", "model.pt!data.pkl"}


# --- the pipelines, with fake secrets in the environment --------------------------------------

CLASSIFIER = [
    "filter.limit=120",
    "data_prep.image_size=36",
    "classifier.image_size=32",
    "classifier.epochs=1",
    "classifier.batch_size=16",
    "classifier.hidden_dim=16",
    "evaluate.min_macro_f1=0.0",
]


def _execute(
    workspace: Path, pipeline: str, sets: list[str], *extra: str
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "execute.py", "--pipeline", pipeline, "--set", f"workspace={workspace}"]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(
        [*args, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **SECRET_ENV, "PYTHONWARNINGS": "ignore"},
        check=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """moco, then classifier on its backbone, then Azure ML dry runs, in one workspace."""
    workspace = tmp_path_factory.mktemp("secrets-workspace")
    done = {"moco": _execute(workspace, "moco", TINY)}
    if done["moco"].returncode == 0:
        done["classifier"] = _execute(workspace, "classifier", CLASSIFIER)
    for pipeline in ("moco", "classifier"):
        done[f"azureml-{pipeline}"] = _execute(
            workspace, pipeline, AZURE_STORES, "--backend", "azureml", "--dry-run"
        )
    return {"workspace": workspace, "done": done}


@pytest.mark.e2e
def test_the_pipelines_ran_with_the_secrets_set(runs: dict[str, Any]) -> None:
    for name, done in runs["done"].items():
        assert done.returncode == 0, f"{name}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert set(runs["done"]) == {"moco", "classifier", "azureml-moco", "azureml-classifier"}
    assert "registered model moco-backbone version 1" in runs["done"]["moco"].stdout
    assert "registered model image-classifier version 1" in runs["done"]["classifier"].stdout


@pytest.mark.e2e
def test_no_secret_in_any_file_the_pipelines_wrote(runs: dict[str, Any]) -> None:
    workspace: Path = runs["workspace"]
    found, files = find_secrets(workspace)
    names = {p.name for p in files}
    # What was searched: records, logs, the registry, model files and the compiled YAML.
    assert {"run.json", "log.txt", "mlflow.db", "backbone.pt", "classifier.pt"} <= names
    assert {"moco.pipeline.yaml", "classifier.pipeline.yaml"} <= names
    assert len(list(workspace.glob("runs/*/run.json"))) == 2
    assert not found, found


@pytest.mark.e2e
def test_no_secret_in_the_mlflow_parameters_tags_or_console(runs: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs['workspace'] / 'mlflow.db'}")
    texts = []
    experiments = client.search_experiments()
    found = client.search_runs([e.experiment_id for e in experiments])
    assert len(found) >= 4  # two pipeline runs and their training and evaluation steps
    for run in found:
        texts += [*run.data.params.items(), *run.data.tags.items()]
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            texts += [*version.tags.items(), (version.source, version.description or "")]
    assert any(k.startswith("sslpipe.") for k, _ in texts)  # the tags were read
    blob = "\n".join(f"{k}={v}" for k, v in texts).encode()
    blob += b"".join(d.stdout.encode() + d.stderr.encode() for d in runs["done"].values())
    assert not list(_leaks(blob, "mlflow/console"))


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["azureml", "local"])
def test_a_sas_token_in_the_blob_uri_is_refused_or_kept_out_of_everything_written(
    tmp_path: Path, backend: str
) -> None:
    sets = [AZURE_STORES[0], f"stores.blob_uri={AZURE_STORES[1].split('=', 1)[1]}?{SAS_TOKEN}"]
    done = _execute(tmp_path, "moco", sets, "--backend", backend, "--dry-run")
    assert done.returncode == 2, done.stderr
    assert "carries a credential" in done.stderr and "AZURE_STORAGE_SAS_TOKEN" in done.stderr
    assert not list(_leaks((done.stdout + done.stderr).encode(), "console"))
    found, _ = find_secrets(tmp_path)
    assert not found, found


# --- a store that cannot be opened: the error names it, never the secret -----------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _all_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err)) + repr(err)


@pytest.mark.parametrize(
    ("query", "environ"),
    [
        (SAS_TOKEN, {}),
        ("", {azure_blob.SAS_TOKEN_ENV: SAS_TOKEN}),
        ("", {azure_blob.ACCOUNT_KEY_ENV: STORAGE_KEY}),
        ("", "connection-string"),
    ],
    ids=["sas-in-uri", "sas-env", "account-key-env", "connection-string-env"],
)
def test_a_blob_store_at_a_closed_port_never_shows_the_credential(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    query: str,
    environ: dict[str, str] | str,
) -> None:
    port = _closed_port()
    account_url = f"http://127.0.0.1:{port}/devstoreaccount1"
    if environ == "connection-string":
        environ = {
            "AZURE_STORAGE_CONNECTION_STRING": (
                f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                f"AccountKey={ACCOUNT_KEY};BlobEndpoint={account_url};"
            )
        }
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(environ).items():
        monkeypatch.setenv(name, value)
    uri = f"{account_url}/images" + (f"?{query}" if query else "")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as raised:
        azure_blob.AzureBlobStore.from_uri(uri, retry_total=0, backoff_s=0.0)
    text = _all_text(raised.value)
    assert f"127.0.0.1:{port}" in text and "cannot open the container" in text
    assert not list(_leaks((text + caplog.text).encode(), "error")), text


def test_the_ingest_command_with_a_sas_uri_at_a_closed_port_shows_no_signature(
    tmp_path: Path,
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "docs.jsonl").write_text('{"id": "a.jpeg"}\n')
    uri = f"http://127.0.0.1:{_closed_port()}/devstoreaccount1/images?{SAS_TOKEN}"
    done = subprocess.run(
        [sys.executable, "-m", "sslpipe", "ingest", "--images", "photos",
         "--documents", "docs.jsonl", "--set", "workspace=ws", "--set", f"stores.blob_uri={uri}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **SECRET_ENV},
    )  # fmt: skip
    # 1: the store cannot be opened; 2 would be a configuration that refuses a SAS in the URI.
    assert done.returncode in (1, 2), done.stderr[-2000:]
    if done.returncode == 1:
        assert "cannot open the container" in done.stderr
    assert not list(_leaks((done.stdout + done.stderr).encode(), "console")), done.stderr
    found, _ = find_secrets(tmp_path)
    assert not found, found


def test_a_cosmos_store_at_a_closed_port_never_shows_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    uri = f"cosmos://127.0.0.1:{_closed_port()}/catalog/images"
    retry = cosmos.RetrySettings(total=0, connect=0, read=0, backoff_max_s=0)
    with pytest.raises(StoreError, match="connect failed") as raised:
        cosmos.CosmosMetadataStore.from_uri(uri, credential=COSMOS_KEY, retry=retry)
    assert not list(_leaks((_all_text(raised.value) + caplog.text).encode(), "error"))


def test_the_ingest_command_with_an_unreachable_cosmos_store_shows_no_key(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "docs.jsonl").write_text('{"id": "a.jpeg"}\n')
    uri = f"cosmos://127.0.0.1:{_closed_port()}/catalog/images"
    done = subprocess.run(
        [sys.executable, "-m", "sslpipe", "ingest", "--images", "photos",
         "--documents", "docs.jsonl", "--set", "workspace=ws",
         "--set", f"stores.metadata_uri={uri}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **SECRET_ENV},
    )  # fmt: skip
    assert done.returncode == 1 and "connect failed" in done.stderr, done.stderr[-2000:]
    assert not list(_leaks((done.stdout + done.stderr).encode(), "console")), done.stderr


def test_label_studio_at_a_closed_port_never_shows_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LabelStudioError) as raised:
        connect(f"http://127.0.0.1:{_closed_port()}", token=LABEL_STUDIO_TOKEN, max_retries=0)
    assert "cannot reach Label Studio" in str(raised.value)
    assert not list(_leaks((_all_text(raised.value) + caplog.text).encode(), "error"))


def test_the_sync_labels_command_at_a_closed_port_shows_no_token(tmp_path: Path) -> None:
    SQLiteMetadataStore(tmp_path / "metadata.db").close()
    done = subprocess.run(
        [sys.executable, "-m", "sslpipe", "sync-labels", "--project", "1",
         "--url", f"http://127.0.0.1:{_closed_port()}",
         "--metadata-uri", f"sqlite:///{tmp_path / 'metadata.db'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **SECRET_ENV},
    )  # fmt: skip
    assert done.returncode == 1 and "cannot reach Label Studio" in done.stderr, done.stderr
    assert not list(_leaks((done.stdout + done.stderr).encode(), "console")), done.stderr


@pytest.mark.parametrize(
    "uri",
    [
        f"https://acct.blob.core.windows.net/Bad_Name?{SAS_TOKEN}",
        f"https://acct.blob.core.windows.net/a/b/c?{SAS_TOKEN}",
        f"http://example.com/acct/images?{SAS_TOKEN}",
        f"https://user:{STORAGE_KEY}@acct.blob.core.windows.net/images",
        f"ftp://acct/images?{SAS_TOKEN}",
        f"cosmos://user:{COSMOS_KEY}@host/catalog/images",
        f"cosmos://host/catalog?key={COSMOS_KEY}",
        f"sqlite3://x?sig={SAS_SIGNATURE}",
    ],
)
def test_a_malformed_store_uri_is_refused_without_repeating_its_secret(
    no_network: list[dict[str, Any]], uri: str
) -> None:
    from sslpipe.stores.factory import open_blob_store, open_metadata_store

    opener = open_metadata_store if uri.startswith(("cosmos", "sqlite")) else open_blob_store
    with pytest.raises(StoreError) as raised:
        opener(uri)
    assert not list(_leaks(_all_text(raised.value).encode(), "error")), str(raised.value)


# --- TLS: verification off only for loopback ------------------------------------------------


class _NoConnection(Exception):
    pass


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Any connection attempt fails the test; CosmosClient records its arguments and stops."""
    made: list[dict[str, Any]] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a network connection was attempted: {args!r}")

    def client(endpoint: str, **kwargs: Any) -> Any:
        made.append({"endpoint": endpoint, **kwargs})
        raise _NoConnection

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(cosmos, "CosmosClient", client)
    return made


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://catalog-account.documents.azure.com:443/",
        "https://10.0.0.5:8081/",
        "https://localhost.example.com/",
        "https://127.0.0.1.example.com/",
        "https://[2001:db8::1]:8081/",
    ],
)
def test_unverified_tls_to_a_host_that_is_not_loopback_is_refused_before_connecting(
    no_network: list[dict[str, Any]], endpoint: str
) -> None:
    with pytest.raises(StoreError, match=r"refusing to open .* without verifying its TLS"):
        cosmos.CosmosMetadataStore(endpoint, "catalog", "images", credential=COSMOS_KEY,
                                   verify_tls=False)  # fmt: skip
    assert no_network == []  # no client was even made
    # By default such a host is verified.
    with pytest.raises(_NoConnection):
        cosmos.CosmosMetadataStore(endpoint, "catalog", "images", credential=COSMOS_KEY)
    assert no_network[-1]["connection_verify"] is True and "transport" not in no_network[-1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "LOCALHOST"])
def test_loopback_emulators_are_not_verified(no_network: list[dict[str, Any]], host: str) -> None:
    with pytest.raises(_NoConnection):
        cosmos.CosmosMetadataStore.from_uri(f"cosmos://{host}:8081/catalog/images",
                                            credential=COSMOS_KEY)  # fmt: skip
    assert no_network[-1]["connection_verify"] is False


def test_plain_http_blob_storage_is_refused_for_a_host_that_is_not_loopback(
    no_network: list[dict[str, Any]],
) -> None:
    for uri in (
        "http://catalogaccount.blob.core.windows.net/images",
        "http://10.0.0.5:10000/devstoreaccount1/images",
        "http://localhost.example.com/devstoreaccount1/images",
    ):
        with pytest.raises(StoreError, match="refusing plain http"):
            azure_blob.AzureBlobStore.from_uri(uri)


# --- a live server that refuses the credential: its answer is not echoed -----------------------


async def _open_and_read(uri: str) -> None:
    store = azure_blob.AzureBlobStore.from_uri(uri, retry_total=0, backoff_s=0.0)
    try:
        await store.read("a.jpeg")
    finally:
        await store.close()


@pytest.mark.servers
@pytest.mark.parametrize("source", ["sas-in-uri", "account-key-env"])
def test_azurite_refusing_a_forged_credential_shows_no_secret(
    azurite: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    source: str,
) -> None:
    import asyncio

    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    uri = f"{azurite['blob_endpoint']}/secrets{_TAG}"
    if source == "sas-in-uri":
        uri += f"?{SAS_TOKEN}"
    else:
        monkeypatch.setenv(azure_blob.ACCOUNT_KEY_ENV, STORAGE_KEY)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as raised:
        asyncio.run(_open_and_read(uri))
    text = _all_text(raised.value)
    assert "403" in text or "Authentication" in text, text
    assert not list(_leaks((text + caplog.text).encode(), "error")), text
