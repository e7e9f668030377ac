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

from dataclasses import dataclass

import torch

from sslpipe.core.config import MOCO_VIEWS as VIEWS_MODES
from sslpipe.core.machine import available_memory, usable_cores
from sslpipe.data.packed_images import PackedImages

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
