"""Scheduled retraining: ``execute.py --schedule CRON --backend azureml`` builds a JobSchedule.

Everything up to the service call is real (azure-ai-ml objects, offline validation, YAML dump);
the calls to the workspace go to a stand-in client, since Azure ML cannot be reached from here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from pipelines import PIPELINES
from sslpipe.cli import pipelines as cli
from sslpipe.core.config import load_config
from sslpipe.execution import schedules
from sslpipe.execution.schedules import (
    ScheduleError,
    ScheduleRequest,
    validate_cron,
    validate_time_zone,
)
from tests.execution.test_azureml import AZURE_STORES, WORKSPACE

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "expression", ["0 3 * * 1", "*/15 * * * *", "0 0 1,15 * *", "30 2 * 1-6/2 0-4", " 0  3 * * 1 "]
)
def test_valid_cron_expressions_pass_with_single_spaces(expression: str) -> None:
    assert validate_cron(expression) == " ".join(expression.split())


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 3 * *", "has 4 fields; expected 5"),
        ("60 3 * * 1", "minute field: 60 is outside 0-59"),
        ("0 24 * * 1", "hour field: 24 is outside 0-23"),
        ("0 3 0 * *", "day of month field: 0 is outside 1-31"),
        ("0 3 * 13 *", "month field: 13 is outside 1-12"),
        ("0 3 * * 9", "day of week field: 9 is outside 0-6"),
        ("0 3 * * mon", "day of week field: 'mon' is not"),
        ("*/0 3 * * 1", "minute field: step 0"),
        ("0 5-2 * * *", "hour field: the range '5-2' runs backwards"),
    ],
)
def test_invalid_cron_expressions_name_the_field(expression: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("*", r"\*")):
        validate_cron(expression)


def test_time_zones_are_azure_ml_names() -> None:
    assert validate_time_zone("W. Europe Standard Time") == "W. Europe Standard Time"
    with pytest.raises(ScheduleError, match=r"did you mean one of .*W\. Europe Standard Time"):
        validate_time_zone("europe")
    with pytest.raises(ScheduleError, match="unknown time zone 'Mars/Olympus'"):
        validate_time_zone("Mars/Olympus")


def test_schedule_names_are_checked() -> None:
    with pytest.raises(ScheduleError, match="schedule name 'retrain now!'"):
        ScheduleRequest("retrain now!", "0 3 * * 1").validated()


def _execute(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    sets = [f"workspace={tmp_path}", *AZURE_STORES]
    command = [sys.executable, "execute.py", "--pipeline", "classifier", *args]
    return subprocess.run(
        [*command, *(a for s in sets for a in ("--set", s))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dry_run_writes_a_schedule_that_wraps_the_pipeline_job(tmp_path: Path) -> None:
    done = _execute(
        tmp_path, "--backend", "azureml", "--dry-run",
        "--schedule", "0 3 * * 1", "--time-zone", "W. Europe Standard Time",
    )
    assert done.returncode == 0, done.stderr
    path = tmp_path / "azureml" / "sslpipe-classifier-retrain.schedule.yaml"
    assert f"schedule validated and written to {path}" in done.stdout
    dumped = yaml.safe_load(path.read_text())
    assert dumped["name"] == "sslpipe-classifier-retrain"
    assert dumped["trigger"] == {
        "type": "cron",
        "expression": "0 3 * * 1",
        "time_zone": "W. Europe Standard Time",
    }
    job = dumped["create_job"]
    assert job["type"] == "pipeline"
    assert set(job["jobs"]) == {"connect_db", "data_prep", "classifier_train", "evaluate"}
    assert dumped["tags"] == {"sslpipe.pipeline": "classifier"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "0 3 * * 1"], "error: schedules run on Azure ML: add --backend azureml"),
        (
            ["--backend", "azureml", "--dry-run", "--schedule", "0 25 * * *"],
            "error: cron hour field: 25 is outside 0-23",
        ),
    ],
)
def test_bad_schedule_settings_are_one_line_before_anything_is_sent(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = _execute(tmp_path, *args)
    assert done.returncode == 2
    assert done.stderr.strip() == message
    assert not (tmp_path / "azureml").exists()


class FakeSchedules:
    """Records the calls a real MLClient.schedules would send to the workspace."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stored: dict[str, Any] = {}

    def _done(self, value: Any = None) -> Any:
        return SimpleNamespace(result=lambda: value)

    def begin_create_or_update(self, schedule: Any) -> Any:
        self.calls.append(("create_or_update", schedule.name))
        schedule._is_enabled = True  # what the service answers for a new schedule
        self.stored[schedule.name] = schedule
        return self._done(schedule)

    def begin_disable(self, name: str) -> Any:
        self.calls.append(("disable", name))
        if name in self.stored:
            self.stored[name]._is_enabled = False
        return self._done()

    def begin_delete(self, name: str) -> Any:
        self.calls.append(("delete", name))
        return self._done()

    def list(self) -> list[Any]:
        return list(self.stored.values())


def _args(**given: Any) -> argparse.Namespace:
    defaults: dict[str, Any] = {
        "backend": "azureml", "dry_run": False, "schedule": None, "time_zone": "UTC",
        "schedule_name": None, "list_schedules": False, "disable_schedule": None,
        "delete_schedule": None,
    }
    return argparse.Namespace(**(defaults | given))


def test_a_stand_in_workspace_gets_create_list_disable_and_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(None, [f"workspace={tmp_path}", *AZURE_STORES, *WORKSPACE])
    client = SimpleNamespace(schedules=FakeSchedules())
    run = cli.run_schedules
    assert run("moco", config, _args(schedule="0 2 * * *"), ml_client=client) == 0
    assert run("moco", config, _args(list_schedules=True), ml_client=client) == 0
    assert run("moco", config, _args(disable_schedule="nightly"), ml_client=client) == 0
    assert run("moco", config, _args(delete_schedule="nightly"), ml_client=client) == 0
    assert client.schedules.calls == [
        ("create_or_update", "sslpipe-moco-retrain"),
        ("disable", "nightly"),
        ("delete", "nightly"),
    ]
    stored = client.schedules.stored["sslpipe-moco-retrain"]
    assert stored.trigger.expression == "0 2 * * *"
    assert stored.create_job.display_name == "moco"
    out = capsys.readouterr().out
    assert "sslpipe-moco-retrain  '0 2 * * *'  UTC  enabled" in out
    assert schedules.list_schedules(client)[0]["cron"] == "0 2 * * *"


def _guard_input(job: Any, step: str) -> Any:
    return job.jobs[step].inputs["skip_unchanged"]._data


@pytest.mark.parametrize(
    ("setting", "expected"), [([], True), (["retrain.skip_unchanged=false"], False)]
)
def test_scheduled_runs_have_the_retraining_guard_on_unless_it_is_set_off(
    tmp_path: Path, setting: list[str], expected: bool
) -> None:
    config = load_config(None, [f"workspace={tmp_path}", *AZURE_STORES, *WORKSPACE, *setting])
    client = SimpleNamespace(schedules=FakeSchedules())
    assert cli.run_schedules("moco", config, _args(schedule="0 2 * * *"), ml_client=client) == 0
    job = client.schedules.stored["sslpipe-moco-retrain"].create_job
    assert _guard_input(job, "moco_train") is expected
    assert cli.run_schedules("full", config, _args(schedule="0 2 * * 1"), ml_client=client) == 0
    job = client.schedules.stored["sslpipe-full-retrain"].create_job
    assert _guard_input(job, "moco_train") is expected
    assert _guard_input(job, "classifier_train") is expected
    assert not _guard_input(job, "baseline_classifier_train")  # a baseline is not registered
    assert not _guard_input(job, "scratch_classifier_train")


def test_one_off_runs_train_unless_the_guard_is_asked_for() -> None:
    assert load_config(None, []).retrain.skip_unchanged is None
    assert load_config(None, []).for_schedule().retrain.skip_unchanged is True
    job = PIPELINES["moco"](load_config(None, []))
    assert _guard_input(job, "moco_train") is False
