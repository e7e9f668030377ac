"""The Azure blob store's retry policy: exponential backoff for the SDK's requests and for
plain GETs, which errors are transient, and error text without secrets."""

from __future__ import annotations

import random
import re
from typing import Any

import aiohttp
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob.aio import ExponentialRetry

from sslpipe.stores.blob_get import BlobStatusError

_SIGNATURE = re.compile(r"(?i)(sig|key|token|secret|password|accountkey)=[^&;\s]*")
# Status codes worth a second try once the SDK's own retries are spent; None: no response at all.
_TRANSIENT_STATUS = (None, 408, 429, 500, 502, 503, 504)
# What a read may raise besides the service's answers: the SDK's errors and the connection's.
READ_ERRORS = (AzureError, aiohttp.ClientError, ConnectionError, TimeoutError)


class Backoff(ExponentialRetry):
    """The SDK's storage retry policy with a plain exponential backoff: ``first_s * 2**n``
    seconds before retry ``n`` (0-based), at most ``max_s``, jittered by ±20%."""

    def __init__(self, *, retry_total: int, first_s: float, max_s: float) -> None:
        super().__init__(
            retry_total=retry_total,
            retry_connect=retry_total,
            retry_read=retry_total,
            retry_status=retry_total,
        )
        self.first_s, self.max_s = first_s, max_s

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return backoff_seconds(settings["count"], self.first_s, self.max_s)


def backoff_seconds(retry: int, first_s: float, max_s: float) -> float:
    """Seconds to wait before retry number ``retry`` (0-based): exponential, capped, jittered."""
    return min(max_s, first_s * 2**retry) * random.uniform(0.8, 1.2)


def is_transient(error: BaseException) -> bool:
    """True for a dropped connection, a broken-off body or a 408/429/5xx answer."""
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return True
    if isinstance(error, HttpResponseError | BlobStatusError):
        return error.status_code in _TRANSIENT_STATUS
    return isinstance(error, aiohttp.ClientError | ConnectionError | TimeoutError)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _SIGNATURE.sub(lambda m: f"{m.group(1)}=***", text)


def error_code(error: BaseException) -> str | None:
    """The storage error code (``x-ms-error-code``) of an SDK error, if any."""
    code = getattr(error, "error_code", None)
    return None if code is None else str(getattr(code, "value", code))  # enum member or text
