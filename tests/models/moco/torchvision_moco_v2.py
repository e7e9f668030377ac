"""MoCo v2 image by image with torchvision: the reference for the batched recipe's tests.

The library trains with :mod:`sslpipe.models.moco.batch_augment` only; this is the ``aug_plus``
pipeline of facebookresearch/moco ``main_moco.py`` on PIL images, with the same arguments, the
same validation and the same optional extras, so that the tests can compare the distribution of
the batched views with torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

from sslpipe.models.moco.batch_augment import blur_kernel_size, validate_moco_v2_arguments
from sslpipe.models.moco.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ConvertRGB


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

    Arguments and defaults are those of
    :func:`sslpipe.models.moco.batch_augment.validate_moco_v2_arguments` (MoCo v2's ``aug_plus``).
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
