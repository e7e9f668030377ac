"""Run a :class:`PipelineGraph` on this machine, with Azure ML-style step reuse.

Layout under the workspace::

    runs/<run_id>/run.json                   the run record (rewritten after every change)
    runs/<run_id>/graph.json                 the graph, so that the run can be resumed
    runs/<run_id>/<step>/outputs/<output>    a folder (uri_folder) or a file path (uri_file)
    runs/<run_id>/<step>/log.txt             the step's stdout and stderr
    cache/<cache_key>.json                   {run_id, step, outputs} of a step that succeeded

A step is reused (not run) when it is deterministic and an earlier successful step had the
same cache key: the same component spec, the same code (component folder + library paths),
the same literal parameters, the same *content* of every input path (through symbolic links)
and the same live state, pinned when the run starts (:mod:`sslpipe.execution.live`: the model
version a registry reference names, the registry a step registers in, cached weights). When a
step runs, the console says why (what changed since its latest run, from the run records:
:mod:`sslpipe.execution.history`); its command goes to its log and the run record.

A step whose component (or pipeline node) declares ``distribution: {type: pytorch,
process_count_per_instance: N}`` with N > 1 runs under torchrun on this machine's cores or
GPUs: ``python -m torch.distributed.run --standalone --nproc_per_node N <script or -m module>
...``. torchrun gives every process RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT,
as Azure ML does; the output of all processes goes to the step's log, and the step fails when
any process fails.

The executor composes :mod:`sslpipe.execution.cache` (cache keys and entries),
:mod:`sslpipe.execution.commands` (a component command as an argument list, torchrun) and
:mod:`sslpipe.execution.process` (a step's environment and process, its output streamed).
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sslpipe.core.io import write_atomically, write_json
from sslpipe.execution.cache import CACHE_KEY_VERSION, CacheEntry, StepCache, compute_cache_key
from sslpipe.execution.commands import (
    CommandError,
    format_value,
    resolve_command,
    step_argv,
    torchrun_argv,
)
from sslpipe.execution.graph import LiteralValue, PipelineGraph, StepSpec, UpstreamOutput
from sslpipe.execution.hashing import hash_code, hash_path
from sslpipe.execution.history import RunHistory, explain_miss
from sslpipe.execution.live import LiveState, LiveStateError, LiveStateResolver
from sslpipe.execution.process import TAIL_LINES, run_process, step_environment
from sslpipe.execution.record import (
    DONE_STEP_STATUSES,
    RunRecord,
    StepRecord,
    utc_now,
)

__all__ = [  # the executor, and the parts it composes (importable from here as before)
    "CACHE_KEY_VERSION",
    "TAIL_LINES",
    "CommandError",
    "LocalExecutor",
    "StepFailedError",
    "compute_cache_key",
    "format_value",
    "new_run_id",
    "resolve_command",
    "torchrun_argv",
]

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StepFailedError(RuntimeError):
    """A step of a local run failed; the run stopped and later steps were skipped.

    Attributes:
        step: the step's name.
        returncode: the process's exit code (None when it could not start or its inputs
            were missing).
        log_path: the step's log file.
        tail: the last lines of the log (for printing without opening the file).
        run_id: the run the step belongs to (resume it with ``LocalExecutor.resume``).
    """

    def __init__(
        self,
        step: str,
        returncode: int | None,
        log_path: Path,
        *,
        tail: Sequence[str] = (),
        reason: str | None = None,
        run_id: str | None = None,
    ) -> None:
        what = f"failed: {reason}" if reason else f"failed with exit code {returncode}"
        super().__init__(f"step {step!r} {what}; see its log: {log_path}")
        self.step = step
        self.returncode = returncode
        self.log_path = log_path
        self.tail = "\n".join(tail)
        self.run_id = run_id


# --------------------------------------------------------------------------- helpers


def new_run_id() -> str:
    """A run id that sorts by start time: ``YYYYmmdd-HHMMSS-xxxxxx`` (UTC + random)."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _default_echo(line: str) -> None:
    print(line, flush=True)


def _short(key: str | None) -> str:
    return (key or "")[:8]


# --------------------------------------------------------------------------- executor


@dataclass
class _Prepared:
    """Everything known about a step before it runs."""

    parameters: dict[str, Any]
    inputs: dict[str, str]
    live: LiveState = field(default_factory=LiveState)
    input_hashes: dict[str, str] = field(default_factory=dict)
    code_hash: str | None = None
    cache_key: str | None = None


class LocalExecutor:
    """Runs pipeline graphs as subprocesses on this machine, reusing unchanged steps."""

    def __init__(
        self,
        workspace: Path,
        *,
        force_rerun: bool = False,
        env: Mapping[str, str] | None = None,
        library_paths: Sequence[Path] = (),
        python: str = sys.executable,
        echo: Callable[[str], None] | None = None,
        live_state: LiveStateResolver | None = None,
    ) -> None:
        """
        Args:
            workspace: folder holding ``runs/`` and ``cache/`` (created when missing).
            force_rerun: run every step even when an earlier identical one could be reused.
            env: extra environment variables for every step (on top of ``os.environ``).
            library_paths: code outside the component folders that steps import (e.g. the
                ``sslpipe`` package); part of every step's code hash.
            python: interpreter that replaces a leading ``python`` in commands.
            echo: receives console lines (default: ``print`` with flush).
            live_state: resolves what steps depend on beyond their code, parameters and
                inputs (registry references, registry, cached weights; see
                :mod:`sslpipe.execution.live`); None: nothing.
        """
        self.workspace = Path(workspace).resolve()
        self.force_rerun = force_rerun
        self.env = dict(env or {})
        self.library_paths = [Path(p).resolve() for p in library_paths]
        self.python = python
        self.echo = echo or _default_echo
        self.live_state = live_state
        self._cache = StepCache(self.cache_dir)
        self._hash_memo: dict[str, str] = {}
        self._history = RunHistory(self.runs_dir, pipeline=None)

    @property
    def runs_dir(self) -> Path:
        """``<workspace>/runs``."""
        return self.workspace / "runs"

    @property
    def cache_dir(self) -> Path:
        """``<workspace>/cache``."""
        return self.workspace / "cache"

    def run_dir(self, run_id: str) -> Path:
        """The folder of one run."""
        return self.runs_dir / run_id

    # ---- public API

    def run(self, graph: PipelineGraph, *, run_id: str | None = None) -> RunRecord:
        """Run every step of ``graph`` in dependency order and return the run record.

        Raises:
            StepFailedError: when a step fails (the record, with status ``failed``, is in
                ``<run>/run.json``; resume it with :meth:`resume`).
            FileExistsError: when ``run_id`` names an existing run.
        """
        run_id = run_id or new_run_id()
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '.', '_', '-'")
        run_dir = self.run_dir(run_id)
        if run_dir.exists():
            raise FileExistsError(
                f"run {run_id!r} already exists at {run_dir}; use resume({run_id!r}) to "
                "continue it or choose another run id"
            )
        run_dir.mkdir(parents=True)
        write_json(run_dir / "graph.json", graph.to_dict())
        record = RunRecord(
            run_id=run_id,
            pipeline=graph.name,
            started=utc_now(),
            workspace=str(self.workspace),
            steps={
                s.name: StepRecord(name=s.name, component=s.component_name)
                for s in graph.topological_order()
            },
        )
        self.echo(f"run {run_id}: pipeline {graph.name!r}, {len(graph.steps)} steps in {run_dir}")
        return self._execute(graph, record)

    def resume(self, run_id: str) -> RunRecord:
        """Continue an unfinished or failed run in its own folder.

        Completed and reused steps are kept; failed, skipped and pending steps run again,
        writing into their existing output folders (so a training step can pick up the
        checkpoint it left there). The graph is the one recorded when the run started.
        """
        run_dir = self.run_dir(run_id)
        record_path = run_dir / "run.json"
        if not record_path.is_file():
            known = sorted(p.name for p in self.runs_dir.glob("*") if p.is_dir())
            raise FileNotFoundError(
                f"no run {run_id!r} in {self.runs_dir} (no {record_path.name}); "
                f"known runs: {', '.join(known[-5:]) or '(none)'}"
            )
        graph = PipelineGraph.from_dict(json.loads((run_dir / "graph.json").read_text("utf-8")))
        record = RunRecord.load(record_path)
        todo = [n for n, s in record.steps.items() if s.status not in DONE_STEP_STATUSES]
        if not todo:
            self.echo(f"run {run_id}: every step is already completed or reused; nothing to do")
            return record
        for name in todo:
            record.steps[name].status = "pending"
        record.status, record.ended = "running", None
        self.echo(f"run {run_id}: resuming {', '.join(todo)}")
        return self._execute(graph, record)

    def plan(self, graph: PipelineGraph) -> list[dict[str, Any]]:
        """What :meth:`run` would do, without running anything (for ``--dry-run``).

        Each entry has the step's ``name``, ``component``, ``parameters`` (the values the step
        will get: registry references pinned), ``configured`` (the values those replaced),
        ``notes`` (what the live state resolved to), ``effective`` (values the step will use
        instead of its configured ones: name -> :class:`~sslpipe.execution.live.Effective`),
        ``inputs`` (paths, or ``<step>.<output>`` for outputs not produced yet), ``cache_key``,
        ``would_reuse`` (True, False, or None when it reads outputs of steps that would run
        first, whose content is not known yet), ``reason``, ``reused_from`` (the run it would
        reuse), ``reused_outputs`` (the earlier outputs it would take over) and ``assumes``
        (sentences the decision rests on: a step that always runs writing what it wrote in an
        earlier run with the same key, as connect_db does while the store is unchanged).
        """
        self._hash_memo = {}  # files may have changed since the last run or plan
        self._history = RunHistory(self.runs_dir, pipeline=graph.name)
        known_outputs: dict[str, dict[str, str]] = {}
        assumptions: dict[str, list[str]] = {}
        plan: list[dict[str, Any]] = []
        for step in graph.topological_order():
            entry = self._plan_step(step, known_outputs, assumptions)
            plan.append(entry)
            outputs = entry["reused_outputs"] or entry.get("expected_outputs")
            if outputs:
                known_outputs[step.name] = outputs
            assumptions[step.name] = entry["assumes"] + entry.get("assumption", [])
        return plan

    # ---- run loop

    def _execute(self, graph: PipelineGraph, record: RunRecord) -> RunRecord:
        run_dir = self.run_dir(record.run_id)
        record_path = run_dir / "run.json"
        record.save(record_path)
        self._hash_memo = {}  # inputs may change between runs; hashes are cached per run only
        self._history = RunHistory(self.runs_dir, pipeline=record.pipeline, exclude=record.run_id)
        outputs = {
            n: dict(s.outputs) for n, s in record.steps.items() if s.status in DONE_STEP_STATUSES
        }
        try:
            self._pin_live_states(graph, record)
            for step in graph.topological_order():
                step_record = record.steps[step.name]
                if step_record.status in DONE_STEP_STATUSES:
                    continue
                outputs[step.name] = self._run_step(step, step_record, record, outputs)
        except BaseException as exc:
            self._finish_failed(record, exc)
            raise
        record.status, record.ended = "completed", utc_now()
        record.save(record_path)
        self.echo(f"run {record.run_id}: completed ({run_dir})")
        return record

    def _pin_live_states(self, graph: PipelineGraph, record: RunRecord) -> None:
        """Resolve every pending step's live state before anything runs.

        Pinned when the run starts, not when each step starts: the run then trains on the model
        versions that existed when it started (what ``--dry-run`` showed), not on one that
        another run registers meanwhile, and a bad reference fails before the first step.
        A resumed run keeps what its start pinned (its checkpoints were made with it).

        Raises:
            StepFailedError: a step's live state cannot be resolved.
        """
        for step in graph.topological_order():
            step_record = record.steps[step.name]
            if step_record.status in DONE_STEP_STATUSES or step_record.live:
                continue
            try:
                step_record.live = self._live_state(step).to_dict()
            except LiveStateError as exc:
                log_path = self._start_step(step, step_record, record)
                write_atomically(log_path, f"error: {exc}\n".encode())
                raise _not_started(step_record, log_path, record.run_id, exc) from exc
        self._save(record)

    def _live_state(self, step: StepSpec) -> LiveState:
        """The step's live state now. Raises LiveStateError."""
        if self.live_state is None:
            return LiveState()
        parameters = {
            name: binding.value
            for name, binding in step.bindings.items()
            if isinstance(binding, LiteralValue) and not step.inputs[name].is_path
        }
        return self.live_state.resolve(step, parameters, self._step_env(step))

    def _finish_failed(self, record: RunRecord, exc: BaseException) -> None:
        """Mark the running step failed and every later step skipped; save the record."""
        for step_record in record.steps.values():
            if step_record.status == "running":
                step_record.status = "failed"
                step_record.ended = utc_now()
                step_record.error = step_record.error or f"{type(exc).__name__}: {exc}"
            elif step_record.status == "pending":
                step_record.status = "skipped"
        record.status, record.ended = "failed", utc_now()
        self._save(record)
        skipped = [n for n, s in record.steps.items() if s.status == "skipped"]
        suffix = f"; skipped: {', '.join(skipped)}" if skipped else ""
        self.echo(f"run {record.run_id}: failed{suffix}. Resume with: resume({record.run_id!r})")

    def _run_step(
        self,
        step: StepSpec,
        step_record: StepRecord,
        record: RunRecord,
        upstream: Mapping[str, Mapping[str, str]],
    ) -> dict[str, str]:
        """Reuse or run one step; return its outputs' paths. Raises StepFailedError."""
        log_path = self._start_step(step, step_record, record)
        started = time.monotonic()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"# {utc_now()} step {step.name!r} of run {record.run_id}\n")
            try:
                live = LiveState.from_dict(step_record.live)
                prepared = self._prepare(step, upstream, live=live, with_hashes=True)
                _fill_prepared(step_record, prepared)
                self._announce(step, live, log)
                hit, why = self._reuse_decision(step, prepared)
                if hit is not None:
                    self._reuse(step, step_record, hit, log)
                    self._end_step(step_record, record, started)
                    return dict(hit.outputs)
                outputs = self._prepare_outputs(step, log_path.parent)
                argv = self._argv(step, prepared, outputs)
            except (FileNotFoundError, CommandError) as exc:
                log.write(f"error: {exc}\n")
                raise _not_started(step_record, log_path, record.run_id, exc) from exc
            step_record.outputs, step_record.argv = outputs, argv
            self._save(record)
            # The command (about a thousand characters for a training step) is in the log and
            # in run.json; the console gets what a person acts on: that it runs, and why.
            self.echo(f"[{step.name}] running ({why})")
            log.write(f"# cwd: {step.code_dir}\n# command: {shlex.join(argv)}\n# {why}\n")
            log.flush()
            step_record.returncode, tail = self._run_process(step, argv, log)

        self._check_finished(step, step_record, outputs, tail, record.run_id)
        step_record.status = "completed"
        self._end_step(step_record, record, started)
        if step.is_deterministic and prepared.cache_key:
            self._cache.remember(prepared.cache_key, record.run_id, step.name, outputs)
        self.echo(f"[{step.name}] completed in {step_record.duration_s:.1f}s")
        return outputs

    def _announce(self, step: StepSpec, live: LiveState, log: IO[str]) -> None:
        """Say what the live state resolved to (e.g. which backbone version is used)."""
        for name, note in live.notes.items():
            log.write(f"{name}: {note}\n")
            self.echo(f"[{step.name}] {name}: {note}")

    def _start_step(self, step: StepSpec, step_record: StepRecord, record: RunRecord) -> Path:
        """Mark a step running (clearing an earlier attempt's results); return its log path."""
        step_dir = self.run_dir(record.run_id) / step.name
        step_dir.mkdir(parents=True, exist_ok=True)
        log_path = step_dir / "log.txt"
        step_record.status, step_record.started, step_record.ended = "running", utc_now(), None
        step_record.log, step_record.error, step_record.returncode = str(log_path), None, None
        step_record.reused_from, step_record.duration_s, step_record.argv = None, None, []
        self._save(record)
        return log_path

    def _reuse(
        self, step: StepSpec, step_record: StepRecord, hit: CacheEntry, log: IO[str]
    ) -> None:
        """Take over an earlier run's outputs instead of running the step."""
        message = (
            f"reused: component code, parameters and inputs unchanged since run "
            f"{hit.run_id} (cache key {_short(step_record.cache_key)})"
        )
        log.write(message + "\n")
        self.echo(f"[{step.name}] {message}")
        step_record.status, step_record.reused_from = "reused", hit.run_id
        step_record.outputs = dict(hit.outputs)

    @staticmethod
    def _check_finished(
        step: StepSpec,
        step_record: StepRecord,
        outputs: Mapping[str, str],
        tail: Sequence[str],
        run_id: str,
    ) -> None:
        """Raise StepFailedError unless the process exited 0 and wrote every output."""
        log_path = Path(step_record.log or "")
        if step_record.returncode != 0:
            raise StepFailedError(
                step.name, step_record.returncode, log_path, tail=tail, run_id=run_id
            )
        missing = [f"{n} ({p})" for n, p in outputs.items() if not Path(p).exists()]
        if missing:
            step_record.error = f"exited 0 but did not write its outputs: {', '.join(missing)}"
            raise StepFailedError(
                step.name, 0, log_path, tail=tail, reason=step_record.error, run_id=run_id
            )

    def _end_step(self, step_record: StepRecord, record: RunRecord, started: float) -> None:
        step_record.ended = utc_now()
        step_record.duration_s = round(time.monotonic() - started, 3)
        self._save(record)

    def _save(self, record: RunRecord) -> None:
        record.save(self.run_dir(record.run_id) / "run.json")

    # ---- preparing a step

    def _prepare(
        self,
        step: StepSpec,
        upstream: Mapping[str, Mapping[str, str]],
        *,
        live: LiveState,
        with_hashes: bool,
    ) -> _Prepared:
        """Resolve a step's parameters (``live`` replaces some) and input paths; hash them when
        asked.

        Raises:
            FileNotFoundError: when an input path does not exist.
            KeyError: when an upstream step's outputs are not in ``upstream``.
        """
        parameters: dict[str, Any] = {}
        inputs: dict[str, str] = {}
        for name, binding in step.bindings.items():
            if isinstance(binding, UpstreamOutput):
                inputs[name] = upstream[binding.step][binding.output]
            elif step.inputs[name].is_path:
                inputs[name] = str(binding.value)
            else:
                parameters[name] = binding.value
        parameters |= live.parameters
        prepared = _Prepared(parameters=parameters, inputs=inputs, live=live)
        if not with_hashes:
            return prepared
        for name, path in inputs.items():
            if not Path(path).exists():
                raise FileNotFoundError(
                    f"input {name!r} points at {path}, which does not exist"
                    + _binding_hint(step.bindings[name])
                )
            prepared.input_hashes[name] = self._hash_input(path)
        prepared.code_hash = self._code_hash(step)
        prepared.cache_key = compute_cache_key(
            step,
            code_hash=prepared.code_hash,
            parameters=parameters,
            input_hashes=prepared.input_hashes,
            live=live.key,
        )
        return prepared

    def _hash_input(self, path: str) -> str:
        if path not in self._hash_memo:
            self._hash_memo[path] = hash_path(Path(path))
        return self._hash_memo[path]

    def _code_hash(self, step: StepSpec) -> str:
        dirs = [step.component_dir, *self.library_paths]
        memo_key = "code:" + "\0".join(str(d) for d in dirs)
        if memo_key not in self._hash_memo:
            self._hash_memo[memo_key] = hash_code(dirs)
        return self._hash_memo[memo_key]

    @staticmethod
    def _prepare_outputs(step: StepSpec, step_dir: Path) -> dict[str, str]:
        """Create output locations: a folder per folder output, the parent of a file output.

        Existing contents are kept on purpose: a resumed step finds what it left there.
        """
        outputs: dict[str, str] = {}
        for name, spec in step.outputs.items():
            path = step_dir / "outputs" / name
            if spec.type == "uri_file":
                path.parent.mkdir(parents=True, exist_ok=True)
            else:
                path.mkdir(parents=True, exist_ok=True)
            outputs[name] = str(path)
        return outputs

    def _argv(self, step: StepSpec, prepared: _Prepared, outputs: Mapping[str, str]) -> list[str]:
        """The step's command with values filled in. Raises CommandError."""
        return step_argv(
            step,
            parameters=prepared.parameters,
            inputs=prepared.inputs,
            outputs=outputs,
            python=self.python,
        )

    # ---- reuse

    def _reuse_decision(
        self, step: StepSpec, prepared: _Prepared | None
    ) -> tuple[CacheEntry | None, str]:
        """(cache entry to reuse or None, why the step runs)."""
        if not step.is_deterministic:
            return None, "is_deterministic: false, always runs"
        if self.force_rerun:
            return None, "force_rerun"
        if prepared is None or prepared.cache_key is None:
            return None, "no cache key"
        entry = self._cache.lookup(prepared.cache_key, step)
        if entry is None:
            return None, self._why_miss(step, prepared)
        return entry, "reused"

    def _why_miss(self, step: StepSpec, prepared: _Prepared) -> str:
        """What changed since the step's latest earlier run (its run records say)."""
        current = StepRecord(name=step.name, component=step.component_name)
        _fill_prepared(current, prepared)
        current.live = prepared.live.to_dict()
        return explain_miss(current, self._history.latest(step.name))

    def _plan_step(
        self,
        step: StepSpec,
        known_outputs: Mapping[str, Mapping[str, str]],
        assumptions: Mapping[str, list[str]],
    ) -> dict[str, Any]:
        """One entry of :meth:`plan`: the decision :meth:`_run_step` would make, read-only."""
        waiting = [u for u in step.upstream_steps() if u not in known_outputs]
        placeholders = {u: {o: f"{u}.{o}" for o in _outputs_read(step, u)} for u in waiting}
        assumes = sorted({a for u in step.upstream_steps() for a in assumptions.get(u, [])})
        entry = _plan_entry(step, assumes)
        try:
            live = self._live_state(step)
        except LiveStateError as exc:
            return entry | {"would_reuse": False, "reason": f"would fail: {exc}"}
        prepared = self._prepare(
            step, {**known_outputs, **placeholders}, live=live, with_hashes=False
        )
        entry |= _planned_values(step, prepared)
        if self.live_state is not None:
            entry["effective"] = self.live_state.effective(
                step, prepared.parameters, prepared.inputs
            )
        if waiting:
            always = self.force_rerun or not step.is_deterministic
            return entry | {
                "would_reuse": False if always else None,
                "reason": self._why_waiting(step, waiting),
            }
        try:
            prepared = self._prepare(step, known_outputs, live=live, with_hashes=True)
        except FileNotFoundError as exc:
            return entry | {"would_reuse": False, "reason": f"would fail: {exc}"}
        hit, why = self._reuse_decision(step, prepared)
        entry |= {
            "cache_key": prepared.cache_key,
            "would_reuse": hit is not None,
            "reason": f"reused from run {hit.run_id}" if hit else why,
            "reused_from": hit.run_id if hit else None,
            "reused_outputs": dict(hit.outputs) if hit else None,
        }
        if not step.is_deterministic and not self.force_rerun:
            entry |= self._expected(step, prepared)
        return entry

    def _why_waiting(self, step: StepSpec, waiting: Sequence[str]) -> str:
        """Why a step that reads outputs of steps that run first is expected to run."""
        if self.force_rerun or not step.is_deterministic:
            return self._reuse_decision(step, None)[1]
        if self._history.latest(step.name) is None:
            return "no earlier run of this step"
        which = (
            f"{waiting[0]}, which runs" if len(waiting) == 1 else f"{', '.join(waiting)}, which run"
        )
        return f"reads outputs of {which} first: reused only if they are the same files as before"

    def _expected(self, step: StepSpec, prepared: _Prepared) -> dict[str, Any]:
        """What a step that always runs is expected to write: its latest outputs for the same
        key. The steps after it are planned on those, as the real run reuses them when the
        step writes the same again (connect_db on an unchanged store)."""
        earlier = self._history.with_key(step.name, prepared.cache_key or "")
        if earlier is None:
            return {}
        return {
            "expected_outputs": dict(earlier.record.outputs),
            "assumption": [f"{step.name} writes what it wrote in run {earlier.run_id}"],
        }

    # ---- processes

    def _step_env(self, step: StepSpec) -> dict[str, str]:
        return step_environment(step, overrides=self.env, image_cache=self.cache_dir / "images")

    def _run_process(self, step: StepSpec, argv: list[str], log: IO[str]) -> tuple[int, list[str]]:
        """Run ``argv``; stream its output to the console and the log. (returncode, tail)."""

        def echo(line: str) -> None:
            self.echo(f"[{step.name}] {line}")

        return run_process(argv, cwd=step.code_dir, env=self._step_env(step), log=log, echo=echo)


def _plan_entry(step: StepSpec, assumes: list[str]) -> dict[str, Any]:
    """A plan entry before anything is known about the step."""
    return {
        "name": step.name,
        "component": step.component_name,
        "parameters": {},
        "configured": {},
        "notes": {},
        "effective": {},
        "inputs": {},
        "cache_key": None,
        "would_reuse": None,
        "reason": "",
        "reused_from": None,
        "reused_outputs": None,
        "assumes": assumes,
    }


def _planned_values(step: StepSpec, prepared: _Prepared) -> dict[str, Any]:
    """The parameters and inputs a step will get, and the configured values live state replaced."""
    configured = {
        name: binding.value
        for name, binding in step.bindings.items()
        if name in prepared.live.parameters and isinstance(binding, LiteralValue)
    }
    return {
        "parameters": prepared.parameters,
        "configured": configured,
        "notes": dict(prepared.live.notes),
        "inputs": prepared.inputs,
    }


def _not_started(
    step_record: StepRecord, log_path: Path, run_id: str, exc: Exception
) -> StepFailedError:
    """The failure of a step that could not start (its error is kept in its record)."""
    step_record.error = str(exc)
    return StepFailedError(
        step_record.name, None, log_path, tail=[str(exc)], reason=str(exc), run_id=run_id
    )


def _fill_prepared(step_record: StepRecord, prepared: _Prepared) -> None:
    step_record.parameters = prepared.parameters
    step_record.inputs = prepared.inputs
    step_record.input_hashes = prepared.input_hashes
    step_record.code_hash = prepared.code_hash
    step_record.cache_key = prepared.cache_key


def _outputs_read(step: StepSpec, upstream: str) -> list[str]:
    return [
        b.output
        for b in step.bindings.values()
        if isinstance(b, UpstreamOutput) and b.step == upstream
    ]


def _binding_hint(binding: LiteralValue | UpstreamOutput) -> str:
    if isinstance(binding, UpstreamOutput):
        return f" (output {binding.output!r} of step {binding.step!r} was removed?)"
    return " (check the pipeline input or pass another path)"
