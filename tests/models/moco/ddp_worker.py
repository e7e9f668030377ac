"""Started by test_ddp.py under torchrun: one MoCo training step per BN mode, in every process.

Each process saves what the test needs to check it against an independent single-process
computation: its two views, the state every process started from, and its state after the step.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sslpipe.models.moco import BN_MODES, BackboneSpec, MoCo, build_backbone
from sslpipe.models.training import distributed

BATCH = 4  # images per process and step
SIZE = 16  # px
LR = 0.5
PERMUTATION_SEED = 1234  # rank 0 seeds its generator with it just before the step


def tiny_moco(bn: str, queue_size: int) -> MoCo:
    torch.manual_seed(0)
    backbone, dim = build_backbone(BackboneSpec("resnet18", small_stem=True))
    return MoCo(
        backbone,
        dim,
        projection_hidden_dim=32,
        projection_dim=16,
        queue_size=queue_size,
        key_momentum=0.9,
        bn=bn,  # type: ignore[arg-type]
    )


def views(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different images in every process."""
    generator = torch.Generator().manual_seed(100 + rank)
    x_query = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    x_key = x_query + 0.3 * torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    return x_query, x_key


def main(out: Path) -> None:
    torch.set_num_threads(1)
    with distributed.session():
        rank, world = distributed.rank(), distributed.world_size()
        for bn in BN_MODES:
            model = tiny_moco(bn, queue_size=4 * BATCH * world)
            # A queue full of keys of other images, so that every slot is a negative.
            model.queue.ids.copy_(torch.arange(model.queue.size) + 10_000)
            if rank > 0:  # distribute() must make rank 0's weights and queue everyone's
                with torch.no_grad():
                    model.backbone.conv1.weight.add_(1.0)
                    model.queue.keys.mul_(-1.0)
            model.distribute()
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            optimizer = torch.optim.SGD(model.query_parameters(), lr=LR)
            model.train()
            x_query, x_key = views(rank)
            torch.manual_seed(PERMUTATION_SEED)
            loss = model(x_query, x_key)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            torch.save(
                {
                    "initial": initial,
                    "final": {k: v.clone() for k, v in model.state_dict().items()},
                    "parameters": [name for name, _ in model.named_parameters()],
                    "x_query": x_query,
                    "x_key": x_key,
                    "loss": float(loss.detach()),
                    "world_size": world,
                },
                out / f"{bn}-rank{rank}.pt",
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
