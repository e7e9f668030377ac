"""Work shared out to forked processes that report back to this one, message by message.

:func:`run_forked` forks one process per share; each runs ``work(share, send, stop)`` and
sends what it wants this process to see (results, progress) with ``send``; this process hands
every message to ``on_message`` as it arrives, so it can record progress while the work goes
on. The first failure of any process stops the others (``stop`` is set: they finish what they
have in hand and return) and is raised here once all have ended, as the same exception where
it can cross processes. A process that dies without a word (killed, out of memory) is a
:class:`ForkedWorkerError`. When this process dies, the forked ones get SIGTERM (Linux's
parent-death signal), which ends them through ``SystemExit``, so their ``finally`` blocks run
and no orphan keeps writing.

Fork, rather than spawn or a fork server, because those re-import the caller's main module in
every process, which would demand an ``if __name__ == "__main__"`` guard of every script that
calls a step; and because the shares need not be pickled. Call it before this process starts
threads whose locks a fork could copy while held (an event loop's resolver or executor).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.synchronize import Event
from typing import Any, TypeVar

_Share = TypeVar("_Share")
Send = Callable[[Any], None]
_PR_SET_PDEATHSIG = 1
_GRACE_S = 60.0  # how long stopped processes may take to finish what they have in hand


class ForkedWorkerError(RuntimeError):
    """A forked process ended without reporting how (a signal, ``os._exit``)."""


def can_fork() -> bool:
    """Whether :func:`run_forked` may be used here (Linux: forking elsewhere is not safe)."""
    return sys.platform.startswith("linux")


def run_forked(
    shares: Sequence[_Share],
    work: Callable[[_Share, Send, Event], None],
    on_message: Callable[[Any], None],
    *,
    name: str = "worker",
) -> None:
    """Run ``work(share, send, stop)`` in one forked process per share; ``on_message`` gets
    every message any of them sends, in this process, in the order each sent them.

    Raises:
        the first exception a process raised (a :class:`RuntimeError` with its text when the
        exception cannot be pickled), or :class:`ForkedWorkerError` when one died silently.
    """
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    running: dict[Connection, multiprocessing.process.BaseProcess] = {}
    failure: BaseException | None = None
    try:
        for number, share in enumerate(shares):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_serve, args=(work, share, send, stop, os.getpid()),
                name=f"{name}-{number}", daemon=True,
            )  # fmt: skip
            process.start()
            send.close()  # so that the pipe ends (EOF) when the process does
            running[receive] = process
        while running:
            for ready in wait(list(running)):
                assert isinstance(ready, Connection)
                done, error = _take(ready, running[ready], on_message)
                if error is not None and failure is None:
                    failure = error
                    stop.set()
                if done:
                    running.pop(ready).join()
    finally:
        stop.set()
        _end(list(running.values()))
    if failure is not None:
        raise failure


def _take(
    connection: Connection,
    process: multiprocessing.process.BaseProcess,
    on_message: Callable[[Any], None],
) -> tuple[bool, BaseException | None]:
    """Read one message: (whether the process is done, its failure if it reported one)."""
    try:
        kind, payload = connection.recv()
    except EOFError:
        process.join()
        return True, ForkedWorkerError(
            f"{process.name} ended without a result (exit code {process.exitcode})"
        )
    if kind == "message":
        on_message(payload)
        return False, None
    return True, payload if kind == "failed" else None


def _end(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Wait for stopped processes to return; terminate those that take too long."""
    for process in processes:
        process.join(_GRACE_S)
        if process.is_alive():
            process.terminate()
            process.join()


def _serve(
    work: Callable[[Any, Send, Event], None],
    share: Any,
    connection: Connection,
    stop: Event,
    parent: int,
) -> None:
    """The forked process: ``work`` with its messages and its end on ``connection``."""
    _die_with(parent)
    try:
        work(share, lambda payload: connection.send(("message", payload)), stop)
    except BaseException as err:  # reported, whatever it is, then this process ends
        connection.send(("failed", _portable(err)))
    else:
        connection.send(("done", None))
    finally:
        connection.close()


def _die_with(parent: int) -> None:
    """Get SIGTERM when the parent dies, and let SIGTERM unwind (``finally`` blocks run)."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # died before the signal was asked for
        raise SystemExit(1)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _portable(err: BaseException) -> BaseException:
    """``err`` when it survives pickling, else a RuntimeError with its type and text (and its
    traceback on this process's stderr)."""
    with contextlib.suppress(Exception):
        pickle.dumps(err)
        reduced: Any = err.__reduce_ex__(pickle.HIGHEST_PROTOCOL)  # (callable, args, ...)
        reduced[0](*reduced[1])  # what unpickling will call: often the exception's __init__
        return err
    traceback.print_exception(err, file=sys.stderr)
    return RuntimeError(f"{type(err).__name__}: {err}")
