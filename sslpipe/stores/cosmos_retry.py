"""The Cosmos DB store's retry policy (the SDK's retry options) and its error reasons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from azure.cosmos.exceptions import CosmosHttpResponseError

from sslpipe.stores.cosmos_location import KEY_ENV


@dataclass(frozen=True)
class RetrySettings:
    """The SDK's retry options. 429 responses are retried after the server's retry-after
    (at most ``total`` times, waiting at most ``backoff_max_s`` in all); 503 and connection
    errors (refused, reset) up to ``connect`` / ``read`` times. Defaults are the SDK's."""

    total: int = 9
    backoff_max_s: int = 30
    connect: int = 3
    read: int = 3
    backoff_factor: float = 1.0

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "retry_total": self.total,
            "retry_backoff_max": self.backoff_max_s,
            "retry_connect": self.connect,
            "retry_read": self.read,
            "retry_backoff_factor": self.backoff_factor,
            # Upserts are idempotent, so a write whose response was lost may be sent again.
            "retry_write": self.connect,
        }


STATUS_HINTS = {
    401: f"the key or identity was refused: check {KEY_ENV} or the identity's role",
    403: "forbidden: the identity needs a Cosmos DB data-plane role on this account",
    429: "request rate too large after the retries: raise the RU/s or retry later",
    503: "service unavailable after the retries: retry later",
}


def error_reason(err: Exception) -> str:
    """A one-line reason for an SDK error (status code, hint and the server's first line)."""
    if isinstance(err, CosmosHttpResponseError):
        lines = str(err.message or err.reason or "").strip().splitlines()
        first = next((line for line in lines if line.strip()), "no message").strip()[:300]
        hint = STATUS_HINTS.get(err.status_code or 0)
        return f"HTTP {err.status_code}{f', {hint}' if hint else ''}: {first}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {(text[0] if text else 'no message')[:300]}"
