"""Multi-process training: the launcher's environment, the process group and its collectives.

A training step runs unchanged in one process or in several. Under ``torchrun`` (the local
executor) or an Azure ML job with ``distribution: {type: pytorch}``, every process finds its
place in the job in the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``. :class:`DistEnv` reads them, :func:`init` joins the process group (NCCL
on CUDA, Gloo on CPU) and the helpers below fall back to single-process no-ops when no group
is running, so the calling code needs no ``if distributed`` branches for them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sslpipe.core.logs import quieted

ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun and Azure ML's PyTorch distribution set in every process."""

DEFAULT_TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for the other processes (rank 0 may be busy evaluating)."""


class DistributedEnvError(ValueError):
    """The distributed environment variables contradict each other; the message names them."""


def _int_variable(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise DistributedEnvError(
            f"environment variable {name}={raw!r} is not an integer; the launcher (torchrun "
            "or Azure ML) sets it to a whole number, unset it to run in one process"
        ) from None


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a (possibly single-process) training job.

    Attributes:
        rank: Global index of the process, 0 .. world_size - 1; rank 0 writes the outputs.
        world_size: Number of processes in the job, over all nodes.
        local_rank: Index of the process on its node; picks its GPU.
        master_addr: Host of rank 0, where the processes meet (None in one process).
        master_port: Port on that host (None in one process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise DistributedEnvError(
                f"WORLD_SIZE={self.world_size}: the number of processes must be >= 1"
            )
        if not 0 <= self.rank < self.world_size:
            raise DistributedEnvError(
                f"RANK={self.rank} is outside 0..{self.world_size - 1} (WORLD_SIZE="
                f"{self.world_size}); every process needs a distinct RANK below WORLD_SIZE"
            )
        if not 0 <= self.local_rank <= self.rank:
            raise DistributedEnvError(
                f"LOCAL_RANK={self.local_rank} must be between 0 and RANK={self.rank}: a "
                "process's index on its node cannot exceed its index in the job"
            )
        if self.world_size > 1:
            if not self.master_addr:
                raise DistributedEnvError(
                    f"WORLD_SIZE={self.world_size} but MASTER_ADDR is not set; the processes "
                    "need rank 0's host to meet (launch with torchrun, or set MASTER_ADDR)"
                )
            if self.master_port is None or not 0 < self.master_port < 65536:
                raise DistributedEnvError(
                    f"WORLD_SIZE={self.world_size} but MASTER_PORT={self.master_port!r} is not a "
                    "port number in 1..65535 (launch with torchrun, or set MASTER_PORT)"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read the launcher's variables; without ``WORLD_SIZE`` this is one process.

        Raises:
            DistributedEnvError: a variable is not an integer, or they contradict each other
                (e.g. ``RANK >= WORLD_SIZE``, or ``RANK`` set without ``WORLD_SIZE``).
        """
        env = os.environ if environ is None else environ
        world_size = _int_variable(env, "WORLD_SIZE", None)
        rank = _int_variable(env, "RANK", None)
        if world_size is None:
            if rank not in (None, 0):
                raise DistributedEnvError(
                    f"RANK={rank} is set but WORLD_SIZE is not; set both (torchrun and Azure ML "
                    "do) or neither to run in one process"
                )
            world_size = 1
        local_rank = _int_variable(env, "LOCAL_RANK", None)
        rank = 0 if rank is None else rank
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=rank if local_rank is None else local_rank,
            master_addr=env.get("MASTER_ADDR") or None,
            master_port=_int_variable(env, "MASTER_PORT", None),
        )

    @property
    def is_distributed(self) -> bool:
        """True when the job has more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints, logs and models."""
        return self.rank == 0


def device_for(env: DistEnv) -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU.

    Raises:
        DistributedEnvError: when there are fewer GPUs on the node than processes.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise DistributedEnvError(
            f"LOCAL_RANK={env.local_rank} but this node has {count} CUDA device(s); run at most "
            f"{count} process(es) per node (process_count_per_instance)"
        )
    return torch.device("cuda", env.local_rank)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, Gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def is_initialized() -> bool:
    """True when this process is part of a running process group."""
    return dist.is_available() and dist.is_initialized()


def init(
    env: DistEnv | None = None,
    *,
    device: torch.device | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> torch.device:
    """Join the process group described by ``env`` (default: the environment).

    A no-op for a single process. Returns the device this process computes on; on CUDA it is
    also made the current device, as NCCL requires.

    Raises:
        DistributedEnvError: inconsistent environment, or too few GPUs.
    """
    env = DistEnv.from_env() if env is None else env
    device = device_for(env) if device is None else device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.is_distributed or is_initialized():
        return device
    dist.init_process_group(
        backend=backend_for(device),
        init_method=_init_method(env),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return device


def _init_method(env: DistEnv) -> str:
    """``env://`` when ``env`` is this process's environment, else an explicit TCP address.

    Under torchrun ``env://`` matters: the workers then join the store that the torchrun agent
    already serves on MASTER_PORT instead of trying to open a second one there.
    """
    same = os.environ.get("MASTER_ADDR") == env.master_addr and os.environ.get(
        "MASTER_PORT", ""
    ).strip() == str(env.master_port)
    if same:
        return "env://"
    host = f"[{env.master_addr}]" if ":" in str(env.master_addr) else env.master_addr
    return f"tcp://{host}:{env.master_port}"


def cleanup() -> None:
    """Leave the process group (a no-op when none is running)."""
    if is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(env: DistEnv | None = None) -> Iterator[torch.device]:
    """``init`` on entry, ``cleanup`` on exit; yields this process's device."""
    device = init(env)
    try:
        yield device
    finally:
        cleanup()


def world_size() -> int:
    """Processes in the running group, 1 without one."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the running group, 0 without one."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process got here (a no-op in one process)."""
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@torch.no_grad()
def all_gather(tensor: Tensor) -> Tensor:
    """Every process's ``tensor`` concatenated along dim 0, in rank order; no gradient.

    All processes must pass tensors of the same shape (with equal per-process batches, as a
    ``DistributedSampler`` with ``drop_last`` gives). In one process the tensor is returned
    detached, without a copy.
    """
    if world_size() == 1:
        return tensor.detach()
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (a no-op in one process)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        if tensor.is_contiguous():
            dist.broadcast(tensor, src=src)
        else:  # e.g. channels_last weights: send a dense copy, write it back in place
            dense = tensor.contiguous()
            dist.broadcast(dense, src=src)
            tensor.copy_(dense)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes whose backward sums the gradients over the processes too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        reduced = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # d(sum_j x_j)/dx_i = 1 in every process: process i's input receives the sum over all
        # processes of the gradients of their outputs.
        reduced = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the processes; differentiable (gradients are summed too).

    Used by synchronised batch normalisation on CPU. In one process the tensor itself is
    returned.
    """
    if world_size() == 1:
        return tensor
    reduced: Tensor = _AllReduceSum.apply(tensor)
    return reduced


__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_VARIABLES",
    "DistEnv",
    "DistributedEnvError",
    "all_gather",
    "all_reduce_sum",
    "backend_for",
    "barrier",
    "broadcast_",
    "cleanup",
    "device_for",
    "init",
    "is_initialized",
    "is_main",
    "rank",
    "session",
    "world_size",
]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one process's random augmentations (and dropout) in one epoch: distinct per
    process (fewer than a million epochs), and ``seed + epoch`` in a single process."""
    return seed + epoch + 1_000_003 * rank


@contextmanager
def quiet_unless_main(logger: logging.Logger, env: DistEnv) -> Iterator[None]:
    """Only rank 0 logs progress through ``logger``; the others log warnings and errors."""
    if env.is_main:
        yield
        return
    with quieted(logger, logging.WARNING):
        yield


def check_same_start(epoch: int, checkpoint_dir: Path, device: torch.device) -> None:
    """Raise unless every process resumes after the same epoch (sees the same checkpoint)."""
    if world_size() == 1:
        return
    epochs = all_gather(torch.tensor([epoch], device=device)).cpu().tolist()
    if len(set(epochs)) > 1:
        raise RuntimeError(
            f"the processes would start after different epochs {epochs} (by rank): every "
            f"process must see rank 0's checkpoint in {checkpoint_dir}, a folder shared by "
            "all nodes"
        )


def check_replicas_agree(tensors: Sequence[Tensor], device: torch.device) -> None:
    """Raise unless every process holds the same ``tensors`` (a cheap checksum of them)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        checksum = torch.stack([t.detach().double().sum() for t in tensors]).sum().reshape(1)
        sums = all_gather(checksum.to(device)).cpu()
    if not bool(torch.all(sums == sums[0])):
        raise RuntimeError(
            f"the training processes diverged: weight checksums {sums.tolist()} differ; "
            "every process must run the same number of steps on the same model"
        )
