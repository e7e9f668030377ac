"""The scaffold both training steps stand on: the process layout and session, the training
state and its checkpoint, the tracking run and the retraining guard.

A step brings its model and its loop; the scaffold brings what runs, resumes, records and
skips them, so a change to how training resumes, is tracked or is skipped is made once, here.
Read it with one step beside it (``sslpipe.steps.moco_train._run``)::

    check_process_count("moco_train", env, nodes=..., processes_per_node=...)
    with training_session(env) as device:
        checkpoint = Checkpoint(checkpoint_dir)
        payload = checkpoint.resume(model, identity, optimizer=optimizer)
        state = MocoState.from_payload(payload) if payload else MocoState()
        with tracking_run(step_tracker(env), step="moco_train", state=state, ...) as run:
            for epoch in range(state.epoch, epochs):
                ...
                checkpoint.save(model=model, optimizer=optimizer, state=state, identity=...)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import torch

from sslpipe.core.io import atomic_path
from sslpipe.core.logs import get_logger
from sslpipe.models.training import distributed, retrain_guard, tracking

CHECKPOINT_FILE = "last.pt"

# How a checkpoint's identity entries are named when a resume is refused.
_WHAT = {
    "config": "configuration",
    "data_fingerprint": "data (manifest.csv)",
    "backbone": "backbone",
}

log = get_logger("training")


# -- process layout and session ---------------------------------------------------------------


def check_process_count(
    step: str,
    env: distributed.DistEnv,
    *,
    nodes: int,
    processes_per_node: int,
    settings: str = "",
) -> None:
    """Raise unless the launcher started the configured ``nodes x processes_per_node``
    processes; ``settings`` is the prefix of the step's keys in the configuration."""
    expected = nodes * processes_per_node
    if env.world_size != expected:
        raise ValueError(
            f"{step} is configured for {nodes} node(s) x {processes_per_node} process(es) = "
            f"{expected}, but it runs in {env.world_size} (WORLD_SIZE); launch it with torchrun "
            f"--nproc_per_node {processes_per_node} (the local executor does) or set "
            f"{settings}nodes and {settings}processes_per_node to match"
        )


@contextmanager
def training_session(env: distributed.DistEnv) -> Iterator[torch.device]:
    """This process's device, inside the process group when there are several processes.

    Only rank 0 logs progress: the library's log lines of the other ranks are their warnings
    and errors. When the step returns, every process waits for the others, so none leaves
    before rank 0 has written its outputs.
    """
    library = logging.getLogger("sslpipe")
    with distributed.quiet_unless_main(library, env), distributed.session(env) as device:
        yield device
        distributed.barrier()


# -- training state and checkpoint ------------------------------------------------------------


@dataclasses.dataclass
class TrainingState:
    """Where training stands; a step adds its own fields in a subclass. Everything here goes
    into the checkpoint, so a resumed run continues its history and its tracking run."""

    epoch: int = 0  # epochs done
    mlflow_run_id: str | None = None  # the tracking run, continued after a resume

    def to_payload(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in names})


class Checkpoint:
    """``last.pt`` in a step's checkpoint folder: the model, the optimizer, the training state
    and the identity of what is trained (configuration, data, backbone).

    It is written atomically after every epoch by rank 0, read by every process, loaded
    without unpickling objects (``weights_only``), and refused when its identity differs from
    the run that would resume from it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / CHECKPOINT_FILE

    def save(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        state: TrainingState,
        identity: Mapping[str, Any],
        **extra: Any,
    ) -> None:
        """Write the checkpoint (rank 0 only); ``extra`` holds a step's own entries."""
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            **state.to_payload(),
            **identity,
            **extra,
        }
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)

    def read(
        self, identity: Mapping[str, Any], *, may_change: Collection[str] = ()
    ) -> dict[str, Any] | None:
        """The checkpoint's content, or None when there is none.

        Raises:
            ValueError: an identity entry differs from the saved one (keys of a mapping entry
                named in ``may_change`` may differ); the message says what changed.
            pickle.UnpicklingError: the file holds pickled objects, which are never run.
        """
        if not self.path.is_file():
            return None
        payload: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        for key, current in identity.items():
            changed = _changes(payload.get(key), current, may_change)
            if changed is not None:
                detail = f" ({', '.join(changed)} changed)" if changed else ""
                raise ValueError(
                    f"cannot resume from {self.path}: it was written with a different "
                    f"{_WHAT.get(key, key)}{detail}; start a fresh run instead of --resume"
                )
        return payload

    def resume(
        self,
        model: torch.nn.Module,
        identity: Mapping[str, Any],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        may_change: Collection[str] = (),
    ) -> dict[str, Any] | None:
        """Load the model (and the optimizer, when given) from the checkpoint and return its
        content, or None to start afresh; raises as :meth:`read`."""
        payload = self.read(identity, may_change=may_change)
        if payload is None:
            return None
        model.load_state_dict(payload["model"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        log.info("resuming from %s after epoch %d", self.path, payload["epoch"])
        return payload


def _changes(saved: Any, current: Any, may_change: Collection[str]) -> list[str] | None:
    """None when ``saved`` and ``current`` agree; else the keys that differ (mappings), or []."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        keys = (saved.keys() | current.keys()) - set(may_change)
        changed = sorted(k for k in keys if saved.get(k) != current.get(k))
        return changed or None
    return None if saved == current else []


# -- tracking run -----------------------------------------------------------------------------


def step_tracker(env: distributed.DistEnv) -> tracking.Tracker:
    """The step's tracker, configured on rank 0 first: it may create the store and the
    experiment, which the other processes only read (a registered backbone) once they exist."""
    tracker = tracking.default_tracker()
    if env.is_main:
        tracker.configure()
    distributed.barrier()
    if not env.is_main:
        tracker.configure()
    return tracker


@contextmanager
def tracking_run(
    tracker: tracking.Tracker,
    *,
    step: str,
    state: TrainingState,
    main: bool,
    params: Callable[[], Mapping[str, Any]],
) -> Iterator[Any]:
    """Rank 0's tracking run, None in the other processes.

    A resumed run continues the run its checkpoint names; a new one logs ``params()`` first.
    The run's id goes into ``state``, hence into every later checkpoint.
    """
    if not main:
        yield None
        return
    with tracker.start_run(
        run_id=state.mlflow_run_id, run_name=step, tags={"sslpipe.step": step}
    ) as run:
        if state.mlflow_run_id is None:
            run.log_params(dict(params()))
        state.mlflow_run_id = run.run_id
        yield run


# -- retraining guard -------------------------------------------------------------------------


def skip_reason(
    model_name: str,
    *,
    data: str,
    setup: str,
    main: bool,
    kept: str,
    keep: Callable[[retrain_guard.GuardDecision], None],
) -> str | None:
    """Why not to train, or None to train.

    Training is skipped when the latest registered version of ``model_name`` was trained on
    the same data and setup (fingerprints, :mod:`retrain_guard`); rank 0 then calls
    ``keep(decision)`` to leave what later steps need in the model folder (at least
    ``skipped.json``). ``kept`` names the model that stays, for the log.
    """
    decision = retrain_guard.decide(model_name, data=data, setup=setup)
    if not decision.skip:
        log.info("retraining: %s", decision.reason)
        return None
    log.info("SKIPPING TRAINING: %s; the registered %s stays", decision.reason, kept)
    if main:
        keep(decision)
    return decision.reason
