"""The component specs, loaded once from components/<name>/component.yaml."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from azure.ai.ml import load_component

COMPONENTS_DIR = Path(__file__).resolve().parent.parent / "components"


@cache
def component(name: str) -> Any:
    """The azure-ai-ml component loaded from ``components/<name>/component.yaml``."""
    path = COMPONENTS_DIR / name / "component.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no component named {name!r}: {path} does not exist")
    return load_component(source=path)
