"""The model registry: MLflow, with a local sqlite store or an Azure ML workspace's URI.

Models are referred to as ``name`` (latest version), ``name/3`` (a version) or ``name@alias``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from torch import nn

from sslpipe.backbone_io import load_backbone_dir

# Progress bars of artifact downloads would interleave with the step logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][\w.\-]*)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w\-]+))?$"
)
_PYFUNC_BACKBONE = Path(__file__).parent / "serving" / "backbone_model.py"


class ModelReferenceError(ValueError):
    """A model reference is malformed or names nothing in the registry."""


def configure_tracking(
    tracking_uri: str | None = None,
    *,
    experiment: str | None = None,
    artifact_root: Path | None = None,
) -> None:
    """Point MLflow at ``tracking_uri`` (or ``$MLFLOW_TRACKING_URI``) and an experiment.

    A new experiment on a local store gets ``artifact_root`` as its artifact location, so that
    artifacts land in the workspace and not in the current directory.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return
    root = artifact_root or (
        Path(os.environ["SSLPIPE_ARTIFACT_ROOT"])
        if os.environ.get("SSLPIPE_ARTIFACT_ROOT")
        else None
    )
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None and root is not None:
        # Another step may create it at the same moment; either way it exists afterwards.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_experiment(name, artifact_location=(root / name).resolve().as_uri())
    mlflow.set_experiment(name)


def model_uri(reference: str) -> str:
    """``name`` | ``name/version`` | ``name@alias`` -> an MLflow ``models:/`` URI."""
    match = _REF.match(reference.strip())
    if not match:
        raise ModelReferenceError(
            f"model reference {reference!r} is not valid; expected 'name', 'name/3' or 'name@alias'"
        )
    name, version, alias = match["name"], match["version"], match["alias"]
    if alias:
        return f"models:/{name}@{alias}"
    if version and version != "latest":
        return f"models:/{name}/{version}"
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'") if _safe_name(name) else []
    if not versions:
        raise ModelReferenceError(
            f"no registered model named {name!r} in {mlflow.get_tracking_uri()}"
        )
    latest = max(int(v.version) for v in versions)
    return f"models:/{name}/{latest}"


def _safe_name(name: str) -> bool:
    # MLflow's search filter has no parameters; the regex above only admits [\w.-] names.
    return bool(re.fullmatch(r"[\w.\-]+", name))


def register_backbone(
    model_dir: Path, *, name: str, tags: dict[str, str], description: str = ""
) -> dict[str, Any]:
    """Log the backbone folder as an MLflow pyfunc model in the active run and register it.

    The pyfunc is defined by code (models-from-code), not by a pickled object, and returns
    embeddings for image paths, bytes or arrays.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_backbone needs an active MLflow run")
    # MLflow asks for type hints on predict; this model takes paths, bytes and arrays alike.
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    info = mlflow.pyfunc.log_model(
        name="backbone",
        python_model=str(_PYFUNC_BACKBONE),
        artifacts={"backbone": str(model_dir)},
        code_paths=[str(Path(__file__).parent)],
        pip_requirements=["torch", "torchvision", "pillow", "pandas", "numpy", "mlflow"],
        registered_model_name=name,
        await_registration_for=0,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=description)
    return {
        "name": name,
        "version": version,
        "uri": f"models:/{name}/{version}",
        "run_id": run.info.run_id,
    }


def download_model(reference: str) -> Path:
    """Download a registered model's files and return the local folder."""
    uri = model_uri(reference)
    try:
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp())
        )
    except mlflow.exceptions.MlflowException as err:
        raise ModelReferenceError(f"cannot load {reference!r} ({uri}): {err.message}") from None


def load_backbone(reference: str) -> tuple[nn.Module, dict[str, Any]]:
    """The registered backbone network (eval mode) and its config, by reference."""
    folder = download_model(reference)
    candidates = [p.parent for p in folder.rglob("backbone.json")]
    if not candidates:
        raise ModelReferenceError(f"{reference!r} is not a backbone model: no backbone.json inside")
    return load_backbone_dir(candidates[0])
