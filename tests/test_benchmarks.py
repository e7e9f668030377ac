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
