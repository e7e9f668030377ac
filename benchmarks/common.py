"""What every benchmark row shares: the row record, medians, child processes that report their
peak memory, the machine's description, the Markdown table, and the local servers.

A row module has one function ``run(quick: bool) -> list[dict]``; each dict is a :func:`row`.
Ratios are always "bigger is better for the project": project / baseline for rates (img/s),
baseline / project for times and memory (s, MiB).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SSLPIPE_BENCH_CACHE", ROOT / "benchmarks" / ".cache"))
"""Generated inputs kept between runs (images, metadata stores); git-ignored."""

KEYS = ("row", "project", "baseline", "unit", "ratio", "target", "met", "notes")
VERSIONED = (
    "torch",
    "torchvision",
    "pillow",
    "numpy",
    "azure-storage-blob",
    "azure-cosmos",
    "lightly",
)


# --- rows


def row(
    name: str,
    *,
    project: float,
    baseline: float,
    unit: str,
    higher_is_better: bool,
    target: str = "",
    met: bool | None = None,
    notes: str = "",
) -> dict[str, Any]:
    """One table row; ``ratio`` is project/baseline when higher is better (rates), else
    baseline/project (times, memory), so that a ratio above 1 always favours the project."""
    if higher_is_better:
        ratio = project / baseline if baseline else math.nan
    else:
        ratio = baseline / project if project else math.nan
    return {
        "row": name,
        "project": float(project),
        "baseline": float(baseline),
        "unit": unit,
        "ratio": float(ratio),
        "target": target,
        "met": met,
        "notes": notes,
    }


def not_run(name: str, why: str) -> dict[str, Any]:
    """A row that could not be measured (module missing, skipped, failed); ``why`` says so."""
    return {
        "row": name,
        "project": math.nan,
        "baseline": math.nan,
        "unit": "",
        "ratio": math.nan,
        "target": "",
        "met": None,
        "notes": why,
    }


def check_row(item: Any) -> dict[str, Any]:
    """``item`` as a row dict with every key of :data:`KEYS`.

    Raises:
        ValueError: a key is missing or of the wrong type; the message names it.
    """
    if not isinstance(item, dict):
        raise ValueError(f"a benchmark row must be a dict with keys {KEYS}, found {item!r:.200}")
    missing = [key for key in KEYS if key not in item]
    if missing:
        raise ValueError(f"benchmark row {item.get('row')!r} lacks {missing}; expected {KEYS}")
    for key in ("project", "baseline", "ratio"):
        if not isinstance(item[key], int | float):
            raise ValueError(f"benchmark row {item['row']!r}: {key} must be a number")
    if item["met"] not in (True, False, None):
        raise ValueError(f"benchmark row {item['row']!r}: met must be true, false or null")
    return item


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else math.nan


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``"median 12.3 (10.1-13.0, n=3)"`` for notes."""
    if not values:
        return "no values"
    return (
        f"median {median(values):.{digits}f} ({min(values):.{digits}f}-"
        f"{max(values):.{digits}f}, n={len(values)})"
    )


def interleaved(
    repeats: int, contestants: dict[str, Callable[[], dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Run every contestant ``repeats`` times, interleaved and rotating who goes first, so that
    a noisy neighbour or a warming cache hits all of them alike; results per contestant."""
    names = list(contestants)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(contestants[name]())
    return results


# --- child processes


def peak_rss_mib() -> float:
    """This process's peak resident set size so far: ``VmHWM`` of /proc/self/status.

    Not ``ru_maxrss``: Linux carries it across fork and exec, so a child's ``ru_maxrss`` starts
    at its parent's resident size when it forked (a 1 GiB runner makes every child read
    1 GiB), while ``VmHWM`` belongs to the memory map that exec created.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far, all its threads together, plus that of
    its children that have exited and been waited for (e.g. a process pool after shutdown)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _pss_mib(pid: int) -> float:
    """Proportional set size of ``pid``: its own pages plus its share of pages it shares (with
    the parent it was forked from, say), so that a process tree's PSS adds up honestly."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *_descendants(int(child))]
    return found


class TreeMemory:
    """Peak PSS of this process and all its descendants together, sampled by a thread every
    ``interval_s`` while the ``with`` block runs (``peak_mib``; NaN where /proc lacks it).

    A child's own peak (``VmHWM``) misses the memory of worker processes; summing their RSS
    would count the pages they share with the parent once per process.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s, self.peak_mib = interval_s, math.nan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        if Path(f"/proc/{os.getpid()}/smaps_rollup").exists():
            self.peak_mib = 0.0
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            total = sum(_pss_mib(p) for p in [pid, *_descendants(pid)])
            self.peak_mib = max(self.peak_mib, total)
            self._stop.wait(self.interval_s)


def current_rss_mib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return math.nan


def in_child(
    function: str, timeout_s: float = 1800.0, env: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Call ``module:function(**kwargs)`` in a fresh Python process; its result (a JSON dict)
    plus ``peak_rss_mib`` (the child's own peak, measured there) and ``rss_after_import_mib``.

    Raises:
        RuntimeError: the child failed; the message has the end of its stderr.
    """
    command = [sys.executable, "-m", "benchmarks.child", function, json.dumps(kwargs)]
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"{function} failed in a child process (exit {done.returncode}):\n{tail}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    seconds: float = math.nan

    def __enter__(self) -> Timer:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started


# --- the machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024.0 / 1024.0
    return math.nan


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu() -> str:
    try:
        import torch
    except ImportError:
        return "none (torch missing)"
    if not torch.cuda.is_available():
        return "none"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def machine() -> dict[str, str]:
    """The machine and library versions, for the report's header."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    info = {
        "date (UTC)": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "CPU": f"{_cpu_model()}, {usable} usable core(s) of {cores}",
        "memory": f"{_memory_gib():.1f} GiB",
        "GPU": _gpu(),
        "OS": platform.platform(),
        "Python": platform.python_version(),
    }
    info |= {package: _version(package) for package in VERSIONED}
    return info


# --- the report


def _number(value: float) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "–"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return f"{value:.2g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as a Markdown table (``ratio`` > 1 favours the project)."""
    lines = [
        "| row | project | baseline | unit | ratio | target | met | notes |",
        "|---|---:|---:|---|---:|---|---|---|",
    ]
    for item in rows:
        met = {True: "yes", False: "**no**", None: "–"}[item["met"]]
        ratio = _number(item["ratio"])
        ratio = ratio if ratio == "–" else f"{ratio}x"
        cells = [
            _cell(str(item["row"])),
            _number(item["project"]),
            _number(item["baseline"]),
            _cell(item["unit"]),
            ratio,
            _cell(item["target"]),
            met,
            _cell(item["notes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(
    rows: Sequence[dict[str, Any]], info: dict[str, str], *, command: str, seconds: float
) -> str:
    """BENCHMARKS.md: what was run, on what, and the table."""
    header = "\n".join(f"- **{key}**: {value}" for key, value in info.items())
    return (
        "# Benchmarks\n\n"
        f"Generated by `{command}` in {seconds / 60:.1f} min. "
        "Ratios favour the project above 1: project / baseline for rates, "
        "baseline / project for times and memory. Project and baseline ran interleaved in the "
        "same process tree; values are medians over the repeats given in the notes. "
        "See benchmarks/README.md for what each row measures.\n\n"
        f"## Machine\n\n{header}\n\n## Results\n\n{markdown_table(rows)}\n"
    )


# --- modules and servers


def import_optional(name: str) -> ModuleType | None:
    """The module ``name``, or None when it does not exist (a row not written yet)."""
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def servers() -> ModuleType:
    """infra/servers.py, which installs and starts the local servers (stdlib only)."""
    name = "sslpipe_infra_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "infra" / "servers.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def server(name: str) -> dict[str, str]:
    """Start (idempotent) the local server ``name`` ("azurite", "cosmos"); its connection info."""
    module = servers()
    module.start([name])
    info: dict[str, str] = module.connection_info()[name]
    return info


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (children inherit them)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
