"""moco_train: checkpoints, resume after a crash, outputs and registration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sslpipe.core.config import MocoConfig
from sslpipe.data.packed_images import write_packed
from sslpipe.models.moco.recipe import effective_sizes
from sslpipe.steps.moco_train import CHECKPOINT_FILE, run_moco_train

REPO = Path(__file__).resolve().parents[2]
SMALL = {
    "image_size": 16,
    "batch_size": 16,
    "projection_hidden_dim": 64,
    "projection_dim": 32,
    "queue_size": 64,
    "num_workers": 0,
    "small_stem": False,
}


def make_data(folder: Path, count: int = 96) -> Path:
    """A data_prep-shaped folder of ``count`` small images, a third of them labelled."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(20, 20, 3), dtype=np.uint8)
        pixels[:, : 4 + i % 8] = 255 * (i % 2)  # a class-dependent bar, for the kNN monitor
        Image.fromarray(pixels).save(folder / "images" / f"{i:03d}.jpg")
        label = ("Even" if i % 2 == 0 else "Odd") if i % 3 == 0 else ""
        rows.append((f"{i:03d}.jpg", f"images/{i:03d}.jpg", label, 20, 20))
    pd.DataFrame(rows, columns=["id", "path", "label", "width", "height"]).to_csv(
        folder / "manifest.csv", index=False
    )
    return folder


@pytest.fixture()
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.setenv("SSLPIPE_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    return uri


def backbone_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "backbone.pt", weights_only=True)


def test_queue_is_shrunk_below_the_number_of_images() -> None:
    batch, queue = effective_sizes(MocoConfig(batch_size=32, queue_size=4096), 100)
    assert batch == 32
    assert queue == 64  # leaves at least one batch of other images out of the queue


def test_batch_is_clamped_to_a_tiny_dataset() -> None:
    assert effective_sizes(MocoConfig(batch_size=128, queue_size=8), 10) == (10, 8)


def test_training_writes_the_backbone_folder_and_registers_it(
    tmp_path: Path, tracking: str
) -> None:
    data = make_data(tmp_path / "data")
    result = run_moco_train(
        data_dir=data,
        model_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "ckpt",
        config=MocoConfig(epochs=1, **SMALL),
    )
    for name in ("backbone.pt", "backbone.json", "loss_curve.png", "metrics.json"):
        assert (tmp_path / "model" / name).is_file(), name
    config = json.loads((tmp_path / "model" / "backbone.json").read_text())
    assert config["lineage"]["num_images"] == 96 and config["lineage"]["num_labelled"] == 32
    assert result["registered"]["uri"] == "models:/moco-backbone/1"
    assert len(result["metrics"]["knn_top1"]) == 2  # before training and after epoch 1


def test_a_run_killed_mid_training_resumes_to_the_same_weights(
    tmp_path: Path, tracking: str
) -> None:
    data = make_data(tmp_path / "data", count=160)
    config = MocoConfig(epochs=3, **SMALL)
    run_moco_train(
        data_dir=data,
        model_dir=tmp_path / "straight",
        checkpoint_dir=tmp_path / "c1",
        config=config,
        register=False,
    )

    # The same training in a real process, killed once the first epoch's checkpoint exists.
    checkpoint = tmp_path / "c2"
    args = [
        sys.executable,
        "-m",
        "components.moco_train.main",
        "--data",
        str(data),
        "--model",
        str(tmp_path / "resumed"),
        "--checkpoint",
        str(checkpoint),
    ]
    for key, value in config.model_dump().items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    process = subprocess.Popen(
        args, cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (checkpoint / CHECKPOINT_FILE).exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(checkpoint / CHECKPOINT_FILE, weights_only=True)["epoch"] == 1
    assert not (tmp_path / "resumed" / "backbone.pt").exists()

    run_moco_train(
        data_dir=data,
        model_dir=tmp_path / "resumed",
        checkpoint_dir=checkpoint,
        config=config,
        resume=True,
        register=False,
    )
    straight, resumed = (
        backbone_weights(tmp_path / "straight"),
        backbone_weights(tmp_path / "resumed"),
    )
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_resuming_with_a_different_configuration_is_refused(tmp_path: Path, tracking: str) -> None:
    data = make_data(tmp_path / "data")
    run_moco_train(
        data_dir=data,
        model_dir=tmp_path / "m",
        checkpoint_dir=tmp_path / "c",
        config=MocoConfig(epochs=1, **SMALL),
        register=False,
    )
    with pytest.raises(ValueError, match="different configuration"):
        run_moco_train(
            data_dir=data,
            model_dir=tmp_path / "m2",
            checkpoint_dir=tmp_path / "c",
            config=MocoConfig(epochs=1, **{**SMALL, "lr": 0.1}),
            register=False,
        )


def test_the_retraining_guard_keeps_the_registered_backbone_until_the_data_changes(
    tmp_path: Path, tracking: str
) -> None:
    data = make_data(tmp_path / "data", count=48)
    config = MocoConfig(epochs=1, **SMALL)

    def train(name: str) -> dict:
        return run_moco_train(
            data_dir=data,
            model_dir=tmp_path / name / "model",
            checkpoint_dir=tmp_path / name / "checkpoint",
            config=config,
            skip_unchanged=True,
        )

    first = train("first")
    assert first["registered"]["version"] == "1"
    assert "skipped" not in first

    second = train("second")  # same data, same settings: nothing is trained or registered
    assert second["registered"] is None
    assert "unchanged since models:/moco-backbone/1" in second["skipped"]
    kept = tmp_path / "second" / "model"
    assert json.loads((kept / "skipped.json").read_text())["previous"]["version"] == "1"
    assert not (tmp_path / "second" / "checkpoint" / CHECKPOINT_FILE).exists()
    # Later steps get the kept backbone itself, weight for weight.
    first_weights = backbone_weights(tmp_path / "first" / "model")
    kept_weights = backbone_weights(kept)
    assert all(torch.equal(first_weights[k], kept_weights[k]) for k in first_weights)

    Image.new("RGB", (20, 20), (1, 2, 3)).save(data / "images" / "005.jpg")  # new pixels
    third = train("third")
    assert third["registered"]["version"] == "2"
    assert not (tmp_path / "third" / "model" / "skipped.json").exists()


def test_the_learning_rate_warms_up_linearly_then_follows_the_cosine() -> None:
    from math import cos, pi

    from sslpipe.models.moco.recipe import lr_at

    def cosine(position: float) -> float:
        return 0.1 * 0.5 * (1 + cos(pi * position / 10))

    config = MocoConfig(lr=0.1, epochs=10, warmup_epochs=2)
    assert lr_at(config, 0, 0.5) == pytest.approx(cosine(0.5) * 0.25)
    assert lr_at(config, 1, 1.0) == pytest.approx(cosine(2.0))
    assert lr_at(config, 5) == pytest.approx(0.05)
    no_warmup = MocoConfig(lr=0.1, epochs=10, warmup_epochs=0)
    assert lr_at(no_warmup, 0, 0.1) == pytest.approx(cosine(0.1))


def pack(data: Path) -> Path:
    """What data_prep writes beside the JPEGs: the images packed for training."""
    write_packed(data, list(pd.read_csv(data / "manifest.csv")["path"]))
    return data


class _Crash(RuntimeError):
    pass


def _crash_after_first_epoch(epoch: int, backbone: torch.nn.Module) -> None:
    raise _Crash(f"stopped after epoch {epoch + 1}")


def test_packed_images_are_trained_from_and_the_log_says_so(
    tmp_path: Path, tracking: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = pack(make_data(tmp_path / "data"))
    with caplog.at_level("INFO", logger="sslpipe"):
        result = run_moco_train(
            data_dir=data,
            model_dir=tmp_path / "model",
            checkpoint_dir=tmp_path / "ckpt",
            config=MocoConfig(epochs=1, **SMALL),
            register=False,
        )
    assert "views: cut in batches from the packed images" in caplog.text
    assert "precision: fp32" in caplog.text
    assert np.isfinite(result["metrics"]["final_loss"])


def test_without_packed_images_the_jpegs_are_decoded_and_packed_can_be_required(
    tmp_path: Path, tracking: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_data(tmp_path / "data")
    common = {"data_dir": data, "checkpoint_dir": tmp_path / "ckpt", "register": False}
    with caplog.at_level("INFO", logger="sslpipe"):
        run_moco_train(model_dir=tmp_path / "m", config=MocoConfig(epochs=1, **SMALL), **common)
    assert "views: decoded from the JPEGs by 0 DataLoader worker(s)" in caplog.text
    with pytest.raises(ValueError, match="packed"):
        run_moco_train(
            model_dir=tmp_path / "m2",
            config=MocoConfig(epochs=1, **{**SMALL, "views": "packed"}),
            resume=False,
            **common,
        )


def test_a_run_stopped_on_the_packed_path_resumes_to_the_same_weights(
    tmp_path: Path, tracking: str
) -> None:
    data = pack(make_data(tmp_path / "data"))
    config = MocoConfig(epochs=2, **SMALL)
    common = {"data_dir": data, "config": config, "register": False}
    run_moco_train(model_dir=tmp_path / "straight", checkpoint_dir=tmp_path / "c1", **common)
    with pytest.raises(_Crash):
        run_moco_train(
            model_dir=tmp_path / "resumed",
            checkpoint_dir=tmp_path / "c2",
            on_epoch=_crash_after_first_epoch,
            **common,
        )
    run_moco_train(model_dir=tmp_path / "resumed", checkpoint_dir=tmp_path / "c2", **common)
    straight = backbone_weights(tmp_path / "straight")
    resumed = backbone_weights(tmp_path / "resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
