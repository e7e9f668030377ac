"""The executor's parts on their own: the step cache and the process runner."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from sslpipe.execution.cache import StepCache
from sslpipe.execution.graph import OutputSpec, StepSpec
from sslpipe.execution.process import TAIL_LINES, run_process


def make_step(tmp_path: Path, outputs: tuple[str, ...] = ("out",)) -> StepSpec:
    return StepSpec(
        name="s",
        component_name="c",
        component_version="1",
        command="python -c pass",
        code_dir=tmp_path,
        component_dir=tmp_path,
        inputs={},
        outputs={name: OutputSpec("uri_folder") for name in outputs},
    )


def test_a_cache_entry_is_found_while_its_outputs_exist(tmp_path: Path) -> None:
    cache, step = StepCache(tmp_path / "cache"), make_step(tmp_path)
    out = tmp_path / "run" / "out"
    out.mkdir(parents=True)
    assert cache.lookup("k", step) is None
    cache.remember("k", "run-1", "s", {"out": str(out)})
    entry = cache.lookup("k", step)
    assert entry is not None and (entry.run_id, entry.outputs) == ("run-1", {"out": str(out)})
    assert cache.lookup("k", make_step(tmp_path, ("out", "more"))) is None
    out.rmdir()
    assert cache.lookup("k", step) is None


def test_an_unreadable_cache_entry_is_a_miss(tmp_path: Path) -> None:
    cache = StepCache(tmp_path)
    (tmp_path / "k.json").write_text("{not json")
    assert cache.lookup("k", make_step(tmp_path)) is None


def test_a_process_streams_its_output_and_keeps_the_tail(tmp_path: Path) -> None:
    log, echoed = io.StringIO(), list[str]()
    code = f"import sys\nfor i in range({TAIL_LINES + 5}): print(i)\nsys.exit(3)"
    returncode, tail = run_process(
        [sys.executable, "-c", code], cwd=tmp_path, env={}, log=log, echo=echoed.append
    )
    assert returncode == 3
    assert echoed == [str(i) for i in range(TAIL_LINES + 5)]
    assert tail == echoed[-TAIL_LINES:]
    assert log.getvalue().endswith("# exit code 3\n")


def test_a_process_that_cannot_start_exits_127(tmp_path: Path) -> None:
    log, echoed = io.StringIO(), list[str]()
    returncode, tail = run_process(
        [str(tmp_path / "missing")], cwd=tmp_path, env={}, log=log, echo=echoed.append
    )
    assert returncode == 127 and tail == echoed and "cannot start" in tail[0]
