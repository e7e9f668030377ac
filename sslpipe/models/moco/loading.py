"""How moco_train feeds the model, chosen for the machine unless the user chose.

Two ways to make the views' crops (:mod:`sslpipe.steps.moco_train`):

* **packed**: cut in batches from data_prep's packed ``uint8`` array
  (:class:`sslpipe.models.moco.packed_loader.PackedCropLoader`), with nothing to decode. Used when
  the
  array matches the manifest and fits: on the GPU when it takes at most a quarter of the free
  GPU memory, else in host memory when it takes at most half of what is available.
* **stream**: decoded from the JPEGs and cropped in DataLoader worker processes.

The streaming loader's workers follow the usable cores: on a GPU the training process needs
about one core and every other core decodes (a GPU node with one worker trains at one core's
decoding rate); on a CPU the training threads need the cores, so one worker per four cores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sslpipe.core.config import MOCO_VIEWS as VIEWS_MODES
from sslpipe.core.config import MocoConfig
from sslpipe.core.logs import get_logger
from sslpipe.core.machine import available_memory, usable_cores
from sslpipe.data.packed_images import PackedImages, open_packed
from sslpipe.models.moco.epochs import EpochOrder, SeededItems
from sslpipe.models.moco.packed_loader import PackedCropLoader

log = get_logger("moco")

GPU_SHARE = 0.25
"""Most of the free GPU memory the packed array may take there."""
HOST_SHARE = 0.5
"""Most of the available host memory the packed array may take."""


@dataclass(frozen=True)
class LoaderPlan:
    """The streaming DataLoader's settings and why they were chosen."""

    workers: int
    pin_memory: bool
    prefetch_factor: int | None
    reason: str


def loader_plan(requested: int, device: torch.device, processes_per_node: int = 1) -> LoaderPlan:
    """Workers for ``requested`` (``moco.num_workers``; -1: sized to the machine)."""
    cuda = device.type == "cuda"
    cores = max(1, usable_cores() // processes_per_node)
    if requested >= 0:
        workers, reason = requested, f"moco.num_workers={requested}"
    elif cuda:
        workers = max(1, cores - 1)
        reason = f"{cores} usable cores per GPU process: one trains, {workers} decode"
    else:
        workers = max(1, cores // 4)
        reason = f"{cores} usable cores, training on the CPU: its threads need them, 1 worker per 4"
    prefetch = (4 if cuda else 2) if workers else None
    return LoaderPlan(workers, pin_memory=cuda, prefetch_factor=prefetch, reason=reason)


@dataclass(frozen=True)
class ViewsPlan:
    """Where the crops come from: ``packed`` (on the device or in host memory) or ``stream``."""

    source: str
    on_device: bool
    reason: str


def _free_gpu_memory(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def views_plan(mode: str, packed: PackedImages | str, device: torch.device) -> ViewsPlan:
    """The source of the crops for ``mode`` (``moco.views``) given the packed images (or the
    reason there are none).

    Raises:
        ValueError: ``mode`` is ``packed`` and the packed images are missing, stale or too
            large for this machine.
    """
    if mode not in VIEWS_MODES:
        raise ValueError(f"moco.views must be one of {VIEWS_MODES}, got {mode!r}")
    if mode == "stream":
        return ViewsPlan("stream", False, "moco.views=stream")
    if isinstance(packed, str):
        return _refuse_or_stream(mode, packed)
    size = packed.nbytes
    if device.type == "cuda" and size <= GPU_SHARE * _free_gpu_memory(device):
        return ViewsPlan("packed", True, f"packed images ({size / 2**20:.0f} MiB) fit on the GPU")
    if size <= HOST_SHARE * available_memory():
        where = "the training device" if device.type == "cpu" else "host memory"
        return ViewsPlan(
            "packed", device.type == "cpu", f"packed images ({size / 2**20:.0f} MiB) fit in {where}"
        )
    return _refuse_or_stream(mode, f"packed images ({size / 2**20:.0f} MiB) do not fit in memory")


def _refuse_or_stream(mode: str, reason: str) -> ViewsPlan:
    if mode == "packed":
        raise ValueError(f"moco.views=packed, but {reason}; set moco.views to auto or stream")
    return ViewsPlan("stream", False, f"{reason}: decoding the JPEGs")


__all__ = ["VIEWS_MODES", "LoaderPlan", "ViewsPlan", "loader_plan", "views_plan"]


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


def streaming_loader(
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


def views_loader(
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
    return streaming_loader(dataset, order, batch, workers)
