"""moco_train in two processes (torchrun, Gloo on CPU): rank 0 checkpoints, every rank resumes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sslpipe.core.config import MocoConfig
from sslpipe.models.moco.recipe import effective_sizes
from sslpipe.models.training.distributed import DistEnv
from sslpipe.steps.moco_train import CHECKPOINT_FILE, run_moco_train
from tests.steps.test_moco_train import SMALL, make_data, pack

REPO = Path(__file__).resolve().parents[2]
DDP = {**SMALL, "processes_per_node": 2, "epochs": 2}  # global batch 32, queue 64


def torchrun_command(data: Path, model: Path, checkpoint: Path, config: MocoConfig) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={config.processes_per_node}",
        "-m",
        "components.moco_train.main",
        "--data",
        str(data),
        "--model",
        str(model),
        "--checkpoint",
        str(checkpoint),
    ]
    for key, value in config.model_dump().items():
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return command


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "tests",
        "SSLPIPE_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def checkpoint(folder: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    return payload


def test_two_processes_checkpoint_on_rank_0_and_resume_on_both_to_the_same_weights(
    tmp_path: Path, env: dict[str, str]
) -> None:
    data = make_data(tmp_path / "data", count=160)
    config = MocoConfig(**DDP)

    straight = run(torchrun_command(data, tmp_path / "m1", tmp_path / "c1", config), env)
    assert straight.count("epoch 2/2: loss") == 1  # only rank 0 logs
    assert "data parallel over 2 processes (cpu)" in straight
    assert "global batch 32" in straight
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == [CHECKPOINT_FILE]
    finished = checkpoint(tmp_path / "c1")
    assert (finished["epoch"], finished["world_size"]) == (2, 2)
    assert (tmp_path / "m1" / "registered_model.json").is_file()

    # The same training, killed (every process) once the first epoch's checkpoint exists.
    resumed_ckpt = tmp_path / "c2"
    command = torchrun_command(data, tmp_path / "m2", resumed_ckpt, config)
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not (resumed_ckpt / CHECKPOINT_FILE).exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        # torchrun starts its workers in sessions of their own: kill them by id, then it.
        for pid in [*child_pids(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    assert checkpoint(resumed_ckpt)["epoch"] == 1
    assert not (tmp_path / "m2" / "backbone.pt").exists()

    resumed = run(command, env)
    assert "resuming from" in resumed and "after epoch 1" in resumed
    assert "epoch 1/2" not in resumed and resumed.count("epoch 2/2: loss") == 1
    after = checkpoint(resumed_ckpt)
    assert after["epoch"] == 2
    assert after["losses"][0] == finished["losses"][0]

    weights = [
        torch.load(m / "backbone.pt", weights_only=True) for m in (tmp_path / "m1", tmp_path / "m2")
    ]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=0, msg=key)
    for key in ("queue.keys", "queue.ptr", "key_backbone.conv1.weight"):
        torch.testing.assert_close(after["model"][key], finished["model"][key], rtol=0, atol=0)


def test_a_world_size_other_than_the_configured_one_is_refused(tmp_path: Path) -> None:
    config = MocoConfig(**{**DDP, "epochs": 1})
    with pytest.raises(ValueError, match=r"1 node\(s\) x 2 process\(es\) = 2, but it runs in 1"):
        run_moco_train(
            data_dir=tmp_path,
            model_dir=tmp_path / "m",
            checkpoint_dir=tmp_path / "c",
            config=config,
            env=DistEnv(),
        )


def test_sizes_under_ddp_are_per_process_with_a_queue_of_whole_global_batches() -> None:
    config = MocoConfig(**{**SMALL, "processes_per_node": 2})
    assert effective_sizes(config, 160, world_size=2) == (16, 64)
    # 40 images per process: batch 16, global 32; the queue leaves a global batch out.
    assert effective_sizes(config, 80, world_size=2) == (16, 32)
    # 10 images per process: the batch shrinks to 10 and the queue to a multiple of 20.
    assert effective_sizes(config, 20, world_size=2) == (10, 20)


def test_a_queue_that_is_not_a_multiple_of_the_global_batch_is_refused() -> None:
    config = MocoConfig(**{**SMALL, "queue_size": 48})
    with pytest.raises(ValueError, match=r"queue_size 48 is not a multiple of the global batch 32"):
        effective_sizes(config, 160, world_size=2)


def test_too_few_images_per_process_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 images per process"):
        effective_sizes(MocoConfig(**SMALL), 5, world_size=4)


def test_two_processes_train_from_the_packed_images_each_on_its_own_shard(
    tmp_path: Path, env: dict[str, str]
) -> None:
    data = pack(make_data(tmp_path / "data", count=160))
    config = MocoConfig(**{**DDP, "epochs": 1})
    output = run(torchrun_command(data, tmp_path / "m", tmp_path / "c", config), env)
    assert "views: cut in batches from the packed images" in output
    assert "data parallel over 2 processes (cpu)" in output
    finished = checkpoint(tmp_path / "c")
    assert (finished["epoch"], finished["world_size"]) == (1, 2)
    # 160 images, 80 per process, 16 per process batch: 5 steps of the global batch of 32,
    # every key enqueued once from both processes.
    assert int(finished["model"]["queue.ptr"]) == (5 * 32) % config.queue_size
