"""URI helpers: store URIs are logged and recorded only without credentials."""

from __future__ import annotations

import re
from urllib.parse import urlparse, urlunparse

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
