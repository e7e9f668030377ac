"""Experiment tracking behind one small interface, so that training runs without MLflow.

The training steps log through a :class:`Tracker`, whose ``start_run`` yields a
:class:`TrackingRun` (params, metrics, tags, artifacts). Two implementations:

* :class:`MlflowTracker`: the MLflow store that ``$MLFLOW_TRACKING_URI`` names (see
  :func:`sslpipe.models.registry.configure_tracking`); it imports MLflow only when it is built.
* :class:`LocalTracker`: one JSON-lines file per run under a folder (and copies of the
  artifacts), for a machine without MLflow: a GPU box with only the training dependencies.

:func:`default_tracker` takes MLflow whenever it is installed and falls back to a
:class:`LocalTracker` in ``$SSLPIPE_TRACKING_DIR`` (default ``.sslpipe/tracking``) only when it
is not, saying so once per run. Registering a model always needs MLflow:
:func:`require_mlflow` fails with a message that says so and how to fix it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from sslpipe.core.io import Journal, atomic_path
from sslpipe.core.logs import get_logger, quiet_third_party

log = get_logger("tracking")

TRACKING_DIR_ENV = "SSLPIPE_TRACKING_DIR"
DEFAULT_TRACKING_DIR = Path(".sslpipe") / "tracking"
RUN_LOG = "run.jsonl"
"""The file of a :class:`LocalTracker` run: one JSON object per call, oldest first."""


class MlflowMissingError(ImportError):
    """MLflow is needed (registry, MLflow tracking) but not installed."""


def require_mlflow(purpose: str) -> ModuleType:
    """The ``mlflow`` module, or an error naming ``purpose`` and the missing package.

    MLflow's housekeeping INFO lines (a new SQLite store's tables) are turned down on the way
    (:func:`sslpipe.core.logs.quiet_third_party`).

    Raises:
        MlflowMissingError: MLflow cannot be imported.
    """
    try:
        mlflow = importlib.import_module("mlflow")
    except ImportError as err:
        raise MlflowMissingError(
            f"{purpose} needs MLflow, and the package 'mlflow' is not installed ({err}); "
            "install it (pip install 'mlflow>=2.16') or run without the model registry"
        ) from err
    quiet_third_party()  # before a store is opened: a new SQLite store logs its tables
    return mlflow


class TrackingRun(Protocol):
    """One run of one step: what the steps log."""

    @property
    def run_id(self) -> str: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metric(self, key: str, value: float, step: int | None = None) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None: ...


class Tracker(Protocol):
    """Where runs go."""

    def configure(self) -> None:
        """Point at the store and experiment the environment names (before any run)."""
        ...

    def start_run(
        self, *, run_name: str, run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> AbstractContextManager[TrackingRun]:
        """A new run, or run ``run_id`` continued (a resumed training), ended on exit."""
        ...


@dataclass(frozen=True)
class MlflowRun:
    """The active MLflow run (MLflow's fluent API, which the registry's ``log_model`` uses)."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.log_params(dict(params))

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        import mlflow

        mlflow.log_metric(key, value, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(dict(metrics), step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


class MlflowTracker:
    """MLflow tracking; a run started by the local executor's pipeline run becomes its child
    (``$SSLPIPE_MLFLOW_PARENT_RUN_ID``).

    Raises:
        MlflowMissingError: on construction, when MLflow is not installed.
    """

    def __init__(self) -> None:
        require_mlflow("MLflow tracking")

    def configure(self) -> None:
        from sslpipe.models.registry import configure_tracking

        configure_tracking()

    @contextlib.contextmanager
    def start_run(
        self, *, run_name: str, run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[TrackingRun]:
        import mlflow

        parent = os.environ.get("SSLPIPE_MLFLOW_PARENT_RUN_ID")
        all_tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
        with mlflow.start_run(run_id=run_id, run_name=run_name, tags=all_tags) as run:
            yield MlflowRun(run.info.run_id)


@dataclass(frozen=True)
class LocalRun:
    """A run as ``<folder>/run.jsonl`` (``{"time", "kind", ...}`` per call) and
    ``<folder>/artifacts/``."""

    run_id: str
    folder: Path
    journal: Journal

    def _append(self, kind: str, **fields: Any) -> None:
        self.journal.append({"time": time.time(), "kind": kind, **fields})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._append("params", params=dict(params))

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._append("metrics", step=step, metrics={k: float(v) for k, v in metrics.items()})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._append("tags", tags=dict(tags))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        source = Path(path)
        target = self.folder / "artifacts" / (artifact_path or "") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        self._append("artifact", path=str(target.relative_to(self.folder)))


class LocalTracker:
    """Runs as JSON lines in ``root/<run_id>/`` (read them with
    :func:`sslpipe.core.io.read_journal`); a continued run appends to its file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def configure(self) -> None:
        """Nothing to point at: the folder is the store."""

    @contextlib.contextmanager
    def start_run(
        self, *, run_name: str, run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[TrackingRun]:
        run_id = run_id or uuid.uuid4().hex
        folder = self.root / run_id
        with Journal(folder / RUN_LOG) as journal:
            run = LocalRun(run_id, folder, journal)
            run._append("start", run_name=run_name, tags=dict(tags or {}))
            status = "FAILED"
            try:
                yield run
                status = "FINISHED"
            finally:
                run._append("end", status=status)


def default_tracker() -> Tracker:
    """MLflow when it is installed; otherwise a :class:`LocalTracker` in
    ``$SSLPIPE_TRACKING_DIR`` (default ``.sslpipe/tracking``), with a warning that says so."""
    try:
        return MlflowTracker()
    except MlflowMissingError as err:
        root = Path(os.environ.get(TRACKING_DIR_ENV) or DEFAULT_TRACKING_DIR)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        log.warning(
            "MLflow is not installed (%s): runs are tracked as JSON lines in %s%s",
            err.__cause__,
            root.resolve(),
            " ($MLFLOW_TRACKING_URI is ignored)" if uri else "",
        )
        return LocalTracker(root)


__all__ = [
    "LocalRun",
    "LocalTracker",
    "MlflowMissingError",
    "MlflowRun",
    "MlflowTracker",
    "Tracker",
    "TrackingRun",
    "default_tracker",
    "require_mlflow",
]
