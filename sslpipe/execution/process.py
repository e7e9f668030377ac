"""Running a step's process: its environment, and its output streamed line by line to the
console and the step's log."""

from __future__ import annotations

import os
import subprocess
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sslpipe.data.image_cache import IMAGE_CACHE_ENV
from sslpipe.execution.graph import StepSpec

TAIL_LINES = 20
"""Lines of a step's output kept for its failure message."""


def step_environment(
    step: StepSpec, *, overrides: Mapping[str, str], image_cache: Path
) -> dict[str, str]:
    """The environment of a step's process: ``os.environ``, then the step's own variables,
    then ``overrides`` (the executor's); the workspace's image cache unless one is set."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # so that output streams line by line, as it happens
    if step.processes > 1:
        # torchrun would set 1 (with a warning); share the cores between the processes.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // step.processes)))
    env.update(step.environment_variables)
    env.update(overrides)
    # The workspace's image cache, shared by data_prep runs (sslpipe.data.image_cache).
    env.setdefault(IMAGE_CACHE_ENV, str(image_cache))
    return env


def run_process(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: IO[str],
    echo: Callable[[str], None],
) -> tuple[int, list[str]]:
    """Run ``argv``; stream its output to ``echo`` and ``log``. (returncode, last lines).

    A process that cannot start returns 127 and the reason as its output.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
    except OSError as exc:
        message = f"cannot start {argv[0]!r}: {exc}"
        log.write(message + "\n")
        echo(message)
        return 127, [message]
    with _terminate_on_error(process):
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            log.write(line + "\n")
            log.flush()
            tail.append(line)
            echo(line)
        returncode = process.wait()
    log.write(f"# exit code {returncode}\n")
    return returncode, list(tail)


@contextmanager
def _terminate_on_error(process: subprocess.Popen[str]) -> Iterator[None]:
    """Stop the child when we are interrupted, so that no step keeps running unseen."""
    try:
        yield
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
