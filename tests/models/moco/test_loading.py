"""How moco_train feeds the model: sized to the machine unless the user chose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslpipe.data.packed_images import PackedImages
from sslpipe.models.moco import loading
from sslpipe.models.moco.loading import loader_plan, views_plan

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def sixteen_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "usable_cores", lambda: 16)


@pytest.mark.usefixtures("sixteen_cores")
def test_a_gpu_process_gets_every_core_but_its_own_as_decoding_workers() -> None:
    plan = loader_plan(-1, CUDA)
    assert (plan.workers, plan.pin_memory, plan.prefetch_factor) == (15, True, 4)
    assert "16 usable cores" in plan.reason
    assert loader_plan(-1, CUDA, processes_per_node=4).workers == 3  # 4 cores per GPU process


@pytest.mark.usefixtures("sixteen_cores")
def test_cpu_training_leaves_the_cores_to_its_threads() -> None:
    plan = loader_plan(-1, CPU)
    assert (plan.workers, plan.pin_memory) == (4, False)


def test_two_cores_train_with_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "usable_cores", lambda: 2)
    assert loader_plan(-1, CPU).workers == 1
    assert loader_plan(-1, CUDA).workers == 1


@pytest.mark.usefixtures("sixteen_cores")
def test_a_chosen_worker_count_is_kept_and_said_to_be_chosen() -> None:
    plan = loader_plan(0, CUDA)
    assert (plan.workers, plan.prefetch_factor, plan.reason) == (0, None, "moco.num_workers=0")


def _packed(nbytes: int) -> PackedImages:
    one = np.zeros(1, np.int64)
    return PackedImages(np.zeros(nbytes, np.uint8), one * 0, one + 1, one + 1)


def test_packed_images_that_fit_on_the_gpu_go_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_free_gpu_memory", lambda device: 4 * 2**20)
    plan = views_plan("auto", _packed(2**20), CUDA)
    assert (plan.source, plan.on_device) == ("packed", True)
    assert "fit on the GPU" in plan.reason


def test_packed_images_too_large_for_the_gpu_stay_in_host_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loading, "_free_gpu_memory", lambda device: 2**20)
    monkeypatch.setattr(loading, "available_memory", lambda: 2**30)
    plan = views_plan("auto", _packed(2**20), CUDA)
    assert (plan.source, plan.on_device) == ("packed", False)
    assert "host memory" in plan.reason


def test_packed_images_too_large_for_memory_are_streamed_or_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loading, "available_memory", lambda: 2**20)
    plan = views_plan("auto", _packed(2**20), CPU)
    assert plan.source == "stream" and "do not fit in memory" in plan.reason
    with pytest.raises(ValueError, match=r"moco\.views=packed, but packed images"):
        views_plan("packed", _packed(2**20), CPU)


def test_missing_packed_images_fall_back_to_decoding_unless_packed_is_required() -> None:
    plan = views_plan("auto", "data has no packed images", CPU)
    assert plan.source == "stream" and plan.reason.startswith("data has no packed images")
    with pytest.raises(ValueError, match=r"no packed images; set moco\.views to auto or stream"):
        views_plan("packed", "data has no packed images", CPU)
    assert views_plan("stream", _packed(10), CPU).source == "stream"
    with pytest.raises(ValueError, match=r"moco\.views must be one of"):
        views_plan("gpu", _packed(10), CPU)
