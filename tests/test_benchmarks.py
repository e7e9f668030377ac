"""The benchmark harness (benchmarks/) keeps working: its table and report on fake rows, the
runner's handling of missing and failing rows, and one cheap row at a tiny size. Nothing here
asserts a time: benchmarks are not tests."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, run  # noqa: E402


def _fake_rows() -> list[dict[str, Any]]:
    return [
        common.row(
            "rate | with a pipe",
            project=300.0,
            baseline=75.0,
            unit="img/s",
            higher_is_better=True,
            target=">= 4x",
            met=True,
            notes="n=3",
        ),
        common.row(
            "time",
            project=2.0,
            baseline=1.0,
            unit="s",
            higher_is_better=False,
            target="> 1x",
            met=False,
        ),
        common.not_run("2. moco", "not run: benchmarks.bench_moco does not exist yet"),
    ]


def test_ratios_favour_the_project_above_one() -> None:
    rate, time, missing = _fake_rows()
    assert rate["ratio"] == pytest.approx(4.0)
    assert time["ratio"] == pytest.approx(0.5)
    assert math.isnan(missing["ratio"]) and missing["met"] is None


def test_markdown_table_has_one_line_per_row_and_escapes_pipes() -> None:
    table = common.markdown_table(_fake_rows())
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert "rate \\| with a pipe" in lines[2]
    assert "| 4.00x |" in lines[2] and "| yes |" in lines[2]
    assert "| 0.5x |" in lines[3] or "| 0.500x |" in lines[3]
    assert "**no**" in lines[3]
    assert "| – |" in lines[4]


def test_report_names_the_machine_and_the_command() -> None:
    info = common.machine()
    assert {"date (UTC)", "CPU", "memory", "GPU", "Python", "torch"} <= set(info)
    report = common.markdown_report(
        _fake_rows(), info, command="python -m benchmarks.run --quick", seconds=90
    )
    assert report.startswith("# Benchmarks")
    assert "`python -m benchmarks.run --quick`" in report
    assert info["CPU"] in report and "| row | project |" in report


def test_check_row_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="lacks"):
        common.check_row({"row": "x", "project": 1.0})
    bad = common.row("x", project=1, baseline=1, unit="s", higher_is_better=False)
    bad["met"] = "yes"
    with pytest.raises(ValueError, match="met must be"):
        common.check_row(bad)


def test_runner_reports_missing_and_failing_rows_and_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(quick: bool) -> list[dict[str, Any]]:
        raise RuntimeError("server gone")

    fine = types.ModuleType("benchmarks.fake_fine")
    fine.run = lambda quick: [_fake_rows()[0]]  # type: ignore[attr-defined]
    failing = types.ModuleType("benchmarks.fake_failing")
    failing.run = broken  # type: ignore[attr-defined]
    modules = {"benchmarks.fake_fine": fine, "benchmarks.fake_failing": failing}
    monkeypatch.setattr(
        run,
        "ROWS",
        {
            "fine": ("benchmarks.fake_fine", "fine"),
            "failing": ("benchmarks.fake_failing", "failing"),
            "absent": ("benchmarks.fake_absent", "absent"),
        },
    )
    monkeypatch.setattr(run, "RUN_ORDER", ["fine", "failing", "absent"])
    monkeypatch.setattr(run, "import_optional", lambda name: modules.get(name))
    seen: list[int] = []
    rows = run.run_rows(
        ["fine", "failing", "absent"],
        quick=True,
        explicit=False,
        progress=lambda so_far: seen.append(len(so_far)),
    )
    assert seen == [1, 2]  # the report is rewritten after each row, for a run stopped midway
    assert [r["row"] for r in rows] == ["rate | with a pipe", "failing", "absent"]
    assert "failed: RuntimeError: server gone" in rows[1]["notes"]
    assert "does not exist" in rows[2]["notes"]


def test_quick_skips_e2e_unless_named() -> None:
    rows = run.run_rows(["e2e"], quick=True, explicit=False)
    assert rows[0]["notes"].startswith("skipped in --quick")


def test_connect_db_row_at_a_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQLite part of row 4 on 400 documents: the project's selection and the naive scan
    select the same ids (the row fails otherwise), and the plan is reported."""
    monkeypatch.setattr(common, "CACHE", tmp_path)
    monkeypatch.setenv("SSLPIPE_BENCH_CACHE", str(tmp_path))
    from benchmarks import bench_connect_db

    rows = bench_connect_db.sqlite_rows(400, repeats=1)
    assert len(rows) == 3
    for item in rows:
        common.check_row(item)
    assert "EXPLAIN QUERY PLAN" in rows[0]["notes"]
    assert "selected (same ids as the baseline)" in rows[1]["notes"]
    assert list(tmp_path.glob("connect_db/catalog-400-*.db"))


def test_python_filter_agrees_with_the_naive_sql() -> None:
    """The Cosmos baseline's Python filter and the SQLite baseline's SQL on the same documents."""
    import json
    import sqlite3

    from benchmarks.bench_connect_db import FILTERS, documents, naive_sql, python_match

    docs = list(documents(2000))
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE documents (id TEXT PRIMARY KEY, doc TEXT)")
    db.executemany("INSERT INTO documents VALUES (?, ?)", [(d["id"], json.dumps(d)) for d in docs])
    for spec in FILTERS.values():
        sql, params = naive_sql(spec)
        by_sql = [json.loads(text)["id"] for (text,) in db.execute(sql, params)]
        by_python = sorted(d["id"] for d in docs if python_match(d, spec))
        assert by_sql == by_python and by_sql


# --- row 3: representation quality (the gates, without training)


def _curve(*knn: float, probe: float = 0.5) -> list[dict[str, float]]:
    """A synthetic per-epoch curve; epoch 0 is the random initialisation."""
    return [{"epoch": e, "knn": v, "probe": probe} for e, v in enumerate(knn)]


PIXELS = {"knn": 0.9, "probe": 0.85}


def _quality(project: list[dict[str, float]], lightly: list[dict[str, float]]) -> dict[str, Any]:
    from benchmarks.bench_quality import quality_row

    return common.check_row(
        quality_row("3. quality", project, lightly, PIXELS, setup="Settings: test", walls="w")
    )


def test_quality_row_not_met_when_neither_side_learns() -> None:
    item = _quality(_curve(0.80, 0.78, 0.79), _curve(0.82, 0.75, 0.70))
    assert item["met"] is False
    assert "neither side beats its random init" in item["notes"]


def test_quality_row_not_met_when_only_lightly_learns() -> None:
    item = _quality(_curve(0.80, 0.80, 0.79), _curve(0.78, 0.85, 0.90))
    assert item["met"] is False
    assert "lightly beats its random init and the project does not" in item["notes"]


def test_quality_row_not_met_when_the_project_learns_but_trails_lightly() -> None:
    item = _quality(_curve(0.80, 0.82, 0.85), _curve(0.78, 0.85, 0.90))
    assert item["met"] is False and "trails lightly" in item["notes"]


def test_quality_row_met_when_the_project_learns_and_keeps_up_with_lightly() -> None:
    item = _quality(_curve(0.80, 0.84, 0.885), _curve(0.78, 0.85, 0.90))
    assert item["met"] is True
    assert item["project"] == pytest.approx(0.885) and item["baseline"] == pytest.approx(0.90)
    # The notes carry both curves (kNN and probe), random init, raw pixels and the settings.
    notes = item["notes"]
    assert "[0: 0.800, 1: 0.840, 2: 0.885]" in notes and "[0: 0.780, 1: 0.850, 2: 0.900]" in notes
    assert "linear probe per epoch" in notes and "raw pixels: kNN 0.9000, probe 0.8500" in notes
    assert "random init of the project's network: kNN 0.8000" in notes
    assert "Settings: test" in notes


def test_quality_row_met_when_the_project_learns_and_lightly_does_not() -> None:
    item = _quality(_curve(0.80, 0.81), _curve(0.82, 0.80))
    assert item["met"] is True and "lightly does not beat its random init" in item["notes"]


def test_gpu_quality_row_needs_a_margin_over_random_init_and_pixels() -> None:
    from benchmarks.bench_quality import gpu_quality_row

    def met(*knn: float) -> bool | None:
        return common.check_row(gpu_quality_row(_curve(*knn), PIXELS, setup="s"))["met"]

    assert met(0.80, 0.92) is True
    assert met(0.80, 0.84) is False  # learns, but by less than 0.05 (and below pixels)
    assert met(0.88, 0.89) is False  # above pixels but not 0.05 above random init
    assert met(0.60, 0.70) is False  # 0.1 above random init but below raw pixels


def test_gpu_row_without_cuda_is_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from benchmarks.bench_quality import gpu_row

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    item = common.check_row(gpu_row(quick=True, recipe={}))
    assert (
        item["met"] is None
        and item["notes"] == "not run: no GPU (torch.cuda.is_available() is False)"
    )


def test_quality_recipe_is_read_from_moco_config() -> None:
    from benchmarks.bench_moco import RECIPE_FIELDS
    from benchmarks.bench_quality import moco_recipe
    from sslpipe.core.config import MocoConfig

    recipe = moco_recipe()
    assert tuple(recipe) == RECIPE_FIELDS
    assert recipe == {field: getattr(MocoConfig(), field) for field in RECIPE_FIELDS}


def test_lightly_transform_follows_the_recipe() -> None:
    pytest.importorskip("lightly")
    from benchmarks.bench_moco import ROW2_RECIPE, lightly_transform

    recipe = {**ROW2_RECIPE, "jitter_strength": 0.8, "jitter_p": 0.7, "crop_min_scale": 0.3}
    # lightly builds its views from torchvision.transforms or .v2: find the steps by name.
    steps = {
        type(s).__name__: s
        for s in lightly_transform(16, recipe).transforms[0].transform.transforms
    }
    assert steps["RandomResizedCrop"].scale == (0.3, 1.0)
    assert steps["RandomHorizontalFlip"].p == 0.5 and steps["RandomVerticalFlip"].p == 0.0
    assert steps["RandomGrayscale"].p == 0.2
    jitter_p = steps["RandomApply"]
    jitter = jitter_p.transforms[0]
    assert jitter_p.p == 0.7 and type(jitter).__name__ == "ColorJitter"
    assert tuple(jitter.brightness) == (pytest.approx(0.2), pytest.approx(1.8))
    assert tuple(jitter.saturation) == (pytest.approx(0.2), pytest.approx(1.8))
    assert tuple(jitter.hue) == (pytest.approx(-0.2), pytest.approx(0.2))


def test_quality_evaluator_scores_epoch_zero_on_a_tiny_folder(tmp_path: Path) -> None:
    """The child's evaluation on 60 digits: epoch 0 is the random init, evaluations follow the
    schedule (every 2nd epoch and the last), and the scores are accuracies."""
    from benchmarks.bench_quality import Evaluator, make_digits_folder

    data_dir, labels = make_digits_folder(tmp_path / "data", 8, count=60)
    assert len(labels) == 60 and "label" in (data_dir / "manifest.csv").read_text()
    assert all(
        line.split(",")[2] == ""
        for line in (data_dir / "manifest.csv").read_text().splitlines()[1:]
    )
    evaluator = Evaluator(data_dir, 8, epochs=3, every=2)
    evaluator.random_init(small_stem=True, seed=0)
    assert [evaluator.due(e) for e in (1, 2, 3)] == [False, True, True]
    assert len(evaluator.curve) == 1 and evaluator.curve[0]["epoch"] == 0
    assert 0.0 <= evaluator.curve[0]["knn"] <= 1.0 and 0.0 <= evaluator.curve[0]["probe"] <= 1.0
