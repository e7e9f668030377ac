"""Image augmentations of MoCo v2 and the deterministic transform used for embeddings.

The training recipe is ``aug_plus`` of facebookresearch/moco ``main_moco.py`` (MoCo v2, Chen et
al., 2020), itself taken from SimCLR: random resized crop, colour jitter, grayscale, Gaussian
blur and horizontal flip. Vertical flips and rotations are optional extras for catalogs without
a canonical orientation (e.g. microscopy or aerial images); they are off by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image
from torch import Tensor
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ConvertRGB:
    """Convert a PIL image to RGB (catalogs mix grayscale, palette and RGBA files).

    A class rather than a lambda so that the transform can be pickled into DataLoader workers.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_image_size(image_size: int, where: str) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(
            f"{where}: image_size must be an int >= 8 (pixels), got {image_size!r}. "
            "Typical values are 32 (small stem), 96 or 224."
        )


def _check_probability(value: float, name: str) -> None:
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"moco_v2_transform: {name} must be a probability in [0, 1], got {value!r}."
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
    """Raise ValueError unless the arguments describe a valid :func:`moco_v2_transform`."""
    _check_image_size(image_size, "moco_v2_transform")
    if not isinstance(min_scale, int | float) or not 0.0 < min_scale <= 1.0:
        raise ValueError(
            f"moco_v2_transform: min_scale must be in (0, 1], got {min_scale!r}. MoCo v2 uses 0.2."
        )
    if not isinstance(jitter_strength, int | float) or not 0.0 <= jitter_strength <= 2.0:
        # Hue jitter is jitter_strength / 4 and torchvision caps hue at 0.5.
        raise ValueError(
            f"moco_v2_transform: jitter_strength must be in [0, 2], got {jitter_strength!r}. "
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
            f"moco_v2_transform: blur_sigma must be (low, high) with 0 < low <= high, got "
            f"{blur_sigma!r}. MoCo v2 uses (0.1, 2.0)."
        )
    if (
        not isinstance(rotation_degrees, int | float)
        or not math.isfinite(rotation_degrees)
        or not 0.0 <= rotation_degrees <= 180.0
    ):
        raise ValueError(
            f"moco_v2_transform: rotation_degrees must be in [0, 180], got {rotation_degrees!r}. "
            "Use 0 to disable rotation."
        )


def moco_v2_transform(
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
) -> T.Compose:
    """Random augmentation producing one view, PIL image -> (3, image_size, image_size) float.

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
    validate_moco_v2_arguments(
        image_size,
        min_scale=min_scale,
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
    steps: list[Callable[..., object]] = [
        ConvertRGB(),
        T.RandomResizedCrop(image_size, scale=(float(min_scale), 1.0)),
        T.RandomApply([T.ColorJitter(s, s, s, s / 4)], p=jitter_p),
        T.RandomGrayscale(p=grayscale_p),
        T.RandomApply(
            [T.GaussianBlur(blur_kernel_size(image_size), sigma=tuple(map(float, blur_sigma)))],
            p=blur_p,
        ),
        T.RandomHorizontalFlip(p=horizontal_flip_p),
    ]
    # Optional extras are only added when enabled, so the default pipeline is exactly MoCo v2's.
    if vertical_flip_p > 0:
        steps.append(T.RandomVerticalFlip(p=vertical_flip_p))
    if rotation_degrees > 0:
        steps.append(T.RandomRotation(float(rotation_degrees)))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(image_size: int) -> T.Compose:
    """Deterministic transform for embeddings and the kNN monitor.

    Resizes the shorter side to ``image_size``, takes the central square crop and normalises:
    PIL image -> (3, image_size, image_size) float tensor.
    """
    _check_image_size(image_size, "eval_transform")
    return T.Compose(
        [
            ConvertRGB(),
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoCropsTransform:
    """Apply a random transform twice to get the query and key views of one image.

    Args:
        base_transform: Random transform, e.g. :func:`moco_v2_transform`.

    Returns (from ``__call__``):
        ``(query_view, key_view)``, two independently augmented tensors.
    """

    def __init__(self, base_transform: Callable[[Image.Image], Tensor]) -> None:
        if not callable(base_transform):
            raise ValueError(
                f"TwoCropsTransform expects a callable transform, got "
                f"{type(base_transform).__name__}. Pass e.g. moco_v2_transform(224)."
            )
        self.base_transform = base_transform

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        return self.base_transform(img), self.base_transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_transform!r})"
