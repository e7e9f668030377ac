"""The library's layers (docs/architecture.md): imports point down, never up.

Every import of a library module is read from the source, including the imports inside
functions (the lazy ones are still dependencies), and checked against the layer order.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "sslpipe"
# Lowest first: a module may import its own layer and the layers before it.
LAYERS = ("core", "stores", "data", "models", "steps", "execution", "cli")
TOP = {"__init__", "__main__"}  # the package itself and ``python -m sslpipe`` (the command line)


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of ``sslpipe.<layer>...``; the package root and ``__main__`` sit on top."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "cli"
    return parts[1]


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sslpipe":  # ``from sslpipe import core``: the names are modules
                for alias in node.names:
                    yield node.lineno, f"sslpipe.{alias.name}"
            else:
                yield node.lineno, node.module


def library_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(LIBRARY.rglob("*.py"))}


def upward_imports(modules: dict[str, Path]) -> list[str]:
    found = []
    for name, path in modules.items():
        importer = layer_of(name)
        for line, module in imported_modules(path):
            if module != "sslpipe" and module.startswith("sslpipe."):
                imported = layer_of(module)
                if LAYERS.index(imported) > LAYERS.index(importer):
                    found.append(
                        f"{name}:{line} ({importer}) imports "
                        f"{module} ({imported})"
                    )
    return found


def test_the_library_top_level_holds_only_the_layers() -> None:
    entries = {p.stem for p in LIBRARY.iterdir() if p.name != "__pycache__"}
    assert entries == set(LAYERS) | TOP


def test_every_module_lies_in_a_known_layer() -> None:
    layers = {layer_of(name) for name in library_modules()}
    assert layers == set(LAYERS)


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_imports(library_modules()) == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    # The rule itself can fail: a core module that reaches for a step, even lazily, is reported.
    config = LIBRARY / "core" / "config.py"
    copy = tmp_path / "config.py"
    late = "\n\ndef _late() -> None:\n    from sslpipe.steps import moco_train\n"
    copy.write_text(config.read_text() + late)
    found = upward_imports({"sslpipe.core.config": copy})
    assert len(found) == 1
    assert "sslpipe.core.config" in found[0]
    assert "(core) imports sslpipe.steps (steps)" in found[0]
