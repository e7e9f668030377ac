"""Training the classifier in one process or several: its batches (this process's shard of
the shared shuffle), the DistributedDataParallel wrapper of the part that trains, and
validation spread over the processes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from sslpipe.models.classifier.model import ImageClassifier
from sslpipe.models.classifier.train import (
    LabelledImageDataset,
    predict,
    scores,
)
from sslpipe.models.training import distributed


def batches(
    dataset: Dataset[Any], batch: int, workers: int, *, seed: int | None
) -> DataLoader[Any]:
    """Shuffled (seeded) training batches when ``seed`` is given, ordered batches otherwise."""
    if seed is None:
        return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,  # no batch of one: BatchNorm in fine-tuning cannot train on it
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def sharded_batches(
    dataset: Dataset[Any],
    batch: int,
    workers: int,
    *,
    seed: int,
    epoch: int,
    env: distributed.DistEnv,
) -> DataLoader[Any]:
    """This process's shard of the epoch's shared shuffle (the same permutation everywhere)."""
    # drop_last in the sampler: every process runs the same number of steps; in the loader:
    # no batch of one, as in one process.
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        persistent_workers=False,
    )


def replicate(
    model: ImageClassifier, *, backbone_frozen: bool, device: torch.device
) -> nn.Module | None:
    """The DistributedDataParallel wrapper of the part that trains (None in one process).

    With a frozen backbone only the head is wrapped: the backbone runs under no_grad outside
    it, so DDP sees only parameters that receive gradients. Wrapping broadcasts rank 0's
    weights of the wrapped part.
    """
    if distributed.world_size() == 1:
        return None
    module = model.head if backbone_frozen else model
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def mean_over_processes(values: list[float], device: torch.device) -> list[float]:
    """The mean of each value over the processes (the values themselves in one process)."""
    if distributed.world_size() == 1:
        return values
    local = torch.tensor([values], dtype=torch.float64, device=device)
    mean: list[float] = distributed.all_gather(local).mean(dim=0).cpu().tolist()
    return mean


SCORES = ("loss", "accuracy", "macro_f1")


def validate_sharded(
    model: ImageClassifier,
    dataset: LabelledImageDataset,
    criterion: nn.Module,
    *,
    batch: int,
    workers: int,
    num_classes: int,
    device: torch.device,
) -> dict[str, float]:
    """Validation over the processes: process r predicts images r, r + W, r + 2W, ...

    The logits are gathered back into dataset order and scored on every process; rank 0's
    scores are then broadcast, so that every process decides alike even if the scores of two
    processes differed in the last bit.
    """
    world, rank = distributed.world_size(), distributed.rank()
    count = len(dataset)
    per_process = math.ceil(count / world)
    shard = Subset(dataset, range(rank, count, world))
    padded = torch.zeros(per_process, num_classes)
    if len(shard):
        shard_loader = batches(shard, batch, workers, seed=None)
        logits, _ = predict(model, shard_loader, device, desc="validation")
        padded[: len(logits)] = logits
    gathered = distributed.all_gather(padded.to(device)).cpu()
    # gathered[r * per_process + i] holds image r + i * world.
    ordered = gathered.view(world, per_process, num_classes).transpose(0, 1)
    logits = ordered.reshape(world * per_process, num_classes)[:count]
    result = scores(logits, torch.tensor(dataset.targets, dtype=torch.long), criterion)
    values = torch.tensor([result[k] for k in SCORES], dtype=torch.float64, device=device)
    distributed.broadcast_([values])
    return dict(zip(SCORES, values.cpu().tolist(), strict=True))
