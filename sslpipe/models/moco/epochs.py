"""Epochs whose shuffle and augmentations are a function of (seed, epoch) alone, so that one
DataLoader, and its worker processes, can serve every epoch of a run.

A DataLoader made per epoch forks its workers anew every epoch, from a trainer that by then
holds gigabytes of weights, optimizer state and cached activations; every page the trainer
then writes is copied once for the worker that shares it. On 2 CPU cores that cost a fifth of
each epoch after the first (resnet18 at 112 px, 256 images: 35 against 51 images/s with
workers that persist; BENCHMARKS.md, row 2). Persistent workers keep their random state from
one epoch to the next, though, so their draws would depend on the run's history: a run resumed
from a checkpoint would augment differently from one that never stopped. Here every item is
drawn with its own seed instead (:class:`SeededItems`), and :class:`EpochOrder` tells the
dataset which epoch it serves; the views then depend neither on the history nor on which
worker, or how many, made them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The random seed of item ``index`` in ``epoch`` (64 bits, distinct for distinct triples
    but for hash collisions)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class EpochOrder(Sampler[tuple[int, int]]):
    """This process's ``(epoch, index)`` items of the current epoch (:meth:`set_epoch`).

    The order is a permutation drawn from ``seed + epoch``, the same in every process, of
    which process ``rank`` of ``world_size`` takes every ``world_size``-th index (all of them in
    a single process), dropping the last few so that every process gets as many.
    """

    def __init__(self, dataset: Dataset[Any], *, seed: int, rank: int = 0, world_size: int = 1):
        self._order: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self._order)

    def __len__(self) -> int:
        return len(self._order)


class SeededItems(Dataset[Any]):
    """``dataset`` indexed by ``(epoch, index)``: item ``index``, drawn with the torch random
    seed :func:`item_seed` ``(seed, epoch, index)``; the caller's random state is left as it
    was (it is saved and restored around the draw)."""

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self.dataset[index]
