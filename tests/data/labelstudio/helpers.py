"""Helpers for the tests against the real Label Studio (the session fixture ``label_studio``)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sslpipe.data.labelstudio.client import LabelStudioClient

# The demo catalog's taxonomy (sslpipe/data/demo.py): parity, then digit.
DIGITS = {"Even": ["0", "2", "4", "6", "8"], "Odd": ["1", "3", "5", "7", "9"]}

ProjectMaker = Callable[..., tuple[int, list[dict[str, Any]]]]


def taxonomy_config(tree: dict[str, list[str]] = DIGITS, *, name: str = "taxonomy") -> str:
    """A labeling config with an Image and a two-level Taxonomy over it."""
    choices = ""
    for top, subs in tree.items():
        inner = "".join(f'<Choice value="{sub}"/>' for sub in subs)
        choices += f'<Choice value="{top}">{inner}</Choice>'
    return (
        '<View><Image name="image" value="$image"/>'
        f'<Taxonomy name="{name}" toName="image">{choices}</Taxonomy></View>'
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def taxonomy_result(*paths: Sequence[str], name: str = "taxonomy") -> list[dict[str, Any]]:
    return [
        {
            "from_name": name,
            "to_name": "image",
            "type": "taxonomy",
            "value": {"taxonomy": [list(p) for p in paths]},
        }
    ]


def annotate(
    client: LabelStudioClient, task_id: int, user_id: int, *paths: Sequence[str], **flags: Any
) -> int:
    """Create an annotation completed by ``user_id`` choosing ``paths``; returns its id."""
    result = taxonomy_result(*paths) if paths else []
    annotation = client.sdk.annotations.create(
        id=task_id, result=result, completed_by=user_id, **flags
    )
    assert annotation.id is not None
    return int(annotation.id)


def create_users(client: LabelStudioClient, count: int) -> list[int]:
    """``count`` new annotator accounts (unique e-mails), their user ids."""
    ids = []
    for _ in range(count):
        name = unique("annotator")
        user = client.sdk.users.create(username=name, email=f"{name}@sslpipe.local")
        assert user.id is not None
        ids.append(int(user.id))
    return ids
