"""The run record: ``<run>/run.json``, a JSON account of what a local run did.

It is rewritten atomically after every state change, so a crash or Ctrl-C leaves a readable
record that says which steps finished; :meth:`LocalExecutor.resume` relies on that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sslpipe.core.io import write_json

RUN_STATUSES = ("running", "completed", "failed")
STEP_STATUSES = ("pending", "running", "completed", "reused", "failed", "skipped")
DONE_STEP_STATUSES = frozenset({"completed", "reused"})
"""Steps in these states have usable outputs and are kept by a resume."""


def utc_now() -> str:
    """The current time as an ISO 8601 string with a UTC offset (seconds precision)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StepRecord:
    """What happened to one step of a run."""

    name: str
    component: str
    status: str = "pending"
    argv: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    cache_key: str | None = None
    code_hash: str | None = None
    input_hashes: dict[str, str] = field(default_factory=dict)
    live: dict[str, Any] = field(default_factory=dict)
    """State outside code, parameters and inputs, pinned when the run started (see
    :mod:`sslpipe.execution.live`): replaced parameters, cache key part and notes."""
    reused_from: str | None = None
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None
    returncode: int | None = None
    log: str | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        """Rebuild from JSON, ignoring keys written by newer versions."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunRecord:
    """What happened in one local run of a pipeline."""

    run_id: str
    pipeline: str
    status: str = "running"
    started: str | None = None
    ended: str | None = None
    workspace: str | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)

    @property
    def failed_steps(self) -> list[str]:
        """Names of the steps whose status is ``failed``."""
        return [name for name, step in self.steps.items() if step.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form (steps keep their execution order)."""
        data = asdict(self)
        data["steps"] = {name: asdict(step) for name, step in self.steps.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Rebuild a record from :meth:`to_dict` output."""
        known = {f.name for f in fields(cls)} - {"steps"}
        steps = {name: StepRecord.from_dict(s) for name, s in data.get("steps", {}).items()}
        return cls(**{k: v for k, v in data.items() if k in known}, steps=steps)

    def save(self, path: Path) -> None:
        """Write the record to ``path`` atomically."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """Read a record written by :meth:`save`.

        Raises:
            FileNotFoundError: when there is no record at ``path``.
        """
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))
