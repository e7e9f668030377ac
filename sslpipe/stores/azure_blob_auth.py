"""Which Azure Blob Storage container a URI names, and with which credential to reach it.

URIs name one container::

    https://<account>.blob.core.windows.net/<container>[?<SAS token>]
    http://127.0.0.1:10000/devstoreaccount1/<container>      (Azurite, path style; loopback only)

Credentials, first found wins (the store's ``auth`` names the source, never the secret):

1. a SAS token in the URI's query;
2. ``AZURE_STORAGE_CONNECTION_STRING`` when it names this account's blob endpoint
   (its ``AccountKey`` or ``SharedAccessSignature``);
3. ``AZURE_STORAGE_SAS_TOKEN``;
4. ``AZURE_STORAGE_KEY`` (the account name is read from the URI);
5. ``azure.identity.aio.DefaultAzureCredential`` (managed identity on Azure ML compute).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential

from sslpipe.core.uris import is_loopback_host, redact_uri
from sslpipe.stores.base import StoreError

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
SAS_TOKEN_ENV = "AZURE_STORAGE_SAS_TOKEN"
ACCOUNT_KEY_ENV = "AZURE_STORAGE_KEY"
DEFAULT_CREDENTIAL = "DefaultAzureCredential"

# https://learn.microsoft.com/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata
_CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$|^\$(root|web|logs)$")


# --- where: the container a URI names ----------------------------------------------------------


@dataclass(frozen=True)
class BlobLocation:
    """A container parsed from a URI: ``account_url`` (no query), ``account_name`` (None when
    the host does not tell it), ``container`` and the URI's SAS token, if any (never shown)."""

    account_url: str
    account_name: str | None
    container: str
    sas_token: str | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        """The container's URI without credentials."""
        return f"{self.account_url}/{self.container}"


def _is_path_style(host: str) -> bool:
    """Emulators and IP endpoints put the account in the path, not in the host name."""
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_blob_uri(uri: str) -> BlobLocation:
    """The container that ``uri`` names.

    Raises:
        StoreError: the URI is not an https (or loopback http) container URI; the message shows
            the URI redacted and the expected form.
    """
    shown = redact_uri(uri)
    parsed = urlparse(uri)
    host = parsed.hostname or ""
    expected = (
        "expected https://<account>.blob.core.windows.net/<container> "
        "or, for the local emulator, http://127.0.0.1:10000/<account>/<container>"
    )
    if parsed.scheme not in ("https", "http") or not host:
        raise StoreError(f"{shown!r} is not a blob container URI: {expected}")
    if "@" in parsed.netloc:
        raise StoreError(
            f"{shown!r}: credentials in the URI's user part are not supported; use a SAS token "
            f"in the query or the {CONNECTION_STRING_ENV} / {ACCOUNT_KEY_ENV} environment"
        )
    if parsed.scheme == "http" and not is_loopback_host(host):
        raise StoreError(
            f"refusing plain http for {shown!r}: only a local emulator on a loopback address "
            "(127.0.0.1, ::1, localhost) may be reached without TLS; use https://"
        )
    try:
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise StoreError(f"{shown!r} has an invalid port: {expected}") from None
    parts = [unquote(p) for p in parsed.path.split("/") if p]
    path_style = _is_path_style(host)
    if len(parts) != (2 if path_style else 1):
        raise StoreError(f"{shown!r} does not name exactly one container: {expected}")
    container = parts[-1]
    if not _CONTAINER_NAME.match(container):
        raise StoreError(
            f"{shown!r}: {container!r} is not a valid container name (3 to 63 lowercase "
            "letters, digits and single hyphens, starting and ending with a letter or digit)"
        )
    if path_style:
        account: str | None = parts[0]
        account_url = f"{parsed.scheme}://{parsed.netloc}/{parts[0]}"
    else:
        account = host.split(".")[0] if ".blob." in host else None
        account_url = f"{parsed.scheme}://{parsed.netloc}"
    sas = parsed.query or None
    if sas is not None and "sig=" not in sas:
        raise StoreError(f"{shown!r}: the URI's query is not a SAS token (it has no 'sig=')")
    return BlobLocation(account_url, account, container, sas)


# --- who: the credential -----------------------------------------------------------------------

Credential = AzureSasCredential | AzureNamedKeyCredential


@dataclass(frozen=True)
class Auth:
    """Where the credential came from (safe to show) and the credential itself (never shown);
    ``credential=None`` means a token credential (DefaultAzureCredential), made per client."""

    source: str
    credential: Credential | None = field(default=None, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)


def _parse_connection_string(text: str) -> dict[str, str]:
    """The ``key=value;...`` pairs of a connection string, keys lower-cased."""
    pairs = (part.partition("=") for part in text.split(";") if part.strip())
    return {key.strip().lower(): value.strip() for key, _, value in pairs}


def _endpoint_key(url: str) -> tuple[str, int | None, str]:
    parsed = urlparse(url)
    port = parsed.port or {"https": 443, "http": 80}.get(parsed.scheme)
    return (parsed.hostname or "").lower(), port, parsed.path.rstrip("/")


def _connection_string_auth(text: str, location: BlobLocation) -> Auth | None:
    """The credential of a connection string that names ``location``'s account, else None."""
    fields = _parse_connection_string(text)
    account = fields.get("accountname")
    endpoint = fields.get("blobendpoint")
    if endpoint is None and account:
        protocol = fields.get("defaultendpointsprotocol", "https")
        suffix = fields.get("endpointsuffix", "core.windows.net")
        endpoint = f"{protocol}://{account}.blob.{suffix}"
    if endpoint is None or _endpoint_key(endpoint) != _endpoint_key(location.account_url):
        return None
    source = f"{CONNECTION_STRING_ENV} (account {account or location.account_name})"
    if sas := fields.get("sharedaccesssignature"):
        return Auth(source, AzureSasCredential(sas.lstrip("?")), (text, sas))
    if (key := fields.get("accountkey")) and account:
        return Auth(source, AzureNamedKeyCredential(account, key), (text, key))
    return None


def resolve_auth(location: BlobLocation, environ: Mapping[str, str]) -> Auth:
    """The credential for ``location``, in the order of this module's docstring.

    Raises:
        StoreError: ``AZURE_STORAGE_KEY`` is set but the URI does not tell the account name, or
            a loopback (http) emulator would need a token credential, which requires TLS.
    """
    if location.sas_token:
        return Auth("the URI's SAS token", AzureSasCredential(location.sas_token),
                    (location.sas_token,))  # fmt: skip
    if (text := environ.get(CONNECTION_STRING_ENV)) and (
        auth := _connection_string_auth(text, location)
    ):
        return auth
    if sas := environ.get(SAS_TOKEN_ENV):
        return Auth(SAS_TOKEN_ENV, AzureSasCredential(sas.lstrip("?")), (sas,))
    if key := environ.get(ACCOUNT_KEY_ENV):
        if not location.account_name:
            raise StoreError(
                f"{ACCOUNT_KEY_ENV} is set but the account name of {location.uri!r} is unknown; "
                f"use https://<account>.blob.core.windows.net/... or {CONNECTION_STRING_ENV}"
            )
        return Auth(ACCOUNT_KEY_ENV, AzureNamedKeyCredential(location.account_name, key), (key,))
    if location.account_url.startswith("http://"):
        raise StoreError(
            f"no credentials for the emulator at {location.account_url}: set "
            f"{CONNECTION_STRING_ENV}, {SAS_TOKEN_ENV} or {ACCOUNT_KEY_ENV} "
            f"({DEFAULT_CREDENTIAL} needs https)"
        )
    return Auth(DEFAULT_CREDENTIAL)
