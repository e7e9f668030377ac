"""Run the benchmarks, print the table and write BENCHMARKS.md.

    .venv/bin/python -m benchmarks.run            # every row, full size (about 30 min, 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # smaller sizes, under 5 minutes
    .venv/bin/python -m benchmarks.run --only data_prep connect_db --output /tmp/B.md

A row whose module does not exist is reported as not run; a row that fails is reported with
its error, and the others still run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    check_row,
    import_optional,
    log,
    machine,
    markdown_report,
    markdown_table,
    not_run,
)

ROWS: dict[str, tuple[str, str]] = {
    "data_prep": ("benchmarks.bench_data_prep", "1. data_prep throughput"),
    "latency": ("benchmarks.bench_latency", "6. data_prep under 20 ms latency"),
    "moco": ("benchmarks.bench_moco", "2. moco_train throughput vs lightly"),
    "quality": ("benchmarks.bench_quality", "3. representation quality"),
    "connect_db": ("benchmarks.bench_connect_db", "4. connect_db at scale"),
    "e2e": ("benchmarks.bench_e2e", "5. end to end"),
    "gpu": ("benchmarks.bench_gpu", "7. GPU throughput (one GPU)"),
}
"""Row name -> (module, title), in table order."""

RUN_ORDER = ["data_prep", "latency", "connect_db", "e2e", "moco", "quality", "gpu"]
"""The order the rows run in (the table keeps the order of :data:`ROWS`)."""

QUICK_SKIPS = {"e2e": "skipped in --quick (run it with --only e2e)"}
"""Rows --quick leaves out unless named with --only."""


def run_rows(
    names: Sequence[str],
    *,
    quick: bool,
    explicit: bool,
    progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every named row's results in table order; missing modules and failures become rows
    that say so. The rows run in :data:`RUN_ORDER` (the long training rows last, so that a
    run stopped midway still has the others); ``progress`` gets the rows so far after each."""
    done: dict[str, list[dict[str, Any]]] = {}

    def so_far() -> list[dict[str, Any]]:
        return [item for name in names if name in done for item in done[name]]

    for name in sorted(names, key=RUN_ORDER.index):
        if progress is not None and done:
            progress(so_far())
        done[name] = _run_one(name, quick=quick, explicit=explicit)
    return so_far()


def _run_one(name: str, *, quick: bool, explicit: bool) -> list[dict[str, Any]]:
    module_name, title = ROWS[name]
    if quick and not explicit and name in QUICK_SKIPS:
        return [not_run(title, QUICK_SKIPS[name])]
    module = import_optional(module_name)
    if module is None:
        return [not_run(title, f"not run: {module_name} does not exist yet")]
    log(f"{title} ({'quick' if quick else 'full'})")
    started = time.perf_counter()
    try:
        produced = [check_row(item) for item in module.run(quick)]
    except Exception as err:  # a failing row must not hide the others
        traceback.print_exc(file=sys.stderr)
        return [not_run(title, f"failed: {type(err).__name__}: {err}"[:500])]
    log(f"{title}: {len(produced)} row(s) in {time.perf_counter() - started:.0f} s")
    return produced


def _load() -> str:
    """The system's load averages: how busy the shared machine was."""
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 5 minutes")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(ROWS),
        metavar="NAME",
        help=f"run only these rows ({', '.join(ROWS)})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "BENCHMARKS.md",
        help="the Markdown report to write (default: BENCHMARKS.md)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name for name in ROWS if args.only is None or name in args.only]
    started, load = time.perf_counter(), _load()
    command = " ".join(
        ["python -m benchmarks.run", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]
    )

    def report(rows: list[dict[str, Any]], *, done: bool) -> None:
        seconds = time.perf_counter() - started
        info = machine() | {
            "load average (1, 5, 15 min)": f"{load} at the start, {_load()} at the end"
        }
        text = markdown_report(rows, info, command=command, seconds=seconds)
        if not done:  # a run stopped midway still leaves what it measured
            text += f"\n**Run in progress**: {len(rows)} row(s) so far.\n"
        args.output.write_text(text)

    rows = run_rows(
        names,
        quick=args.quick,
        explicit=args.only is not None,
        progress=lambda so_far: report(so_far, done=False),
    )
    print(markdown_table(rows))
    report(rows, done=True)
    log(f"wrote {args.output} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
