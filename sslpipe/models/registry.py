"""The model registry: MLflow, with a local sqlite store or an Azure ML workspace's URI.

Models are referred to as ``name`` (latest version), ``name/3`` (a version) or ``name@alias``.

Two kinds of models are registered, both as MLflow pyfunc models defined by code (no pickles):
the MoCo backbone (images -> embeddings, :func:`register_backbone`) and the image classifier
(images -> labels and probabilities, :func:`register_classifier`). Aliases mark the stages:
``candidate`` (set by the evaluate step when the quality gate passes) and ``production`` (set
by a person with :func:`promote`, e.g. ``python -m sslpipe promote image-classifier@candidate``).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

from torch import nn

from sslpipe.models.backbone_io import load_backbone_dir
from sslpipe.models.training.tracking import require_mlflow

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# Progress bars of artifact downloads would interleave with the step logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][\w.\-]*)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w\-]+))?$"
)
_LIBRARY = Path(__file__).resolve().parents[1]
_PYFUNC_BACKBONE = Path(__file__).parent / "serving" / "backbone_model.py"
_PYFUNC_CLASSIFIER = Path(__file__).parent / "serving" / "classifier_model.py"
_ALIAS = re.compile(r"^[A-Za-z_][\w\-]*$")
_PIP_REQUIREMENTS = ["torch", "torchvision", "pillow", "pandas", "numpy", "mlflow"]


class ModelReferenceError(ValueError):
    """A model reference is malformed or names nothing in the registry."""


def _mlflow() -> ModuleType:
    """MLflow, imported when the registry is first used (training runs without it)."""
    return require_mlflow("the model registry")


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
    mlflow = _mlflow()
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
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(name) is None and root is not None:
        # Another step may create it at the same moment; either way it exists afterwards.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_experiment(name, artifact_location=(root / name).resolve().as_uri())
    mlflow.set_experiment(name)


def model_uri(reference: str) -> str:
    """``name`` | ``name/version`` | ``name@alias`` -> an MLflow ``models:/`` URI."""
    name, version, alias = parse_reference(reference)
    if alias:
        return f"models:/{name}@{alias}"
    if version and version != "latest":
        return f"models:/{name}/{version}"
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'") if _safe_name(name) else []
    if not versions:
        raise ModelReferenceError(
            f"no registered model named {name!r} in {mlflow.get_tracking_uri()}"
        )
    latest = max(int(v.version) for v in versions)
    return f"models:/{name}/{latest}"


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """``name`` | ``name/3`` | ``name@alias`` -> ``(name, version or None, alias or None)``.

    ``name@latest`` and ``name/latest`` mean the highest version, as for ``name``: MLflow
    reserves the alias 'latest', so it can never name a real alias.

    Raises:
        ModelReferenceError: the reference does not follow that grammar.
    """
    match = _REF.match(reference.strip())
    if not match:
        raise ModelReferenceError(
            f"model reference {reference!r} is not valid; expected 'name', 'name/3' or 'name@alias'"
        )
    alias = match["alias"]
    if alias is not None and alias.lower() == "latest":
        return match["name"], "latest", None
    return match["name"], match["version"], alias


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
    return _register_pyfunc(
        model_dir,
        artifact="backbone",
        python_model=_PYFUNC_BACKBONE,
        name=name,
        tags=tags,
        description=description,
        caller="register_backbone",
    )


def register_classifier(
    model_dir: Path, *, name: str, tags: dict[str, str], description: str = ""
) -> dict[str, Any]:
    """Log a classifier folder (``sslpipe.classifier/v1``) as a pyfunc in the active run and
    register it as a new version of ``name``.

    The pyfunc (:class:`sslpipe.models.serving.classifier.ImageClassifierModel`) is defined by code
    and returns one row per image: label, confidence, ``prob_<class>`` columns and error.

    Returns:
        ``{"name", "version", "uri", "run_id"}`` of the new version.
    """
    return _register_pyfunc(
        model_dir,
        artifact="classifier",
        python_model=_PYFUNC_CLASSIFIER,
        name=name,
        tags=tags,
        description=description,
        caller="register_classifier",
    )


_PREDICT_HINT = "type hints to the `predict` method"


@contextlib.contextmanager
def _without_predict_hint() -> Iterator[None]:
    """Drop MLflow's advice to add type hints to ``predict`` while our pyfunc classes are
    defined (MLflow checks ``predict`` when a class is defined, in ``log_model`` or
    ``load_model``): they take paths, bytes and arrays alike, so they have no hints on purpose.

    MLflow raises the advice under its own ``simplefilter("once", UserWarning)``, which
    overrides any filter of ours (it reached the step's ``log.txt`` with raw ANSI colour
    codes), so it is dropped where warnings are shown, during this block only; every other
    warning is shown as before.
    """
    show = warnings.showwarning

    def showwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not (issubclass(category, UserWarning) and _PREDICT_HINT in str(message)):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = show


def _register_pyfunc(
    model_dir: Path,
    *,
    artifact: str,
    python_model: Path,
    name: str,
    tags: dict[str, str],
    description: str,
    caller: str,
) -> dict[str, Any]:
    mlflow = _mlflow()
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"{caller} needs an active MLflow run")
    with _without_predict_hint():
        info = mlflow.pyfunc.log_model(
            name=artifact,
            python_model=str(python_model),
            artifacts={artifact: str(model_dir)},
            code_paths=[str(_LIBRARY)],  # the whole sslpipe package, as the pyfunc imports it
            pip_requirements=_PIP_REQUIREMENTS,
            registered_model_name=name,
            await_registration_for=0,
        )
    client = mlflow.MlflowClient()
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


def resolve_version(reference: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """``name`` | ``name/3`` | ``name@alias`` -> ``(name, version)`` of an existing version.

    Args:
        reference: the model reference.
        tracking_uri: the registry to look in; None: the one MLflow is pointed at. A given
            ``sqlite:`` store that does not exist yet is not created (it holds no model).

    Raises:
        ModelReferenceError: the reference is malformed, or the model, version or alias does
            not exist (the message lists what does).
    """
    name, version, alias = parse_reference(reference)
    mlflow = _mlflow()
    where = tracking_uri or mlflow.get_tracking_uri()
    client = _client(tracking_uri)
    versions = _versions(client, name) if client is not None else []
    if client is None or not versions:
        raise ModelReferenceError(f"no registered model named {name!r} in {where}")
    if alias:
        aliases = _aliases(client, name)
        if alias not in aliases:
            known = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items()))
            raise ModelReferenceError(
                f"registered model {name!r} has no alias {alias!r}; "
                + (f"its aliases are {known}" if known else "it has no aliases")
            )
        return name, aliases[alias]
    if version and version != "latest":
        if version not in versions:
            raise ModelReferenceError(
                f"registered model {name!r} has no version {version}; "
                f"its versions are {', '.join(sorted(versions, key=int))}"
            )
        return name, version
    return name, max(versions, key=int)


def model_version_identity(
    name: str, version: str, *, tracking_uri: str | None = None
) -> dict[str, str]:
    """What tells two same-numbered versions apart (in two registries, or in a registry wiped
    and filled again): the MLflow run that logged the version and when it was created."""
    client = _client(tracking_uri)
    if client is None:
        raise ModelReferenceError(f"no registered model named {name!r} in {tracking_uri}")
    found = client.get_model_version(name, version)
    return {"run_id": str(found.run_id or ""), "created": str(found.creation_timestamp or "")}


def _client(tracking_uri: str | None) -> MlflowClient | None:
    """A client of ``tracking_uri`` (None: MLflow's current one); None for a sqlite store that
    does not exist, which MLflow would otherwise create just to find it empty."""
    mlflow = _mlflow()
    if tracking_uri is None:
        return mlflow.MlflowClient()
    if tracking_uri.startswith("sqlite:///"):
        database = tracking_uri.removeprefix("sqlite:///").split("?")[0]
        # sqlite:////abs/path.db is absolute, sqlite:///rel.db relative to the current folder.
        if database not in ("", ":memory:") and not Path(database).is_file():
            return None
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _versions(client: MlflowClient, name: str) -> list[str]:
    if not _safe_name(name):
        return []
    return [str(v.version) for v in client.search_model_versions(f"name = '{name}'")]


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        model = client.get_registered_model(name)
    except _mlflow().exceptions.MlflowException:
        return {}
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def set_alias(name: str, version: str | int, alias: str) -> None:
    """Point ``name@alias`` at ``version`` (moving it from another version if needed).

    Raises:
        ModelReferenceError: the alias is not a valid alias name, or the version does not exist.
    """
    if not _ALIAS.match(alias) or alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ModelReferenceError(
            f"alias {alias!r} is not valid; use letters, digits, '_' and '-', starting with a "
            "letter (not 'latest' or 'v<number>')"
        )
    name, version = resolve_version(f"{name}/{version}")
    _mlflow().MlflowClient().set_registered_model_alias(name, alias, version)


def promote(reference: str, alias: str = "production") -> dict[str, Any]:
    """Set ``alias`` on the version ``reference`` names (``name``, ``name/3``, ``name@alias``).

    Returns:
        ``{"name", "version", "alias", "uri", "previous"}``; ``previous`` is the version the
        alias pointed at before, or None.
    """
    name, version = resolve_version(reference)
    previous = _aliases(_mlflow().MlflowClient(), name).get(alias)
    set_alias(name, version, alias)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "uri": f"models:/{name}@{alias}",
        "previous": previous,
    }


def load_classifier(reference: str) -> Any:
    """The registered classifier as an MLflow pyfunc model (``predict(images) -> DataFrame``).

    Raises:
        ModelReferenceError: the reference names nothing, or a model that is not a classifier.
    """
    return _load_registered(reference, "ImageClassifierModel", "an image classifier")


def load_embedder(reference: str) -> Any:
    """The registered backbone as an MLflow pyfunc model (``predict(images) -> (N, D)``)."""
    return _load_registered(reference, "BackboneEmbedder", "a backbone model")


def _load_registered(reference: str, expected_kind: str, description: str) -> Any:
    """The pyfunc model a reference points at now, refused unless it is ``expected_kind``."""
    name, version = resolve_version(reference)
    model = _load_pyfunc(reference, f"models:/{name}/{version}")
    kind = _python_model_kind(model)
    if kind != expected_kind:
        raise ModelReferenceError(
            f"{reference!r} ({name} version {version}) is not {description} ({kind})"
        )
    return model


def _python_model_kind(model: Any) -> str:
    try:
        return type(model.unwrap_python_model()).__name__
    except _mlflow().exceptions.MlflowException:
        return "not an sslpipe pyfunc model"


def _load_pyfunc(reference: str, uri: str) -> Any:
    mlflow = _mlflow()
    try:
        with _without_predict_hint():
            return mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException as err:
        raise ModelReferenceError(f"cannot load {reference!r} ({uri}): {err.message}") from None


def download_model(reference: str) -> Path:
    """Download a registered model's files and return the local folder."""
    uri = model_uri(reference)
    mlflow = _mlflow()
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
