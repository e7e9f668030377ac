"""Batched MoCo v2 augmentations: each op against torchvision's per-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sslpipe.models.moco import batch_augment as B
from sslpipe.models.moco.batch_augment import BatchMoCoV2Augment, crop_transform


def _images(n: int = 6, size: int = 20) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("mine", "reference", "values"),
    [
        (B._brightness, TF.adjust_brightness, [0.6, 0.8, 1.0, 1.2, 1.4, 0.9]),
        (B._contrast, TF.adjust_contrast, [0.6, 0.8, 1.0, 1.2, 1.4, 0.9]),
        (B._saturation, TF.adjust_saturation, [0.6, 0.8, 1.0, 1.2, 1.4, 0.0]),
        (B._hue, TF.adjust_hue, [-0.1, -0.05, 0.0, 0.03, 0.1, 0.5]),
    ],
)
def test_each_jitter_op_matches_torchvision_image_by_image(
    mine: object, reference: object, values: list[float]
) -> None:
    x = _images()
    out = mine(x.clone(), torch.tensor(values))  # type: ignore[operator]
    expected = torch.stack([reference(x[i], v) for i, v in enumerate(values)])  # type: ignore[operator]
    # torchvision's luma weights are rounded differently (0.2989 vs 0.299).
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_blur_with_one_sigma_per_image_matches_torchvision() -> None:
    x = _images()
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0, 0.7]
    out = B._gaussian_blur(x.clone(), torch.tensor(sigmas), 5)
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [s, s]) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_a_zero_rotation_is_the_identity() -> None:
    x = _images(2)
    torch.testing.assert_close(B._rotate(x, torch.zeros(2)), x, atol=0, rtol=0)


def test_crop_then_batch_gives_normalised_views_of_the_requested_size() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    crop = crop_transform(16)(Image.fromarray(pixels).convert("L"))
    assert crop.shape == (3, 16, 16) and crop.dtype == torch.uint8
    augment = BatchMoCoV2Augment(16, vertical_flip_p=0.5, rotation_degrees=30)
    views = augment(torch.stack([crop] * 8))
    assert views.shape == (8, 3, 16, 16) and views.dtype == torch.float32
    assert views.min() < 0  # ImageNet normalisation leaves [0, 1]


def test_seeded_augmentation_is_reproducible_and_varies_across_images() -> None:
    crops = (_images(8, 16) * 255).to(torch.uint8)
    augment = BatchMoCoV2Augment(16)
    torch.manual_seed(3)
    first = augment(crops)
    torch.manual_seed(3)
    torch.testing.assert_close(augment(crops), first, atol=0, rtol=0)
    assert not torch.equal(augment(crops), first)


def test_float_input_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"uint8 crops.*crop_transform"):
        BatchMoCoV2Augment(16)(torch.rand(2, 3, 16, 16))


def test_invalid_arguments_are_refused_like_moco_v2_transform() -> None:
    with pytest.raises(ValueError, match="blur_p must be a probability"):
        BatchMoCoV2Augment(16, blur_p=2.0)


# --- the distribution of the views against torchvision's per-image MoCo v2 pipeline ----------


def _photos(count: int = 48, size: int = 40) -> list[Image.Image]:
    """Square patches of scikit-learn's two sample photos: real colours, edges and textures."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    patches = []
    for i in range(count):
        photo = load_sample_images().images[i % 2]
        top, left = rng.integers(0, photo.shape[0] - 160), rng.integers(0, photo.shape[1] - 160)
        patch = Image.fromarray(photo[top : top + 160, left : left + 160])
        patches.append(patch.resize((size, size), Image.Resampling.BILINEAR))
    return patches


def _views(photos: list[Image.Image], batched: bool, repeats: int, seed: int = 1) -> torch.Tensor:
    """(repeats, 2, N, 3, S, S): two views of every photo, ``repeats`` times."""
    from sslpipe.models.moco import TwoCropsTransform
    from tests.models.moco.torchvision_moco_v2 import moco_v2_transform

    size = 24
    torch.manual_seed(seed)
    if not batched:
        per_image = TwoCropsTransform(moco_v2_transform(size))
        out = []
        for _ in range(repeats):
            queries, keys = zip(*map(per_image, photos), strict=True)
            out.append(torch.stack([torch.stack(queries), torch.stack(keys)]))
        return torch.stack(out)
    crops, augment = TwoCropsTransform(crop_transform(size)), BatchMoCoV2Augment(size)
    out = []
    for _ in range(repeats):
        queries, keys = zip(*map(crops, photos), strict=True)
        out.append(torch.stack([augment(torch.stack(queries)), augment(torch.stack(keys))]))
    return torch.stack(out)


@pytest.fixture(scope="module")
def both_pipelines() -> dict[str, torch.Tensor]:
    photos = _photos()
    return {"batched": _views(photos, True, 12), "torchvision": _views(photos, False, 12)}


def test_views_have_torchvisions_per_channel_means_and_spreads(
    both_pipelines: dict[str, torch.Tensor],
) -> None:
    stats = {}
    for name, views in both_pipelines.items():
        per_channel = views.transpose(0, 3).reshape(3, -1)
        stats[name] = (per_channel.mean(1), per_channel.std(1))
    # 12 x 2 x 48 views of 24x24 px: the means move by about 0.03 from one seed to another.
    torch.testing.assert_close(stats["batched"][0], stats["torchvision"][0], atol=0.06, rtol=0)
    torch.testing.assert_close(stats["batched"][1], stats["torchvision"][1], atol=0.06, rtol=0)


def _cosines(views: torch.Tensor) -> tuple[float, float]:
    """Mean cosine of (two views of one image, views of two different images), centred pixels."""
    flat = views.flatten(3)
    flat = torch.nn.functional.normalize(flat - flat.mean(dim=-1, keepdim=True), dim=-1)
    same = (flat[:, 0] * flat[:, 1]).sum(-1).mean()
    other = (flat[:, 0] * flat[:, 1].roll(1, dims=1)).sum(-1).mean()
    return float(same), float(other)


def test_two_views_of_one_image_are_as_alike_as_torchvisions_and_more_than_two_images(
    both_pipelines: dict[str, torch.Tensor],
) -> None:
    batched = _cosines(both_pipelines["batched"])
    reference = _cosines(both_pipelines["torchvision"])
    assert batched[0] == pytest.approx(reference[0], abs=0.05)
    assert batched[1] == pytest.approx(reference[1], abs=0.05)
    assert batched[0] > batched[1] + 0.05
