"""Fixtures for the executor tests."""

import shutil
from pathlib import Path

import pytest

from .helpers import FIXTURES, Bench, Console

_AZURE_NOISE = (
    # azure-ai-ml's marshmallow schemas warn on every load; the warnings are not ours to fix.
    r"ignore::DeprecationWarning:marshmallow\..*",
    r"ignore::DeprecationWarning:azure\..*",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Silence third-party deprecation noise, for this folder's tests only."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            for spec in _AZURE_NOISE:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    """Fixture components copied to a temporary folder, so tests may edit them."""
    root = tmp_path / "components"
    shutil.copytree(FIXTURES, root, ignore=shutil.ignore_patterns("__pycache__"))
    return Bench(
        root=root,
        workspace=tmp_path / "workspace",
        counter=tmp_path / "counter.txt",
        console=Console(),
    )
