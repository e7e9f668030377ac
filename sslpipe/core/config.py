"""The pipeline configuration: one validated model with layered sources.

Sources, later ones winning: the defaults below, a YAML file (``--config``), then ``--set
key=value`` overrides. Secrets are never part of it: they come from the environment or Azure
identity when a store is opened.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sslpipe.core.architectures import BACKBONES
from sslpipe.core.filters import ImageFilter
from sslpipe.core.uris import credential_in_uri, redact_uri


class ConfigError(ValueError):
    """The configuration is invalid; the message is one line a person can act on."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoresConfig(_Section):
    """Where metadata, images and MLflow runs live. Unset URIs default into the workspace."""

    metadata_uri: str | None = Field(None, description="sqlite:///… (default) or cosmos://…")
    blob_uri: str | None = Field(None, description="file:///… (default) or https://….blob…")
    tracking_uri: str | None = Field(None, description="MLflow tracking and registry URI")

    @field_validator("metadata_uri", "blob_uri", "tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A store URI is a literal pipeline input: recorded, logged and sent to Azure ML.
        found = credential_in_uri(value) if value else None
        if found:
            raise ValueError(
                f"the URI carries a credential ({found}); store URIs are recorded and logged, "
                f"so credentials come from the environment (e.g. AZURE_STORAGE_SAS_TOKEN, "
                f"AZURE_STORAGE_CONNECTION_STRING, SSLPIPE_COSMOS_KEY) or Azure identity; "
                f"remove it from stores.{info.field_name}"
            )
        return value


class DataPrepConfig(_Section):
    image_size: int = Field(72, ge=8, le=4096, description="shorter side after resizing, px")
    # Sized for the network, not the cores: images/s wanted x seconds a request takes (64 at
    # 20 ms: up to 3,200 images/s), shared out over the fetching processes (steps.data_prep).
    concurrency: int = Field(
        64, ge=1, le=512, description="blob downloads in flight, all processes together"
    )
    max_skipped_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="fail when more images than this fraction are unusable"
    )
    # Each node fetches the ids of its hash shard (sslpipe.steps.data_prep); more than one
    # needs Azure ML (distribution pytorch, instance_count = nodes).
    nodes: int = Field(1, ge=1, description="machines (Azure ML resources.instance_count)")
    # The workspace's image cache, shared by local runs (sslpipe.data.image_cache); Azure ML jobs
    # have no workspace folder and ignore it.
    cache_max_mb: int = Field(
        4096, ge=0, description="image cache bound, MiB, least recently used pruned (0: no cache)"
    )


class MocoConfig(_Section):
    """MoCo v2 pre-training. Defaults: REFERENCE §5 small-data practice, sized for 2 CPU cores."""

    backbone: str = Field("resnet18", description=f"one of {BACKBONES}")
    small_stem: bool = Field(False, description="3x3 stride-1 stem without max-pool (≈32 px)")
    # Sized for the demo on 2 CPU cores: its digits hold 8x8 pixels of information, and 32 px
    # crops train three times faster than 64 px ones, so 15 epochs fit in the demo's minutes.
    # Product photos: 96 px and more (the seed's 100 px; configs/azure.yaml uses 112).
    image_size: int = Field(32, ge=8, le=1024, description="crop size fed to the network, px")
    # The seed trained 100 epochs at batch 128 and lr 0.06 (Table 6.1). The demo default is
    # sized for 2 CPU cores: batch 64 gives twice the updates per epoch at the same image rate.
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=2)
    # The seed's lr 0.06 with MoCo v2's weight decay 1e-4, and the crop and jitter below: on
    # MNIST at 32 px the loss fell to 4.7 (chance 6.9) in 8 epochs, against 6.6 with lr 0.03,
    # weight decay 5e-4 and MoCo v2's full-strength augmentations (README, "MoCo pre-training").
    lr: float = Field(0.06, gt=0, description="SGD learning rate, cosine schedule")
    warmup_epochs: float = Field(
        2.0, ge=0, description="linear learning-rate warm-up, in epochs (0: none)"
    )
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    queue_size: int = Field(4096, ge=1, description="negatives K; shrunk when above the images")
    key_momentum: float = Field(0.99, ge=0, le=1)
    temperature: float = Field(0.2, gt=0)
    projection_dim: int = Field(128, ge=1)
    projection_hidden_dim: int = Field(2048, ge=1)
    # The MoCo v2 recipe (aug_plus, sslpipe.models.moco.batch_augment), at the strength that suits
    # the default small crops: a crop of at least half the image and half MoCo v2's colour jitter.
    # Colour photos at 96 px and more learn with MoCo v2's own 0.2 and 0.4 (configs/azure.yaml).
    crop_min_scale: float = Field(
        0.5, gt=0, le=1, description="smallest crop area, share of the image (MoCo v2: 0.2)"
    )
    jitter_strength: float = Field(
        0.2, ge=0, le=2, description="brightness/contrast/saturation jitter, hue a quarter (0.4)"
    )
    jitter_p: float = Field(0.8, ge=0, le=1, description="probability of the colour jitter")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="probability of grayscale")
    blur_p: float = Field(0.5, ge=0, le=1, description="probability of Gaussian blur")
    # Off by default: a mirrored digit, letter or logo is another thing, and views that must
    # match their mirror image teach the backbone to ignore what tells them apart (the demo's
    # digits at 32 px: kNN 0.915 at random init, 0.918 after 10 epochs with flips at 0.5,
    # 0.952 without). Photos of objects that look alike mirrored: 0.5 (configs/azure.yaml).
    horizontal_flip_p: float = Field(
        0.0, ge=0, le=1, description="probability of a horizontal flip (MoCo v2: 0.5)"
    )
    vertical_flip: bool = Field(False, description="the seed's extra augmentation")
    rotation_degrees: float = Field(0.0, ge=0, le=180, description="the seed's extra augmentation")
    # How the views are fed (sslpipe.models.moco.loading): sized to the machine unless set.
    views: str = Field(
        "auto",
        description="crops cut in batches from data_prep's packed array (packed), decoded from "
        "the JPEGs in workers (stream), or packed when it fits in memory (auto)",
    )
    num_workers: int = Field(
        -1, ge=-1, description="streaming DataLoader worker processes (-1: sized to the machine)"
    )
    precision: str = Field(
        "auto", description="bf16 autocast, fp32, or auto: bf16 on GPUs that support it"
    )
    seed: int = 0
    knn_k: int = Field(20, ge=1, description="neighbours of the kNN monitor")
    knn_every: int = Field(
        1, ge=0, description="kNN monitor every N epochs and after the last (0: last only)"
    )
    model_name: str = Field("moco-backbone", min_length=1, description="registered model name")
    # Distributed data-parallel training (sslpipe.models.training.distributed). batch_size is per
    # process: the global batch, which the queue receives at every step, is batch_size x nodes x
    # processes_per_node. A str rather than a Literal, like backbone, to mirror the component.
    bn: str = Field(
        "shuffle",
        description="shuffle-BN (split BN in one process), sync (SyncBatchNorm, DDP) or none",
    )
    bn_splits: int = Field(
        0, ge=0, description="one process, bn=shuffle: BN groups per batch (0: one per 32 images)"
    )
    nodes: int = Field(1, ge=1, description="machines (Azure ML resources.instance_count)")
    processes_per_node: int = Field(
        1, ge=1, description="training processes per machine (one per GPU); >1 runs torchrun"
    )

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        # A field validator, so that the error names the key ('moco.backbone').
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; expected one of {BACKBONES}")
        return value

    @field_validator("views")
    @classmethod
    def _known_views(cls, value: str) -> str:
        if value not in MOCO_VIEWS:
            raise ValueError(f"unknown views {value!r}; expected one of {MOCO_VIEWS}")
        return value

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        if value not in MOCO_PRECISIONS:
            raise ValueError(f"unknown precision {value!r}; expected one of {MOCO_PRECISIONS}")
        return value

    @field_validator("bn")
    @classmethod
    def _known_bn(cls, value: str) -> str:
        if value not in MOCO_BN_MODES:
            raise ValueError(f"unknown bn {value!r}; expected one of {MOCO_BN_MODES}")
        return value

    @field_validator("processes_per_node")
    @classmethod
    def _queue_takes_whole_global_batches(cls, value: int, info: ValidationInfo) -> int:
        # Declared last, so the fields it checks against are validated (when valid) by now.
        batch, queue, nodes = (info.data.get(k) for k in ("batch_size", "queue_size", "nodes"))
        if batch is None or queue is None or nodes is None or value * nodes == 1:
            return value
        global_batch = batch * value * nodes
        if queue % global_batch:
            raise ValueError(
                f"with {nodes} node(s) x {value} processes every step enqueues the global batch "
                f"of {global_batch} keys (batch_size {batch} per process), so queue_size must be "
                f"a multiple of {global_batch}, found {queue}; set moco.queue_size to "
                f"{max(global_batch, queue // global_batch * global_batch)} or change "
                "moco.batch_size"
            )
        return value


MOCO_BN_MODES = ("shuffle", "sync", "none")
"""moco.bn: as ``sslpipe.models.moco.ddp.BN_MODES`` (not imported here, to keep torch out)."""
MOCO_VIEWS = ("auto", "packed", "stream")
"""moco.views: where the crops come from (sslpipe.models.moco.loading)."""
MOCO_PRECISIONS = ("auto", "bf16", "fp32")
"""moco.precision: the training step's autocast (sslpipe.steps.moco_train)."""


class LabelsConfig(_Section):
    """connect_db's labelled mode: label resolution, split and class balance (classifier)."""

    level: int = Field(1, ge=1, description="taxonomy level of the label (1 = first level)")
    min_agreement: float = Field(
        0.0, ge=0, le=1, description="share of annotators that must agree on the winner"
    )
    split: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train, val and test shares, stratified by label"
    )
    seed: int = Field(0, description="seed of the split and of the oversampling")
    pin_sortout_testset: bool = Field(
        True, description="images with sortout_testset = true always go to the test split"
    )
    balance: Literal["oversample", "class_weight", "none"] = Field(
        "oversample", description="random oversampling of the train split, or a weighted loss"
    )

    @field_validator("split")
    @classmethod
    def _shares(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 for v in value) or abs(sum(value) - 1.0) > 1e-6 or value[0] <= 0:
            raise ValueError(f"split {list(value)} must be 3 non-negative shares summing to 1")
        return value


class ClassifierConfig(_Section):
    """classifier_train: the seed's head on a (frozen) backbone."""

    backbone: str = Field(
        "moco-backbone@latest",
        description="registered backbone (name, name/3, name@alias) or torchvision:resnet18",
    )
    mode: Literal["head", "two_stage"] = Field(
        "head", description="frozen backbone with head only, or probe then fine-tune"
    )
    hidden_dim: int = Field(256, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    # The size the backbone was pre-trained at (moco.image_size): the demo's 32 px backbone
    # gives kNN 0.960 on the labelled digits at 32 px but 0.923 at 64 px (random init: 0.915).
    image_size: int = Field(32, ge=8, le=1024, description="input size, px (moco.image_size)")
    epochs: int = Field(30, ge=1, description="head training epochs (stage 1)")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the head")
    weight_decay: float = Field(1e-4, ge=0)
    finetune_epochs: int = Field(10, ge=0, description="stage 2 epochs in two_stage mode")
    finetune_lr: float = Field(1e-4, gt=0, description="stage 2 learning rate, whole network")
    patience: int = Field(8, ge=1, description="early stopping on validation macro-F1")
    vertical_flip: bool = Field(
        False, description="also flip training images vertically (no canonical orientation)"
    )
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    # Distributed data-parallel training (sslpipe.models.training.distributed), as for moco:
    # batch_size is per process, so the global batch is batch_size x nodes x processes_per_node.
    nodes: int = Field(1, ge=1, description="machines (Azure ML resources.instance_count)")
    processes_per_node: int = Field(
        1, ge=1, description="training processes per machine (one per GPU); >1 runs torchrun"
    )


class EvaluateConfig(_Section):
    min_macro_f1: float = Field(
        0.5, ge=0, le=1, description="quality gate for the 'candidate' alias"
    )
    model_name: str = Field("image-classifier", min_length=1, description="registered name")


class TrainConfig(_Section):
    """Settings shared by both training steps; a step's own setting, when given, wins."""

    processes: int | None = Field(
        None, ge=1, description="moco.processes_per_node and classifier.processes_per_node"
    )
    nodes: int | None = Field(None, ge=1, description="moco.nodes and classifier.nodes")


# train.<key> -> the key it sets in each training step's section
_SHARED_TRAINING = {"processes": "processes_per_node", "nodes": "nodes"}
_TRAINING_STEPS = ("moco", "classifier")


class RetrainConfig(_Section):
    """The retraining guard (sslpipe.models.training.retrain_guard) of the steps that register
    a model."""

    skip_unchanged: bool | None = Field(
        None,
        description="skip training when data and settings equal the latest registered "
        "version's; unset: on for scheduled runs (--schedule), off otherwise",
    )


class AzureMLConfig(_Section):
    """``--backend azureml``: the workspace and compute targets. Identity-based auth only.

    Unset workspace settings fall back to the environment variables AZURE_SUBSCRIPTION_ID,
    AZURE_RESOURCE_GROUP and AZUREML_WORKSPACE_NAME when the job is submitted.
    """

    subscription_id: str | None = Field(None, description="or env AZURE_SUBSCRIPTION_ID")
    resource_group: str | None = Field(None, description="or env AZURE_RESOURCE_GROUP")
    workspace_name: str | None = Field(None, description="or env AZUREML_WORKSPACE_NAME")
    cpu_compute: str = Field("cpu-cluster", min_length=1, description="connect_db, data_prep…")
    gpu_compute: str = Field("gpu-cluster", min_length=1, description="the training steps")
    experiment_name: str | None = Field(None, description="default: the top-level experiment")
    output_dir: Path | None = Field(None, description="dry-run YAML; default <workspace>/azureml")


class PipelineConfig(_Section):
    workspace: Path = Field(Path(".sslpipe"), description="local folder for stores, runs, MLflow")
    experiment: str = Field("sslpipe", min_length=1, description="MLflow experiment name")
    backend: Literal["local", "azureml"] = "local"
    demo: bool = Field(True, description="build the demo catalog when the metadata store is empty")
    stores: StoresConfig = StoresConfig()
    filter: ImageFilter = ImageFilter()
    data_prep: DataPrepConfig = DataPrepConfig()
    train: TrainConfig = TrainConfig()
    moco: MocoConfig = MocoConfig()
    labels: LabelsConfig = LabelsConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    retrain: RetrainConfig = RetrainConfig()
    azureml: AzureMLConfig = AzureMLConfig()

    @model_validator(mode="before")
    @classmethod
    def _shared_training_settings(cls, data: Any) -> Any:
        """Copy ``train.*`` into the training steps' sections that do not set it themselves.

        Before validation, so that each section checks the value with its own rules (the
        queue of moco must hold whole global batches).
        """
        train = data.get("train") if isinstance(data, dict) else None
        if not isinstance(train, dict):
            return data
        data = dict(data)
        for key, target in _SHARED_TRAINING.items():
            if train.get(key) is None:
                continue
            for step in _TRAINING_STEPS:
                section = data.get(step) or {}
                if isinstance(section, dict) and target not in section:
                    data[step] = {**section, target: train[key]}
        return data

    def for_schedule(self) -> PipelineConfig:
        """The configuration of scheduled runs: the retraining guard on unless set off."""
        if self.retrain.skip_unchanged is not None:
            return self
        return self.model_copy(update={"retrain": RetrainConfig(skip_unchanged=True)})

    @property
    def workspace_dir(self) -> Path:
        return self.workspace.expanduser().resolve()

    @property
    def metadata_uri(self) -> str:
        return self.stores.metadata_uri or f"sqlite:///{self.workspace_dir / 'metadata.db'}"

    @property
    def blob_uri(self) -> str:
        return self.stores.blob_uri or (self.workspace_dir / "blobs" / "images").as_uri()

    @property
    def tracking_uri(self) -> str:
        return self.stores.tracking_uri or f"sqlite:///{self.workspace_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.workspace_dir / "mlartifacts"


def _yaml_problem(err: Exception) -> str:
    """A YAML error as one line: the problem and where it is (PyYAML's own text spans lines)."""
    import yaml  # only to read settings: the training core imports this module without it

    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return " ".join(f"{err.problem}{where}".split())
    return " ".join(str(err).split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"moco.epochs=3"`` -> ``(["moco", "epochs"], 3)``; the value is parsed as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set moco.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = _yaml_problem(err)
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem})") from None
    return key.strip().split("."), value


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _apply(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(err: ValidationError) -> str:
    known = known_keys(PipelineConfig)
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
        return f"unknown configuration key {key!r}{hint}"
    given = first.get("input")
    if key.startswith("stores.") and isinstance(given, str):
        given = redact_uri(given)  # never repeat a credential
    return f"invalid value for {key!r}: {first['msg']} (got {given!r})"


def load_config(
    path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides, validated once.

    Raises:
        ConfigError: with one line naming the key and the problem.
    """
    import yaml

    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason})"
            ) from None
        except yaml.YAMLError as err:
            problem = _yaml_problem(err)
            raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _apply(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
