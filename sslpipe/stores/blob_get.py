"""Blob downloads as plain HTTP GETs on the store's aiohttp session, for SAS-signed reads.

azure-storage-blob's ``download_blob`` sends each request through its policy pipeline (request
ids, user agent, logging, signing, retries, response hooks) and a downloader object: about 2 ms
of CPU per blob on top of aiohttp's 0.2 ms, measured on a 65 KB JPEG from Azurite
(BENCHMARKS.md, row 1). data_prep reads every image once, so on 2 cores that overhead alone
caps its throughput. Where the credential is a shared access signature, or an account key from
which one is made, a blob is one GET with the token in the query and no more work than that;
token credentials (DefaultAzureCredential) keep the SDK's path.

:class:`SasSource` provides the token; :meth:`BlobReads.get` makes one request and tells a 304,
a body and an error status apart; the store retries around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from yarl import URL

_NOT_MODIFIED = 304
_OK = (200, 206)
# A SAS made from an account key lives this long and is made again when less than RENEW is left,
# so a long run never sends an expired one and a leaked one is soon useless.
SAS_LIFETIME = timedelta(hours=8)
SAS_RENEW = timedelta(hours=1)


class BlobStatusError(Exception):
    """The service answered a GET with an error status; ``error_code`` is its
    ``x-ms-error-code`` (e.g. BlobNotFound, ContainerNotFound, AuthorizationFailure)."""

    def __init__(self, status_code: int, error_code: str | None, reason: str) -> None:
        super().__init__(f"{status_code} {reason}" + (f" ({error_code})" if error_code else ""))
        self.status_code, self.error_code, self.message = status_code, error_code, reason
        self.retry_after_s: float | None = None


@dataclass
class SasSource:
    """The SAS token (query string, no ``?``) for reading the blobs of one container.

    A SAS credential is used as it is; an account key signs a read-only container SAS that
    :meth:`token` makes again before it expires. ``secrets`` lists the tokens made so far, for
    scrubbing error messages.
    """

    container: str
    credential: AzureSasCredential | AzureNamedKeyCredential
    secrets: list[str] = field(default_factory=list, repr=False)
    _token: str = field(default="", repr=False)
    _renew_at: float = 0.0

    @classmethod
    def of(cls, credential: object, container: str) -> SasSource | None:
        """The source for ``credential``, or None when it is not a SAS or an account key."""
        if isinstance(credential, AzureSasCredential | AzureNamedKeyCredential):
            return cls(container, credential)
        return None

    def token(self) -> str:
        if isinstance(self.credential, AzureSasCredential):
            return self.credential.signature.lstrip("?")
        if not self._token or time.time() >= self._renew_at:
            self._token = self._account_key_sas()
            self.secrets.append(self._token)
        return self._token

    def _account_key_sas(self) -> str:
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        assert isinstance(self.credential, AzureNamedKeyCredential)
        name, key = self.credential.named_key
        expiry = datetime.now(UTC) + SAS_LIFETIME
        self._renew_at = (expiry - SAS_RENEW).timestamp()
        return generate_container_sas(
            name, self.container, account_key=key,
            permission=ContainerSasPermissions(read=True), expiry=expiry,
        )  # fmt: skip


def blob_url(container_url: str, key: str, token: str) -> str:
    """The URL of blob ``key`` with the SAS ``token``; the name is quoted as the SDK does."""
    return f"{container_url}/{quote(key, safe='~/')}?{token}"


@dataclass(frozen=True)
class BlobReads:
    """A connection pool for plain GETs of one account's blobs, through the proxy that the
    environment names for it (HTTPS_PROXY / HTTP_PROXY, unless NO_PROXY exempts the host),
    looked up once: aiohttp's ``trust_env`` would look it up, and read ~/.netrc, in a thread
    for every request."""

    session: aiohttp.ClientSession
    timeout: aiohttp.ClientTimeout
    proxy: str | None = None
    proxy_auth: aiohttp.BasicAuth | None = None

    @classmethod
    def for_account(
        cls, account_url: str, connections: int, timeout: aiohttp.ClientTimeout
    ) -> BlobReads:
        """A pool of ``connections`` for ``account_url``; call in the event loop that uses it."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # the blob's bytes as stored, whatever its Content-Encoding
        )
        try:
            proxy, proxy_auth = get_env_proxy_for_url(URL(account_url))
        except LookupError:
            return cls(session, timeout)
        return cls(session, timeout, str(proxy), proxy_auth)

    async def get(self, url: str, etag: str | None) -> tuple[bytes | None, str]:
        """One GET of ``url``: ``(None, etag)`` when the blob still has ``etag`` (304), else
        ``(body, ETag without quotes)``.

        Raises:
            BlobStatusError: any other status (``retry_after_s`` from a Retry-After header).
            aiohttp.ClientError, TimeoutError: the connection failed or the body broke off.
        """
        headers = {"If-None-Match": f'"{etag}"'} if etag else {}
        async with self.session.get(
            url, headers=headers, timeout=self.timeout, allow_redirects=False,
            proxy=self.proxy, proxy_auth=self.proxy_auth,
        ) as reply:  # fmt: skip
            return await _answer(reply, etag)


async def _answer(reply: aiohttp.ClientResponse, etag: str | None) -> tuple[bytes | None, str]:
    """The blob of ``reply`` (see :meth:`BlobReads.get`)."""
    if reply.status == _NOT_MODIFIED:
        return None, etag or ""
    if reply.status not in _OK:
        error = BlobStatusError(
            reply.status, reply.headers.get("x-ms-error-code"), reply.reason or ""
        )
        error.retry_after_s = _retry_after(reply.headers.get("Retry-After"))
        await reply.read()  # so that the connection goes back to the pool
        raise error
    body = await reply.read()
    length = reply.headers.get("Content-Length")
    if length is not None and int(length) != len(body):
        raise aiohttp.ClientPayloadError(f"body of {len(body)} bytes, {length} announced")
    return body, (reply.headers.get("ETag") or "").strip('"')


def _retry_after(value: str | None) -> float | None:
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: use the backoff instead
