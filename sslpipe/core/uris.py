"""URI helpers: store URIs are logged and recorded only without credentials."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlparse, urlunparse

_SECRET_QUERY = re.compile(
    r"(?i)(sig|se|sp|sv|sr|st|spr|skoid|sktid|key|token|secret|password)=[^&]*"
)


def redact_uri(uri: str) -> str:
    """Drop user info and secret-looking query parameters (SAS signatures, keys) from a URI."""
    parsed = urlparse(uri)
    if "@" not in parsed.netloc and not parsed.query:
        return uri
    # Host and port as written (parsed.port raises on a bad port; hostname drops IPv6 brackets).
    netloc = parsed.netloc.rpartition("@")[2]
    query = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}=***", parsed.query)
    return urlunparse(parsed._replace(netloc=netloc, query=query))


def credential_in_uri(uri: str) -> str | None:
    """What in ``uri`` is a credential (user info, a SAS or key parameter), or None.

    Store URIs are recorded, logged and passed to Azure ML as plain inputs, so a credential in
    one would be written everywhere; the message this feeds never repeats its value.
    """
    parsed = urlparse(uri)
    if "@" in parsed.netloc:
        return "user info before '@'"
    names = sorted({name for name, _ in parse_qsl(parsed.query, keep_blank_values=True)})
    secret = [name for name in names if _SECRET_QUERY.fullmatch(f"{name}=")]
    return f"query parameter(s) {', '.join(secret)}" if secret else None


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
