"""Step reuse: cache keys and the cache entries of steps that succeeded.

An entry, ``<cache_dir>/<cache_key>.json``, holds ``{run_id, step, outputs, created}``. A step
is reused when an entry for its key exists and the outputs it names still exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslpipe.core.io import write_json
from sslpipe.execution.graph import StepSpec
from sslpipe.execution.hashing import hash_text
from sslpipe.execution.record import utc_now

CACHE_KEY_VERSION = 1
"""Bump when the cache key's recipe changes, so old cache entries stop matching."""


def compute_cache_key(
    step: StepSpec,
    *,
    code_hash: str,
    parameters: Mapping[str, Any],
    input_hashes: Mapping[str, str],
    live: Mapping[str, Any] | None = None,
) -> str:
    """The reuse key of a step: what it runs, with which code, parameters and input data.

    Paths are deliberately absent: only the *content* of inputs counts, so the same data in
    another run folder (or moved elsewhere) still hits the cache. ``live`` is the state outside
    those (:class:`~sslpipe.execution.live.LiveState` ``key``: registry, model versions, cached
    weights).
    """
    payload: dict[str, Any] = {
        "version": CACHE_KEY_VERSION,
        "component": step.component_spec(),
        "code": code_hash,
        "parameters": {k: parameters[k] for k in sorted(parameters)},
        "inputs": {k: input_hashes[k] for k in sorted(input_hashes)},
    }
    if live:
        # Only when there is some, so that the keys of steps without live state stay valid.
        payload["live"] = {k: live[k] for k in sorted(live)}
    return hash_text(json.dumps(payload, sort_keys=True, default=str))


@dataclass
class CacheEntry:
    """A step that succeeded: the run it ran in and its outputs' paths."""

    run_id: str
    step: str
    outputs: dict[str, str]


class StepCache:
    """The cache entries in one folder (``<workspace>/cache``)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def lookup(self, cache_key: str, step: StepSpec) -> CacheEntry | None:
        """The cache entry for ``cache_key`` if its outputs still exist, else None."""
        path = self.cache_dir / f"{cache_key}.json"
        try:
            data = json.loads(path.read_text("utf-8"))
            entry = CacheEntry(str(data["run_id"]), str(data["step"]), dict(data["outputs"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or unreadable: treat as a miss, the step simply runs
        if set(entry.outputs) != set(step.outputs):
            return None
        if not all(Path(p).exists() for p in entry.outputs.values()):
            return None  # an earlier run folder was deleted
        return entry

    def remember(self, cache_key: str, run_id: str, step: str, outputs: Mapping[str, str]) -> None:
        """Record that ``step`` of ``run_id`` succeeded with ``outputs`` under ``cache_key``."""
        write_json(
            self.cache_dir / f"{cache_key}.json",
            {"run_id": run_id, "step": step, "outputs": dict(outputs), "created": utc_now()},
        )
