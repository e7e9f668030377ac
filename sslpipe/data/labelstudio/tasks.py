"""Which catalog image a Label Studio task shows: the one rule that sync and push share.

The image id of a task (the metadata document's ``id``, i.e. the image's blob name) is:

1. ``task.data[image_id_field]`` (default ``image_id``) when it is a non-empty string or a
   number; import tasks with this field to be independent of how image URLs look;
2. otherwise the last path component of ``task.data["image"]``, URL-unquoted, ignoring any
   query string or fragment: ``https://acct.blob.core.windows.net/images/a%20b.jpeg?sv=...``
   -> ``a b.jpeg``, ``azure-blob://images/x/y.jpeg`` -> ``y.jpeg``. Label Studio's local-files
   URLs keep the path in the ``d`` query parameter (``/data/local-files/?d=images/y.jpeg``),
   so its last component is taken there;
3. otherwise (no such field, or a URL ending in ``/``) the task has no image id.

Files uploaded through Label Studio's UI are stored under a random prefix
(``/data/upload/1/8f2a11c3-y.jpeg``), which the rule cannot undo: give such tasks an
``image_id`` field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

DEFAULT_IMAGE_ID_FIELD = "image_id"
IMAGE_FIELD = "image"


def _last_component(path: str) -> str:
    # A path ending in "/" names a folder: its last component is empty, so no image.
    return unquote(path.rpartition("/")[2])


def image_id_from_url(url: str) -> str | None:
    """The image id an image URL points at (rule 2 of the module docstring), or None."""
    parsed = urlparse(url)
    name = _last_component(parsed.path)
    local = parse_qs(parsed.query).get("d")
    if local and parsed.path.rstrip("/").endswith("local-files"):
        name = _last_component(local[0])
    return name or None


def task_image_id(
    task: Mapping[str, Any], *, image_id_field: str = DEFAULT_IMAGE_ID_FIELD
) -> str | None:
    """The image id of a task per the module's rule, or None when it has none."""
    data = task.get("data") or {}
    explicit = data.get(image_id_field)
    if isinstance(explicit, str | int) and not isinstance(explicit, bool) and str(explicit):
        return str(explicit)
    image = data.get(IMAGE_FIELD)
    return image_id_from_url(image) if isinstance(image, str) and image else None


def image_ref(task: Mapping[str, Any], *, image_id_field: str = DEFAULT_IMAGE_ID_FIELD) -> Any:
    """What the task says about its image, for reports: the id field, else the image URL."""
    data = task.get("data") or {}
    return data.get(image_id_field) or data.get(IMAGE_FIELD)


def tasks_by_image(
    tasks: Iterable[Mapping[str, Any]], *, image_id_field: str = DEFAULT_IMAGE_ID_FIELD
) -> tuple[dict[str, list[Mapping[str, Any]]], list[Mapping[str, Any]]]:
    """Tasks grouped by image id (an image imported twice has two tasks), and the tasks
    without an image id."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    without: list[Mapping[str, Any]] = []
    for task in tasks:
        image_id = task_image_id(task, image_id_field=image_id_field)
        if image_id is None:
            without.append(task)
        else:
            groups.setdefault(image_id, []).append(task)
    return groups, without
