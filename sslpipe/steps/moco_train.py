"""moco_train: MoCo v2 pre-training of a ResNet backbone on the prepared images.

Inputs: a data_prep output folder (manifest.csv, images/, selection.json).
Outputs:
    model/       backbone.pt + backbone.json (see sslpipe.models.backbone_io), loss_curve.png,
                 metrics.json, registered_model.json
    checkpoint/  last.pt, rewritten atomically after every epoch; ``resume`` continues from it

One DataLoader, whose workers persist, serves every epoch; each image's views are drawn with a
seed of their own, so a resumed run trains exactly like one that never stopped
(sslpipe.models.moco.epochs).

Several processes (torchrun, or Azure ML's PyTorch distribution; see
sslpipe.models.training.distributed): every process trains on its own shard of the images
(sslpipe.models.moco.epochs.EpochOrder) with ``batch_size`` images per step, so the global batch,
which the queue receives at every step, is ``batch_size x WORLD_SIZE``; the learning rate is not
rescaled. The query encoder is wrapped in DistributedDataParallel and keys are gathered from all
processes before they are enqueued (sslpipe.models.moco.MoCo.distribute). Rank 0 alone writes
checkpoints, logs, metrics, plots, the kNN monitor and the model, and registers it; every process
resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sslpipe.core.config import MocoConfig
from sslpipe.core.io import atomic_path, read_csv, read_optional_json, write_json
from sslpipe.core.logs import get_logger
from sslpipe.models.backbone_io import save_backbone
from sslpipe.models.moco import BackboneSpec, MoCo, TwoCropsTransform
from sslpipe.models.moco.batch_augment import crop_transform
from sslpipe.models.moco.epochs import EpochOrder
from sslpipe.models.moco.loading import ManifestImages, views_loader
from sslpipe.models.moco.recipe import batch_augment, build_model, effective_sizes, lr_at, uses_bf16
from sslpipe.models.moco.train import knn_monitor, monitor_images, train_epoch
from sslpipe.models.registry import configure_tracking, download_model, register_backbone
from sslpipe.models.training import distributed, retrain_guard, tracking
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

log = get_logger("moco_train")

EpochCallback = Callable[[int, torch.nn.Module], None]
"""``on_epoch(epoch, backbone)`` of :func:`run_moco_train`."""

RESUMABLE_CHANGES = frozenset({"num_workers", "views", "knn_every"})
"""Settings a run may be resumed with other values of: they choose how the images are fed and
watched, not what is trained. (``views`` changes the random stream, never the distribution.)"""


@dataclass
class MocoState(TrainingState):
    losses: list[float] = field(default_factory=list)  # per epoch
    knn: list[float] = field(default_factory=list)  # kNN monitor top-1, after ``knn_epochs``
    knn_epochs: list[int] = field(default_factory=list)  # 0: random init

    def __post_init__(self) -> None:
        # Checkpoints written before knn_every existed measured after every epoch.
        self.losses, self.knn = list(self.losses or []), list(self.knn or [])
        self.knn_epochs = list(self.knn_epochs or range(len(self.knn)))


def _monitored_after(config: MocoConfig, epoch: int) -> bool:
    """Whether the kNN monitor runs after ``epoch`` (1, 2, ...): every ``knn_every``-th and
    the last."""
    every = config.knn_every
    return epoch == config.epochs or (every > 0 and epoch % every == 0)


def _plot_losses(path: Path, losses: list[float], knn: list[float], knn_epochs: list[int]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(losses) + 1)
    ax.plot(epochs, losses, marker="o", label="contrastive loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    lines = ax.get_lines()
    if knn:
        ax2 = ax.twinx()
        ax2.plot(
            knn_epochs,
            knn,
            color="tab:orange",
            marker="s",
            label="kNN top-1 (epoch 0: random init)",
        )
        ax2.set_ylabel("kNN top-1 (labelled images)")
        lines = [*lines, *ax2.get_lines()]
    ax.legend(handles=lines, loc="best", fontsize="small")
    ax.set_title("MoCo v2 pre-training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _setup_fingerprint(config: MocoConfig) -> str:
    """What determines the backbone besides the data: every setting but those that only choose
    how the images are fed and watched (:data:`RESUMABLE_CHANGES`)."""
    return retrain_guard.setup_fingerprint(
        config.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES))
    )


def _reuse_registered(model_dir: Path, decision: retrain_guard.GuardDecision) -> None:
    """Fill ``model_dir`` with the registered backbone that stays, so later steps can use it."""
    assert decision.previous is not None
    folder = download_model(f"{decision.previous['name']}/{decision.previous['version']}")
    found = [p.parent for p in folder.rglob("backbone.json")]
    if not found:
        raise ValueError(f"{decision.previous['uri']} holds no backbone.json to reuse")
    model_dir.mkdir(parents=True, exist_ok=True)
    for path in found[0].iterdir():
        if path.is_file() and path.name != "registered_model.json":
            with atomic_path(model_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)
    retrain_guard.write_skipped(model_dir, decision, step="moco_train")


def _guard(data_dir: Path, model_dir: Path, config: MocoConfig, main: bool) -> str | None:
    """The reason to skip training (model_dir then holds the kept backbone), or None to train."""
    configure_tracking()  # the registry lives where tracking points
    return skip_reason(
        config.model_name,
        data=retrain_guard.data_fingerprint(data_dir),
        setup=_setup_fingerprint(config),
        main=main,
        kept="backbone",
        keep=functools.partial(_reuse_registered, model_dir),
    )


def run_moco_train(
    *,
    data_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    config: MocoConfig,
    resume: bool = True,
    register: bool = True,
    skip_unchanged: bool = False,
    env: distributed.DistEnv | None = None,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Pre-train, checkpoint every epoch, write the backbone folder and register it.

    ``on_epoch(epoch, backbone)``, when given, is called on rank 0 after every epoch (1, 2, ...)
    with the query backbone, for evaluations beyond the kNN monitor (benchmarks); it must leave
    the backbone's weights alone (its mode is reset before training goes on).

    With ``skip_unchanged`` (the retraining guard, :mod:`sslpipe.models.training.retrain_guard`),
    nothing is trained when the data and settings equal those of the latest registered
    version of ``config.model_name``: ``model_dir`` then receives that version's files and
    ``skipped.json``, and the result's ``skipped`` says why.

    Runs in one process, or in each of ``config.nodes x config.processes_per_node`` processes
    started by torchrun or Azure ML (``env``: default, read from the environment). Every
    process returns the metrics; only rank 0 writes ``model_dir`` and ``checkpoint_dir``.

    Raises:
        ValueError: the data is too small, the checkpoint has another configuration, or the
            number of processes is not the configured one.
        tracking.MlflowMissingError: ``register`` or ``skip_unchanged`` without MLflow.
    """
    env = distributed.DistEnv.from_env() if env is None else env
    check_process_count(
        "moco_train", env, nodes=config.nodes, processes_per_node=config.processes_per_node
    )
    if register:  # before training, not after it
        tracking.require_mlflow("moco_train with register=True (the model registry)")
    if skip_unchanged:
        reason = _guard(Path(data_dir), Path(model_dir), config, env.is_main)
        if reason is not None:
            return {"metrics": None, "registered": None, "skipped": reason}
    with training_session(env) as device:
        return _run(
            data_dir=data_dir,
            model_dir=model_dir,
            checkpoint_dir=checkpoint_dir,
            config=config,
            resume=resume,
            register=register,
            env=env,
            device=device,
            on_epoch=on_epoch,
        )


def _run(
    *,
    data_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    config: MocoConfig,
    resume: bool,
    register: bool,
    env: distributed.DistEnv,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    main = env.is_main
    torch.manual_seed(config.seed)
    manifest = read_csv(data_dir / "manifest.csv", required=("id", "path", "label"))
    batch, queue = effective_sizes(config, len(manifest), env.world_size)
    model = build_model(config, queue, device, batch)
    optimizer = torch.optim.SGD(
        model.query_parameters(),
        lr=config.lr,
        momentum=config.sgd_momentum,
        weight_decay=config.weight_decay,
        # One fused kernel for the whole update instead of a loop over parameter tensors.
        fused=device.type in ("cpu", "cuda"),
    )
    # Every process loads rank 0's checkpoint (map_location cpu, then onto its device).
    checkpoint = Checkpoint(checkpoint_dir)
    identity = {"config": config.model_dump(mode="json")}
    loaded = (
        checkpoint.resume(model, identity, optimizer=optimizer, may_change=RESUMABLE_CHANGES)
        if resume
        else None
    )
    state = MocoState.from_payload(loaded) if loaded else MocoState()
    losses, knn, knn_epochs = state.losses, state.knn, state.knn_epochs
    distributed.check_same_start(state.epoch, checkpoint_dir, device)
    model.distribute(device_ids=[device.index] if device.type == "cuda" else None)

    # MoCo v2's augmentations in two parts: the random crop per image in the DataLoader
    # workers (small uint8 crops), the photometric ops and flips batched on the device.
    augment = batch_augment(config)
    train_set = ManifestImages(
        data_dir,
        list(manifest["path"]),
        TwoCropsTransform(crop_transform(config.image_size, min_scale=config.crop_min_scale)),
    )
    labelled = manifest[manifest["label"] != ""]
    classes = sorted(set(labelled["label"]))
    knn_labels = torch.tensor([classes.index(c) for c in labelled["label"]], dtype=torch.long)
    monitor = main and len(classes) >= 2
    knn_images = (
        monitor_images(data_dir, list(labelled["path"]), config.image_size) if monitor else None
    )

    selection = read_optional_json(data_dir / "selection.json")
    params = {
        **config.model_dump(mode="json"),
        "effective_batch_size": batch,
        "effective_queue_size": queue,
        "world_size": env.world_size,
        "global_batch_size": batch * env.world_size,
        "num_images": len(manifest),
    }
    tracker = step_tracker(env)
    with tracking_run(
        tracker, step="moco_train", state=state, main=main, params=lambda: params
    ) as run:
        if knn_images is not None and not knn:
            knn.append(knn_monitor(model, knn_images, knn_labels, config.knn_k, device))
            knn_epochs.append(0)
            run.log_metric("knn_top1", knn[0], step=0)
            log.info(
                "epoch 0 (random init): kNN top-1 %.3f on %d labelled images", knn[0], len(labelled)
            )
        if env.is_distributed:
            log.info(
                "data parallel over %d processes (%s): %d images per process and step, "
                "global batch %d, bn=%s",
                env.world_size,
                device.type,
                batch,
                batch * env.world_size,
                config.bn,
            )
        order = EpochOrder(train_set, seed=config.seed, rank=env.rank, world_size=env.world_size)
        loader = views_loader(
            config, data_dir, list(manifest["path"]), train_set, order, batch, device
        )
        bf16 = uses_bf16(config, device)
        log.info("precision: %s", "bf16 autocast" if bf16 else "fp32")
        for epoch in range(state.epoch, config.epochs):
            # Seeding per epoch makes an epoch's shuffle and augmentations a function of
            # (seed, epoch, rank) alone, so a resumed run continues like an uninterrupted one:
            # the batched augmentations here, the crops in the loader (per item).
            torch.manual_seed(distributed.epoch_seed(config.seed, epoch, env.rank))
            order.set_epoch(epoch)
            started = time.perf_counter()
            loss, steps = train_epoch(
                model,
                loader,
                optimizer,
                device,
                augment,
                lr_at=functools.partial(lr_at, config, epoch),
                bf16=bf16,
                desc=f"epoch {epoch + 1}/{config.epochs}",
            )
            lr = float(optimizer.param_groups[0]["lr"])
            seconds = time.perf_counter() - started
            distributed.check_replicas_agree([*model.parameters(), model.queue.keys], device)
            losses.append(loss)
            images = steps * batch * env.world_size
            metrics = {"loss": loss, "lr": lr, "images_per_s": images / seconds}
            if knn_images is not None and _monitored_after(config, epoch + 1):
                knn.append(knn_monitor(model, knn_images, knn_labels, config.knn_k, device))
                knn_epochs.append(epoch + 1)
                metrics["knn_top1"] = knn[-1]
            state.epoch = epoch + 1
            if not main:
                continue
            run.log_metrics(metrics, step=epoch + 1)
            log.info(
                "epoch %d/%d: loss %.4f, lr %.4f, %.1f images/s%s",
                epoch + 1,
                config.epochs,
                loss,
                lr,
                metrics["images_per_s"],
                f", kNN top-1 {knn[-1]:.3f}" if "knn_top1" in metrics else "",
            )
            checkpoint.save(
                model=model,
                optimizer=optimizer,
                state=state,
                identity=identity,
                world_size=env.world_size,
            )
            if on_epoch is not None:
                on_epoch(epoch + 1, model.backbone)
        del loader  # its workers end now rather than when the step's process does

        metrics_out = {
            "final_loss": losses[-1],
            "losses": losses,
            "knn_top1": knn,
            "knn_epochs": knn_epochs,
            "epochs": config.epochs,
            "num_images": len(manifest),
        }
        if not main:
            return {"metrics": metrics_out, "registered": None}
        assert run is not None
        lineage = {
            "filter": selection.get("filter"),
            "metadata_store": selection.get("metadata_store"),
            "num_images": len(manifest),
            "num_labelled": len(labelled),
            "data_fingerprint": retrain_guard.data_fingerprint(data_dir),
            "setup_fingerprint": _setup_fingerprint(config),
            "mlflow_run_id": run.run_id,
            "pipeline_run_id": os.environ.get("SSLPIPE_RUN_ID"),
        }
        registered = _save_outputs(
            model_dir, model, config, state, metrics_out, lineage, run, register=register
        )
    return {"metrics": metrics_out, "registered": registered}


def _save_outputs(
    model_dir: Path,
    model: MoCo,
    config: MocoConfig,
    state: MocoState,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    run: Any,
    *,
    register: bool,
) -> dict[str, Any] | None:
    """Write the backbone folder (weights, config, lineage), its loss curve and metrics, track
    them and, with ``register``, register the backbone: the registered version, or None."""
    spec = BackboneSpec(config.backbone, config.small_stem)
    save_backbone(model_dir, model.backbone, spec, image_size=config.image_size, lineage=lineage)
    _plot_losses(model_dir / "loss_curve.png", state.losses, state.knn, state.knn_epochs)
    write_json(model_dir / "metrics.json", metrics)
    run.log_artifact(model_dir / "loss_curve.png")
    if not register:
        return None
    registered = register_backbone(
        model_dir,
        name=config.model_name,
        tags=_lineage_tags(lineage),
        description=f"MoCo v2 {config.backbone} backbone",
    )
    write_json(model_dir / "registered_model.json", registered)
    log.info("registered %s (version %s)", registered["uri"], registered["version"])
    return registered


def _lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    import json

    return {
        f"lineage.{k}": v if isinstance(v, str) else json.dumps(v)
        for k, v in lineage.items()
        if v is not None
    }


__all__ = [
    "CHECKPOINT_FILE",
    "RESUMABLE_CHANGES",
    "EpochCallback",
    "MocoState",
    "run_moco_train",
]
