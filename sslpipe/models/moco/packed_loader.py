"""A loader of MoCo views that decodes nothing: crops cut in batches from packed images.

It yields what the streaming DataLoader yields, ``(query crops, key crops, image ids)`` with
``uint8`` (N, 3, S, S) crops, for this process's share of each epoch (the same
:class:`sslpipe.models.moco.epochs.EpochOrder`), so the training loop and the batched rest of the
recipe (:class:`sslpipe.models.moco.batch_augment.BatchMoCoV2Augment`) cannot tell them apart. The
packed array lives on the training device when it fits there (every crop is then one gather
on the GPU) or in host memory (each batch's images are gathered into one buffer and moved).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sslpipe.data.packed_images import PackedImages
from sslpipe.models.moco.batch_crop import random_resized_boxes, resized_crops
from sslpipe.models.moco.epochs import EpochOrder


class PackedCropLoader:
    """Batches of two random resized crops per image, cut from ``packed`` (see module doc)."""

    def __init__(
        self,
        packed: PackedImages,
        order: EpochOrder,
        batch: int,
        *,
        image_size: int,
        min_scale: float,
        device: torch.device,
        on_device: bool,
    ) -> None:
        self.order, self.batch, self.image_size = order, batch, image_size
        self.scale = (float(min_scale), 1.0)
        self.device, self.on_device = device, on_device
        self.heights = torch.from_numpy(packed.heights)
        self.widths = torch.from_numpy(packed.widths)
        self.offsets = torch.from_numpy(packed.offsets)
        self.sizes = self.heights * self.widths * 3
        # One copy into memory (the array is a memory map of the file), then to the device.
        pixels = torch.from_numpy(np.array(packed.pixels, dtype=np.uint8, copy=True))
        self.pixels = pixels.to(device) if on_device else pixels
        self._device_offsets = self.offsets.to(device) if on_device else None
        self._device_widths = self.widths.to(device) if on_device else None

    def __len__(self) -> int:
        return len(self.order) // self.batch

    def _images(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(pixels, offsets, widths) of the images ``ids`` on the training device."""
        if self._device_offsets is not None and self._device_widths is not None:
            return self.pixels, self._device_offsets[ids], self._device_widths[ids]
        sizes = self.sizes[ids]
        parts = [
            self.pixels[start : start + size]
            for start, size in zip(self.offsets[ids].tolist(), sizes.tolist(), strict=True)
        ]
        buffer = torch.cat(parts)
        offsets = torch.cumsum(sizes, 0) - sizes
        if self.device.type == "cuda":
            buffer = buffer.pin_memory()
        return (
            buffer.to(self.device, non_blocking=True),
            offsets.to(self.device),
            self.widths[ids].to(self.device),
        )

    def _crops(self, images: tuple[Tensor, Tensor, Tensor], ids: Tensor) -> Tensor:
        boxes = random_resized_boxes(self.heights[ids], self.widths[ids], self.scale)
        pixels, offsets, widths = images
        return resized_crops(pixels, offsets, widths, boxes, self.image_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        indices = torch.tensor([index for _, index in self.order], dtype=torch.long)
        for start in range(0, len(self) * self.batch, self.batch):
            ids = indices[start : start + self.batch]
            images = self._images(ids.to(self.device) if self.on_device else ids)
            yield self._crops(images, ids), self._crops(images, ids), ids


__all__ = ["PackedCropLoader"]
