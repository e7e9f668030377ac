"""Augmentations of classifier training, and the deterministic transform used to evaluate.

Milder than MoCo's views on purpose: the label must survive the augmentation. A random crop of
most of the image resized to ``image_size``, a small rotation, horizontal (optionally vertical)
flips and a light colour jitter, then ImageNet normalisation, like every backbone here expects.
Evaluation uses :func:`sslpipe.models.moco.preprocessing.eval_transform` (shorter side resize,
centre crop), the same transform the serving code applies.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

from sslpipe.models.moco.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvertRGB,
    eval_transform,
)

__all__ = ["eval_transform", "train_transform"]


def train_transform(
    image_size: int,
    *,
    min_scale: float = 0.6,
    rotation_degrees: float = 10.0,
    jitter: float = 0.2,
    horizontal_flip_p: float = 0.5,
    vertical_flip_p: float = 0.0,
) -> T.Compose:
    """Random training transform, PIL image -> (3, image_size, image_size) float tensor.

    Args:
        image_size: Side of the output in pixels, >= 8.
        min_scale: Lower bound of the crop's area fraction (RandomResizedCrop), in (0, 1].
        rotation_degrees: Random rotation in [-d, d] degrees, in [0, 180]; 0 turns it off.
        jitter: Brightness, contrast and saturation jitter; hue gets a tenth of it. In [0, 1].
        horizontal_flip_p: Probability of a horizontal flip.
        vertical_flip_p: Probability of a vertical flip (off by default: most catalog images
            have an up; turn it on for microscopy or aerial images).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"train_transform: image_size must be an int >= 8, got {image_size!r}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"train_transform: min_scale must be in (0, 1], got {min_scale!r}")
    if not 0.0 <= rotation_degrees <= 180.0:
        raise ValueError(
            f"train_transform: rotation_degrees must be in [0, 180], got {rotation_degrees!r}"
        )
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"train_transform: jitter must be in [0, 1], got {jitter!r}")
    for name, p in (("horizontal_flip_p", horizontal_flip_p), ("vertical_flip_p", vertical_flip_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"train_transform: {name} must be in [0, 1], got {p!r}")
    steps: list[Callable[..., object]] = [
        ConvertRGB(),
        T.RandomResizedCrop(image_size, scale=(float(min_scale), 1.0)),
    ]
    if rotation_degrees > 0:
        steps.append(T.RandomRotation(float(rotation_degrees)))
    if jitter > 0:
        steps.append(T.ColorJitter(jitter, jitter, jitter, jitter / 10))
    if horizontal_flip_p > 0:
        steps.append(T.RandomHorizontalFlip(horizontal_flip_p))
    if vertical_flip_p > 0:
        steps.append(T.RandomVerticalFlip(vertical_flip_p))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
