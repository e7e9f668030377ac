"""The training scaffold both steps stand on: process layout, checkpoint, tracking run, guard.

The steps' own tests (tests/steps/test_moco_train.py, test_classifier_train.py and their DDP
tests) resume, skip and track through it end to end; these pin down the scaffold's contract.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from sslpipe.core.io import read_journal
from sslpipe.models.training import retrain_guard
from sslpipe.models.training.distributed import DistEnv
from sslpipe.models.training.scaffold import (
    CHECKPOINT_FILE,
    Checkpoint,
    TrainingState,
    check_process_count,
    skip_reason,
    tracking_run,
    training_session,
)
from sslpipe.models.training.tracking import RUN_LOG, LocalTracker


@dataclass
class LoopState(TrainingState):
    losses: list[float] = field(default_factory=list)


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # momentum buffers now exist
    return model, optimizer


CONFIG = {"lr": 0.1, "epochs": 5, "num_workers": 2}


def test_a_checkpoint_restores_model_optimizer_and_state(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer(seed=0)
    state = LoopState(epoch=3, mlflow_run_id="run-1", losses=[3.0, 2.0, 1.5])
    Checkpoint(tmp_path).save(
        model=model, optimizer=optimizer, state=state, identity={"config": CONFIG}, world_size=2
    )
    assert (tmp_path / CHECKPOINT_FILE).is_file()

    fresh, fresh_optimizer = model_and_optimizer(seed=1)
    payload = Checkpoint(tmp_path).resume(fresh, {"config": CONFIG}, optimizer=fresh_optimizer)
    assert payload is not None
    assert LoopState.from_payload(payload) == state
    assert payload["world_size"] == 2
    for restored, saved in zip(
        fresh.state_dict().values(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(restored, saved)
    assert fresh_optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        optimizer.state_dict()["state"][0]["momentum_buffer"]
    )


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    model, _ = model_and_optimizer(seed=0)
    assert Checkpoint(tmp_path / "absent").resume(model, {"config": CONFIG}) is None


def test_a_resume_with_other_settings_is_refused_naming_what_changed(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer(seed=0)
    Checkpoint(tmp_path).save(
        model=model, optimizer=optimizer, state=LoopState(epoch=1), identity={"config": CONFIG}
    )
    other = {**CONFIG, "lr": 0.2, "epochs": 9}
    with pytest.raises(ValueError, match=r"different configuration \(epochs, lr changed\)"):
        Checkpoint(tmp_path).read({"config": other})


def test_settings_that_only_choose_how_data_is_fed_may_change_on_resume(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer(seed=0)
    Checkpoint(tmp_path).save(
        model=model, optimizer=optimizer, state=LoopState(epoch=1), identity={"config": CONFIG}
    )
    other = {**CONFIG, "num_workers": 8}
    assert Checkpoint(tmp_path).read({"config": other}, may_change={"num_workers"}) is not None
    with pytest.raises(ValueError, match=r"\(num_workers changed\)"):
        Checkpoint(tmp_path).read({"config": other})


def test_a_resume_on_other_data_is_refused(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer(seed=0)
    identity = {"config": CONFIG, "data_fingerprint": "aaa"}
    Checkpoint(tmp_path).save(
        model=model, optimizer=optimizer, state=LoopState(), identity=identity
    )
    with pytest.raises(ValueError, match=r"different data \(manifest.csv\); start a fresh run"):
        Checkpoint(tmp_path).read({**identity, "data_fingerprint": "bbb"})


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer(seed=0)
    checkpoint = Checkpoint(tmp_path)
    checkpoint.save(model=model, optimizer=optimizer, state=LoopState(epoch=1), identity={})
    with pytest.raises((pickle.PicklingError, AttributeError)):  # cannot be saved
        checkpoint.save(
            model=model,
            optimizer=optimizer,
            state=LoopState(epoch=2),
            identity={},
            bad=lambda: None,
        )
    payload = checkpoint.read({})
    assert payload is not None and payload["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_the_process_count_must_match_the_configuration() -> None:
    two = DistEnv(rank=0, world_size=2, master_addr="127.0.0.1", master_port=29500)
    check_process_count("step", two, nodes=1, processes_per_node=2)
    with pytest.raises(ValueError) as raised:
        check_process_count(
            "classifier_train",
            DistEnv(),
            nodes=2,
            processes_per_node=2,
            settings="classifier.",
        )
    message = str(raised.value)
    assert "configured for 2 node(s) x 2 process(es) = 4, but it runs in 1" in message
    assert "torchrun --nproc_per_node 2" in message
    assert "classifier.nodes and classifier.processes_per_node" in message


def test_a_session_in_one_process_gives_the_cpu_or_the_gpu() -> None:
    with training_session(DistEnv()) as device:
        assert device.type in ("cpu", "cuda")


def test_a_resumed_run_continues_its_tracking_run_and_logs_params_once(tmp_path: Path) -> None:
    tracker = LocalTracker(tmp_path)
    state = LoopState()
    with tracking_run(tracker, step="loop", state=state, main=True, params=lambda: {"a": 1}):
        pass
    assert state.mlflow_run_id is not None
    resumed = LoopState.from_payload(state.to_payload())
    with tracking_run(tracker, step="loop", state=resumed, main=True, params=lambda: {"a": 2}):
        pass
    assert resumed.mlflow_run_id == state.mlflow_run_id
    entries = read_journal(tmp_path / state.mlflow_run_id / RUN_LOG)
    assert [e["kind"] for e in entries] == ["start", "params", "end", "start", "end"]
    assert entries[0]["tags"] == {"sslpipe.step": "loop"}
    assert entries[1]["params"] == {"a": 1}


def test_only_rank_0_tracks(tmp_path: Path) -> None:
    state = LoopState()
    with tracking_run(
        LocalTracker(tmp_path), step="loop", state=state, main=False, params=dict
    ) as run:
        assert run is None
    assert state.mlflow_run_id is None
    assert list(tmp_path.iterdir()) == []


def decision(skip: bool) -> retrain_guard.GuardDecision:
    previous = {"name": "m", "version": "1", "uri": "models:/m/1"} if skip else None
    reason = "same data and setup" if skip else "new"
    return retrain_guard.GuardDecision(skip, reason, "d", "s", previous)


@pytest.mark.parametrize(
    ("skip", "main", "kept_calls"), [(True, True, 1), (True, False, 0), (False, True, 0)]
)
def test_the_guard_keeps_the_registered_model_on_rank_0_only_when_it_skips(
    monkeypatch: pytest.MonkeyPatch, skip: bool, main: bool, kept_calls: int
) -> None:
    # The decision itself (the registry's latest version) is tested in test_retrain_guard.py
    # and end to end by the steps' tests; here, what the scaffold does with it.
    monkeypatch.setattr(retrain_guard, "decide", lambda name, *, data, setup: decision(skip))
    kept: list[retrain_guard.GuardDecision] = []
    reason = skip_reason("m", data="d", setup="s", main=main, kept="model", keep=kept.append)
    assert reason == ("same data and setup" if skip else None)
    assert len(kept) == kept_calls
