"""Progress of the long loops (a training epoch, the kNN monitor, data_prep's fetch), with tqdm.

One policy for every step, decided when a loop starts:

* on a terminal: a bar refreshed in place (carriage returns), cleared when the loop ends (the
  step's own line per epoch says how it went);
* elsewhere (Azure ML's logs, the local executor, which captures a step's output into
  ``log.txt`` and reads it line by line, so that a carriage return would start a line of its
  own): a plain line every ``$SSLPIPE_PROGRESS_INTERVAL`` seconds (default 10) with the count,
  the rate and the ETA, e.g. ``epoch 2/5: 40/110 batch (36%) in 00:30, ETA 00:53, 1.31batch/s``;
  a loop shorter than that prints nothing;
* nothing in any process but rank 0 of a distributed run (the process group's rank, else
  ``$RANK``).

``$SSLPIPE_PROGRESS`` overrides the choice: ``auto`` (the default), ``bar``, ``lines`` or
``off``. The display only counts iterations: it reads no tensor, so a training step never waits
for the device because of it. Output goes to stderr: some commands print a report on stdout.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, Literal, TextIO, TypeVar

from tqdm import tqdm

MODE_ENV = "SSLPIPE_PROGRESS"
INTERVAL_ENV = "SSLPIPE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0
BAR_REFRESH_S = 0.5
Mode = Literal["bar", "lines", "off"]
_FORCED: dict[str, Mode] = {"bar": "bar", "lines": "lines", "off": "off"}

_T = TypeVar("_T")


class _Bar(tqdm):
    """tqdm's bar, without its monitor thread (the fetch forks processes while a bar runs)."""

    monitor_interval = 0


class _Lines(tqdm):
    """tqdm's counts, rate and ETA as whole lines, no carriage return, no clearing."""

    monitor_interval = 0

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # close() clearing the bar: a log keeps what it printed
            return False
        self.fp.write(" ".join(str(self).split()) + "\n")  # tqdm pads the rate
        self.fp.flush()
        return True


def current_rank() -> int:
    """This process's rank: the running process group's, else ``$RANK``, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0").strip() or 0)
    except ValueError:
        return 0


def interval_s() -> float:
    """Seconds between two plain lines: ``$SSLPIPE_PROGRESS_INTERVAL``, default 10."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, "").strip() or DEFAULT_INTERVAL_S)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return max(0.0, value)


def mode_for(stream: TextIO, rank: int | None = None) -> Mode:
    """How progress shows on ``stream`` in the process of ``rank`` (default: this one's)."""
    if (current_rank() if rank is None else rank) != 0:
        return "off"
    chosen = os.environ.get(MODE_ENV, "auto").strip().lower()
    if chosen in _FORCED:
        return _FORCED[chosen]
    isatty = getattr(stream, "isatty", None)
    try:
        terminal = bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed stream
        terminal = False
    return "bar" if terminal else "lines"


def bar(
    iterable: Iterable[_T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    rank: int | None = None,
    stream: TextIO | None = None,
) -> tqdm:
    """A tqdm over ``iterable`` (or updated by hand with ``.update(n)``), shown as the policy
    above says; iterate it, or use it as a context manager, so that it is closed."""
    stream = sys.stderr if stream is None else stream
    mode = mode_for(stream, rank)
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    options: dict[str, Any] = {"desc": desc, "total": total, "unit": unit, "file": stream}
    if mode == "off":
        return _Bar(iterable, disable=True, **options)
    if mode == "bar":
        return _Bar(iterable, mininterval=BAR_REFRESH_S, leave=False, dynamic_ncols=True, **options)
    every = interval_s()
    known = "{n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) in {elapsed}, ETA {remaining}"
    counted = known if total else "{n_fmt} {unit} in {elapsed}"
    return _Lines(
        iterable,
        mininterval=every,
        delay=every,  # nothing before the first interval: short loops print nothing
        miniters=1,  # look at the clock after every item: lines come every interval
        leave=False,
        bar_format="{desc}: " + counted + ", {rate_fmt}",
        **options,
    )


__all__ = ["DEFAULT_INTERVAL_S", "INTERVAL_ENV", "MODE_ENV", "bar", "current_rank", "mode_for"]
