"""The GPU benchmark row (benchmarks/bench_gpu.py) keeps working on a machine without a GPU: it
says "not run: no GPU" there, each of its measurements runs on the CPU at a tiny size (the
rehearsal), and its target checks can say no. Nothing here asserts a time."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_gpu, common, run  # noqa: E402
from benchmarks.bench_gpu import GPU_PLAN, gpu_rows, projected_seconds, target_checks  # noqa: E402

TINY: dict[str, Any] = {"image_size": 32, "batch": 8, "queue": 16}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_prep-shaped folder of 32 photo-like JPEGs, 43x32."""
    from benchmarks.bench_moco import make_photo_folder

    return make_photo_folder(tmp_path_factory.mktemp("gpu_row") / "data", 32, short_side=32)


# --- without a GPU


def test_without_cuda_the_row_says_not_run_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (item,) = bench_gpu.run(quick=False)
    common.check_row(item)
    assert item["notes"].startswith("not run: no GPU") and item["met"] is None
    # The same through the runner, where the row is registered.
    (item,) = run.run_rows(["gpu"], quick=False, explicit=True)
    assert item["notes"].startswith("not run: no GPU")
    assert run.RUN_ORDER.index("gpu") > run.RUN_ORDER.index("moco")  # a training row, late


# --- the CPU rehearsal: each measurement at a tiny size


def test_rehearsal_eager_ceiling_returns_a_rate() -> None:
    result = bench_gpu.compute_ceiling(
        **TINY, warmup=1, steps=2, device="cpu", compiled=False, precision="auto"
    )
    assert "error" not in result, result
    assert result["rate"] > 0 and result["precision"] == "fp32 (CPU)"


def test_rehearsal_compiled_ceiling_returns_a_rate() -> None:
    """torch.compile of the encoders; ``aot_eager`` traces forward and backward like inductor
    does, without its minutes of code generation on a CPU."""
    result = bench_gpu.compute_ceiling(
        **TINY, warmup=1, steps=2, device="cpu", compiled=True, backend="aot_eager"
    )
    assert "error" not in result, result
    assert result["rate"] > 0 and result["scope"] == "encoders" and result["graphs"] >= 1


def test_rehearsal_project_end_to_end_returns_rates(photos: Path, tmp_path: Path) -> None:
    result = bench_gpu.project_end_to_end(
        data_dir=str(photos), work=str(tmp_path / "work"), **TINY, epochs=1, workers=0
    )
    assert "error" not in result, result
    assert len(result["rates"]) == 1 and result["rates"][0] > 0
    assert 0 < result["logged_s"][0] <= result["total_s"]
    assert (tmp_path / "work" / "model" / "backbone.pt").is_file()


def test_rehearsal_lightly_loop_returns_rates(photos: Path) -> None:
    pytest.importorskip("lightly")
    result = bench_gpu.lightly_loop(
        images_dir=str(photos / "images"), **TINY, epochs=1, workers=0, device="cpu"
    )
    assert "error" not in result, result
    assert len(result["rates"]) == 1 and result["rates"][0] > 0


def test_rehearsal_rows_are_labelled_and_judge_nothing() -> None:
    rows = gpu_rows(_results(), bench_gpu.REHEARSAL)
    assert len(rows) == 3
    for item in rows:
        common.check_row(item)
        assert bench_gpu.REHEARSAL_LABEL in item["row"] and item["met"] is None
        assert "not judged in a rehearsal" in item["notes"]


# --- the targets


def _results(
    project: list[float] | None = None,
    lightly: list[float] | None = None,
    ceiling: float = 20_000.0,
    gap_s: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Measurements as :func:`bench_gpu.measure` returns them; the project's log lines come
    ``gap_s`` after each epoch (its checkpoint), after a 10 s set-up."""
    rates = project or [8_000.0, 15_000.0, 16_000.0]
    per_epoch = GPU_PLAN.images_per_epoch
    logged, at = [], 10.0
    for rate in rates:
        at += per_epoch / rate
        logged.append(at)
        at += gap_s
    return {
        "project": {"rates": rates, "logged_s": logged, "total_s": at + 2.0, "precision": "bf16"},
        "lightly": {"rates": lightly or [3_000.0, 4_000.0, 4_100.0], "precision": "bf16"},
        "ceiling_eager": {"rate": ceiling / 2},
        "ceiling_compiled": {"rate": ceiling, "first_step_s": 60.0, "scope": "encoders"},
    }


def test_target_checks_say_no_for_numbers_that_miss_them() -> None:
    missed = target_checks(
        project_rate=5_000.0, ceiling_compiled=10_000.0, lightly_rate=6_000.0, projected_s=300.0
    )
    assert set(missed) == {
        "projected <= 120 s",
        "project >= 12,500 images/s",
        ">= 0.8 of the compiled ceiling",
        "ahead of lightly",
    }
    assert all(ok is False for ok in missed.values())
    met = target_checks(13_000.0, 15_000.0, 9_000.0, 115.0)
    assert all(ok is True for ok in met.values())
    unknown = target_checks(13_000.0, math.nan, math.nan, 115.0)
    assert unknown[">= 0.8 of the compiled ceiling"] is None and unknown["ahead of lightly"] is None


def test_rows_say_no_when_the_project_misses_the_targets() -> None:
    # 5,000 images/s: a quarter of the ceiling, behind lightly's 6,000, 300 s for 1.5 M samples.
    rows = gpu_rows(_results([3_000.0, 5_000.0], lightly=[5_000.0, 6_000.0]), GPU_PLAN)
    ceiling, lightly, projected = (common.check_row(item) for item in rows)
    assert ceiling["met"] is False and ceiling["ratio"] == pytest.approx(0.25)
    assert lightly["met"] is False and lightly["ratio"] == pytest.approx(5 / 6)
    assert projected["met"] is False and projected["unit"] == "s" and projected["project"] > 300
    assert (
        "ahead of lightly: NO" in ceiling["notes"] and "projected <= 120 s: NO" in ceiling["notes"]
    )


def test_rows_say_yes_when_the_project_meets_the_targets() -> None:
    rows = gpu_rows(_results(ceiling=18_000.0), GPU_PLAN)
    assert [item["met"] for item in rows] == [True, True, True]
    assert rows[0]["project"] == 16_000.0  # steady state: the best epoch after the first
    assert rows[2]["project"] < 120


def test_a_failed_measurement_is_reported_in_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without MLflow: the project's import error becomes its result, and the rows
    that need the project say so while the table goes on."""

    def no_mlflow() -> None:
        raise ModuleNotFoundError("No module named 'mlflow'")

    monkeypatch.setattr(bench_gpu, "_import_trainer", no_mlflow)
    failed = bench_gpu.project_end_to_end(
        data_dir="unused", work="unused", **TINY, epochs=1, workers=0
    )
    assert failed == {
        "error": "importing the training core (sslpipe.steps.moco_train): "
        "ModuleNotFoundError: No module named 'mlflow'"
    }
    rows = gpu_rows({**_results(), "project": failed}, GPU_PLAN)
    assert len(rows) == 3
    for item in rows:
        common.check_row(item)
        assert item["met"] is None and "No module named 'mlflow'" in item["notes"]


def test_projection_adds_set_up_warm_up_and_per_epoch_overheads() -> None:
    # 1,000 images per epoch at a steady 1,000 images/s; the first epoch takes 2 s instead of 1;
    # 5 s of set-up, 0.5 s between epochs, 1 s after the last log line.
    seconds = projected_seconds([500.0, 1_000.0, 1_000.0], [7.0, 8.5, 10.0], 11.0, 1_000)
    assert seconds == pytest.approx(6.0 + 1.0 + 1_500.0 + 99 * 0.5)
    assert math.isnan(projected_seconds([], [], 1.0, 1_000))
