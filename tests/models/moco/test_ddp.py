"""MoCo under DistributedDataParallel: two real processes (torchrun, Gloo on CPU).

ddp_worker.py runs one training step per BN mode in each of two processes; these tests check
the result against an independent single-process computation of the same step: the queue holds
the keys of both processes' images, identical in both, and the weights move as one
single-process step over the global batch would move them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sslpipe.models.moco import BN_MODES, CPUSyncBatchNorm, MoCo, convert_sync_batchnorm
from tests.models.moco.ddp_worker import BATCH, LR, PERMUTATION_SEED, tiny_moco

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("ddp_worker.py")
WORLD = 2

Result = dict[str, Any]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Result]]:
    """{bn: [rank 0's result, rank 1's result]} of one step in two processes."""
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(WORKER),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {
        bn: [torch.load(out / f"{bn}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
        for bn in BN_MODES
    }


def reference_model(bn: str, initial: dict[str, torch.Tensor]) -> MoCo:
    """A single-process model in the state both processes started from."""
    model = tiny_moco("none", queue_size=initial["queue.keys"].shape[0])
    model.load_state_dict(initial)
    model.train()
    return model


@torch.no_grad()
def reference_keys(bn: str, model: MoCo, x_keys: list[torch.Tensor]) -> torch.Tensor:
    """The global batch's keys, computed in one process the way the BN mode prescribes."""
    model.momentum_update()
    x_all = torch.cat(x_keys)
    if bn == "sync":  # statistics of the whole global batch
        return model.encode_keys(x_all)
    if bn == "none":  # each process's own statistics
        return torch.cat([model.encode_keys(x) for x in x_keys])
    # shuffle: rank 0's permutation, each process normalising its share of the shuffled batch
    torch.manual_seed(PERMUTATION_SEED)
    permutation = torch.randperm(x_all.shape[0])
    shuffled = x_all[permutation]
    keys = torch.cat([model.encode_keys(part) for part in shuffled.split(BATCH)])
    return keys[torch.argsort(permutation)]


@pytest.mark.parametrize("bn", BN_MODES)
def test_both_processes_hold_the_same_queue_with_the_keys_of_both(
    results: dict[str, list[Result]], bn: str
) -> None:
    first, second = results[bn]
    queue, pointer = first["final"]["queue.keys"], first["final"]["queue.ptr"]
    torch.testing.assert_close(second["final"]["queue.keys"], queue, rtol=0, atol=0)
    assert int(pointer) == int(second["final"]["queue.ptr"]) == WORLD * BATCH

    model = reference_model(bn, first["initial"])
    expected = reference_keys(bn, model, [first["x_key"], second["x_key"]])
    # Rows 0..B-1 come from rank 0's images, B..2B-1 from rank 1's; the rest is untouched.
    torch.testing.assert_close(queue[: WORLD * BATCH], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        queue[WORLD * BATCH :], first["initial"]["queue.keys"][WORLD * BATCH :], rtol=0, atol=0
    )


def test_shuffle_bn_normalises_keys_with_other_processes_images(
    results: dict[str, list[Result]],
) -> None:
    first, second = results["shuffle"]
    x_keys = [first["x_key"], second["x_key"]]
    unshuffled = reference_keys("none", reference_model("none", first["initial"]), x_keys)
    assert not torch.allclose(first["final"]["queue.keys"][: WORLD * BATCH], unshuffled)


def test_rank_0_state_is_everyones_before_the_first_step(
    results: dict[str, list[Result]],
) -> None:
    """The worker perturbs rank 1's weights and queue; distribute() must undo that."""
    for bn in BN_MODES:
        first, second = results[bn]
        for key, value in first["initial"].items():
            torch.testing.assert_close(second["initial"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("bn", BN_MODES)
def test_one_step_in_two_processes_equals_one_step_on_the_global_batch(
    results: dict[str, list[Result]], bn: str
) -> None:
    """DDP averages the gradients of the two local losses; the reference does so in one process.

    With sync-BN the step is exactly a single-process step on all 2B images (BN statistics
    included); otherwise each process's queries are normalised with its own images.
    """
    first, second = results[bn]
    model = reference_model(bn, first["initial"])
    keys = reference_keys(bn, model, [first["x_key"], second["x_key"]])
    negatives = first["initial"]["queue.keys"]
    optimizer = torch.optim.SGD(model.query_parameters(), lr=LR)
    if bn == "sync":
        queries = model.encode_queries(torch.cat([first["x_query"], second["x_query"]]))
        loss = model.criterion(queries, keys, negatives)
    else:
        losses = [
            model.criterion(model.encode_queries(r["x_query"]), k, negatives)
            for r, k in zip((first, second), keys.split(BATCH), strict=True)
        ]
        loss = torch.stack(losses).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    state = model.state_dict()
    compared = first["parameters"] if bn != "sync" else list(first["final"])
    for key in compared:
        if key.startswith("queue.") or key.endswith("num_batches_tracked"):
            continue
        # Both processes end with the same weights, the reference's.
        torch.testing.assert_close(
            second["final"][key], first["final"][key], rtol=0, atol=0, msg=key
        )
        torch.testing.assert_close(first["final"][key], state[key], rtol=1e-4, atol=1e-5, msg=key)
    assert first["loss"] != second["loss"]  # the processes did see different images


def test_cpu_sync_batchnorm_is_plain_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    synced = convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    )
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], CPUSyncBatchNorm)
    assert plain.state_dict().keys() == synced.state_dict().keys()
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var)


def test_conversion_keeps_the_parameter_objects_an_optimizer_holds() -> None:
    bn = torch.nn.BatchNorm2d(4)
    weight = bn.weight
    converted = convert_sync_batchnorm(torch.nn.Sequential(bn))
    assert converted[0].weight is weight


def test_distribute_is_a_no_op_without_a_process_group() -> None:
    model = tiny_moco("shuffle", queue_size=16)
    model.distribute()
    assert not model.is_distributed
    model.train()
    model(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))
    assert int(model.queue.ptr) == 2


def test_an_unknown_bn_mode_is_rejected_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"bn must be one of shuffle, sync, none"):
        tiny_moco("batch", queue_size=16)
