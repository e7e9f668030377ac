"""The pipeline runner (``execute.py``, ``python -m sslpipe run``): what it hands the executor."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import sslpipe.steps
from sslpipe.cli.pipelines import library_dir


def test_every_library_module_a_step_imports_is_in_the_code_the_cache_key_hashes() -> None:
    # A step is reused only while its code is unchanged; the code hashed is the component's
    # folder plus library_dir(), so every sslpipe module the steps import must lie inside it
    # (otherwise an edited module hands back a stale result).
    for step in pkgutil.iter_modules(sslpipe.steps.__path__, "sslpipe.steps."):
        importlib.import_module(step.name)
    imported = [m for name, m in sys.modules.items() if name.startswith("sslpipe.")]
    files = [Path(m.__file__).resolve() for m in imported if getattr(m, "__file__", None)]
    root = library_dir()
    assert len(files) > 20
    outside = [str(f) for f in files if not f.is_relative_to(root)]
    assert outside == []
    assert (root / "steps" / "moco_train.py").is_file()
