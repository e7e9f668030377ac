"""Fixtures for the tests against the real Label Studio (the session fixture ``label_studio``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from label_studio_sdk import ImportApiRequest

from sslpipe.data.labelstudio.client import LabelStudioClient, connect

from .helpers import ProjectMaker, create_users, taxonomy_config, unique


@pytest.fixture
def ls_client(label_studio: dict[str, str]) -> LabelStudioClient:
    """A checked client for the local Label Studio."""
    return connect(label_studio["url"], token=label_studio["token"])


@pytest.fixture
def make_project(ls_client: LabelStudioClient) -> Iterator[ProjectMaker]:
    """``make_project([task data, ...], label_config=...)`` -> (project id, tasks by import
    order); the projects are deleted afterwards."""
    created: list[int] = []

    def make(
        tasks: Sequence[dict[str, Any]], *, label_config: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        project = ls_client.sdk.projects.create(
            title=unique("sslpipe test"), label_config=label_config or taxonomy_config()
        )
        assert project.id is not None
        created.append(int(project.id))
        response = ls_client.sdk.projects.import_tasks(
            id=project.id,
            request=[ImportApiRequest(data=dict(t)) for t in tasks],
            return_task_ids=True,
        )
        ids = list(getattr(response, "task_ids", None) or [])  # an untyped extra field
        assert len(ids) == len(tasks)
        return int(project.id), [
            {"id": i, "data": dict(d)} for i, d in zip(ids, tasks, strict=True)
        ]

    yield make
    for project_id in created:
        with contextlib.suppress(Exception):
            ls_client.sdk.projects.delete(id=project_id)


@pytest.fixture
def make_users(ls_client: LabelStudioClient) -> Iterator[Callable[[int], list[int]]]:
    """``make_users(3)`` -> ids of new annotator accounts, deleted afterwards."""
    created: list[int] = []

    def make(count: int) -> list[int]:
        ids = create_users(ls_client, count)
        created.extend(ids)
        return ids

    yield make
    for user_id in created:
        with contextlib.suppress(Exception):
            ls_client.sdk.users.delete(id=user_id)
