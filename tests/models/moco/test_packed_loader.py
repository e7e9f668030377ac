"""The decode-free loader: what the streaming DataLoader yields, cut from packed images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslpipe.data.packed_images import PackedImages, open_packed, write_packed
from sslpipe.models.moco.epochs import EpochOrder
from sslpipe.models.moco.packed_loader import PackedCropLoader


def _packed(root: Path, count: int = 10) -> PackedImages:
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    paths = []
    for i in range(count):
        height, width = (36, 48) if i % 2 else (48, 36)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            root / f"images/{i}.png"
        )
        paths.append(f"images/{i}.png")
    write_packed(root, paths)
    packed = open_packed(root, paths)
    assert isinstance(packed, PackedImages)
    return packed


def _loader(
    packed: PackedImages, *, on_device: bool, rank: int = 0, world_size: int = 1
) -> PackedCropLoader:
    order = EpochOrder(range(len(packed)), seed=3, rank=rank, world_size=world_size)  # type: ignore[arg-type]
    return PackedCropLoader(
        packed,
        order,
        batch=4,
        image_size=16,
        min_scale=0.2,
        device=torch.device("cpu"),
        on_device=on_device,
    )


def _epoch(loader: PackedCropLoader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    torch.manual_seed(100 + epoch)  # as moco_train seeds every epoch
    loader.order.set_epoch(epoch)
    return list(loader)


def test_it_yields_two_uint8_crops_per_image_in_the_epochs_order(tmp_path: Path) -> None:
    loader = _loader(_packed(tmp_path), on_device=True)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 2  # 10 images, batches of 4, the last 2 dropped
    order = [index for _, index in loader.order]
    for number, (query, key, ids) in enumerate(batches):
        assert query.shape == key.shape == (4, 3, 16, 16) and query.dtype == torch.uint8
        assert ids.tolist() == order[4 * number : 4 * number + 4]
        assert not torch.equal(query, key)  # two independent crops


def test_an_epoch_seeded_alike_yields_the_same_crops_wherever_the_array_lives(
    tmp_path: Path,
) -> None:
    packed = _packed(tmp_path)
    on_device = _epoch(_loader(packed, on_device=True), 1)
    again = _epoch(_loader(packed, on_device=True), 1)
    from_host = _epoch(_loader(packed, on_device=False), 1)
    for a, b, c in zip(on_device, again, from_host, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            assert torch.equal(x, y) and torch.equal(x, z)
    assert not torch.equal(on_device[0][2], _epoch(_loader(packed, on_device=True), 2)[0][2])


def test_each_process_crops_only_its_own_shard(tmp_path: Path) -> None:
    packed = _packed(tmp_path, count=16)
    shards = [
        {
            i
            for *_, ids in _epoch(_loader(packed, on_device=True, rank=r, world_size=2), 0)
            for i in ids.tolist()
        }
        for r in (0, 1)
    ]
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 16
