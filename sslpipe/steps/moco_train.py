"""moco_train: MoCo v2 pre-training of a ResNet backbone on the prepared images.

Inputs: a data_prep output folder (manifest.csv, images/, selection.json).
Outputs:
    model/       backbone.pt + backbone.json (see sslpipe.backbone_io), loss_curve.png,
                 metrics.json, registered_model.json
    checkpoint/  last.pt, rewritten atomically after every epoch; ``resume`` continues from it
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sslpipe.backbone_io import save_backbone
from sslpipe.config import MocoConfig
from sslpipe.io import atomic_path, read_csv, read_optional_json, write_json
from sslpipe.logs import get_logger
from sslpipe.moco import (
    BackboneSpec,
    MoCo,
    TwoCropsTransform,
    build_backbone,
    eval_transform,
    leave_one_out_knn_top1,
    moco_v2_transform,
)
from sslpipe.registry import configure_tracking, parent_run_tags, register_backbone

log = get_logger("moco_train")

CHECKPOINT_FILE = "last.pt"


class ImageFolderDataset(Dataset[Any]):
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


@dataclass
class TrainingState:
    epoch: int = 0
    losses: list[float] | None = None
    knn: list[float] | None = None
    mlflow_run_id: str | None = None


def effective_sizes(config: MocoConfig, num_images: int) -> tuple[int, int]:
    """Batch size and queue size that fit ``num_images``, with a warning when changed.

    The queue must not hold more keys than there are other images, or an image's own earlier
    key (a positive) lands among its negatives.
    """
    if num_images < 2:
        raise ValueError(f"MoCo needs at least 2 images, the data has {num_images}")
    batch = min(config.batch_size, num_images)
    if batch < config.batch_size:
        log.warning("batch_size %d > %d images: using %d", config.batch_size, num_images, batch)
    limit = max(batch, (num_images - batch) // batch * batch)
    queue = config.queue_size
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


def build_model(config: MocoConfig, queue_size: int) -> MoCo:
    backbone, feature_dim = build_backbone(BackboneSpec(config.backbone, config.small_stem))
    return MoCo(
        backbone,
        feature_dim,
        projection_hidden_dim=config.projection_hidden_dim,
        projection_dim=config.projection_dim,
        queue_size=queue_size,
        key_momentum=config.key_momentum,
        temperature=config.temperature,
    ).to(memory_format=torch.channels_last)


def _loader(dataset: Dataset[Any], batch: int, workers: int, seed: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
    )


def _lr_at(config: MocoConfig, epoch: int) -> float:
    """Cosine schedule over epochs (MoCo v2), as a pure function so resume needs no state."""
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))


def _train_epoch(model: MoCo, loader: DataLoader[Any], optimizer: torch.optim.Optimizer) -> float:
    model.train()
    total, steps = 0.0, 0
    for x_query, x_key in loader:
        loss = model(
            x_query.contiguous(memory_format=torch.channels_last),
            x_key.contiguous(memory_format=torch.channels_last),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return total / max(1, steps)


@torch.no_grad()
def knn_monitor(model: MoCo, dataset: ImageFolderDataset, labels: torch.Tensor, k: int) -> float:
    """Leave-one-out kNN top-1 of the labelled images on frozen backbone features."""
    model.eval()
    loader = DataLoader(dataset, batch_size=256, shuffle=False, num_workers=0)
    features = torch.cat(
        [model.embed(x.contiguous(memory_format=torch.channels_last)) for x in loader]
    )
    return leave_one_out_knn_top1(features, labels, k=k)


def _save_checkpoint(
    folder: Path,
    model: MoCo,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    config: MocoConfig,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "losses": state.losses,
        "knn": state.knn,
        "mlflow_run_id": state.mlflow_run_id,
        "config": config.model_dump(mode="json"),
    }
    with atomic_path(folder / CHECKPOINT_FILE) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(
    folder: Path, model: MoCo, optimizer: torch.optim.Optimizer, config: MocoConfig
) -> TrainingState | None:
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["config"] != config.model_dump(mode="json"):
        raise ValueError(
            f"cannot resume from {path}: it was written with a different configuration; "
            "start a fresh run instead of --resume"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    log.info("resuming from %s after epoch %d", path, payload["epoch"])
    return TrainingState(
        payload["epoch"], payload["losses"], payload["knn"], payload["mlflow_run_id"]
    )


def _plot_losses(path: Path, losses: list[float], knn: list[float]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(losses) + 1)
    ax.plot(epochs, losses, marker="o", label="contrastive loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    lines = ax.get_lines()
    if knn:
        ax2 = ax.twinx()
        ax2.plot(
            range(len(knn)),
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


def _fingerprint(manifest_path: Path) -> str:
    return hashlib.sha256(manifest_path.read_bytes()).hexdigest()[:16]


def run_moco_train(
    *,
    data_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    config: MocoConfig,
    resume: bool = True,
    register: bool = True,
) -> dict[str, Any]:
    """Pre-train, checkpoint every epoch, write the backbone folder and register it."""
    torch.manual_seed(config.seed)
    manifest = read_csv(data_dir / "manifest.csv", required=("id", "path", "label"))
    batch, queue = effective_sizes(config, len(manifest))
    model = build_model(config, queue)
    optimizer = torch.optim.SGD(
        model.query_parameters(),
        lr=config.lr,
        momentum=config.sgd_momentum,
        weight_decay=config.weight_decay,
    )
    state = (
        _load_checkpoint(checkpoint_dir, model, optimizer, config) if resume else None
    ) or TrainingState()
    losses, knn = list(state.losses or []), list(state.knn or [])

    augment = moco_v2_transform(
        config.image_size,
        vertical_flip_p=0.5 if config.vertical_flip else 0.0,
        rotation_degrees=config.rotation_degrees,
    )
    train_set = ImageFolderDataset(data_dir, list(manifest["path"]), TwoCropsTransform(augment))
    labelled = manifest[manifest["label"] != ""]
    classes = sorted(set(labelled["label"]))
    knn_set = ImageFolderDataset(
        data_dir, list(labelled["path"]), eval_transform(config.image_size)
    )
    knn_labels = torch.tensor([classes.index(c) for c in labelled["label"]], dtype=torch.long)
    monitor = len(classes) >= 2

    configure_tracking()
    selection = read_optional_json(data_dir / "selection.json")
    with mlflow.start_run(
        run_id=state.mlflow_run_id,
        run_name="moco_train",
        tags={"sslpipe.step": "moco_train", **parent_run_tags()},
    ) as run:
        if state.mlflow_run_id is None:
            mlflow.log_params(
                {
                    **config.model_dump(mode="json"),
                    "effective_batch_size": batch,
                    "effective_queue_size": queue,
                    "num_images": len(manifest),
                }
            )
        state.mlflow_run_id = run.info.run_id
        if monitor and not knn:
            knn.append(knn_monitor(model, knn_set, knn_labels, config.knn_k))
            mlflow.log_metric("knn_top1", knn[0], step=0)
            log.info(
                "epoch 0 (random init): kNN top-1 %.3f on %d labelled images", knn[0], len(labelled)
            )
        for epoch in range(state.epoch, config.epochs):
            lr = _lr_at(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Seeding per epoch makes an epoch's shuffle and augmentations a function of
            # (seed, epoch) alone, so a resumed run continues exactly like an uninterrupted one.
            torch.manual_seed(config.seed + epoch)
            loader = _loader(train_set, batch, config.num_workers, config.seed + epoch)
            started = time.perf_counter()
            loss = _train_epoch(model, loader, optimizer)
            seconds = time.perf_counter() - started
            losses.append(loss)
            metrics = {"loss": loss, "lr": lr, "images_per_s": len(loader) * batch / seconds}
            if monitor:
                knn.append(knn_monitor(model, knn_set, knn_labels, config.knn_k))
                metrics["knn_top1"] = knn[-1]
            mlflow.log_metrics(metrics, step=epoch + 1)
            log.info(
                "epoch %d/%d: loss %.4f, lr %.4f, %.1f images/s%s",
                epoch + 1,
                config.epochs,
                loss,
                lr,
                metrics["images_per_s"],
                f", kNN top-1 {knn[-1]:.3f}" if monitor else "",
            )
            state.epoch, state.losses, state.knn = epoch + 1, losses, knn
            _save_checkpoint(checkpoint_dir, model, optimizer, state, config)

        lineage = {
            "filter": selection.get("filter"),
            "metadata_store": selection.get("metadata_store"),
            "num_images": len(manifest),
            "num_labelled": len(labelled),
            "data_fingerprint": _fingerprint(data_dir / "manifest.csv"),
            "mlflow_run_id": run.info.run_id,
            "pipeline_run_id": os.environ.get("SSLPIPE_RUN_ID"),
        }
        spec = BackboneSpec(config.backbone, config.small_stem)
        save_backbone(
            model_dir, model.backbone, spec, image_size=config.image_size, lineage=lineage
        )
        _plot_losses(model_dir / "loss_curve.png", losses, knn)
        metrics_out = {
            "final_loss": losses[-1],
            "losses": losses,
            "knn_top1": knn,
            "epochs": config.epochs,
            "num_images": len(manifest),
        }
        write_json(model_dir / "metrics.json", metrics_out)
        mlflow.log_artifact(str(model_dir / "loss_curve.png"))
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
