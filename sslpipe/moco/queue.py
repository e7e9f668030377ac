"""First-in-first-out dictionary of negative keys (MoCo, He et al., 2020, Sec. 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KeyQueue(nn.Module):
    """Ring buffer of the ``size`` most recent keys, used as negatives by the InfoNCE loss.

    The keys are registered as buffers, so they follow ``.to(device)`` and are saved in the
    ``state_dict``: a resumed run sees exactly the negatives it would have seen without the
    interruption.

    Args:
        size: Number of keys K kept; 65536 in MoCo on ImageNet, far less for small catalogs.
        dim: Width D of a key (the projection output, 128 in MoCo v2).

    Buffers:
        keys: (K, D) float tensor. Starts as random unit vectors, like the original
            implementation, so the first batches are contrasted against uninformative negatives
            rather than zeros (a zero key would give logit 0 regardless of the query).
        ptr: () long tensor, row where the next key is written.
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"KeyQueue {name} must be a positive int, got {value!r}. Pass an int >= 1."
                )
        # torch.randn draws from the global generator, so the queue is reproducible under
        # torch.manual_seed like the rest of the model.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Capacity K of the queue."""
        return int(self.keys.shape[0])

    @property
    def dim(self) -> int:
        """Width D of a key."""
        return int(self.keys.shape[1])

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write a batch of keys over the oldest ones.

        Equivalent to writing the rows one after the other into the ring buffer: a batch that
        runs past the end wraps around to the start, and a batch of more than K keys leaves only
        its last K keys (the oldest ones would have been overwritten anyway).

        Args:
            keys: (B, D) tensor, expected L2-normalised; detached and cast to the queue's dtype.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(
                f"KeyQueue.enqueue expects keys of shape (B, {self.dim}), got "
                f"{tuple(keys.shape)}. Enqueue the projected keys, one row per sample."
            )
        batch_size = int(keys.shape[0])
        if batch_size == 0:
            return
        size = self.size
        start = int(self.ptr)
        keys = keys.detach().to(device=self.keys.device, dtype=self.keys.dtype)
        if batch_size > size:
            # Only the last K rows survive; they land where sequential writes would put them.
            start = (start + batch_size - size) % size
            keys = keys[-size:]
        n = int(keys.shape[0])
        head = min(n, size - start)  # rows that fit before the end of the buffer
        self.keys[start : start + head] = keys[:head]
        if head < n:
            self.keys[: n - head] = keys[head:]
        self.ptr.fill_((int(self.ptr) + batch_size) % size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
