"""Progress inside long loops (sslpipe.core.progress): periodic plain lines with rate and ETA where
the output is a log, in-place refreshes on a terminal, nothing on ranks other than 0; and the
steps' loops that show it (moco_train's epochs and kNN monitor, classifier_train's epochs and
validation, data_prep's fetch), without waiting for the device in a training step."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sslpipe.core import progress
from sslpipe.core.config import ClassifierConfig, MocoConfig
from sslpipe.steps import moco_train
from sslpipe.steps.classifier_train import run_classifier_train
from sslpipe.steps.data_prep import run_data_prep
from tests.steps.test_classifier_train import FAST, make_labelled_data
from tests.steps.test_data_prep import GOOD, write_ids
from tests.steps.test_moco_train import SMALL, make_data

LINE = re.compile(
    r"^work: (\d+)/60 it \(\d+%\) in \d\d:\d\d, ETA (\d\d:\d\d), \d+\.\d\d(it/s|s/it)$"
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """tqdm's clock, moved by hand: one second per item."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("tqdm.std.time", fake)
    return fake


@pytest.fixture(autouse=True)
def defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (progress.MODE_ENV, progress.INTERVAL_ENV, "RANK"):
        monkeypatch.delenv(name, raising=False)


def walk(items: int, clock: Clock, **options: Any) -> tuple[list[int], str]:
    """Iterate a progress bar over ``range(items)``, one fake second per item."""
    stream = options.pop("stream")
    seen = []
    for item in progress.bar(range(items), desc="work", stream=stream, **options):
        clock.now += 1.0
        seen.append(item)
    return seen, stream.getvalue()


def test_a_log_gets_a_plain_line_every_interval_with_rate_and_eta(clock: Clock) -> None:
    seen, out = walk(60, clock, stream=io.StringIO())
    assert seen == list(range(60))  # the loop itself is untouched
    assert "\r" not in out  # the executor reads lines: a carriage return would split them
    lines = out.splitlines()
    assert len(lines) == 6, out  # every 10 s of a 60 s loop
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m[1]) for m in matches if m] == [10, 20, 30, 40, 50, 60]
    assert [m[2] for m in matches if m] == ["00:50", "00:40", "00:30", "00:20", "00:10", "00:00"]
    assert lines[0] == "work: 10/60 it (17%) in 00:10, ETA 00:50, 1.00it/s"


def test_the_interval_of_plain_lines_is_a_setting(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(progress.INTERVAL_ENV, "25")
    _, out = walk(60, clock, stream=io.StringIO())
    assert [line.split()[1] for line in out.splitlines()] == ["25/60", "50/60"]


def test_a_loop_shorter_than_the_interval_prints_nothing_in_a_log(clock: Clock) -> None:
    _, out = walk(9, clock, stream=io.StringIO())
    assert out == ""


def test_a_terminal_gets_one_line_refreshed_in_place(clock: Clock) -> None:
    seen, out = walk(6, clock, stream=Terminal())
    assert seen == list(range(6))
    assert "\n" not in out  # refreshed with carriage returns, and cleared at the end
    assert out.count("\r") >= 6
    assert "work:" in out and "3/6" in out and "it/s" in out
    assert "<00:03" in out  # tqdm's [elapsed<remaining] ETA


def test_other_ranks_show_nothing(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    for stream in (io.StringIO(), Terminal()):
        seen, out = walk(60, clock, stream=stream, rank=1)
        assert seen == list(range(60)) and out == ""
    monkeypatch.setenv("RANK", "2")  # torchrun's and Azure ML's variable, when not told
    assert progress.mode_for(io.StringIO()) == "off"
    seen, out = walk(60, clock, stream=io.StringIO())
    assert seen == list(range(60)) and out == ""
    monkeypatch.setenv("RANK", "0")
    assert progress.mode_for(io.StringIO()) == "lines"


def test_the_rank_of_a_running_process_group_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    class Group:  # torch.distributed with a process group (started without $RANK, by spawn)
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def is_available(self) -> bool:
            return True

        def is_initialized(self) -> bool:
            return True

        def get_rank(self) -> int:
            return self.rank

    monkeypatch.setitem(sys.modules, "torch.distributed", Group(1))
    assert progress.current_rank() == 1 and progress.mode_for(Terminal()) == "off"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(sys.modules, "torch.distributed", Group(0))
    assert progress.current_rank() == 0 and progress.mode_for(Terminal()) == "bar"


def test_the_environment_can_force_a_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    assert progress.mode_for(io.StringIO()) == "lines"
    assert progress.mode_for(Terminal()) == "bar"
    monkeypatch.setenv(progress.MODE_ENV, "off")
    assert progress.mode_for(Terminal()) == "off"
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    assert progress.mode_for(Terminal()) == "lines"
    monkeypatch.setenv(progress.MODE_ENV, "bar")
    assert progress.mode_for(io.StringIO()) == "bar"
    assert progress.mode_for(io.StringIO(), rank=3) == "off"  # whatever is forced


def test_a_bar_can_be_updated_by_hand(clock: Clock) -> None:
    stream = io.StringIO()
    with progress.bar(desc="fetching", total=30, unit="img", stream=stream) as shown:
        for _ in range(30):
            clock.now += 1.0
            shown.update()
    assert stream.getvalue().splitlines() == [
        "fetching: 10/30 img (33%) in 00:10, ETA 00:20, 1.00img/s",
        "fetching: 20/30 img (67%) in 00:20, ETA 00:10, 1.00img/s",
        "fetching: 30/30 img (100%) in 00:30, ETA 00:00, 1.00img/s",
    ]


def test_an_iterable_without_a_length_gets_count_and_rate(clock: Clock) -> None:
    stream = io.StringIO()
    for _ in progress.bar((i for i in range(12)), desc="work", stream=stream):
        clock.now += 1.0
    assert stream.getvalue() == "work: 10 it in 00:10, 1.00it/s\n"


# --- the steps' loops --------------------------------------------------------------------------


@pytest.fixture()
def every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain lines after every item, whatever the time: each loop shows up in stderr. (And
    the training steps' tracking in a store of the test's own.)"""
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.setenv("SSLPIPE_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_the_display_reads_no_tensor(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a training step yields passes through untouched: nothing makes the host wait."""
    reads: list[str] = []
    for name in ("item", "__float__", "__int__", "__bool__", "__len__", "__repr__", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *a: Any, _real: Any = real, _name: str = name) -> Any:
            reads.append(_name)
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, spy)
    losses = [torch.tensor(float(i)) for i in range(30)]
    for stream in (io.StringIO(), Terminal()):
        for loss in progress.bar(losses, desc="epoch 1/1", unit="batch", stream=stream):
            clock.now += 1.0
            assert loss.dim() == 0
        assert "epoch 1/1: " in stream.getvalue()
    assert reads == []
    assert float(losses[1]) == 1.0 and reads == ["__float__"]  # the spies see a read


def test_moco_train_shows_its_epochs_and_knn_monitor(
    tmp_path: Path, every_step: None, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_data(tmp_path / "data", count=32)
    moco_train.run_moco_train(
        data_dir=data, model_dir=tmp_path / "model", checkpoint_dir=tmp_path / "ckpt",
        config=MocoConfig(**{**SMALL, "epochs": 1}), register=False, resume=False,
    )  # fmt: skip
    err = capsys.readouterr().err
    shown = _lines(err, "epoch 1/1: ")
    assert [line.split()[2] for line in shown] == ["0/2", "1/2", "2/2"], err  # 32 images / 16
    assert all(" batch (" in line and ", ETA " in line for line in shown), shown
    monitor = _lines(err, "kNN monitor: ")  # decoding once, then at random init and after
    assert "kNN monitor: decoding: 11/11 img (100%)" in "\n".join(monitor), err
    assert sum(line.startswith("kNN monitor: 11/11 img (100%)") for line in monitor) == 2, err


def test_classifier_train_shows_training_and_validation_of_each_epoch(
    tmp_path: Path, every_step: None, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_labelled_data(tmp_path / "data", per_split={"train": 4, "val": 2})
    run_classifier_train(
        data_dir=data, model_dir=tmp_path / "model", checkpoint_dir=tmp_path / "ckpt",
        config=ClassifierConfig(
            **{**FAST, "backbone": "torchvision:resnet18", "epochs": 2, "mode": "head"}
        ),
    )  # fmt: skip
    err = capsys.readouterr().err
    for epoch in (1, 2):
        training = _lines(err, f"epoch {epoch} (head {epoch}/2): ")
        assert training and all(", ETA " in line for line in training), err
        assert any(" batch (100%)" in line for line in training), training
    validation = _lines(err, "validation: ")
    assert sum(" batch (100%)" in line for line in validation) == 2, err


def test_data_prep_shows_its_fetch(
    tiny_catalog: Any, every_step: None, capsys: pytest.CaptureFixture[str]
) -> None:
    for processes in (1, 2):  # in this process, and reported back by forked ones
        ids = write_ids(tiny_catalog.root / f"ids{processes}", GOOD)
        run_data_prep(
            ids_dir=ids, blob_uri=tiny_catalog.blob_uri, image_size=24, processes=processes,
            output_dir=tiny_catalog.root / f"data{processes}",
        )  # fmt: skip
        shown = _lines(capsys.readouterr().err, "fetching: ")
        assert [line.split()[1] for line in shown] == ["0/3", "1/3", "2/3", "3/3"], shown
        assert all(" img (" in line and ", ETA " in line for line in shown), shown
