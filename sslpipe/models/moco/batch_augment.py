"""The MoCo v2 training recipe, split in two for speed: a per-image crop, then batched tensor ops.

The recipe is ``aug_plus`` of facebookresearch/moco ``main_moco.py`` (MoCo v2, Chen et al.,
2020), itself taken from SimCLR: random resized crop, colour jitter, grayscale, Gaussian blur
and horizontal flip. Vertical flips and rotations are optional extras for catalogs without a
canonical orientation (e.g. microscopy or aerial images); they are off by default.

Run image by image on PIL images with torchvision's transforms, the recipe costs several
milliseconds per view in the DataLoader workers; on a machine with few cores those workers take
CPU time away from the training threads. Here only the geometric part that needs the
full-resolution image, the random resized crop, runs per image (:func:`crop_transform`, PIL in,
a small ``uint8`` tensor out, so that workers hand over a quarter of the bytes of float views).
The rest of the recipe, colour jitter, grayscale, Gaussian blur, flips and the optional
rotation, then normalisation, runs on the whole batch at once on the training device
(:class:`BatchMoCoV2Augment`): a handful of vectorised tensor ops that use every intra-op thread
on a CPU and run on the GPU when training there. :class:`TwoCropsTransform` makes the query and
key crops of one image.

The distribution of the views is that of torchvision's per-image pipeline with the same
arguments (the reference the tests compare with, ``tests/models/moco/torchvision_moco_v2.py``): the
same probabilities and parameter ranges, drawn per image, and the same order of steps. One
difference: the colour jitter's four operations run in a random order drawn per batch rather
than per image (every image still sees each order with equal probability, and the query and
key views of an image are augmented in separate calls, so independently). Pixel values differ
slightly, because the ops work in float on [0, 1] instead of rounding to ``uint8`` after every
PIL step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from sslpipe.models.moco.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvertRGB,
    check_image_size,
)

# ITU-R 601-2 luma, the weights of PIL's and torchvision's RGB -> L conversion.
_LUMA = (0.299, 0.587, 0.114)


def _check_probability(value: float, name: str) -> None:
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"MoCo v2 augmentation: {name} must be a probability in [0, 1], got {value!r}."
        )


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel size of about 10% of the image side, at least 3 (23 for 224 px)."""
    size = max(3, round(0.1 * image_size))
    return size if size % 2 == 1 else size + 1


def validate_moco_v2_arguments(
    image_size: int,
    *,
    min_scale: float = 0.2,
    jitter_strength: float = 0.4,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    horizontal_flip_p: float = 0.5,
    vertical_flip_p: float = 0.0,
    rotation_degrees: float = 0.0,
) -> None:
    """Raise ValueError unless the arguments describe a valid MoCo v2 recipe.

    Defaults are MoCo v2's (``aug_plus`` in facebookresearch/moco).

    Args:
        image_size: Side of the output crop in pixels, >= 8.
        min_scale: Lower bound of the crop area fraction of RandomResizedCrop (0.2 in MoCo v2).
        jitter_strength: Brightness, contrast and saturation jitter; hue jitter is a quarter of
            it, giving MoCo v2's ColorJitter(0.4, 0.4, 0.4, 0.1) by default. In [0, 2].
        jitter_p: Probability of applying the colour jitter (0.8).
        grayscale_p: Probability of converting to grayscale (0.2).
        blur_p: Probability of Gaussian blur (0.5).
        blur_sigma: Range (low, high) the blur sigma is drawn from ((0.1, 2.0)).
        horizontal_flip_p: Probability of a horizontal flip (0.5).
        vertical_flip_p: Probability of a vertical flip (0.0, off).
        rotation_degrees: Random rotation in [-d, d] degrees (0.0, off).
    """
    check_image_size(image_size, "MoCo v2 augmentation")
    if not isinstance(min_scale, int | float) or not 0.0 < min_scale <= 1.0:
        raise ValueError(
            f"MoCo v2 augmentation: min_scale must be in (0, 1], got {min_scale!r}. "
            "MoCo v2 uses 0.2."
        )
    if not isinstance(jitter_strength, int | float) or not 0.0 <= jitter_strength <= 2.0:
        # Hue jitter is jitter_strength / 4 and torchvision caps hue at 0.5.
        raise ValueError(
            f"MoCo v2 augmentation: jitter_strength must be in [0, 2], got {jitter_strength!r}. "
            "MoCo v2 uses 0.4."
        )
    for name, value in (
        ("jitter_p", jitter_p),
        ("grayscale_p", grayscale_p),
        ("blur_p", blur_p),
        ("horizontal_flip_p", horizontal_flip_p),
        ("vertical_flip_p", vertical_flip_p),
    ):
        _check_probability(value, name)
    if (
        len(blur_sigma) != 2
        or not all(isinstance(s, int | float) and s > 0 for s in blur_sigma)
        or blur_sigma[0] > blur_sigma[1]
    ):
        raise ValueError(
            f"MoCo v2 augmentation: blur_sigma must be (low, high) with 0 < low <= high, got "
            f"{blur_sigma!r}. MoCo v2 uses (0.1, 2.0)."
        )
    if (
        not isinstance(rotation_degrees, int | float)
        or not math.isfinite(rotation_degrees)
        or not 0.0 <= rotation_degrees <= 180.0
    ):
        raise ValueError(
            "MoCo v2 augmentation: rotation_degrees must be in [0, 180], got "
            f"{rotation_degrees!r}. "
            "Use 0 to disable rotation."
        )


def crop_transform(image_size: int, *, min_scale: float = 0.2) -> T.Compose:
    """The per-image part of MoCo v2: RGB, random resized crop, ``uint8`` (3, S, S) tensor."""
    validate_moco_v2_arguments(image_size, min_scale=min_scale)
    return T.Compose(
        [
            ConvertRGB(),
            T.RandomResizedCrop(image_size, scale=(float(min_scale), 1.0)),
            T.PILToTensor(),
        ]
    )


class TwoCropsTransform:
    """Apply a random transform twice to get the query and key views of one image.

    Args:
        base_transform: Random transform, e.g. :func:`crop_transform`.

    Returns (from ``__call__``):
        ``(query_view, key_view)``, two independently augmented tensors.
    """

    def __init__(self, base_transform: Callable[[Image.Image], Tensor]) -> None:
        if not callable(base_transform):
            raise ValueError(
                f"TwoCropsTransform expects a callable transform, got "
                f"{type(base_transform).__name__}. Pass e.g. crop_transform(224)."
            )
        self.base_transform = base_transform

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        return self.base_transform(img), self.base_transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_transform!r})"


def _gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H, W) luma."""
    return (_LUMA[0] * x[:, 0:1]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def _column(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``factor * x + (1 - factor) * other`` clamped to [0, 1], per image factor."""
    f = _column(factor)
    return (x * f).add_(other * (1.0 - f)).clamp_(0.0, 1.0)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _column(factor)).clamp_(0.0, 1.0)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x), factor)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns (in [-0.5, 0.5]) per image.

    HSV hue in sixths of a turn is ``2 * m + (next - after_next) / chroma`` where ``m`` is the
    channel holding the maximum (R, G, B = 0, 1, 2) and ``next``, ``after_next`` the channels
    after it cyclically; ties give the same hue whichever maximum is taken. Value and chroma
    are unchanged by the rotation, and HSV -> RGB is, for channel ``n`` in (5, 3, 1),
    ``value - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + hue) mod 6``.
    """
    value, top = x.max(dim=1, keepdim=True)
    chroma = value - x.min(dim=1, keepdim=True).values
    following = x.gather(1, torch.remainder(top + 1, 3))
    after = x.gather(1, torch.remainder(top + 2, 3))
    # chroma 0 (a grey pixel): any hue gives the same colour, and following == after there.
    hue = (following - after).div_(chroma.clamp_min(1e-12)).add_(2.0 * top)
    hue.add_(_column(6.0 * shift))
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(hue + n, 6.0)
        channels.append(torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(chroma).neg_().add_(value))
    return torch.cat(channels, dim=1)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding (as torchvision)."""
    n, c, h, w = x.shape
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, h, w)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its centre, nearest neighbour, zero fill (as RandomRotation)."""
    angle = degrees * (math.pi / 180.0)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class BatchMoCoV2Augment:
    """MoCo v2's photometric and flip augmentations on a batch of ``uint8`` crops.

    Takes (N, 3, S, S) ``uint8`` crops from :func:`crop_transform` on any device and returns
    normalised float32 views on that device. Random parameters are drawn from torch's global
    CPU generator (so a seeded run is reproducible on any device), one draw per image.

    Arguments and defaults are those of :func:`validate_moco_v2_arguments` (MoCo v2's
    ``aug_plus``), minus ``min_scale``, which belongs to the crop.
    """

    def __init__(
        self,
        image_size: int,
        *,
        jitter_strength: float = 0.4,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        horizontal_flip_p: float = 0.5,
        vertical_flip_p: float = 0.0,
        rotation_degrees: float = 0.0,
    ) -> None:
        validate_moco_v2_arguments(
            image_size,
            jitter_strength=jitter_strength,
            jitter_p=jitter_p,
            grayscale_p=grayscale_p,
            blur_p=blur_p,
            blur_sigma=blur_sigma,
            horizontal_flip_p=horizontal_flip_p,
            vertical_flip_p=vertical_flip_p,
            rotation_degrees=rotation_degrees,
        )
        s = float(jitter_strength)
        self.image_size = image_size
        # ColorJitter(s, s, s, s / 4): factors in [max(0, 1 - s), 1 + s], hue in [-s/4, s/4].
        self.factor_range = (max(0.0, 1.0 - s), 1.0 + s)
        self.hue_range = s / 4
        self.jitter_p = float(jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.kernel_size = blur_kernel_size(image_size)
        self.horizontal_flip_p = float(horizontal_flip_p)
        self.vertical_flip_p = float(vertical_flip_p)
        self.rotation_degrees = float(rotation_degrees)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, jitter={self.factor_range}, "
            f"hue={self.hue_range}, p=({self.jitter_p}, {self.grayscale_p}, {self.blur_p}), "
            f"blur_sigma={self.blur_sigma}, flips=({self.horizontal_flip_p}, "
            f"{self.vertical_flip_p}), rotation={self.rotation_degrees})"
        )

    @torch.no_grad()
    def __call__(self, crops: Tensor) -> Tensor:
        if crops.dim() != 4 or crops.shape[1] != 3 or crops.dtype != torch.uint8:
            raise ValueError(
                f"BatchMoCoV2Augment expects (N, 3, H, W) uint8 crops, got "
                f"{tuple(crops.shape)} {crops.dtype}; produce them with crop_transform()."
            )
        n, device = crops.shape[0], crops.device
        x = crops.float().div_(255.0)
        # All random draws up front, on the CPU, in a fixed order.
        jitter = torch.rand(n) < self.jitter_p
        low, high = self.factor_range
        factors = torch.empty(n, 3).uniform_(low, high)
        hue = torch.empty(n).uniform_(-self.hue_range, self.hue_range)
        order = torch.randperm(4)  # the jitter's random order of its four ops, per batch
        gray = torch.rand(n) < self.grayscale_p
        blur = torch.rand(n) < self.blur_p
        sigma = torch.empty(n).uniform_(*self.blur_sigma)
        hflip = torch.rand(n) < self.horizontal_flip_p
        vflip = torch.rand(n) < self.vertical_flip_p
        angle = torch.empty(n).uniform_(-self.rotation_degrees, self.rotation_degrees)

        if bool(jitter.any()):
            idx = jitter.nonzero().squeeze(1).to(device)
            params = (factors[jitter, 0], factors[jitter, 1], factors[jitter, 2], hue[jitter])
            ops = (_brightness, _contrast, _saturation, _hue)
            y = x[idx]
            for op_index in order.tolist():
                y = ops[op_index](y, params[op_index].to(device))
            x[idx] = y
        if bool(gray.any()):
            idx = gray.nonzero().squeeze(1).to(device)
            x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
        if bool(blur.any()):
            idx = blur.nonzero().squeeze(1).to(device)
            x[idx] = _gaussian_blur(x[idx], sigma[blur].to(device), self.kernel_size)
        if bool(hflip.any()):
            x = torch.where(_column(hflip.to(device)), x.flip(-1), x)
        if bool(vflip.any()):
            x = torch.where(_column(vflip.to(device)), x.flip(-2), x)
        if self.rotation_degrees > 0:
            x = _rotate(x, angle.to(device))
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


__all__ = [
    "BatchMoCoV2Augment",
    "TwoCropsTransform",
    "blur_kernel_size",
    "crop_transform",
    "validate_moco_v2_arguments",
]
