"""A thin Label Studio client: the SDK behind one place that turns its failures into one line.

The API token comes from ``$LABEL_STUDIO_API_KEY`` unless passed; it is never logged and never
part of an error message (the SDK's own errors carry response headers, so they are not echoed
either). Every request goes through :meth:`LabelStudioClient.call`, which names the server and
the operation when Label Studio cannot be reached or refuses, and says what was changed.

SDK quirks handled here (label-studio-sdk 2.1 against Label Studio 1.23):

- ``tasks.list`` pagers ask for the page after the last one, which the server answers with
  ``404 Invalid page``; the SDK's iterator swallows every 404 there, so a real error mid-way
  would end the listing silently. :meth:`LabelStudioClient.tasks` pages by hand and stops at
  the ``total`` the server reports.
- The SDK retries every request on connection errors and 408/409/429/5xx answers, POSTs
  included (``max_retries``, 2 by default, backing off 1 s then 2 s).
- ``LabelStudio(api_key=...)`` defaults to ``$LABEL_STUDIO_API_KEY`` read when the SDK is
  *imported*; :func:`connect` reads the environment when it is called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx
from label_studio_sdk import LabelStudio, PredictionRequest
from label_studio_sdk.core.api_error import ApiError

from sslpipe.core.uris import is_loopback_host, redact_uri

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
URL_ENV = "LABEL_STUDIO_URL"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2  # the SDK's: on connection errors, 408, 409, 429 and 5xx, backing off 1 s, 2 s
DEFAULT_PAGE_SIZE = 100
NOTHING_CHANGED = "nothing was changed"

T = TypeVar("T")


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a request; the message names the server,
    the operation and what was changed (never the token)."""


def _describe(err: Exception) -> str:
    """Why a request failed, in one line, without headers, cookies or the token."""
    if isinstance(err, ApiError):
        body = err.body if isinstance(err.body, Mapping) else {}
        detail = body.get("detail") or body.get("validation_errors") or ""
        if not body and isinstance(err.body, str):
            detail = "" if err.body.lstrip().startswith("<") else err.body[:200]
        return " ".join(f"HTTP {err.status_code} {detail}".split())
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass(frozen=True)
class LabelStudioClient:
    """The SDK client (``sdk``, for anything not wrapped here) and the server's ``url``."""

    url: str
    sdk: LabelStudio
    page_size: int = DEFAULT_PAGE_SIZE

    def call(self, what: str, request: Callable[[], T], *, changed: str = NOTHING_CHANGED) -> T:
        """``request()``; a transport failure or an HTTP error becomes :class:`LabelStudioError`
        naming the server, ``what`` was being done and ``changed`` (what had been written)."""
        try:
            return request()
        except httpx.HTTPError as err:
            raise LabelStudioError(
                f"cannot reach Label Studio at {redact_uri(self.url)} while {what} "
                f"({_describe(err)}); {changed}"
            ) from None
        except ApiError as err:
            raise LabelStudioError(
                f"Label Studio at {redact_uri(self.url)} refused {what} ({_describe(err)}); "
                f"{changed}"
            ) from None

    def whoami(self) -> dict[str, Any]:
        """The user the token belongs to (checks that the server answers and the token works)."""
        user = self.call("checking the API token", self.sdk.users.whoami)
        return _as_dict(user)

    def project(self, project_id: int) -> dict[str, Any]:
        """The project as the API returns it (``label_config``, ``parsed_label_config``, ...)."""
        project = self.call(
            f"reading project {project_id}", lambda: self.sdk.projects.get(id=project_id)
        )
        return _as_dict(project)

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations and predictions, ordered by id.

        Paged by hand (``page_size`` per request) up to the ``total`` the server reports; a
        task seen twice (tasks added while paging) is kept once.
        """
        tasks: dict[int, dict[str, Any]] = {}
        page = 1
        while True:
            items, total = self._task_page(project_id, page)
            tasks.update((int(task["id"]), task) for task in items)
            if not items or page * self.page_size >= total:
                return [tasks[task_id] for task_id in sorted(tasks)]
            page += 1

    def _task_page(self, project_id: int, page: int) -> tuple[list[dict[str, Any]], int]:
        pager: Any = self.call(
            f"reading page {page} of the tasks of project {project_id}",
            lambda: self.sdk.tasks.list(
                project=project_id, fields="all", page=page, page_size=self.page_size
            ),
        )
        return [_as_dict(task) for task in pager.items or []], int(pager.response.total)

    def import_predictions(
        self, project_id: int, predictions: Sequence[Mapping[str, Any]], *, changed: str
    ) -> int:
        """Create predictions in one request (all or none); returns how many were created."""
        response = self.call(
            f"creating {len(predictions)} predictions in project {project_id}",
            lambda: self.sdk.projects.import_predictions(
                id=project_id, request=[PredictionRequest(**p) for p in predictions]
            ),
            changed=changed,
        )
        created = getattr(response, "created", None)
        return int(created) if created is not None else len(predictions)

    def delete_prediction(self, prediction_id: int, *, changed: str) -> None:
        self.call(
            f"deleting prediction {prediction_id}",
            lambda: self.sdk.predictions.delete(id=prediction_id),
            changed=changed,
        )


def _as_dict(model: Any) -> dict[str, Any]:
    """An SDK response object as the plain JSON-like dict the server sent."""
    if isinstance(model, Mapping):
        return dict(model)
    dumped: dict[str, Any] = model.model_dump(mode="json")
    return dumped


def check_url(url: str) -> str:
    """``url`` without a trailing slash; raises ValueError unless it is an http(s) URL.

    Plain http only to a loopback host: the API token goes with every request.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"Label Studio URL {redact_uri(url)!r} is not an http(s) URL; "
            "expected e.g. http://127.0.0.1:8080"
        )
    if parsed.scheme == "http" and not is_loopback_host(parsed.hostname or ""):
        raise ValueError(
            f"Label Studio URL {redact_uri(url)!r} is plain http to another machine, which "
            "would send the API token unencrypted; use https (http only for loopback hosts)"
        )
    return url.rstrip("/")


def connect(
    url: str,
    *,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_retries: int = DEFAULT_RETRIES,
    check: bool = True,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> LabelStudioClient:
    """A client for the Label Studio at ``url``.

    ``token`` defaults to ``$LABEL_STUDIO_API_KEY`` (a legacy token or a personal access
    token). With ``check`` the server is asked who the token belongs to, so that an
    unreachable server or a refused token fails here, before anything is read or written.

    Raises:
        ValueError: ``url`` is not an http(s) URL, or ``page_size`` is below 1.
        LabelStudioError: no token is set, or (with ``check``) the server cannot be reached or
            refuses the token.
    """
    url = check_url(url)
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, found {page_size}")
    key = token if token is not None else os.environ.get(TOKEN_ENV)
    if not key:
        raise LabelStudioError(
            f"no API token for Label Studio at {redact_uri(url)}: set {TOKEN_ENV} (Account & "
            f"Settings > Access Token in Label Studio); {NOTHING_CHANGED}"
        )
    client = LabelStudioClient(
        url=url,
        sdk=LabelStudio(base_url=url, api_key=key, timeout=timeout, max_retries=max_retries),
        page_size=page_size,
    )
    if check:
        client.whoami()
    return client
