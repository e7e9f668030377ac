"""Live state: what a step's result depends on beyond its code, parameters and input files.

The cache key covers the component, its code, its literal parameters and the content of its
input paths. Some steps also depend on state kept elsewhere, which can change between two runs
that have the same key:

* a **registry reference** such as ``moco-backbone@latest`` names another version once a new
  one is registered;
* a step that **registers** models (or reads them) does so in whatever registry
  ``MLFLOW_TRACKING_URI`` points at;
* ``torchvision:resnet18`` loads ImageNet weights only when they happen to be in the local
  **torch hub cache**.

A resolver turns that state into a :class:`LiveState` once per step, when a run starts (and
when a run is planned for ``--dry-run``): a reference becomes the concrete ``name/<version>``
that replaces the configured parameter, so the step trains on exactly what was keyed, and the
rest becomes part of the cache key. Both are written in ``run.json``; a resumed run keeps what
its start resolved, so that a checkpoint is never continued on another backbone.

:class:`RegistryLiveState` is that resolver, driven by a table of which component uses the
registry how (:data:`PROJECT_COMPONENTS` for this project's components). It also tells
``--dry-run`` the values a step will really use where the step adjusts its configuration to the
data (:func:`moco_effective_sizes`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sslpipe.core.logs import quieted
from sslpipe.execution.graph import StepSpec
from sslpipe.execution.hashing import hash_file

ALWAYS = "always"
"""``RegistryUse.registry_when`` for a step that uses the registry whatever its inputs."""

TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
TORCHVISION_PREFIX = "torchvision:"


class LiveStateError(ValueError):
    """A step's live state cannot be resolved (e.g. its reference names no model)."""


@dataclass(frozen=True)
class LiveState:
    """What a step depends on outside its code, parameters and input files.

    Attributes:
        parameters: values that replace configured parameters (a reference pinned to
            ``name/<version>``); the step is given these.
        key: added to the cache key (registry URI, model versions, cached weights).
        notes: one sentence per resolved value, for the console and ``--dry-run``.
    """

    parameters: dict[str, Any] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form (the step record's ``live``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LiveState:
        """Rebuild from :meth:`to_dict` output (a resumed run keeps its start's state)."""
        return cls(
            parameters=dict(data.get("parameters") or {}),
            key=dict(data.get("key") or {}),
            notes=dict(data.get("notes") or {}),
        )


@dataclass(frozen=True)
class Effective:
    """A value the step will use instead of the configured one, and why."""

    value: Any
    why: str


class LiveStateResolver(Protocol):
    """Resolves live state for the local executor (see the module docstring)."""

    def resolve(
        self, step: StepSpec, parameters: Mapping[str, Any], env: Mapping[str, str]
    ) -> LiveState:
        """The step's live state. Raises LiveStateError when it cannot be resolved."""
        ...

    def effective(
        self, step: StepSpec, parameters: Mapping[str, Any], inputs: Mapping[str, str]
    ) -> dict[str, Effective]:
        """Parameters the step will adjust to its inputs, with the values it will use."""
        ...


EffectiveValues = Callable[[Mapping[str, Any], Mapping[str, str]], dict[str, Effective]]


@dataclass(frozen=True)
class RegistryUse:
    """How one component depends on the model registry and the torch hub cache.

    Attributes:
        references: string inputs that hold a model reference (``name``, ``name/3``,
            ``name@alias``); other values (``torchvision:...``) are left alone.
        unless_bound: the references are not used when this input is bound (classifier_train
            takes moco_train's model folder instead of its ``backbone`` reference).
        registry_when: when the step registers or reads models: :data:`ALWAYS`, the name of a
            boolean input that says so, or None (only through ``references``).
        torchvision: string inputs that may name ``torchvision:<arch>``, whose ImageNet
            weights are loaded when they are in the local hub cache.
    """

    references: tuple[str, ...] = ()
    unless_bound: str | None = None
    registry_when: str | None = None
    torchvision: tuple[str, ...] = ()


class RegistryLiveState:
    """The live state of components that use the model registry or torchvision's weights."""

    def __init__(
        self,
        components: Mapping[str, RegistryUse],
        effective: Mapping[str, EffectiveValues] | None = None,
    ) -> None:
        """
        Args:
            components: component name (as in its YAML) -> how it uses the registry.
            effective: component name -> a function of (parameters, input paths) that says
                which values the step will use instead of the configured ones.
        """
        self.components = dict(components)
        self.effective_values = dict(effective or {})
        self._weights_memo: dict[tuple[str, int, int], str] = {}

    def resolve(
        self, step: StepSpec, parameters: Mapping[str, Any], env: Mapping[str, str]
    ) -> LiveState:
        """Pin the step's references and key it on its registry and cached weights.

        Raises:
            LiveStateError: a reference names no model, version or alias in the registry.
        """
        use = self.components.get(step.component_name)
        if use is None:
            return LiveState()
        uri = env.get(TRACKING_URI_VARIABLE) or _default_tracking_uri()
        state = LiveState()
        if use.unless_bound is None or use.unless_bound not in step.bindings:
            for name in use.references:
                _pin_reference(state, name, parameters.get(name), uri)
            for name in use.torchvision:
                self._key_cached_weights(state, name, parameters.get(name))
        if state.parameters or _uses_registry(use, parameters):
            # Models registered in (or read from) another registry are other models.
            state.key["tracking_uri"] = uri
        return state

    def effective(
        self, step: StepSpec, parameters: Mapping[str, Any], inputs: Mapping[str, str]
    ) -> dict[str, Effective]:
        """The values the step will use where it adjusts its configuration to its inputs."""
        values = self.effective_values.get(step.component_name)
        return values(parameters, inputs) if values else {}

    def _key_cached_weights(self, state: LiveState, name: str, value: Any) -> None:
        """Key on the torchvision checkpoint the step would load from the hub cache, if any."""
        if not isinstance(value, str) or not value.strip().startswith(TORCHVISION_PREFIX):
            return
        from sslpipe.models.classifier.backbones import (
            cached_torchvision_checkpoint,
            parse_torchvision_source,
        )

        try:
            spec = parse_torchvision_source(value)
        except ValueError:
            return  # the step itself fails and says why
        if spec.small_stem:
            return  # the small stem never loads ImageNet weights: the cache does not matter
        checkpoint = cached_torchvision_checkpoint(spec.name)
        identity = None if checkpoint is None else self._weights_identity(checkpoint)
        state.key[f"{name}.torchvision_weights"] = identity
        where = f"{checkpoint.name} in the torch hub cache" if checkpoint else "random init"
        state.notes[name] = f"{value}: {where}"

    def _weights_identity(self, checkpoint: Path) -> str:
        """The checkpoint's name and content hash (hashed once per file version)."""
        stat = checkpoint.stat()
        memo = (str(checkpoint), stat.st_size, stat.st_mtime_ns)
        if memo not in self._weights_memo:
            self._weights_memo[memo] = f"{checkpoint.name}:{hash_file(checkpoint)}"
        return self._weights_memo[memo]


def _default_tracking_uri() -> str:
    """MLflow's own default, named explicitly so that looking in it never creates it."""
    from sslpipe.models.training.tracking import require_mlflow

    return str(require_mlflow("the model registry").get_tracking_uri())


def _uses_registry(use: RegistryUse, parameters: Mapping[str, Any]) -> bool:
    if use.registry_when is None:
        return False
    return use.registry_when == ALWAYS or bool(parameters.get(use.registry_when))


def _pin_reference(state: LiveState, name: str, value: Any, tracking_uri: str) -> None:
    """Replace a model reference by the version it names now, keyed by that version's identity."""
    from sslpipe.models.registry import (
        ModelReferenceError,
        model_version_identity,
        parse_reference,
        resolve_version,
    )

    if not isinstance(value, str) or value.strip().startswith(TORCHVISION_PREFIX):
        return
    try:
        parse_reference(value)
    except ModelReferenceError:
        return  # not a reference: the step decides what it means
    try:
        model, version = resolve_version(value, tracking_uri=tracking_uri)
        identity = model_version_identity(model, version, tracking_uri=tracking_uri)
    except ModelReferenceError as err:
        raise LiveStateError(f"input {name!r} = {value!r}: {err}") from None
    pinned = f"{model}/{version}"
    state.parameters[name] = pinned
    state.key[f"{name}.model"] = {"name": model, "version": version, **identity}
    state.notes[name] = f"{value} is {pinned}" if value.strip() != pinned else pinned


# --------------------------------------------------------------------------- this project

PROJECT_COMPONENTS: dict[str, RegistryUse] = {
    # Registers the backbone; with skip_unchanged its guard also reads the registry.
    "sslpipe_moco_train": RegistryUse(registry_when=ALWAYS),
    # Trains on a registered backbone (unless given moco_train's folder) or on torchvision's
    # network; its guard reads the registry with skip_unchanged.
    "sslpipe_classifier_train": RegistryUse(
        references=("backbone",),
        unless_bound="backbone_model",
        registry_when="skip_unchanged",
        torchvision=("backbone",),
    ),
    # Registers the classifier when asked to.
    "sslpipe_evaluate": RegistryUse(registry_when="register"),
}
"""How this project's components use the registry (names as in components/*/component.yaml)."""


def moco_effective_sizes(
    parameters: Mapping[str, Any], inputs: Mapping[str, str]
) -> dict[str, Effective]:
    """The batch and queue moco_train will use on its data (see ``effective_sizes``)."""
    manifest = Path(inputs.get("data", "")) / "manifest.csv"
    configured = parameters.get("queue_size")
    if not manifest.is_file():
        why = "configured; shrunk if the prepared images are too few, known after data_prep"
        return {"queue_size": Effective(configured, why)}
    from sslpipe.core.config import MocoConfig
    from sslpipe.models.moco import recipe

    config = MocoConfig(**{k: parameters[k] for k in MocoConfig.model_fields if k in parameters})
    images = _count_rows(manifest)
    try:
        with quieted(recipe.log):  # its warnings say the same, for the real run
            batch, queue = recipe.effective_sizes(
                config, images, config.nodes * config.processes_per_node
            )
    except ValueError as err:
        return {"queue_size": Effective(configured, f"the step would fail: {err}")}
    found: dict[str, Effective] = {}
    if batch != config.batch_size:
        found["batch_size"] = Effective(
            batch, f"configured {config.batch_size}; {images} images per process allow {batch}"
        )
    if queue != config.queue_size:
        found["queue_size"] = Effective(
            queue,
            f"configured {config.queue_size}; {images} images support {queue} keys without "
            "an image's own key among its negatives",
        )
    return found


def project_live_state() -> RegistryLiveState:
    """The resolver for this project's pipelines."""
    return RegistryLiveState(
        PROJECT_COMPONENTS, effective={"sslpipe_moco_train": moco_effective_sizes}
    )


def _count_rows(table: Path) -> int:
    with open(table, newline="", encoding="utf-8") as handle:
        return max(0, sum(1 for _ in csv.reader(handle)) - 1)


__all__ = [
    "ALWAYS",
    "PROJECT_COMPONENTS",
    "Effective",
    "LiveState",
    "LiveStateError",
    "LiveStateResolver",
    "RegistryLiveState",
    "RegistryUse",
    "moco_effective_sizes",
    "project_live_state",
]
