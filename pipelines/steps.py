"""Sub-graphs shared by the pipelines, called inside a ``@dsl.pipeline`` body.

Each function adds nodes to the pipeline being built and names them, so that the same step
has the same name (and log prefix) in every pipeline that uses it.
"""

from typing import Any

from azure.ai.ml import PyTorchDistribution
from azure.ai.ml.entities import JobResourceConfiguration

from pipelines.components import component
from sslpipe.core.config import ClassifierConfig, PipelineConfig

BASELINE_INPUTS = ("baseline", "baseline_scratch")
"""evaluate's optional inputs for the baselines' reports: the seed's (random init, frozen,
head only) and the one trained from scratch (two-stage)."""


def _named(node: Any, name: str) -> Any:
    node.name = name
    return node


def _distributed(node: Any, *, nodes: int, processes_per_node: int) -> Any:
    """Run ``node`` as ``processes_per_node`` processes on each of ``nodes`` machines.

    PyTorch distribution: Azure ML starts the processes itself, the local executor with
    torchrun. The step gets the same two values as inputs and checks them against WORLD_SIZE.
    """
    node.distribution = PyTorchDistribution(process_count_per_instance=processes_per_node)
    node.resources = JobResourceConfiguration(instance_count=nodes)
    return node


def select_and_prepare(
    config: PipelineConfig,
    *,
    metadata_uri: Any,
    blob_uri: Any,
    image_filter: Any,
    labelled: bool,
    suffix: str = "",
) -> Any:
    """connect_db -> data_prep; returns the data_prep node (its output ``data``).

    With ``data_prep.nodes`` > 1 the data_prep node runs on that many machines, one process
    each (PyTorch distribution, for the RANK and WORLD_SIZE it shards the ids by).
    """
    labels = config.labels
    selection: dict[str, Any] = {"mode": "labelled" if labelled else "all"}
    if labelled:
        selection |= {
            "min_agreement": labels.min_agreement,
            "split": ",".join(str(share) for share in labels.split),
            "split_seed": labels.seed,
            "pin_sortout_testset": labels.pin_sortout_testset,
            "balance": labels.balance,
        }
    connect_db = component("connect_db")(
        metadata_uri=metadata_uri,
        blob_uri=blob_uri,
        filter=image_filter,
        label_level=labels.level,
        **selection,
    )
    _named(connect_db, f"connect_db{suffix}")
    prep = config.data_prep
    data_prep = component("data_prep")(
        selection=connect_db.outputs.selection,
        blob_uri=blob_uri,
        image_size=prep.image_size,
        concurrency=prep.concurrency,
        max_skipped_fraction=prep.max_skipped_fraction,
        nodes=prep.nodes,
        cache_max_mb=prep.cache_max_mb,
    )
    if prep.nodes > 1:
        data_prep.distribution = PyTorchDistribution(process_count_per_instance=1)
        data_prep.resources = JobResourceConfiguration(instance_count=prep.nodes)
    return _named(data_prep, f"data_prep{suffix}")


def train_and_evaluate(
    config: PipelineConfig,
    *,
    data: Any,
    classifier: ClassifierConfig,
    backbone_model: Any = None,
    baselines: dict[str, Any] | None = None,
    register: bool = True,
    prefix: str = "",
) -> Any:
    """classifier_train -> evaluate; returns the evaluate node (its output ``report``).

    classifier_train runs ``classifier.processes_per_node`` processes on each of
    ``classifier.nodes`` machines. ``baselines`` binds evaluate's baseline inputs
    (``baseline``, ``baseline_scratch``) to other evaluate nodes' ``report`` outputs.
    """
    baselines = baselines or {}
    unknown = sorted(set(baselines) - set(BASELINE_INPUTS))
    if unknown:
        raise ValueError(f"evaluate has no baseline input {unknown[0]!r}; it has {BASELINE_INPUTS}")
    inputs = classifier.model_dump(mode="json")
    if register:  # the guard compares with the model evaluate registers; a baseline trains
        inputs |= {
            "skip_unchanged": bool(config.retrain.skip_unchanged),
            "model_name": config.evaluate.model_name,
        }
    if backbone_model is not None:
        inputs["backbone_model"] = backbone_model
    train = component("classifier_train")(data=data, **inputs)
    _distributed(train, nodes=classifier.nodes, processes_per_node=classifier.processes_per_node)
    _named(train, f"{prefix}classifier_train")
    evaluation = {
        "min_macro_f1": config.evaluate.min_macro_f1,
        "model_name": config.evaluate.model_name,
        "register": register,
    }
    evaluation |= {name: report for name, report in baselines.items() if report is not None}
    evaluate = component("evaluate")(model=train.outputs.model, data=data, **evaluation)
    return _named(evaluate, f"{prefix}evaluate")


def moco_training(config: PipelineConfig, *, data: Any) -> Any:
    """moco_train on a data_prep output; returns the node (its output ``model``).

    The node runs ``moco.processes_per_node`` processes on each of ``moco.nodes`` machines.
    """
    moco = config.moco
    node = component("moco_train")(
        data=data,
        skip_unchanged=bool(config.retrain.skip_unchanged),
        **moco.model_dump(mode="json"),
    )
    _distributed(node, nodes=moco.nodes, processes_per_node=moco.processes_per_node)
    return _named(node, "moco_train")


def _random_init_backbone(config: PipelineConfig) -> str:
    """``torchvision:<moco backbone>[:small]``: moco's network, randomly initialised."""
    stem = ":small" if config.moco.small_stem else ""
    return f"torchvision:{config.moco.backbone}{stem}"


def baseline_classifier(config: PipelineConfig) -> ClassifierConfig:
    """The seed's baseline: the same network, randomly initialised and frozen, head only."""
    return config.classifier.model_copy(
        update={"backbone": _random_init_backbone(config), "mode": "head"}
    )


def scratch_classifier(config: PipelineConfig) -> ClassifierConfig:
    """The stronger baseline: the same network trained from scratch with the labels, two-stage
    (the head on the random-init backbone, then the whole network fine-tuned)."""
    return config.classifier.model_copy(
        update={"backbone": _random_init_backbone(config), "mode": "two_stage"}
    )
