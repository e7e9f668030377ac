"""One epoch of MoCo training, and the kNN monitor that watches the backbone between epochs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from sslpipe.core import progress
from sslpipe.models.moco.batch_augment import BatchMoCoV2Augment
from sslpipe.models.moco.knn import leave_one_out_knn_top1
from sslpipe.models.moco.loading import ManifestImages
from sslpipe.models.moco.model import MoCo
from sslpipe.models.moco.preprocessing import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from sslpipe.models.training import distributed


def to_device_channels_last(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def train_epoch(
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
                to_device_channels_last(device, x_query),
                to_device_channels_last(device, x_key),
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
                    to_device_channels_last(device, batch).float().div_(255).sub_(mean).div_(std)
                )
            )
            shown.update(len(batch))
    return leave_one_out_knn_top1(torch.cat(embedded), labels.to(device), k=k)
