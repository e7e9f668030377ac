"""MoCo v2's random resized crop for a whole batch, cut from packed images on the device.

The streaming path crops each image in a DataLoader worker after decoding its JPEG
(:func:`sslpipe.models.moco.batch_augment.crop_transform`, torchvision's ``RandomResizedCrop`` on
PIL images). Here the images are already decoded in one flat ``uint8`` array
(:mod:`sslpipe.data.packed_images`), and the crop of every image of a batch is one vectorised
gather with bilinear interpolation, on the GPU when the array is there.

The crop boxes follow ``RandomResizedCrop.get_params`` exactly: area share uniform in
``scale``, aspect log-uniform in ``ratio``, ten attempts, then the centre crop of the clamped
aspect. They are drawn on the CPU from torch's global generator, like the rest of the batched
recipe, so an epoch seeded alike draws alike on any device. Resampling maps output pixel
centres onto the box as PIL does; one difference: when a box is larger than the output, PIL
widens its filter (antialiasing) while this samples bilinearly, so such views are a little
sharper. The distribution tests (``tests/models/moco/test_batch_crop.py``) bound the difference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


def random_resized_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
) -> Tensor:
    """One crop box ``(top, left, height, width)`` per image (int64, on the CPU)."""
    heights, widths = heights.cpu().long(), widths.cpu().long()
    n = len(heights)
    area = (heights * widths).double()[:, None]
    target = area * torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(*scale)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(*log_ratio).exp_()
    w = (target * aspect).sqrt_().round_().long()
    h = (target / aspect).sqrt_().round_().long()
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (torch.rand(n, dtype=torch.float64) * (heights - h + 1)).long()
    left = (torch.rand(n, dtype=torch.float64) * (widths - w + 1)).long()

    # No attempt fits: the whole image, its aspect clamped into ``ratio``, centred.
    fallback = ~fits.any(dim=1)
    if bool(fallback.any()):
        fh, fw = heights[fallback], widths[fallback]
        in_ratio = fw.double() / fh.double()
        ch = torch.where(in_ratio < min(ratio), (fw / min(ratio)).round().long(), fh)
        cw = torch.where(in_ratio > max(ratio), (fh * max(ratio)).round().long(), fw)
        h[fallback], w[fallback] = ch, cw
        top[fallback], left[fallback] = (fh - ch) // 2, (fw - cw) // 2
    return torch.stack([top, left, h, w], dim=1)


def _sample_positions(start: Tensor, extent: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear source rows (or columns) of ``size`` output pixels over each box: the lower
    index, the upper index and the weight of the upper one, clamped inside the box."""
    centres = torch.arange(size, device=start.device, dtype=torch.float32).add_(0.5)
    first, last = start.float()[:, None], (start + extent - 1).float()[:, None]
    position = first + centres[None, :] * (extent.float()[:, None] / size) - 0.5
    position = torch.maximum(torch.minimum(position, last), first)
    lower = position.floor()
    weight = position - lower
    upper = torch.minimum(lower + 1, last)
    return lower.long(), upper.long(), weight


def resized_crops(
    pixels: Tensor,
    offsets: Tensor,
    widths: Tensor,
    boxes: Tensor,
    size: int,
) -> Tensor:
    """Crop ``boxes`` out of packed images and resize each to ``size`` x ``size``.

    ``pixels`` is the flat ``uint8`` array; ``offsets`` and ``widths`` (one per crop, the
    image it is cut from) locate each image in it; ``boxes`` are ``(top, left, height,
    width)``. All on one device. Returns (N, 3, size, size) ``uint8``.
    """
    device = pixels.device
    offsets, widths, boxes = offsets.to(device), widths.to(device), boxes.to(device)
    y0, y1, wy = _sample_positions(boxes[:, 0], boxes[:, 2], size)
    x0, x1, wx = _sample_positions(boxes[:, 1], boxes[:, 3], size)
    channel = torch.arange(3, device=device)

    def at(rows: Tensor, cols: Tensor) -> Tensor:
        flat = (rows[:, :, None] * widths[:, None, None] + cols[:, None, :]) * 3
        flat = flat + offsets[:, None, None]
        return pixels[flat[..., None] + channel].float()  # (N, S, S, 3)

    wy, wx = wy[:, :, None, None], wx[:, None, :, None]
    top = at(y0, x0).mul_(1 - wx).add_(at(y0, x1).mul_(wx))
    bottom = at(y1, x0).mul_(1 - wx).add_(at(y1, x1).mul_(wx))
    out = top.mul_(1 - wy).add_(bottom.mul_(wy))
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous()


__all__ = ["random_resized_boxes", "resized_crops"]
