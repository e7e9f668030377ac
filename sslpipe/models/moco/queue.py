"""First-in-first-out dictionary of negative keys (MoCo, He et al., 2020, Sec. 3.2).

Each key is kept with the id of the image it encodes, and :meth:`KeyQueue.negatives_mask` says
which keys may not serve as negatives of a batch: the slots never written yet, and the keys of
the batch's own images. Both matter on catalogs of a few thousand images:

* Random keys in unwritten slots (the original implementation starts the queue with random unit
  vectors) are the only negatives of the first ``K / batch`` steps. Being nearly orthogonal to
  everything, they reward aligning every embedding with one common direction, which raises the
  positive similarity for free; by the time real keys fill the queue the embeddings have
  collapsed, every logit is the same and the loss sits at ln(K + 1), from where the gradients
  are too small to recover (measured on MNIST at 32 px: the mean cosine between queries went
  from 0.46 to 0.99 within 5 steps; with the random slots masked it stays near 0.8 and the loss
  falls).
* With a fresh shuffle each epoch, an image's key from the previous epoch is still queued when
  the image comes round again whenever the queue holds more than a few batches of a small
  catalog; left among the negatives it is a second positive the loss pushes away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.models.moco.checks import check_positive_int

EMPTY = -1
"""Id of a queue slot that was never written: always masked out of the negatives."""
UNKNOWN = -2
"""Id of a key enqueued without one: a negative of every query."""


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
        ids: (K,) long tensor, the image id of each key: :data:`EMPTY` for a slot never
            written, :data:`UNKNOWN` for a key enqueued without an id.
    """

    keys: Tensor
    ptr: Tensor
    ids: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        check_positive_int(size, "KeyQueue size")
        check_positive_int(dim, "KeyQueue dim")
        # torch.randn draws from the global generator, so the queue is reproducible under
        # torch.manual_seed like the rest of the model.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("ids", torch.full((size,), EMPTY, dtype=torch.long))
        # ``ptr`` mirrored on the host, so that a step never waits for the device to read it.
        self._cursor = 0
        self.register_load_state_dict_pre_hook(KeyQueue._read_cursor)

    def _read_cursor(self, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
        if prefix + "ptr" in state_dict:
            self._cursor = int(state_dict[prefix + "ptr"])

    @property
    def size(self) -> int:
        """Capacity K of the queue."""
        return int(self.keys.shape[0])

    @property
    def dim(self) -> int:
        """Width D of a key."""
        return int(self.keys.shape[1])

    @property
    def filled(self) -> int:
        """Number of slots that hold a real key."""
        return int((self.ids != EMPTY).sum())

    @torch.no_grad()
    def negatives_mask(self, ids: Tensor | None = None) -> Tensor:
        """(N, K) bool, True where key j may not be a negative of query i (or (1, K) without
        ``ids``): slot j was never written, or it holds a key of image ``ids[i]``."""
        empty = (self.ids == EMPTY).unsqueeze(0)
        if ids is None:
            return empty
        own = ids.to(self.ids.device).unsqueeze(1) == self.ids.unsqueeze(0)
        return own | empty

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor | None = None) -> None:
        """Write a batch of keys over the oldest ones.

        Equivalent to writing the rows one after the other into the ring buffer: a batch that
        runs past the end wraps around to the start, and a batch of more than K keys leaves only
        its last K keys (the oldest ones would have been overwritten anyway).

        Args:
            keys: (B, D) tensor, expected L2-normalised; detached and cast to the queue's dtype.
            ids: (B,) integer ids of the images the keys encode (ids >= 0), or None: the keys
                are then never recognised as a query's own (:data:`UNKNOWN`).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(
                f"KeyQueue.enqueue expects keys of shape (B, {self.dim}), got "
                f"{tuple(keys.shape)}. Enqueue the projected keys, one row per sample."
            )
        batch_size = int(keys.shape[0])
        if ids is None:
            ids = torch.full((batch_size,), UNKNOWN, dtype=torch.long)
        elif ids.shape != (batch_size,) or ids.is_floating_point() or _has_negative(ids):
            raise ValueError(
                f"KeyQueue.enqueue expects {batch_size} image ids >= 0, one per key, got "
                f"{ids.dtype} of shape {tuple(ids.shape)}."
            )
        if batch_size == 0:
            return
        size = self.size
        start = self._cursor
        end = (start + batch_size) % size
        keys = keys.detach().to(device=self.keys.device, dtype=self.keys.dtype)
        ids = ids.to(device=self.ids.device, dtype=torch.long)
        if batch_size > size:
            # Only the last K rows survive; they land where sequential writes would put them.
            start = (start + batch_size - size) % size
            keys, ids = keys[-size:], ids[-size:]
        n = int(keys.shape[0])
        head = min(n, size - start)  # rows that fit before the end of the buffer
        self.keys[start : start + head] = keys[:head]
        self.ids[start : start + head] = ids[:head]
        if head < n:
            self.keys[: n - head] = keys[head:]
            self.ids[: n - head] = ids[head:]
        self._cursor = end
        self.ptr.fill_(end)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


def _has_negative(ids: Tensor) -> bool:
    """Whether ``ids`` holds a negative id; checked on the host only, since reading a device
    tensor would make every training step wait for the device."""
    return ids.device.type == "cpu" and bool((ids < 0).any())
