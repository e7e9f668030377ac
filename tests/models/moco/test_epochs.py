"""Epoch order and per-item seeds: one loader, with persistent workers, for every epoch."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from sslpipe.models.moco.epochs import EpochOrder, SeededItems, item_seed


class RandomViews(Dataset[Any]):
    """Item i: (i, a random draw of torch's global generator), like a random crop."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.rand(3)


def test_item_seeds_depend_on_seed_epoch_and_index_only() -> None:
    assert item_seed(0, 1, 2) == item_seed(0, 1, 2)
    seeds = {item_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**64 for s in seeds)


def test_an_item_is_the_same_whatever_was_drawn_before_and_leaves_the_callers_state() -> None:
    items = SeededItems(RandomViews(), seed=5)
    first = items[(2, 7)][1]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(items[(2, 7)][1], first)  # whatever the global state was
    assert torch.equal(torch.rand(1), expected_next)  # which the draw did not move
    assert not torch.equal(items[(3, 7)][1], first)  # another epoch, another draw
    assert not torch.equal(SeededItems(RandomViews(), seed=6)[(2, 7)][1], first)


def test_the_order_is_a_function_of_seed_and_epoch() -> None:
    order = EpochOrder(RandomViews(), seed=1)
    order.set_epoch(3)
    third = list(order)
    assert sorted(i for _, i in third) == list(range(12)) and {e for e, _ in third} == {3}
    order.set_epoch(4)
    assert [i for _, i in order] != [i for _, i in third]
    again = EpochOrder(RandomViews(), seed=1)
    again.set_epoch(3)
    assert list(again) == third


def test_processes_share_one_order_and_take_disjoint_equal_parts() -> None:
    parts = []
    for rank in range(3):
        order = EpochOrder(RandomViews(), seed=1, rank=rank, world_size=3)
        order.set_epoch(2)
        parts.append([i for _, i in order])
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(i for part in parts for i in part) == list(range(12))


def _epochs(workers: int, epochs: range) -> list[list[tuple[int, torch.Tensor]]]:
    dataset = RandomViews()
    order = EpochOrder(dataset, seed=9)
    loader = DataLoader(
        SeededItems(dataset, 9), batch_size=4, sampler=order, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip
    batches = []
    for epoch in epochs:
        order.set_epoch(epoch)
        pairs = [zip(ids, views, strict=True) for ids, views in loader]
        batches.append([(int(i), v) for batch in pairs for i, v in batch])
    return batches


def test_persistent_workers_draw_the_same_views_as_none_and_a_resumed_run() -> None:
    in_process = _epochs(0, range(3))
    with_workers = _epochs(2, range(3))
    resumed = _epochs(2, range(2, 3))  # epochs 0 and 1 ran in an earlier process
    for ours, theirs in ((in_process, with_workers), (in_process[2:], resumed)):
        for a, b in zip(ours, theirs, strict=True):
            assert [i for i, _ in a] == [i for i, _ in b]
            assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
