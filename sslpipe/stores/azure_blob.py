"""Azure Blob Storage: one container, through azure-storage-blob's async client (aiohttp).

URIs and credentials are those of :mod:`sslpipe.stores.azure_blob_auth`
(``https://<account>.blob.core.windows.net/<container>[?<SAS token>]``, or Azurite on a loopback
address); the store's ``auth`` names the credential's source, never the secret. Retries follow
:mod:`sslpipe.stores.azure_blob_retry`.

One aiohttp session (connection pool) serves the SDK's requests of a store; it is opened on first
use in the running event loop and released by :meth:`AzureBlobStore.close`. Transient failures are
retried with exponential backoff by the SDK's retry policy, and a download whose body breaks off
is retried whole; secrets never appear in the store's URI, its repr, logs or error messages.

Blob reads with a SAS or an account key (which signs a read-only container SAS) skip the SDK's
pipeline: each is one plain GET (:mod:`sslpipe.stores.blob_get`) on a second pool of the same
size, retried the same way, about ten times cheaper in CPU; with a token credential they go
through the SDK. That pool reads the proxy settings (HTTPS_PROXY, NO_PROXY) once, not per request
as aiohttp's ``trust_env`` does (two thread hand-offs and a read of ~/.netrc per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from sslpipe.core.logs import get_logger
from sslpipe.stores.azure_blob_auth import (
    ACCOUNT_KEY_ENV,
    CONNECTION_STRING_ENV,
    DEFAULT_CREDENTIAL,
    SAS_TOKEN_ENV,
    Auth,
    BlobLocation,
    Credential,
    parse_blob_uri,
    resolve_auth,
)
from sslpipe.stores.azure_blob_retry import (
    READ_ERRORS,
    Backoff,
    backoff_seconds,
    error_code,
    is_transient,
    scrub,
)
from sslpipe.stores.base import BlobInfo, BlobNotFoundError, BlobStore, StoreError, blob_key
from sslpipe.stores.blob_get import BlobReads, BlobStatusError, SasSource, blob_url

__all__ = [
    "ACCOUNT_KEY_ENV",
    "CONNECTION_STRING_ENV",
    "DEFAULT_CREDENTIAL",
    "SAS_TOKEN_ENV",
    "Auth",
    "AzureBlobStore",
    "BlobLocation",
    "Credential",
    "backoff_seconds",
    "parse_blob_uri",
    "resolve_auth",
]

log = get_logger("stores.azure_blob")

T = TypeVar("T")

_NOT_MODIFIED = 304
_NOT_FOUND = 404
# The credential is valid but does not allow the operation (e.g. a SAS without that permission).
_PERMISSION_CODES = ("AuthorizationPermissionMismatch", "AuthorizationResourceTypeMismatch")


async def _container_exists(container: ContainerClient) -> bool | None:
    """Whether the container exists; None when the credential may not tell (a container SAS
    may read blobs but neither get the container's properties nor list it)."""
    try:
        return await container.exists()
    except HttpResponseError as err:
        if error_code(err) not in _PERMISSION_CODES:
            raise
    try:
        async for _ in container.list_blobs(results_per_page=1):
            break
    except ResourceNotFoundError:
        return False
    except HttpResponseError as err:
        if error_code(err) not in _PERMISSION_CODES:
            raise
        return None
    return True


def _bare_etag(etag: str | None) -> str:
    """ETags without their quotes: the service quotes them in headers but not in listings."""
    return (etag or "").strip('"')


# --- the store ---------------------------------------------------------------------------------


@dataclass
class _Client:
    """The clients of one event loop: one aiohttp session shared by the SDK's requests, and
    one for plain GETs (``reads``, with the proxy of the environment, if any)."""

    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    service: BlobServiceClient
    container: ContainerClient
    token_credential: Any = None
    reads: BlobReads | None = None

    async def close(self) -> None:
        await self.container.close()
        await self.service.close()
        await self.session.close()
        if self.reads is not None:
            await self.reads.session.close()
        if self.token_credential is not None:
            await self.token_credential.close()


def _run_to_completion(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine from synchronous code, in a fresh event loop (a worker thread's when the
    caller is itself inside a running loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class AzureBlobStore(BlobStore):
    """One Azure Blob Storage container; see the module docstring for URIs and credentials.

    Args:
        location: the container (:func:`parse_blob_uri`).
        auth: the credential (:func:`resolve_auth`).
        max_connections: size of the shared connection pool; raised by
            :meth:`set_max_concurrency`.
        retry_total: retries of one request on transient errors (the SDK's retry policy).
        backoff_s: wait before the first retry; doubled for each further one (``max_backoff_s``).
        download_attempts: tries of a whole download whose connection broke off.
        connection_timeout_s, read_timeout_s: per request.
        direct_reads: download blobs with plain GETs (:mod:`sslpipe.stores.blob_get`) when the
            credential is a SAS or an account key; False: always through the SDK.
    """

    def __init__(
        self,
        location: BlobLocation,
        auth: Auth,
        *,
        max_connections: int = 64,
        retry_total: int = 5,
        backoff_s: float = 0.8,
        max_backoff_s: float = 30.0,
        download_attempts: int = 3,
        connection_timeout_s: float = 20.0,
        read_timeout_s: float = 120.0,
        direct_reads: bool = True,
    ) -> None:
        if max_connections < 1 or retry_total < 0 or download_attempts < 1 or backoff_s < 0:
            raise ValueError(
                "AzureBlobStore needs max_connections >= 1, retry_total >= 0, "
                f"download_attempts >= 1 and backoff_s >= 0; got {max_connections}, "
                f"{retry_total}, {download_attempts} and {backoff_s}"
            )
        self.location, self.auth = location, auth
        self.uri, self.container = location.uri, location.container
        self.max_connections = max_connections
        self.retry_total, self.download_attempts = retry_total, download_attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.connection_timeout_s, self.read_timeout_s = connection_timeout_s, read_timeout_s
        self._client: _Client | None = None
        self._sas = SasSource.of(auth.credential, location.container) if direct_reads else None
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=connection_timeout_s, sock_read=read_timeout_s
        )

    @classmethod
    def from_uri(cls, uri: str, *, create: bool = False, **settings: Any) -> AzureBlobStore:
        """The store of the container ``uri`` names, checked to exist (created with
        ``create=True``); ``settings`` are the constructor's keyword arguments.

        Raises:
            StoreError: bad URI, no usable credential, the container is missing (and
                ``create`` is False) or cannot be reached.
        """
        location = parse_blob_uri(uri)
        store = cls(location, resolve_auth(location, os.environ), **settings)
        _run_to_completion(lambda: store._open_container(create=create))
        return store

    def __repr__(self) -> str:
        return f"AzureBlobStore({self.uri!r}, auth={self.auth.source!r})"

    def set_max_concurrency(self, requests: int) -> None:
        """Size the connection pool for ``requests`` calls in flight (before the first call)."""
        self.max_connections = max(self.max_connections, requests)

    # --- clients -------------------------------------------------------------------------------

    def _new_client(self) -> _Client:
        """Clients bound to the running event loop, sharing one aiohttp session."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # azure-core reads the raw body
            trust_env=True,
        )
        token_credential = None
        credential: Any = self.auth.credential
        if credential is None:
            from azure.identity.aio import DefaultAzureCredential

            credential = token_credential = DefaultAzureCredential()
        service = BlobServiceClient(
            self.location.account_url,
            credential=credential,
            transport=AioHttpTransport(session=session, session_owner=False),
            retry_policy=Backoff(
                retry_total=self.retry_total, first_s=self.backoff_s, max_s=self.max_backoff_s
            ),
            connection_timeout=self.connection_timeout_s,
            read_timeout=self.read_timeout_s,
        )
        container = service.get_container_client(self.container)
        loop = asyncio.get_running_loop()
        reads = None
        if self._sas is not None:
            reads = BlobReads.for_account(
                self.location.account_url, self.max_connections, self._timeout
            )
        return _Client(loop, session, service, container, token_credential, reads)

    def _container_client(self) -> ContainerClient:
        """The container client of the running event loop, made on first use."""
        return self._loop_client().container

    def _loop_client(self) -> _Client:
        """The clients of the running event loop, made on first use."""
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client.loop is not loop:
            if not self._client.loop.is_closed():
                raise StoreError(
                    f"{self!r} is in use by another event loop; close() it there first"
                )
            self._client = None  # its loop has ended and took the connections with it
        if self._client is None:
            self._client = self._new_client()
        return self._client

    async def close(self) -> None:
        """Release the connection pool (and the token credential); the store can be used again."""
        client, self._client = self._client, None
        if client is not None and client.loop is asyncio.get_running_loop():
            await client.close()

    async def _open_container(self, *, create: bool) -> None:
        client = self._new_client()
        try:
            exists = await _container_exists(client.container)
            if exists is None:
                log.info(
                    "%s: the credentials (%s) may not check that the container exists; "
                    "assuming it does",
                    self.uri,
                    self.auth.source,
                )
            if exists is not False:
                return
            if not create:
                raise StoreError(
                    f"blob container {self.container!r} does not exist at "
                    f"{self.location.account_url}; create it or open the store with create=True"
                )
            with contextlib.suppress(ResourceExistsError):  # created meanwhile elsewhere
                await client.container.create_container()
            log.info("created blob container %s", self.uri)
        except AzureError as err:
            raise self._error("cannot open the container", err) from None
        finally:
            await client.close()

    def _error(self, doing: str, error: BaseException) -> StoreError:
        """A StoreError naming this store, what failed and why, without any secret."""
        status = getattr(error, "status_code", None)
        code = error_code(error)
        reason = str(getattr(error, "message", None) or error).strip().splitlines() or [""]
        detail = ", ".join(str(x) for x in (status and f"HTTP {status}", code) if x)
        text = f"{self.uri}: {doing}: {type(error).__name__}"
        text += f" ({detail})" if detail else ""
        text += f": {reason[0]} [credentials from {self.auth.source}]"
        made = tuple(self._sas.secrets) if self._sas is not None else ()
        return StoreError(scrub(text, self.auth.secrets + made))

    def _not_found(self, name: str, error: BaseException) -> StoreError:
        if error_code(error) == "ContainerNotFound":
            return self._error(f"cannot read blob {name!r}: the container is gone", error)
        return BlobNotFoundError(f"blob {name!r} not found in {self.uri}")

    # --- blobs ---------------------------------------------------------------------------------

    async def read(self, name: str) -> bytes:
        data, _ = await self.read_if_changed(name, None)
        assert data is not None  # an unconditional read always has a body
        return data

    async def read_if_changed(self, name: str, etag: str | None) -> tuple[bytes | None, str]:
        """``(None, etag)`` when the blob's ETag is still ``etag`` (one conditional GET, 304),
        else ``(bytes, new etag)``; a download that breaks off is retried whole.

        Raises:
            BlobNotFoundError: no such blob (not retried).
            StoreError: the download failed ``download_attempts`` times or was refused; the
                message names the endpoint and the blob.
        """
        key = blob_key(name)
        last: BaseException | None = None
        for attempt in range(self.download_attempts):
            if attempt:
                wait = backoff_seconds(attempt - 1, self.backoff_s, self.max_backoff_s)
                log.warning(
                    "download of blob %r from %s broke off (%s); try %d of %d in %.1f s",
                    key, self.uri, type(last).__name__, attempt + 1, self.download_attempts, wait,
                )  # fmt: skip
                await asyncio.sleep(wait)
            try:
                return await self._download(key, etag)
            except (*READ_ERRORS, BlobStatusError) as err:
                if getattr(err, "status_code", None) == _NOT_FOUND:
                    raise self._not_found(name, err) from None
                if not is_transient(err):
                    raise self._error(f"cannot read blob {name!r}", err) from None
                last = err
        assert last is not None
        raise self._error(
            f"cannot read blob {name!r} after {self.download_attempts} download attempts", last
        )

    async def _download(self, key: str, etag: str | None) -> tuple[bytes | None, str]:
        if self._sas is not None:
            return await self._get(key, etag)
        blob = self._container_client().get_blob_client(key)
        conditions: dict[str, Any] = {}
        if etag:
            conditions = {"etag": f'"{etag}"', "match_condition": MatchConditions.IfModified}
        try:
            downloader = await blob.download_blob(**conditions)
        except HttpResponseError as err:
            if err.status_code == _NOT_MODIFIED:  # the SDK raises ResourceModifiedError for it
                return None, _bare_etag(etag)
            raise
        data = await downloader.readall()
        return data, _bare_etag(downloader.properties.etag)

    async def _get(self, key: str, etag: str | None) -> tuple[bytes | None, str]:
        """:meth:`_download` as plain GETs, retried like the SDK's requests (``retry_total``
        times on a dropped connection or a transient status, after the service's Retry-After
        when it gives one, else after the backoff); the last error is raised."""
        assert self._sas is not None
        reads = self._loop_client().reads
        assert reads is not None
        url = blob_url(self.uri, key, self._sas.token())
        for retry in range(self.retry_total + 1):
            try:
                return await reads.get(url, etag)
            except (*READ_ERRORS, BlobStatusError) as err:
                if retry == self.retry_total or not is_transient(err):
                    raise
                wait = getattr(err, "retry_after_s", None)
                if wait is None:
                    wait = backoff_seconds(retry, self.backoff_s, self.max_backoff_s)
                await asyncio.sleep(min(wait, self.max_backoff_s))
        raise AssertionError("unreachable: the last try returns or raises")

    async def info(self, name: str) -> BlobInfo:
        """The blob's name, size and ETag from one HEAD request; BlobNotFoundError when absent."""
        key = blob_key(name)
        blob = self._container_client().get_blob_client(key)
        try:
            properties = await blob.get_blob_properties()
        except ResourceNotFoundError as err:
            raise self._not_found(name, err) from None
        except AzureError as err:
            raise self._error(f"cannot read the properties of blob {name!r}", err) from None
        return BlobInfo(name=key, size=properties.size, etag=_bare_etag(properties.etag))

    async def write(self, name: str, data: bytes) -> None:
        blob = self._container_client().get_blob_client(blob_key(name))
        try:
            await blob.upload_blob(data, overwrite=True)
        except AzureError as err:
            raise self._error(f"cannot write blob {name!r}", err) from None

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        pages = self._container_client().list_blobs(name_starts_with=prefix or None)
        try:
            async for blob in pages:
                yield BlobInfo(name=blob.name, size=blob.size, etag=_bare_etag(blob.etag))
        except AzureError as err:
            raise self._error(f"cannot list blobs starting with {prefix!r}", err) from None
