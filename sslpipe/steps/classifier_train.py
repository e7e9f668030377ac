"""classifier_train: the seed's head on a (pre-trained) backbone, with early stopping.

Inputs: a labelled data_prep output folder (manifest.csv with split and repeats, labels.json,
selection.json, images) and optionally a backbone folder (moco_train's ``model`` output); without
one the backbone comes from ``config.backbone`` (see :mod:`sslpipe.models.classifier.backbones`).

Modes:
    head       the backbone is frozen (no gradients, eval mode: its BN statistics do not move)
               and only the head is trained with Adam.
    two_stage  stage 1 as ``head`` for ``epochs``; stage 2 starts from the best stage-1 model and
               fine-tunes the whole network for ``finetune_epochs`` at ``finetune_lr``.

Early stopping watches the validation macro-F1 (``patience`` epochs without improvement end a
stage); the best epoch's model over both stages is the one saved.

Outputs:
    model/       classifier.pt + classifier.json (see sslpipe.models.classifier.model), curves.png,
                 history.json (per epoch), train_metrics.json (best epoch, stopped early)
    checkpoint/  last.pt, rewritten atomically after every epoch; ``resume`` continues from it

The model is not registered here: the evaluate step registers it after measuring it.

Several processes (torchrun, or Azure ML's PyTorch distribution; see
sslpipe.models.training.distributed): every process trains on its own shard of the training images
(DistributedSampler) with ``batch_size`` images per step, so the global batch is ``batch_size x
WORLD_SIZE``; the learning rate is not rescaled. The trained part (the head, or the whole network
when fine-tuning) is wrapped in DistributedDataParallel; the frozen backbone stays outside it. Every
process predicts its share of the validation images, the logits are gathered and scored on every
process, and rank 0's scores are broadcast, so that every process takes the same best-epoch and
early-stop decisions. Rank 0 alone writes checkpoints, history, curves, the model folder and MLflow;
every process resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sslpipe.core.config import ClassifierConfig
from sslpipe.core.io import read_optional_json, write_json
from sslpipe.core.logs import get_logger
from sslpipe.models.classifier.augment import eval_transform, train_transform
from sslpipe.models.classifier.backbones import resolve_backbone
from sslpipe.models.classifier.model import ClassifierHead, ImageClassifier, save_classifier
from sslpipe.models.classifier.parallel import (
    batches,
    mean_over_processes,
    replicate,
    sharded_batches,
    validate_sharded,
)
from sslpipe.models.classifier.train import (
    EarlyStopping,
    LabelledData,
    LabelledImageDataset,
    evaluate,
    expand_repeats,
    make_criterion,
    plot_curves,
    read_labelled_data,
    set_backbone_trainable,
    train_epoch,
    trainable_parameters,
)
from sslpipe.models.training import distributed, retrain_guard
from sslpipe.models.training.scaffold import (
    CHECKPOINT_FILE,
    Checkpoint,
    TrainingState,
    check_process_count,
    skip_reason,
    step_tracker,
    tracking_run,
    training_session,
)

log = get_logger("classifier_train")

HISTORY_FILE = "history.json"
METRICS_FILE = "train_metrics.json"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class Stage:
    name: str  # "head" or "finetune"
    epochs: int
    lr: float
    backbone_frozen: bool


def stages_for(config: ClassifierConfig) -> list[Stage]:
    """The training stages of ``config.mode``."""
    stages = [Stage("head", config.epochs, config.lr, backbone_frozen=True)]
    if config.mode == "two_stage" and config.finetune_epochs > 0:
        stages.append(
            Stage("finetune", config.finetune_epochs, config.finetune_lr, backbone_frozen=False)
        )
    return stages


@dataclass
class ClassifierState(TrainingState):
    """``epoch`` counts the epochs of every stage."""

    stage: int = 0  # index of the stage under way (len(stages) when all are done)
    stage_epoch: int = 0  # epochs done in that stage
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: list[str] = field(default_factory=list)  # names of stages stopped early


def build_classifier(
    backbone: torch.nn.Module, feature_dim: int, num_classes: int, config: ClassifierConfig
) -> ImageClassifier:
    head = ClassifierHead(
        feature_dim, num_classes, hidden_dim=config.hidden_dim, dropout=config.dropout
    )
    return ImageClassifier(backbone, head)


def _setup_fingerprint(config: ClassifierConfig, backbone: dict[str, Any]) -> str:
    """What determines the classifier besides the data: its settings (but the worker count,
    and the backbone reference, which the local executor pins to a version: the backbone is
    known by what it is, :func:`_backbone_identity`)."""
    settings = config.model_dump(mode="json", exclude={"num_workers", "backbone"})
    return retrain_guard.setup_fingerprint({"config": settings, "backbone": backbone})


def _guard(model_name: str, model_dir: Path, *, data: str, setup: str, main: bool) -> str | None:
    """The reason to skip training (``model_dir`` then holds ``skipped.json``), or None."""

    def keep(decision: retrain_guard.GuardDecision) -> None:
        retrain_guard.write_skipped(model_dir, decision, step="classifier_train")

    return skip_reason(model_name, data=data, setup=setup, main=main, kept="classifier", keep=keep)


def _backbone_identity(lineage: dict[str, Any]) -> dict[str, Any]:
    """The part of the backbone lineage that must not change between a run and its resume."""
    pretraining = lineage.get("pretraining") or {}
    return {
        **{k: lineage.get(k) for k in ("kind", "backbone", "name", "version", "init")},
        "pretraining_run": pretraining.get("mlflow_run_id"),
        "pretraining_data": pretraining.get("data_fingerprint"),
    }


def _identity(
    config: ClassifierConfig, fingerprint: str, backbone: dict[str, Any]
) -> dict[str, Any]:
    return {
        "config": config.model_dump(mode="json"),
        "data_fingerprint": fingerprint,
        "backbone": backbone,
    }


def run_classifier_train(
    *,
    data_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    config: ClassifierConfig,
    backbone_dir: Path | None = None,
    resume: bool = True,
    skip_unchanged: bool = False,
    model_name: str = "image-classifier",
    env: distributed.DistEnv | None = None,
) -> dict[str, Any]:
    """Train the classifier, checkpoint every epoch and write the classifier folder.

    With ``skip_unchanged`` (the retraining guard, :mod:`sslpipe.models.training.retrain_guard`),
    nothing is trained when the data, settings and backbone equal those of the latest
    registered version of ``model_name`` (the name evaluate registers under): ``model_dir``
    then holds only ``skipped.json`` and the result's ``skipped`` says why.

    Runs in one process, or in each of ``config.nodes x config.processes_per_node`` processes
    started by torchrun or Azure ML (``env``: default, read from the environment). Every
    process returns the result; only rank 0 writes ``model_dir`` and ``checkpoint_dir``.

    Returns:
        ``{"metrics": train_metrics.json's content, "history": per-epoch rows,
        "lineage": the classifier's lineage}``, plus ``"skipped"`` (the reason) when the
        guard skipped training.

    Raises:
        ValueError: bad data (no train or val rows, a label missing from labels.json), an
            unknown backbone, a backbone folder whose weights do not fit, a resume against a
            checkpoint of a different configuration, data or backbone, or a number of
            processes other than the configured one.
    """
    env = distributed.DistEnv.from_env() if env is None else env
    check_process_count(
        "classifier_train",
        env,
        nodes=config.nodes,
        processes_per_node=config.processes_per_node,
        settings="classifier.",
    )
    with training_session(env) as device:
        return _run(
            data_dir=Path(data_dir),
            model_dir=Path(model_dir),
            checkpoint_dir=Path(checkpoint_dir),
            config=config,
            backbone_dir=backbone_dir,
            resume=resume,
            guard_model=model_name if skip_unchanged else None,
            env=env,
            device=device,
        )


@dataclass
class _Training:
    """What every epoch of one run uses, built once by :func:`_run`."""

    config: ClassifierConfig
    env: distributed.DistEnv
    device: torch.device
    model: ImageClassifier
    num_classes: int
    train_set: LabelledImageDataset
    val_set: LabelledImageDataset
    batch: int  # per process and step
    val_batch: int
    criterion: torch.nn.Module  # scores validation logits on the CPU
    train_criterion: torch.nn.Module  # on the device
    stopper: EarlyStopping
    checkpoint: Checkpoint
    identity: dict[str, Any]
    val_loader: DataLoader[Any] | None = None  # one process only


def _run(
    *,
    data_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    config: ClassifierConfig,
    backbone_dir: Path | None,
    resume: bool,
    guard_model: str | None,
    env: distributed.DistEnv,
    device: torch.device,
) -> dict[str, Any]:
    main = env.is_main
    torch.manual_seed(config.seed)
    data = read_labelled_data(data_dir)
    if data.ignored_rows:
        log.warning("%d manifest rows outside train/val/test are ignored", data.ignored_rows)
    tracker = step_tracker(env)  # the registry lives where tracking points
    backbone, spec, backbone_lineage = resolve_backbone(config.backbone, backbone_dir=backbone_dir)
    fingerprint = retrain_guard.data_fingerprint(data_dir)
    setup = _setup_fingerprint(config, _backbone_identity(backbone_lineage))
    if guard_model is not None:
        reason = _guard(guard_model, model_dir, data=fingerprint, setup=setup, main=main)
        if reason is not None:
            return {"metrics": None, "history": [], "lineage": None, "skipped": reason}
    model = build_classifier(backbone, spec.feature_dim, len(data.classes), config).to(device)
    train_rows = expand_repeats(data.split("train"))
    training = _Training(
        config=config,
        env=env,
        device=device,
        model=model,
        num_classes=len(data.classes),
        train_set=LabelledImageDataset(
            data_dir,
            train_rows,
            train_transform(
                config.image_size, vertical_flip_p=0.5 if config.vertical_flip else 0.0
            ),
        ),
        val_set=LabelledImageDataset(
            data_dir, data.split("val"), eval_transform(config.image_size)
        ),
        batch=_batch_size(config, len(train_rows), env.world_size),
        val_batch=max(64, config.batch_size),
        criterion=make_criterion(data.class_weights),
        train_criterion=make_criterion(data.class_weights).to(device),
        stopper=EarlyStopping(config.patience),
        checkpoint=Checkpoint(checkpoint_dir),
        identity=_identity(config, fingerprint, _backbone_identity(backbone_lineage)),
    )
    if not env.is_distributed:
        training.val_loader = batches(
            training.val_set, training.val_batch, config.num_workers, seed=None
        )
    state, optimizer_state = _resume(training, resume, checkpoint_dir)

    num_images = {**data.counts(), "train_drawn_per_epoch": len(train_rows)}
    balance = (
        "class_weight"
        if data.class_weights is not None
        else "oversample"
        if (data.split("train")["repeats"] > 1).any()
        else "none"
    )
    log.info(
        "%s: %d classes, images %s, balance %s, mode %s",
        data_dir,
        len(data.classes),
        num_images,
        balance,
        config.mode,
    )
    if env.is_distributed:
        log.info(
            "data parallel over %d processes (%s): %d images per process and step, global batch %d",
            env.world_size,
            device.type,
            training.batch,
            training.batch * env.world_size,
        )

    selection = read_optional_json(data_dir / "selection.json")
    params = {
        **config.model_dump(mode="json"),
        "backbone_source": backbone_lineage["source"],
        "backbone_init": backbone_lineage["init"],
        "backbone_version": backbone_lineage.get("version"),
        "num_classes": len(data.classes),
        "balance": balance,
        "world_size": env.world_size,
        "global_batch_size": training.batch * env.world_size,
        **{f"num_{k}": v for k, v in num_images.items()},
    }
    stages = stages_for(config)
    with tracking_run(
        tracker, step="classifier_train", state=state, main=main, params=lambda: params
    ) as run:
        while state.stage < len(stages):
            _train_stage(training, stages[state.stage], state, optimizer_state, run)
            optimizer_state = None  # only the stage a run resumes in continues an optimizer

        stopper = training.stopper
        if stopper.best_state is None:  # pragma: no cover - every stage runs >= 1 epoch
            raise RuntimeError("no epoch was trained")
        model.load_state_dict(stopper.best_state)
        lineage = {
            "backbone": backbone_lineage,
            "filter": selection.get("filter"),
            "metadata_store": selection.get("metadata_store"),
            "label_level": data.level,
            "balance": balance,
            "num_images": num_images,
            "data_fingerprint": fingerprint,
            "setup_fingerprint": setup,
            "mlflow_run_id": state.mlflow_run_id,
            "pipeline_run_id": os.environ.get("SSLPIPE_RUN_ID"),
            "mode": config.mode,
            "best_epoch": stopper.best_epoch,
        }
        metrics = _train_metrics(config, stages, state, stopper, data, num_images)
        if not main:
            return {"metrics": metrics, "history": state.history, "lineage": lineage}
        save_classifier(
            model_dir,
            model,
            spec=spec,
            classes=data.classes,
            hidden_dim=config.hidden_dim,
            dropout=config.dropout,
            image_size=config.image_size,
            lineage=lineage,
        )
        _write_outputs(model_dir, state, metrics, run, title=f"classifier ({config.mode})")
        log.info(
            "best epoch %d (%s): val macro-F1 %.3f, accuracy %.3f; saved to %s",
            stopper.best_epoch,
            metrics["best_stage"],
            metrics["best_val_macro_f1"],
            metrics["best_val_accuracy"],
            model_dir,
        )
    return {"metrics": metrics, "history": state.history, "lineage": lineage}


def _train_metrics(
    config: ClassifierConfig,
    stages: list[Stage],
    state: ClassifierState,
    stopper: EarlyStopping,
    data: LabelledData,
    num_images: dict[str, int],
) -> dict[str, Any]:
    """``train_metrics.json``: the best epoch's scores, the stages as they ran, the data."""
    best_row = next(r for r in state.history if r["epoch"] == stopper.best_epoch)
    return {
        "mode": config.mode,
        "best_epoch": stopper.best_epoch,
        "best_stage": best_row["stage"],
        "best_val_macro_f1": best_row["val_macro_f1"],
        "best_val_accuracy": best_row["val_accuracy"],
        "best_val_loss": best_row["val_loss"],
        "epochs_run": state.epoch,
        "stopped_early": bool(state.stopped_early),
        "stopped_early_stages": state.stopped_early,
        "stages": [
            {
                "name": s.name,
                "epochs": s.epochs,
                "lr": s.lr,
                "epochs_run": sum(1 for r in state.history if r["stage"] == s.name),
            }
            for s in stages
        ],
        "patience": config.patience,
        "classes": data.classes,
        "num_images": num_images,
        "class_weighted_loss": data.class_weights is not None,
        "mlflow_run_id": state.mlflow_run_id,
    }


def _batch_size(config: ClassifierConfig, train_rows: int, world_size: int) -> int:
    """One process's batch: ``config.batch_size``, or fewer when the shard is smaller."""
    if train_rows < 2:
        raise ValueError(f"classifier_train needs at least 2 training images, found {train_rows}")
    per_process = train_rows // world_size
    if per_process < 2:
        raise ValueError(
            f"classifier_train needs at least 2 training images per process, found "
            f"{train_rows} for {world_size} processes; run fewer processes"
        )
    return min(config.batch_size, per_process)


def _resume(
    training: _Training, resume: bool, checkpoint_dir: Path
) -> tuple[ClassifierState, dict[str, Any] | None]:
    """The state to start from and the optimizer state to continue (every process loads rank
    0's checkpoint), with the same weights everywhere, frozen backbone included."""
    loaded = training.checkpoint.resume(training.model, training.identity) if resume else None
    state, optimizer_state = ClassifierState(), None
    if loaded is not None:
        training.stopper.load_state_dict(loaded["early_stopping"])
        state, optimizer_state = ClassifierState.from_payload(loaded), loaded["optimizer"]
    distributed.check_same_start(state.epoch, checkpoint_dir, training.device)
    if training.env.is_distributed:
        model = training.model
        distributed.broadcast_([*model.parameters(), *model.buffers()])
    return state, optimizer_state


def _train_stage(
    training: _Training,
    stage: Stage,
    state: ClassifierState,
    optimizer_state: dict[str, Any] | None,
    run: Any,
) -> None:
    """Train ``stage`` from where ``state`` stands until its last epoch or its early stop,
    checkpointing after every epoch; ``state`` then points at the next stage."""
    model, stopper = training.model, training.stopper
    if state.stage > 0 and state.stage_epoch == 0 and stopper.best_state is not None:
        # Fine-tuning starts from the best head, not from the last (possibly worse) one.
        model.load_state_dict(stopper.best_state)
        log.info("stage %s starts from epoch %d's model", stage.name, stopper.best_epoch)
    set_backbone_trainable(model, not stage.backbone_frozen)
    replica = replicate(model, backbone_frozen=stage.backbone_frozen, device=training.device)
    optimizer = torch.optim.Adam(
        trainable_parameters(model), lr=stage.lr, weight_decay=training.config.weight_decay
    )
    if optimizer_state is not None and state.stage_epoch > 0:
        optimizer.load_state_dict(optimizer_state)
    while state.stage_epoch < stage.epochs:
        row = _train_epoch(training, stage, state, optimizer, replica)
        if run is not None:
            scalars = {k: float(v) for k, v in row.items() if k not in ("epoch", "stage", "best")}
            run.log_metrics(scalars, step=state.epoch)
        log.info(
            "epoch %d (%s %d/%d): train loss %.4f acc %.3f | val loss %.4f acc %.3f "
            "macro-F1 %.3f%s",
            state.epoch,
            stage.name,
            state.stage_epoch,
            stage.epochs,
            row["train_loss"],
            row["train_accuracy"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_macro_f1"],
            " (best)" if row["best"] else "",
        )
        # The same scores everywhere, so every process stops at the same epoch.
        stop = stopper.should_stop
        finished = stop or state.stage_epoch >= stage.epochs
        if stop:
            state.stopped_early.append(stage.name)
            log.info(
                "early stop of stage %s: no better val macro-F1 for %d epochs",
                stage.name,
                stopper.bad_epochs,
            )
        if finished:
            state.stage, state.stage_epoch = state.stage + 1, 0
            stopper.reset_patience()
        if training.env.is_main:
            training.checkpoint.save(
                model=model,
                optimizer=None if finished else optimizer,
                state=state,
                identity=training.identity,
                early_stopping=stopper.state_dict(),
            )
        if finished:
            break
    # Drop this stage's wrapper (and its gradient hooks) before the next one wraps.
    del replica


def _train_epoch(
    training: _Training,
    stage: Stage,
    state: ClassifierState,
    optimizer: torch.optim.Optimizer,
    replica: torch.nn.Module | None,
) -> dict[str, Any]:
    """Train one epoch and validate: its history row, appended to ``state.history``."""
    config, env, device, model = training.config, training.env, training.device, training.model
    # Seeding per epoch makes an epoch a function of (seed, epoch, rank) alone, so a resumed
    # run continues exactly like an uninterrupted one.
    torch.manual_seed(distributed.epoch_seed(config.seed, state.epoch, env.rank))
    loader = (
        sharded_batches(
            training.train_set,
            training.batch,
            config.num_workers,
            seed=config.seed,
            epoch=state.epoch,
            env=env,
        )
        if env.is_distributed
        else batches(
            training.train_set, training.batch, config.num_workers, seed=config.seed + state.epoch
        )
    )
    started = time.perf_counter()
    done = state.stage_epoch + 1
    shown = f"epoch {state.epoch + 1} ({stage.name} {done}/{stage.epochs})"
    train_loss, train_accuracy = train_epoch(
        model,
        loader,
        optimizer,
        training.train_criterion,
        backbone_frozen=stage.backbone_frozen,
        trained=replica,
        device=device,
        desc=shown,
    )
    train_loss, train_accuracy = mean_over_processes([train_loss, train_accuracy], device)
    val = _validate(training)
    state.epoch += 1
    state.stage_epoch += 1
    improved = training.stopper.step(val["macro_f1"], state.epoch, model)
    row: dict[str, Any] = {
        "epoch": state.epoch,
        "stage": stage.name,
        "stage_epoch": state.stage_epoch,
        "lr": stage.lr,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_macro_f1": val["macro_f1"],
        "best": improved,
        "seconds": round(time.perf_counter() - started, 3),
    }
    state.history.append(row)
    return row


def _validate(training: _Training) -> dict[str, float]:
    """Validation scores, the same in every process."""
    model, device = training.model, training.device
    if training.env.is_distributed:
        # Fine-tuning moves BN statistics per process: rank 0's are kept.
        distributed.broadcast_(list(model.buffers()))
        distributed.check_replicas_agree([*model.parameters(), *model.buffers()], device)
        return validate_sharded(
            model,
            training.val_set,
            training.criterion,
            batch=training.val_batch,
            workers=training.config.num_workers,
            num_classes=training.num_classes,
            device=device,
        )
    assert training.val_loader is not None
    if device.type == "cpu":  # CPU batches stay where the loader made them
        return evaluate(model, training.val_loader, training.criterion)
    return evaluate(model, training.val_loader, training.criterion, device)


def _write_outputs(
    model_dir: Path, state: ClassifierState, metrics: dict[str, Any], run: Any, *, title: str
) -> None:
    """The history, metrics and curves beside the saved classifier, and their tracking."""
    write_json(model_dir / HISTORY_FILE, state.history)
    write_json(model_dir / METRICS_FILE, metrics)
    plot_curves(model_dir / CURVES_FILE, state.history, title=title)
    run.log_metrics(
        {
            "best_val_macro_f1": metrics["best_val_macro_f1"],
            "best_val_accuracy": metrics["best_val_accuracy"],
            "best_epoch": float(metrics["best_epoch"]),
        }
    )
    run.set_tags({"stopped_early": str(metrics["stopped_early"]).lower()})
    for name in (CURVES_FILE, METRICS_FILE, HISTORY_FILE):
        run.log_artifact(model_dir / name)


__all__ = [
    "CHECKPOINT_FILE",
    "CURVES_FILE",
    "HISTORY_FILE",
    "METRICS_FILE",
    "Stage",
    "build_classifier",
    "run_classifier_train",
    "stages_for",
]
