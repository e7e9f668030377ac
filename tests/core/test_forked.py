"""run_forked: work in forked processes, their messages relayed here, failures raised here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from sslpipe.core.forked import ForkedWorkerError, can_fork, run_forked

pytestmark = pytest.mark.skipif(not can_fork(), reason="run_forked forks (Linux only)")
Send = Callable[[Any], None]


def count_to(share: tuple[str, int], send: Send, stop: Event) -> None:
    name, count = share
    for number in range(count):
        send((name, number, os.getpid()))


def test_every_message_of_every_process_arrives_in_the_order_each_sent_them() -> None:
    seen: list[tuple[str, int, int]] = []
    run_forked([("a", 50), ("b", 30), ("c", 0)], count_to, seen.append)
    for name, count in (("a", 50), ("b", 30)):
        assert [n for who, n, _ in seen if who == name] == list(range(count))
    assert os.getpid() not in {pid for _, _, pid in seen}
    assert len({pid for _, _, pid in seen}) == 2  # "c" sent nothing


def test_no_shares_run_nothing() -> None:
    seen: list[Any] = []
    run_forked([], count_to, seen.append)
    assert seen == []


def fail_or_wait_for_stop(share: str, send: Send, stop: Event) -> None:
    if share == "fail":
        raise ValueError("blob 'x.jpeg' is unreadable")
    while not stop.wait(0.01):  # works until told to stop, then returns what it has
        send("working")
    send("stopped cleanly")


def test_the_first_failure_stops_the_others_and_is_raised_as_itself() -> None:
    seen: list[str] = []
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^blob 'x\.jpeg' is unreadable$"):
        run_forked(["wait", "fail", "wait"], fail_or_wait_for_stop, seen.append)
    assert time.monotonic() - started < 30
    assert seen.count("stopped cleanly") == 2


class Unpicklable(Exception):
    def __init__(self, code: int, text: str) -> None:  # pickling passes only (text,) back
        super().__init__(text)
        self.code = code


def raise_unpicklable(share: int, send: Send, stop: Event) -> None:
    raise Unpicklable(share, "a custom error")


def test_an_exception_that_cannot_cross_processes_arrives_as_its_type_and_text() -> None:
    with pytest.raises(RuntimeError, match=r"^Unpicklable: a custom error$"):
        run_forked([7], raise_unpicklable, lambda message: None)


def exit_silently(share: int, send: Send, stop: Event) -> None:
    send("about to vanish")
    os._exit(share)


def test_a_process_that_dies_without_a_word_is_an_error_naming_it() -> None:
    seen: list[str] = []
    with pytest.raises(ForkedWorkerError, match=r"step-0 ended without a result \(exit code 3\)"):
        run_forked([3], exit_silently, seen.append, name="step")
    assert seen == ["about to vanish"]


def test_a_failing_receiver_stops_the_processes_and_raises_here() -> None:
    def refuse(message: Any) -> None:
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        run_forked(["wait"], fail_or_wait_for_stop, refuse)


PARENT = """
import sys, time
from pathlib import Path
from sslpipe.core.forked import run_forked

def linger(folder, send, stop):
    (Path(folder) / "started").write_text("")
    try:
        time.sleep(600)
    finally:  # SIGTERM unwinds the process, so finally blocks run
        (Path(folder) / "cleaned up").write_text("")

run_forked([sys.argv[1]], linger, print)
"""


def test_the_processes_end_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT))
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], cwd=Path(__file__).resolve().parents[2]
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert parent.poll() is None and time.monotonic() < deadline, "never started"
            time.sleep(0.05)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while not (tmp_path / "cleaned up").exists():
            assert time.monotonic() < deadline, "the forked process outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
