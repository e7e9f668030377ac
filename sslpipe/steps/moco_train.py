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
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from sslpipe.core import progress
from sslpipe.core.config import MocoConfig
from sslpipe.core.io import atomic_path, read_csv, read_optional_json, write_json
from sslpipe.core.logs import get_logger
from sslpipe.data.packed_images import open_packed
from sslpipe.models.backbone_io import save_backbone
from sslpipe.models.moco import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    MoCo,
    TwoCropsTransform,
    build_backbone,
    eval_transform,
    leave_one_out_knn_top1,
)
from sslpipe.models.moco.batch_augment import BatchMoCoV2Augment, crop_transform
from sslpipe.models.moco.epochs import EpochOrder, SeededItems
from sslpipe.models.moco.loading import LoaderPlan, loader_plan, views_plan
from sslpipe.models.moco.packed_loader import PackedCropLoader
from sslpipe.models.moco.split_bn import auto_splits
from sslpipe.models.registry import configure_tracking, download_model, register_backbone
from sslpipe.models.training import distributed, retrain_guard, tracking
from sslpipe.models.training.scaffold import (
    CHECKPOINT_FILE as CHECKPOINT_FILE,  # re-exported: the checkpoint's name in the folder
)
from sslpipe.models.training.scaffold import (
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


class ManifestImages(Dataset[Any]):
    """Images listed in a data_prep manifest, opened lazily and passed through ``transform``."""

    def __init__(self, root: Path, paths: list[str], transform: Any) -> None:
        self.root = root
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        with Image.open(self.root / self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


class ViewsWithId(Dataset[Any]):
    """``dataset``'s item followed by its index, the image id the queue keeps with each key
    (:meth:`sslpipe.models.moco.KeyQueue.negatives_mask`)."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (*self.dataset[index], index)


@dataclass
class MocoState(TrainingState):
    losses: list[float] = field(default_factory=list)  # per epoch
    knn: list[float] = field(default_factory=list)  # kNN monitor top-1, after ``knn_epochs``
    knn_epochs: list[int] = field(default_factory=list)  # 0: random init

    def __post_init__(self) -> None:
        # Checkpoints written before knn_every existed measured after every epoch.
        self.losses, self.knn = list(self.losses or []), list(self.knn or [])
        self.knn_epochs = list(self.knn_epochs or range(len(self.knn)))


def effective_sizes(config: MocoConfig, num_images: int, world_size: int = 1) -> tuple[int, int]:
    """Per-process batch size and queue size that fit ``num_images``, warning when changed.

    The queue must not hold more keys than there are other images, or an image's own earlier
    key (a positive) lands among its negatives. With several processes each one sees
    ``num_images // world_size`` images per epoch, and the queue, which receives the global
    batch (``batch x world_size`` keys) at every step, must be a multiple of it.
    """
    per_process = num_images // world_size
    if per_process < 2:
        raise ValueError(
            f"MoCo needs at least 2 images per process, the data has {num_images} for "
            f"{world_size} process(es)"
        )
    batch = min(config.batch_size, per_process)
    if batch < config.batch_size:
        log.warning(
            "batch_size %d > %d images per process: using %d", config.batch_size, per_process, batch
        )
    global_batch = batch * world_size
    limit = max(global_batch, (num_images - global_batch) // global_batch * global_batch)
    queue = config.queue_size
    if world_size > 1 and queue % global_batch:
        if batch == config.batch_size:
            raise ValueError(
                f"queue_size {queue} is not a multiple of the global batch {global_batch} "
                f"(batch_size {batch} x {world_size} processes); every step enqueues one global "
                f"batch, so set queue_size to a multiple of {global_batch}"
            )
        queue = max(global_batch, queue // global_batch * global_batch)
    if queue > limit:
        log.warning(
            "queue_size %d exceeds what %d images support without positives among the negatives;"
            " shrinking it to %d",
            queue,
            num_images,
            limit,
        )
        queue = limit
    return batch, queue


def bn_splits(config: MocoConfig, batch: int) -> int:
    """Split-BN groups of one process's batch (``config.bn_splits``, 0: about 32 images each)."""
    if config.bn != "shuffle":
        return 1
    if config.bn_splits:
        if batch % config.bn_splits:
            raise ValueError(
                f"moco.bn_splits {config.bn_splits} does not divide the batch of {batch} "
                "images; choose a divisor of moco.batch_size, or 0 for one group per 32 images"
            )
        return config.bn_splits
    return auto_splits(batch)


def build_model(
    config: MocoConfig, queue_size: int, device: torch.device | None = None, batch: int = 0
) -> MoCo:
    """The MoCo model of ``config`` with a queue of ``queue_size`` keys; ``batch`` (default
    ``config.batch_size``) sizes the split-BN groups of one process."""
    backbone, feature_dim = build_backbone(BackboneSpec(config.backbone, config.small_stem))
    model = MoCo(
        backbone,
        feature_dim,
        projection_hidden_dim=config.projection_hidden_dim,
        projection_dim=config.projection_dim,
        queue_size=queue_size,
        key_momentum=config.key_momentum,
        temperature=config.temperature,
        bn=config.bn,  # type: ignore[arg-type]  # validated by MocoConfig
        bn_splits=bn_splits(config, batch or config.batch_size),
    )
    model = model.to(memory_format=torch.channels_last)
    return model if device is None else model.to(device)


def batch_augment(config: MocoConfig) -> BatchMoCoV2Augment:
    """The batched part of the configured MoCo v2 recipe (the crop runs in the loader)."""
    return BatchMoCoV2Augment(
        config.image_size,
        jitter_strength=config.jitter_strength,
        jitter_p=config.jitter_p,
        grayscale_p=config.grayscale_p,
        blur_p=config.blur_p,
        horizontal_flip_p=config.horizontal_flip_p,
        vertical_flip_p=0.5 if config.vertical_flip else 0.0,
        rotation_degrees=config.rotation_degrees,
    )


def _loader(
    dataset: Dataset[Any], order: EpochOrder, batch: int, plan: LoaderPlan
) -> DataLoader[Any]:
    """The streaming loader of every epoch (``order.set_epoch`` before each): its workers live
    through the run instead of being forked anew every epoch (:mod:`sslpipe.models.moco.epochs`)."""
    return DataLoader(
        SeededItems(ViewsWithId(dataset), order.seed),
        batch_size=batch,
        sampler=order,
        drop_last=True,
        num_workers=plan.workers,
        persistent_workers=plan.workers > 0,
        pin_memory=plan.pin_memory,
        prefetch_factor=plan.prefetch_factor,
    )


def _views_loader(
    config: MocoConfig,
    data_dir: Path,
    paths: list[str],
    dataset: Dataset[Any],
    order: EpochOrder,
    batch: int,
    device: torch.device,
) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The loader of the views' crops, packed or streaming (:mod:`sslpipe.models.moco.loading`),
    logging what was chosen and why."""
    packed = open_packed(data_dir, paths) if config.views != "stream" else "moco.views=stream"
    plan = views_plan(config.views, packed, device)
    if plan.source == "packed" and not isinstance(packed, str):
        log.info("views: cut in batches from the packed images (%s)", plan.reason)
        return PackedCropLoader(
            packed,
            order,
            batch,
            image_size=config.image_size,
            min_scale=config.crop_min_scale,
            device=device,
            on_device=plan.on_device,
        )
    workers = loader_plan(config.num_workers, device, config.processes_per_node)
    log.info(
        "views: decoded from the JPEGs by %d DataLoader worker(s) (%s; %s)",
        workers.workers,
        plan.reason,
        workers.reason,
    )
    return _loader(dataset, order, batch, workers)


def uses_bf16(config: MocoConfig, device: torch.device) -> bool:
    """Whether the training step runs under bf16 autocast (``moco.precision``)."""
    if config.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return config.precision == "bf16"


def lr_at(config: MocoConfig, epoch: float, done: float = 0.0) -> float:
    """Learning rate at ``epoch + done`` (``done``: the share of the epoch's steps): cosine
    decay (MoCo v2) scaled by a linear warm-up over ``config.warmup_epochs``. A pure function
    of the position, so a resumed run needs no scheduler state.

    The warm-up keeps the first steps, while the backbone's features still share one large
    common component, from dragging every embedding along one direction faster than the key
    encoder follows (on MNIST at 32 px, 8 epochs: kNN 0.815 with 2 warm-up epochs, 0.772
    without, 0.804 at random initialisation).
    """
    position = epoch + done
    cosine = config.lr * 0.5 * (1.0 + math.cos(math.pi * position / config.epochs))
    if config.warmup_epochs <= 0:
        return cosine
    return cosine * min(1.0, position / config.warmup_epochs)


def _to_device_channels_last(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def _train_epoch(
    model: MoCo,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | None = None,
    augment: BatchMoCoV2Augment | None = None,
    lr_at: Callable[[float], float] | None = None,
    bf16: bool = False,
    desc: str = "training",
) -> tuple[float, int]:
    """One pass over this process's images: (mean loss over all processes, steps).

    With ``augment``, the loader yields ``uint8`` crops and the rest of the MoCo v2 recipe
    runs here, batched, on ``device`` (see :mod:`sslpipe.models.moco.batch_augment`). With
    ``lr_at``,
    step ``i`` of ``n`` trains at ``lr_at((i + 1) / n)``. With ``bf16``, the forward pass runs
    under bf16 autocast. The losses add up on the device: nothing in a step waits for it
    (the progress shown as ``desc`` counts steps, and reads no tensor).
    """
    device = device or torch.device("cpu")
    model.train()
    total, steps = torch.zeros((), dtype=torch.float64, device=device), 0
    count = len(loader)  # type: ignore[arg-type]
    for x_query, x_key, ids in progress.bar(loader, desc=desc, total=count, unit="batch"):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at((steps + 1) / count)
        if augment is not None:
            x_query = augment(x_query.to(device, non_blocking=True))
            x_key = augment(x_key.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(
                _to_device_channels_last(device, x_query),
                _to_device_channels_last(device, x_key),
                ids.to(device, non_blocking=True),
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
    mean = (total / max(1, steps)).reshape(1)
    return float(distributed.all_gather(mean).mean()), steps


@torch.no_grad()
def monitor_images(data_dir: Path, paths: list[str], image_size: int) -> torch.Tensor:
    """The kNN monitor's images, decoded once: (N, 3, S, S) ``uint8``, as ``eval_transform``
    sees them before it normalises (shorter side resized, centre crop)."""
    steps = eval_transform(image_size).transforms[:3]  # RGB, resize, centre crop
    dataset = ManifestImages(data_dir, paths, T.Compose([*steps, T.PILToTensor()]))
    batches = DataLoader(dataset, batch_size=256, num_workers=0)
    decoded = []
    with progress.bar(desc="kNN monitor: decoding", total=len(dataset), unit="img") as shown:
        for batch in batches:
            decoded.append(batch)
            shown.update(len(batch))
    return torch.cat(decoded)


@torch.no_grad()
def knn_monitor(
    model: MoCo,
    images: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    device: torch.device | None = None,
) -> float:
    """Leave-one-out kNN top-1 of the labelled ``images`` (from :func:`monitor_images`) on
    frozen backbone features, computed on ``device``."""
    device = device or torch.device("cpu")
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    embedded = []
    with progress.bar(desc="kNN monitor", total=len(images), unit="img") as shown:
        for batch in images.split(256):
            embedded.append(
                model.embed(
                    _to_device_channels_last(device, batch).float().div_(255).sub_(mean).div_(std)
                )
            )
            shown.update(len(batch))
    return leave_one_out_knn_top1(torch.cat(embedded), labels.to(device), k=k)


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
    with training_session(env, log) as device:
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
        loader = _views_loader(
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
            loss, steps = _train_epoch(
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
        spec = BackboneSpec(config.backbone, config.small_stem)
        save_backbone(
            model_dir, model.backbone, spec, image_size=config.image_size, lineage=lineage
        )
        _plot_losses(model_dir / "loss_curve.png", losses, knn, knn_epochs)
        write_json(model_dir / "metrics.json", metrics_out)
        run.log_artifact(model_dir / "loss_curve.png")
        registered = None
        if register:
            registered = register_backbone(
                model_dir,
                name=config.model_name,
                tags=_lineage_tags(lineage),
                description=f"MoCo v2 {config.backbone} backbone",
            )
            write_json(model_dir / "registered_model.json", registered)
            log.info("registered %s (version %s)", registered["uri"], registered["version"])
    return {"metrics": metrics_out, "registered": registered}


def _lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    import json

    return {
        f"lineage.{k}": v if isinstance(v, str) else json.dumps(v)
        for k, v in lineage.items()
        if v is not None
    }
