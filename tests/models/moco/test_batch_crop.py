"""Batched random resized crops from packed images against torchvision's per-image crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from sslpipe.models.moco.batch_augment import crop_transform
from sslpipe.models.moco.batch_crop import random_resized_boxes, resized_crops


def _reference_boxes(height: int, width: int, scale: tuple[float, float], n: int) -> torch.Tensor:
    image = Image.new("RGB", (width, height))
    return torch.tensor(
        [T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=torch.float64,
    )


@pytest.mark.parametrize(("height", "width", "scale"), [(72, 96, (0.2, 1.0)), (64, 64, (0.5, 1.0))])
def test_boxes_follow_torchvisions_distribution(
    height: int, width: int, scale: tuple[float, float]
) -> None:
    torch.manual_seed(0)
    n = 4000
    mine = random_resized_boxes(torch.full((n,), height), torch.full((n,), width), scale)
    reference = _reference_boxes(height, width, scale, n)
    assert (mine[:, 0] >= 0).all() and (mine[:, 0] + mine[:, 2] <= height).all()
    assert (mine[:, 1] >= 0).all() and (mine[:, 1] + mine[:, 3] <= width).all()

    def summary(boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes.double()
        area = boxes[:, 2] * boxes[:, 3] / (height * width)
        aspect = (boxes[:, 3] / boxes[:, 2]).log()
        centre_y = (boxes[:, 0] + boxes[:, 2] / 2) / height
        centre_x = (boxes[:, 1] + boxes[:, 3] / 2) / width
        stats = [area, aspect, centre_y, centre_x]
        return torch.tensor([f(s) for s in stats for f in (torch.mean, torch.std)])

    # 4,000 boxes: each statistic moves by about 0.005 from one seed to another.
    torch.testing.assert_close(summary(mine), summary(reference), atol=0.02, rtol=0)


def test_an_image_no_attempt_fits_gets_torchvisions_centre_crop() -> None:
    torch.manual_seed(0)
    # 10 x 200 px: every box of at least 90 % of the area is wider than the image allows.
    boxes = random_resized_boxes(torch.tensor([10, 200]), torch.tensor([200, 10]), (0.9, 1.0))
    expected = [
        _reference_boxes(10, 200, (0.9, 1.0), 1)[0],
        _reference_boxes(200, 10, (0.9, 1.0), 1)[0],
    ]
    torch.testing.assert_close(boxes.double(), torch.stack(expected))


def _packed(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sizes = torch.tensor([im.size for im in images])
    offsets = torch.cumsum(sizes, 0) - sizes
    pixels = torch.from_numpy(np.concatenate([im.reshape(-1) for im in images]))
    return pixels, offsets, torch.tensor([im.shape[1] for im in images])


def test_a_box_over_the_whole_image_at_its_size_is_the_image() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    pixels, offsets, widths = _packed(images)
    crops = resized_crops(pixels, offsets, widths, torch.tensor([[0, 0, 16, 16]] * 3), 16)
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), np.stack(images))


def test_an_enlarged_box_matches_pils_bilinear_resize() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(2)]
    boxes = torch.tensor([[3, 5, 12, 16], [10, 20, 20, 20]])  # top, left, height, width
    pixels, offsets, widths = _packed(images)
    crops = resized_crops(pixels, offsets, widths, boxes, 24).permute(0, 2, 3, 1).numpy()
    for crop, image, (top, left, h, w) in zip(crops, images, boxes.tolist(), strict=True):
        region = Image.fromarray(image).crop((left, top, left + w, top + h))
        expected = np.asarray(region.resize((24, 24), Image.Resampling.BILINEAR))
        assert np.abs(crop.astype(int) - expected.astype(int)).max() <= 1


def _digit_photos(count: int = 64) -> list[Image.Image]:
    """Real images at data_prep's sizes: scikit-learn's digits, dark on white, 36 x 48 px."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count]
    return [
        Image.fromarray(np.uint8(255 - d * 255 / 16)).resize((48, 36)).convert("RGB")
        for d in digits
    ]


def _both_paths(repeats: int = 10, size: int = 24) -> dict[str, torch.Tensor]:
    """(repeats, 2, N, 3, S, S) float crops of every image by each path."""
    photos = _digit_photos()
    arrays = [np.asarray(p) for p in photos]
    pixels, offsets, widths = _packed(arrays)
    heights = torch.tensor([a.shape[0] for a in arrays])
    streaming = crop_transform(size, min_scale=0.2)
    torch.manual_seed(0)
    out: dict[str, list[torch.Tensor]] = {"streaming": [], "packed": []}
    for _ in range(repeats):
        for name in out:
            views = []
            for _view in range(2):
                if name == "streaming":
                    views.append(torch.stack([streaming(p) for p in photos]))
                else:
                    boxes = random_resized_boxes(heights, widths, (0.2, 1.0))
                    views.append(resized_crops(pixels, offsets, widths, boxes, size))
            out[name].append(torch.stack(views).float() / 255)
    return {name: torch.stack(v) for name, v in out.items()}


@pytest.fixture(scope="module")
def both_paths() -> dict[str, torch.Tensor]:
    return _both_paths()


def test_crops_have_the_streaming_paths_per_channel_means_and_spreads(
    both_paths: dict[str, torch.Tensor],
) -> None:
    stats = {}
    for name, views in both_paths.items():
        per_channel = views.transpose(0, 3).reshape(3, -1)
        stats[name] = torch.cat([per_channel.mean(1), per_channel.std(1)])
    # 10 x 2 x 64 crops: the statistics move by about 0.01 from one seed to another.
    torch.testing.assert_close(stats["packed"], stats["streaming"], atol=0.03, rtol=0)


def test_two_crops_of_one_image_are_as_alike_as_the_streaming_paths(
    both_paths: dict[str, torch.Tensor],
) -> None:
    def cosines(views: torch.Tensor) -> tuple[float, float]:
        flat = views.flatten(3)
        flat = torch.nn.functional.normalize(flat - flat.mean(dim=-1, keepdim=True), dim=-1)
        same = (flat[:, 0] * flat[:, 1]).sum(-1).mean()
        other = (flat[:, 0] * flat[:, 1].roll(1, dims=1)).sum(-1).mean()
        return float(same), float(other)

    packed, streaming = cosines(both_paths["packed"]), cosines(both_paths["streaming"])
    assert packed[0] == pytest.approx(streaming[0], abs=0.04)
    assert packed[1] == pytest.approx(streaming[1], abs=0.04)
    assert packed[0] > packed[1] + 0.1
    assert not math.isnan(packed[0])
