"""Earlier runs of a step, read from their run records.

Two questions are answered from them: *why* a step runs again (what changed since its latest
run: a parameter, an input, the code, the registry...), and, for ``--dry-run``, which files a
step that always runs (``is_deterministic: false``, e.g. connect_db reading a live store) is
expected to write: those of its latest run with the same cache key, so that the plan can tell
whether the steps after it will be reused, as the real run will when that step writes the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslpipe.execution.record import DONE_STEP_STATUSES, RunRecord, StepRecord

_MISSING = object()
_SHORT = 60


@dataclass(frozen=True)
class EarlierStep:
    """A step as an earlier run recorded it."""

    run_id: str
    record: StepRecord


class RunHistory:
    """The run records of one pipeline under ``runs_dir``, newest first, read once (lazily).

    Only runs of the same pipeline count: a step of the same name in another pipeline (the
    moco pipeline's data_prep for the classifier's) reads other data, and "changed since" a run
    of another pipeline would say little.
    """

    def __init__(self, runs_dir: Path, *, pipeline: str | None, exclude: str | None = None) -> None:
        """``pipeline``: the pipeline's name (None: every run); ``exclude``: the run being
        executed, which is not its own history."""
        self.runs_dir = runs_dir
        self.pipeline = pipeline
        self.exclude = exclude
        self._records: list[RunRecord] | None = None

    def latest(self, step: str) -> EarlierStep | None:
        """The newest earlier run in which ``step`` completed or was reused."""
        for record in self._load():
            found = record.steps.get(step)
            if found is not None and found.status in DONE_STEP_STATUSES and found.cache_key:
                return EarlierStep(record.run_id, found)
        return None

    def with_key(self, step: str, cache_key: str) -> EarlierStep | None:
        """The newest earlier run of ``step`` with ``cache_key`` whose outputs still exist."""
        for record in self._load():
            found = record.steps.get(step)
            if (
                found is not None
                and found.status in DONE_STEP_STATUSES
                and found.cache_key == cache_key
                and found.outputs
                and all(Path(p).exists() for p in found.outputs.values())
            ):
                return EarlierStep(record.run_id, found)
        return None

    def _load(self) -> list[RunRecord]:
        if self._records is None:
            records = []
            for path in _newest_first(self.runs_dir.glob("*/run.json")):
                if path.parent.name == self.exclude:
                    continue
                try:
                    record = RunRecord.load(path)
                except (OSError, ValueError, TypeError, KeyError):
                    continue  # a record being written or from an unknown version: no history
                if self.pipeline is None or record.pipeline == self.pipeline:
                    records.append(record)
            self._records = records
        return self._records


def _newest_first(paths: Iterable[Path]) -> list[Path]:
    """Records by when they were last written: run ids sort by start time only to the second,
    and a run resumed later is newer than runs started after it."""

    def written(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return 0

    return sorted(paths, key=lambda path: (written(path), path.parent.name), reverse=True)


def explain_miss(current: StepRecord, earlier: EarlierStep | None) -> str:
    """Why a step with ``current``'s key runs instead of reusing ``earlier`` (one line)."""
    if earlier is None:
        return "no earlier run of this step"
    was = earlier.record
    if was.cache_key == current.cache_key:
        return f"the outputs of run {earlier.run_id}, with the same cache key, are gone"
    changes = _parameter_changes(was.parameters, current.parameters)
    inputs = _changed(was.input_hashes, current.input_hashes)
    if inputs:
        changes.append(f"input {', '.join(inputs)} changed")
    if was.code_hash != current.code_hash:
        changes.append("its code changed")
    changed_parameters = set(_changed(was.parameters, current.parameters))
    changes += _live_changes(_live_key(was), _live_key(current), changed_parameters)
    if not changes:
        changes.append("its component definition changed")
    return f"{'; '.join(changes)} since run {earlier.run_id}"


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    names = sorted(set(old) | set(new))
    return [n for n in names if old.get(n, _MISSING) != new.get(n, _MISSING)]


def _parameter_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{name} {_short(old.get(name, _MISSING))} -> {_short(new.get(name, _MISSING))}"
        for name in _changed(old, new)
    ]


def _live_key(record: StepRecord) -> dict[str, Any]:
    return dict((record.live or {}).get("key") or {})


def _live_changes(old: dict[str, Any], new: dict[str, Any], parameters: set[str]) -> list[str]:
    """Changes of the live state, except those already said as a parameter change (a pinned
    reference that moved to another version)."""
    return [
        f"{name} {_short(old.get(name, _MISSING))} -> {_short(new.get(name, _MISSING))}"
        for name in _changed(old, new)
        if name.split(".")[0] not in parameters
    ]


def _short(value: Any) -> str:
    if value is _MISSING:
        return "(unset)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"
