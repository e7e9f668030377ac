"""The Azure blob store: URIs, credentials, secrets, and (against Azurite) opening containers,
conditional reads and downloads that break off. The read/write/list contract itself is checked
for every store in test_blob_stores.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

from sslpipe.stores import StoreError, blob_get, open_blob_store
from sslpipe.stores.azure_blob import (
    ACCOUNT_KEY_ENV,
    CONNECTION_STRING_ENV,
    DEFAULT_CREDENTIAL,
    SAS_TOKEN_ENV,
    AzureBlobStore,
    BlobLocation,
    backoff_seconds,
    parse_blob_uri,
    resolve_auth,
)
from sslpipe.stores.base import BlobNotFoundError
from sslpipe.stores.blob_get import SAS_LIFETIME, SAS_RENEW, SasSource
from tests.faults import CuttingProxy, FaultProxy

AZURE_ENV = (CONNECTION_STRING_ENV, SAS_TOKEN_ENV, ACCOUNT_KEY_ENV)
# Fast retries: the SDK's own retries of a broken body still sleep 1 s each.
FAST = {"retry_total": 2, "backoff_s": 0.01}


@pytest.fixture(autouse=True)
def _no_azure_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the credentials it means to use, whatever the shell exports."""
    for name in AZURE_ENV:
        monkeypatch.delenv(name, raising=False)


# --- URIs --------------------------------------------------------------------------------------


def test_an_https_uri_names_the_account_by_its_host() -> None:
    location = parse_blob_uri("https://acct.blob.core.windows.net/images")
    assert location == BlobLocation("https://acct.blob.core.windows.net", "acct", "images")
    assert location.uri == "https://acct.blob.core.windows.net/images"


@pytest.mark.parametrize("host", ["127.0.0.1:10000", "localhost:10000", "[::1]:10000"])
def test_an_emulator_uri_names_the_account_in_its_path(host: str) -> None:
    location = parse_blob_uri(f"http://{host}/devstoreaccount1/images")
    assert location.account_url == f"http://{host}/devstoreaccount1"
    assert (location.account_name, location.container) == ("devstoreaccount1", "images")


def test_a_sas_token_in_the_query_is_kept_but_never_shown() -> None:
    location = parse_blob_uri("https://acct.blob.core.windows.net/images?sv=2024&sp=r&sig=s3cret")
    assert location.sas_token == "sv=2024&sp=r&sig=s3cret"
    assert "s3cret" not in location.uri and "s3cret" not in repr(location)


@pytest.mark.parametrize(
    "uri",
    [
        "http://acct.blob.core.windows.net/images?sig=s3cret",
        "http://10.0.0.5:10000/devstoreaccount1/images?sig=s3cret",
        "http://azurite:10000/devstoreaccount1/images?sig=s3cret",
    ],
)
def test_plain_http_is_refused_unless_the_host_is_loopback(uri: str) -> None:
    with pytest.raises(StoreError, match=r"refusing plain http .* use https://") as err:
        open_blob_store(uri)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("https://acct.blob.core.windows.net/", "does not name exactly one container"),
        ("https://acct.blob.core.windows.net/images/sub", "does not name exactly one container"),
        ("http://127.0.0.1:10000/images", "does not name exactly one container"),
        ("https://acct.blob.core.windows.net/Images", "'Images' is not a valid container name"),
        ("https://acct.blob.core.windows.net/a--b", "'a--b' is not a valid container name"),
        ("https://acct.blob.core.windows.net/images?sp=r", "is not a SAS token"),
        ("https://user:s3cret@acct.blob.core.windows.net/images", "user part are not supported"),
        ("https://acct.blob.core.windows.net:99999/images", "invalid port"),
    ],
)
def test_malformed_uris_are_refused_with_the_expected_form(uri: str, match: str) -> None:
    with pytest.raises(StoreError, match=match) as err:
        parse_blob_uri(uri)
    assert "s3cret" not in str(err.value)


# --- credentials -------------------------------------------------------------------------------

HTTPS = parse_blob_uri("https://acct.blob.core.windows.net/images")
KEY = "a2V5LWZvci10ZXN0cw=="


def connection_string(account: str = "acct", **extra: str) -> str:
    fields = {"DefaultEndpointsProtocol": "https", "AccountName": account, "AccountKey": KEY}
    fields.update(extra)
    return ";".join(f"{k}={v}" for k, v in fields.items())


def test_a_connection_string_for_this_account_comes_first() -> None:
    env = {CONNECTION_STRING_ENV: connection_string(), SAS_TOKEN_ENV: "sig=x", ACCOUNT_KEY_ENV: "k"}
    auth = resolve_auth(HTTPS, env)
    assert auth.source == f"{CONNECTION_STRING_ENV} (account acct)"
    assert isinstance(auth.credential, AzureNamedKeyCredential)
    assert auth.credential.named_key == ("acct", KEY)


def test_a_connection_string_for_another_account_is_ignored() -> None:
    env = {CONNECTION_STRING_ENV: connection_string("other"), ACCOUNT_KEY_ENV: KEY}
    auth = resolve_auth(HTTPS, env)
    assert auth.source == ACCOUNT_KEY_ENV
    assert isinstance(auth.credential, AzureNamedKeyCredential)
    assert auth.credential.named_key == ("acct", KEY)


def test_a_connection_string_may_carry_a_sas_and_name_the_blob_endpoint() -> None:
    text = "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=1&sig=abc"
    auth = resolve_auth(HTTPS, {CONNECTION_STRING_ENV: text})
    assert isinstance(auth.credential, AzureSasCredential)
    assert auth.credential.signature == "sv=1&sig=abc"


def test_the_uris_own_sas_token_wins() -> None:
    location = parse_blob_uri("https://acct.blob.core.windows.net/images?sv=1&sig=mine")
    auth = resolve_auth(location, {CONNECTION_STRING_ENV: connection_string()})
    assert auth.source == "the URI's SAS token"
    assert isinstance(auth.credential, AzureSasCredential)
    assert auth.credential.signature == "sv=1&sig=mine"


def test_a_sas_token_from_the_environment_loses_its_question_mark() -> None:
    auth = resolve_auth(HTTPS, {SAS_TOKEN_ENV: "?sv=1&sig=abc", ACCOUNT_KEY_ENV: KEY})
    assert auth.source == SAS_TOKEN_ENV
    assert isinstance(auth.credential, AzureSasCredential)
    assert auth.credential.signature == "sv=1&sig=abc"


def test_without_secrets_azure_identity_is_used() -> None:
    auth = resolve_auth(HTTPS, {CONNECTION_STRING_ENV: connection_string("other")})
    assert auth.source == DEFAULT_CREDENTIAL and auth.credential is None


def test_an_account_key_needs_an_account_name_from_the_host() -> None:
    location = parse_blob_uri("https://images.example.com/images")
    with pytest.raises(StoreError, match=f"{ACCOUNT_KEY_ENV} is set but the account name"):
        resolve_auth(location, {ACCOUNT_KEY_ENV: KEY})


def test_the_emulator_without_secrets_is_refused_naming_the_variables() -> None:
    location = parse_blob_uri("http://127.0.0.1:10000/devstoreaccount1/images")
    with pytest.raises(StoreError, match=f"no credentials .* set {CONNECTION_STRING_ENV}"):
        resolve_auth(location, {})


def test_the_auth_shows_its_source_but_never_its_secret() -> None:
    auth = resolve_auth(HTTPS, {CONNECTION_STRING_ENV: connection_string()})
    assert KEY not in repr(auth)


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    waits = [backoff_seconds(n, 1.0, 10.0) for n in range(6)]
    for n, wait in enumerate(waits):
        assert 0.8 * min(10.0, 2**n) <= wait <= 1.2 * min(10.0, 2**n)


def test_an_unreachable_endpoint_fails_on_open_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ACCOUNT_KEY_ENV, KEY)
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}/devstoreaccount1/images"
    with pytest.raises(StoreError, match=rf"{uri}: cannot open the container: ServiceRequestError"):
        AzureBlobStore.from_uri(uri, **FAST)


# --- against Azurite ---------------------------------------------------------------------------


@pytest.fixture
def container(azurite: dict[str, str]) -> Iterator[str]:
    """A fresh container name (deleted afterwards, if it was created)."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    yield name
    with BlobServiceClient.from_connection_string(azurite["connection_string"]) as service:
        if service.get_container_client(name).exists():
            service.delete_container(name)


@pytest.fixture
def uri(azurite: dict[str, str], container: str) -> str:
    return f"{azurite['blob_endpoint']}/{container}"


@pytest.fixture
def with_connection_string(monkeypatch: pytest.MonkeyPatch, azurite: dict[str, str]) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite["connection_string"])


def sas(azurite: dict[str, str], container: str, permission: str) -> str:
    return generate_container_sas(
        azurite["account_name"],
        container,
        account_key=azurite["account_key"],
        permission=ContainerSasPermissions.from_string(permission),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )


def signature(token: str) -> str:
    return token.split("sig=")[1].split("&")[0]


def write_blobs(uri: str, blobs: dict[str, bytes]) -> None:
    """Write blobs with a store of their own (opened with the container's connection)."""

    async def scenario() -> None:
        store = AzureBlobStore.from_uri(uri, create=True)
        try:
            for name, data in blobs.items():
                await store.write(name, data)
        finally:
            await store.close()

    asyncio.run(scenario())


def read_back(store: AzureBlobStore, name: str) -> bytes:
    async def scenario() -> bytes:
        try:
            return await store.read(name)
        finally:
            await store.close()

    return asyncio.run(scenario())


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_open_blob_store_opens_azure_for_the_emulator_uri(uri: str, container: str) -> None:
    store = open_blob_store(uri, create=True)
    assert isinstance(store, AzureBlobStore)
    assert (store.uri, store.container) == (uri, container)
    assert (
        repr(store)
        == f"AzureBlobStore({uri!r}, auth='{CONNECTION_STRING_ENV} (account devstoreaccount1)')"
    )


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_a_missing_container_is_an_error_unless_create_is_asked(uri: str, container: str) -> None:
    with pytest.raises(
        StoreError, match=f"blob container '{container}' does not exist .*create=True"
    ):
        open_blob_store(uri)
    AzureBlobStore.from_uri(uri, create=True)
    AzureBlobStore.from_uri(uri, create=True)  # and again: it exists now
    assert AzureBlobStore.from_uri(uri).container == container


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_read_if_changed_makes_one_conditional_request(uri: str) -> None:
    write_blobs(uri, {"a.jpeg": b"one"})

    async def scenario() -> None:
        store = AzureBlobStore.from_uri(uri)
        try:
            data, etag = await store.read_if_changed("a.jpeg", None)
            listed = [info async for info in store.list()]
            assert data == b"one" and etag == listed[0].etag and '"' not in etag
            assert await store.read_if_changed("a.jpeg", etag) == (None, etag)
            await store.write("a.jpeg", b"two")
            data, new_etag = await store.read_if_changed("a.jpeg", etag)
            assert data == b"two" and new_etag != etag
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_a_missing_blob_is_not_found_at_once(uri: str) -> None:
    store = AzureBlobStore.from_uri(uri, create=True, download_attempts=5, backoff_s=10.0)
    with pytest.raises(BlobNotFoundError, match=rf"'nope\.jpeg' not found in {uri}\W*$"):
        read_back(store, "nope.jpeg")  # no retry: 10 s backoffs would time the test out


@pytest.mark.servers
def test_an_account_key_from_the_environment_opens_the_emulator(
    monkeypatch: pytest.MonkeyPatch, azurite: dict[str, str], uri: str
) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, connection_string("someoneelse"))  # ignored
    monkeypatch.setenv(ACCOUNT_KEY_ENV, azurite["account_key"])
    store = AzureBlobStore.from_uri(uri, create=True)
    assert store.auth.source == ACCOUNT_KEY_ENV
    asyncio.run(store.write("k.jpeg", b"key"))
    assert read_back(store, "k.jpeg") == b"key"


@pytest.mark.servers
@pytest.mark.parametrize("where", ["uri", "environment"])
def test_a_container_sas_reads_and_writes(
    monkeypatch: pytest.MonkeyPatch, azurite: dict[str, str], uri: str, container: str, where: str
) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite["connection_string"])
    write_blobs(uri, {})  # the container
    monkeypatch.delenv(CONNECTION_STRING_ENV)
    token = sas(azurite, container, "rwl")
    if where == "uri":
        store = AzureBlobStore.from_uri(f"{uri}?{token}")
    else:
        monkeypatch.setenv(SAS_TOKEN_ENV, token)
        store = AzureBlobStore.from_uri(uri)
    assert store.uri == uri and signature(token) not in repr(store)
    asyncio.run(store.write("s.jpeg", b"sas"))
    assert read_back(store, "s.jpeg") == b"sas"


@pytest.mark.servers
def test_a_read_only_sas_reads_but_cannot_write_and_the_error_hides_it(
    monkeypatch: pytest.MonkeyPatch, azurite: dict[str, str], uri: str, container: str
) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite["connection_string"])
    write_blobs(uri, {"r.jpeg": b"read me"})
    monkeypatch.delenv(CONNECTION_STRING_ENV)
    token = sas(azurite, container, "r")  # Azurite: not even the container's properties
    store = AzureBlobStore.from_uri(f"{uri}?{token}")
    assert read_back(store, "r.jpeg") == b"read me"
    with pytest.raises(StoreError, match=r"cannot write blob 'w.jpeg': .*HTTP 403") as err:
        asyncio.run(store.write("w.jpeg", b"x"))
    assert signature(token) not in str(err.value) and uri in str(err.value)


@pytest.mark.servers
def test_a_listing_sas_tells_a_missing_container(
    azurite: dict[str, str], uri: str, container: str
) -> None:
    with pytest.raises(StoreError, match=f"blob container '{container}' does not exist"):
        AzureBlobStore.from_uri(f"{uri}?{sas(azurite, container, 'rl')}")


@pytest.mark.servers
def test_a_wrong_key_fails_on_open_without_showing_the_key(
    monkeypatch: pytest.MonkeyPatch, azurite: dict[str, str], uri: str
) -> None:
    wrong = azurite["account_key"][:-8] + "AAAAAAA="
    text = azurite["connection_string"].replace(azurite["account_key"], wrong)
    monkeypatch.setenv(CONNECTION_STRING_ENV, text)
    with pytest.raises(StoreError, match=f"{uri}: cannot open the container: .*HTTP 403") as err:
        open_blob_store(uri)
    assert wrong not in str(err.value) and text not in str(err.value)


@pytest.mark.servers
def test_secrets_stay_out_of_the_logs(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    azurite: dict[str, str],
    uri: str,
    container: str,
) -> None:
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite["connection_string"])
    write_blobs(uri, {"l.jpeg": b"log"})
    token = sas(azurite, container, "rl")
    monkeypatch.setattr(logging.getLogger("sslpipe"), "propagate", True)
    # execute.py quiets the "azure" logger in-process; earlier tests may have run it.
    caplog.set_level(logging.DEBUG, logger="azure")
    with caplog.at_level(logging.DEBUG):
        store = AzureBlobStore.from_uri(f"{uri}?{token}", **FAST)
        assert read_back(store, "l.jpeg") == b"log"
        with pytest.raises(BlobNotFoundError):
            read_back(store, "absent.jpeg")
    assert "Request URL" in caplog.text  # the SDK's request log was captured
    assert signature(token) not in caplog.text
    assert azurite["account_key"] not in caplog.text


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_the_store_opens_from_inside_a_running_event_loop(uri: str) -> None:
    async def scenario() -> bytes:
        store = AzureBlobStore.from_uri(uri, create=True)  # checks the container in a thread
        try:
            await store.write("in.jpeg", b"loop")
            return await store.read("in.jpeg")
        finally:
            await store.close()

    assert asyncio.run(scenario()) == b"loop"


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_the_store_can_be_used_again_in_a_new_event_loop(uri: str) -> None:
    store = AzureBlobStore.from_uri(uri, create=True)
    asyncio.run(store.write("x.jpeg", b"1"))  # this loop ends without close()
    assert read_back(store, "x.jpeg") == b"1"


# --- connections that break off mid-download ---------------------------------------------------


@pytest.fixture
def proxy(azurite: dict[str, str]) -> Iterator[CuttingProxy]:
    target = urlparse(azurite["blob_endpoint"])
    assert target.hostname is not None and target.port is not None
    with CuttingProxy(target.hostname, target.port) as running:
        yield running


@pytest.fixture
def big_blob(
    monkeypatch: pytest.MonkeyPatch, azurite: dict[str, str], uri: str, container: str
) -> bytes:
    """A 200 kB blob ``big.bin``; afterwards the account key is the credential (it works
    through the proxy, whose endpoint no connection string names)."""
    data = os.urandom(200_000)
    monkeypatch.setenv(CONNECTION_STRING_ENV, azurite["connection_string"])
    write_blobs(uri, {"big.bin": data})
    monkeypatch.delenv(CONNECTION_STRING_ENV)
    monkeypatch.setenv(ACCOUNT_KEY_ENV, azurite["account_key"])
    return data


def proxied(proxy: CuttingProxy | FaultProxy, container: str, **settings: Any) -> AzureBlobStore:
    return AzureBlobStore.from_uri(
        f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{container}", **settings
    )


@pytest.mark.servers
@pytest.mark.parametrize("cuts", [2, 4])
def test_a_download_that_breaks_off_is_retried_whole(
    proxy: CuttingProxy, big_blob: bytes, container: str, cuts: int
) -> None:
    store = proxied(proxy, container, **FAST, download_attempts=3)
    before = proxy.connections
    proxy.cut_next(connections=cuts, after_bytes=5_000)  # past the headers, inside the body
    assert read_back(store, "big.bin") == big_blob
    assert proxy.cut == cuts and proxy.connections - before == cuts + 1


@pytest.mark.servers
def test_one_bounded_connection_pool_serves_concurrent_reads(
    proxy: CuttingProxy, big_blob: bytes, container: str
) -> None:
    store = proxied(proxy, container, max_connections=3)
    store.set_max_concurrency(4)
    store.set_max_concurrency(2)  # never lowers it
    assert store.max_connections == 4
    before = proxy.connections

    async def scenario() -> list[bytes]:
        try:
            return await asyncio.gather(*(store.read("big.bin") for _ in range(24)))
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [big_blob] * 24
    assert 1 <= proxy.connections - before <= 4


@pytest.mark.servers
def test_a_download_that_always_breaks_off_fails_naming_endpoint_and_blob(
    proxy: CuttingProxy, big_blob: bytes, container: str
) -> None:
    store = proxied(proxy, container, **FAST, download_attempts=2)
    proxy.cut_next(connections=-1, after_bytes=5_000)
    with pytest.raises(
        StoreError, match=r"cannot read blob 'big\.bin' after 2 download attempts"
    ) as err:
        read_back(store, "big.bin")
    assert f"127.0.0.1:{proxy.port}/devstoreaccount1/{container}" in str(err.value)
    assert not isinstance(err.value, BlobNotFoundError)


# --- the two read paths: plain GETs with a SAS, and the SDK ------------------------------------


def test_a_sas_or_an_account_key_reads_with_plain_gets_and_a_token_credential_with_the_sdk() -> (
    None
):
    location = parse_blob_uri("https://acct.blob.core.windows.net/images")
    by_key = AzureBlobStore(location, resolve_auth(location, {ACCOUNT_KEY_ENV: KEY}))
    by_sas = AzureBlobStore(location, resolve_auth(location, {SAS_TOKEN_ENV: "sv=1&sig=abc"}))
    by_identity = AzureBlobStore(location, resolve_auth(location, {}))
    assert by_key._sas is not None and by_sas._sas is not None and by_identity._sas is None
    assert AzureBlobStore(location, by_key.auth, direct_reads=False)._sas is None


def test_an_account_key_signs_a_read_only_container_sas_renewed_before_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = SasSource("images", AzureNamedKeyCredential("acct", KEY))
    first = source.token()
    fields = dict(part.split("=", 1) for part in first.split("&"))
    assert fields["sp"] == "r" and fields["sr"] == "c" and "sig" in fields
    assert source.token() == first  # made once
    later = time.time() + (SAS_LIFETIME - SAS_RENEW).total_seconds() + 1
    monkeypatch.setattr(blob_get.time, "time", lambda: later)
    monkeypatch.setattr(blob_get, "datetime", _Clock(later))
    renewed = source.token()
    assert renewed != first and source.secrets == [first, renewed]


class _Clock:
    """``datetime`` as blob_get uses it, at a chosen time."""

    def __init__(self, timestamp: float) -> None:
        self.timestamp = timestamp

    def now(self, tz: dt.tzinfo) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.timestamp, tz)


@pytest.fixture(params=[True, False], ids=["plain-gets", "sdk"])
def direct_reads(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_both_read_paths_answer_alike(uri: str, direct_reads: bool) -> None:
    write_blobs(uri, {"a b/ü.jpeg": b"one"})
    store = AzureBlobStore.from_uri(uri, direct_reads=direct_reads)
    assert (store._sas is not None) == direct_reads

    async def scenario() -> None:
        try:
            data, etag = await store.read_if_changed("a b/ü.jpeg", None)
            assert data == b"one" and etag == (await store.info("a b/ü.jpeg")).etag
            assert await store.read_if_changed("a b/ü.jpeg", etag) == (None, etag)
            with pytest.raises(BlobNotFoundError, match=r"'a b/nope' not found"):
                await store.read("a b/nope")
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.servers
@pytest.mark.usefixtures("with_connection_string")
def test_both_read_paths_tell_a_deleted_container_from_a_missing_blob(
    azurite: dict[str, str], uri: str, container: str, direct_reads: bool
) -> None:
    write_blobs(uri, {"a.jpeg": b"one"})
    store = AzureBlobStore.from_uri(uri, direct_reads=direct_reads, **FAST)
    with BlobServiceClient.from_connection_string(azurite["connection_string"]) as service:
        service.delete_container(container)
    with pytest.raises(StoreError, match=r"cannot read blob 'a\.jpeg': the container is gone"):
        read_back(store, "a.jpeg")


class Throttling(FaultProxy):
    """Answers the first ``busy`` GETs of blob ``t.bin`` with 503 ServerBusy and Retry-After."""

    def __init__(self, upstream: str, busy: int, retry_after: str) -> None:
        super().__init__(upstream)
        self.busy, self.retry_after, self.refused = busy, retry_after, 0

    def fault(self, method: str, path: str) -> int | None:
        if method == "GET" and "/t.bin" in path and (self.busy < 0 or self.refused < self.busy):
            self.refused += 1
            return 503
        return None

    def fault_headers(self, status: int) -> list[tuple[str, str]]:
        return [("Retry-After", self.retry_after), ("x-ms-error-code", "ServerBusy")]


@pytest.fixture
def throttled(azurite: dict[str, str], uri: str, big_blob: bytes) -> Iterator[Throttling]:
    write_blobs(uri, {"t.bin": b"throttled"})
    proxy = Throttling(azurite["blob_endpoint"].rsplit("/", 1)[0], busy=3, retry_after="0")
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.servers
def test_a_throttled_read_waits_and_tries_again(
    throttled: Throttling, container: str, direct_reads: bool
) -> None:
    store = proxied(throttled, container, retry_total=3, direct_reads=direct_reads)
    assert read_back(store, "t.bin") == b"throttled"
    assert throttled.refused == 3


@pytest.mark.servers
def test_a_read_throttled_for_good_fails_naming_status_code_and_blob(
    throttled: Throttling, container: str
) -> None:
    throttled.busy = -1
    store = proxied(throttled, container, **FAST, download_attempts=2)
    with pytest.raises(
        StoreError, match=r"cannot read blob 't\.bin' after 2 download attempts.*503.*ServerBusy"
    ):
        read_back(store, "t.bin")
    assert throttled.refused == 2 * (FAST["retry_total"] + 1)
