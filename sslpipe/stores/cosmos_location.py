"""Where a Cosmos DB container is: ``cosmos://`` URIs and the rule for verifying TLS.

``cosmos://<host>[:port]/<database>/<container>[?filter=udf]`` names a container. TLS
certificates are verified for every host except the loopback names (127.0.0.1, ::1,
localhost), where the local emulator serves a self-signed certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

from sslpipe.core.uris import redact_uri
from sslpipe.stores.base import StoreError

KEY_ENV = "SSLPIPE_COSMOS_KEY"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
FILTER_MODES = ("sql", "udf")
URI_FORM = "cosmos://<host>[:port]/<database>/<container>[?filter=udf]"


def verify_tls_for(host: str) -> bool:
    """Whether to verify the server's certificate: False only for the loopback names."""
    return host.strip("[]").lower() not in LOOPBACK_HOSTS


@dataclass(frozen=True)
class CosmosLocation:
    """Where a Cosmos DB container is, parsed from a ``cosmos://`` URI."""

    endpoint: str
    database: str
    container: str
    use_udf: bool = False

    @property
    def host(self) -> str:
        return urlparse(self.endpoint).hostname or ""

    @property
    def verify_tls(self) -> bool:
        return verify_tls_for(self.host)

    @property
    def uri(self) -> str:
        """The store's URI without credentials."""
        netloc = urlparse(self.endpoint).netloc
        query = "?filter=udf" if self.use_udf else ""
        return f"cosmos://{netloc}/{self.database}/{self.container}{query}"


def _uri_error(uri: str, reason: str) -> StoreError:
    return StoreError(f"invalid Cosmos DB URI {redact_uri(uri)!r}: {reason}; expected {URI_FORM}")


def _filter_mode(uri: str, query: str) -> bool:
    """True for ``?filter=udf``; raises StoreError for any other query parameter."""
    fields = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(fields) - {"filter"})
    if unknown:
        raise _uri_error(uri, f"unknown query parameter(s) {', '.join(unknown)}")
    modes = fields.get("filter", ["sql"])
    if len(modes) != 1 or modes[0] not in FILTER_MODES:
        raise _uri_error(uri, f"filter must be one of {FILTER_MODES}")
    return modes[0] == "udf"


def parse_cosmos_uri(uri: str) -> CosmosLocation:
    """``cosmos://host[:port]/db/container[?filter=udf]`` -> its CosmosLocation.

    Raises:
        StoreError: for another scheme, a missing host, database or container, credentials in
            the URI, or an unknown query parameter. The message never repeats a secret.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "cosmos":
        raise _uri_error(uri, f"the scheme is {parsed.scheme!r}, not 'cosmos'")
    if "@" in parsed.netloc:
        raise _uri_error(
            uri, f"credentials do not belong in the URI; set {KEY_ENV} or use an Azure identity"
        )
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as err:
        raise _uri_error(uri, f"bad port ({err})") from None
    if not host:
        raise _uri_error(uri, "no host")
    names = [unquote(part) for part in parsed.path.split("/")[1:]]
    if len(names) != 2 or not all(name.strip() for name in names):
        raise _uri_error(uri, "the path must name exactly a database and a container")
    use_udf = _filter_mode(uri, parsed.query)
    netloc = f"[{host}]" if ":" in host else host
    endpoint = f"https://{netloc}{f':{port}' if port else ''}/"
    return CosmosLocation(endpoint, names[0], names[1], use_udf)
