"""``--backend azureml``: the pipeline jobs compiled, validated and submitted for Azure ML."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from azure.ai.ml import load_job
from azure.ai.ml.entities import PipelineJob

from pipelines import PIPELINES
from sslpipe.core.config import ConfigError, PipelineConfig, load_config
from sslpipe.execution import azureml

REPO = Path(__file__).resolve().parents[2]
AZURE_STORES = [
    "stores.metadata_uri=cosmos://catalog-account/catalog/images",
    "stores.blob_uri=https://catalogaccount.blob.core.windows.net/images",
]
WORKSPACE = [
    "azureml.subscription_id=00000000-0000-0000-0000-000000000000",
    "azureml.resource_group=rg-sslpipe",
    "azureml.workspace_name=ws-sslpipe",
]
CPU_STEPS = {
    "moco": {"connect_db", "data_prep"},
    "classifier": {"connect_db", "data_prep", "evaluate"},
    "full": {
        "connect_db",
        "data_prep",
        "connect_db_labelled",
        "data_prep_labelled",
        "evaluate",
        "baseline_evaluate",
        "scratch_evaluate",
    },
}
GPU_STEPS = {
    "moco": {"moco_train"},
    "classifier": {"classifier_train"},
    "full": {
        "moco_train",
        "classifier_train",
        "baseline_classifier_train",
        "scratch_classifier_train",
    },
}
BASELINE_TRAINING = ["baseline_classifier_train", "scratch_classifier_train"]


def azure_config(tmp_path: Path, *extra: str) -> PipelineConfig:
    sets = [f"workspace={tmp_path / 'ws'}", *AZURE_STORES, "moco.epochs=7", *extra]
    return load_config(None, [*sets, "classifier.epochs=11", "experiment=catalog-ssl"])


def prepared(name: str, config: PipelineConfig) -> PipelineJob:
    return azureml.prepare_job(PIPELINES[name](config), config)


@pytest.fixture(scope="module")
def dumped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each pipeline's dry-run YAML path and its parsed content."""
    tmp_path = tmp_path_factory.mktemp("azureml")
    config = azure_config(tmp_path, "azureml.gpu_compute=a100-cluster")
    out = {}
    for name in PIPELINES:
        job = prepared(name, config)
        assert azureml.validate_offline(job, config) == []
        path = azureml.dry_run(job, config)
        out[name] = (path, yaml.safe_load(path.read_text(encoding="utf-8")))
    return out


@pytest.mark.parametrize("name", ["moco", "classifier", "full"])
def test_dry_run_yaml_round_trips_with_computes_and_literal_inputs(
    dumped: dict[str, tuple[Path, dict[str, Any]]], name: str
) -> None:
    path, spec = dumped[name]
    assert (path.parent.parent.name, path.parent.name, path.name) == (
        "ws",
        "azureml",
        f"{name}.pipeline.yaml",
    )
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    reloaded = load_job(path)
    assert isinstance(reloaded, PipelineJob)
    assert reloaded.settings is not None
    assert reloaded.settings.default_compute in ("cpu-cluster", "azureml:cpu-cluster")
    assert spec["experiment_name"] == "catalog-ssl"
    jobs = spec["jobs"]
    assert set(jobs) == CPU_STEPS[name] | GPU_STEPS[name]
    for step in GPU_STEPS[name]:
        assert jobs[step]["compute"] in ("a100-cluster", "azureml:a100-cluster"), step
    for step in CPU_STEPS[name]:
        assert jobs[step]["compute"] in ("cpu-cluster", "azureml:cpu-cluster"), step
    assert spec["inputs"]["metadata_uri"] == "cosmos://catalog-account/catalog/images"
    assert spec["inputs"]["blob_uri"].startswith("https://catalogaccount.blob.core.windows.net")
    if "moco_train" in jobs:
        assert str(jobs["moco_train"]["inputs"]["epochs"]) == "7"
        # One process on one machine unless configured (see the test below).
        assert jobs["moco_train"]["distribution"] == {
            "type": "pytorch",
            "process_count_per_instance": 1,
        }
        assert jobs["moco_train"]["resources"]["instance_count"] == 1
        selection = jobs["data_prep"]["inputs"]["selection"]
        assert selection == {"path": "${{parent.jobs.connect_db.outputs.selection}}"}
    if "classifier_train" in jobs:
        assert str(jobs["classifier_train"]["inputs"]["epochs"]) == "11"
    if name == "full":
        for step, mode in zip(BASELINE_TRAINING, ("head", "two_stage"), strict=True):
            inputs = jobs[step]["inputs"]
            assert str(inputs["backbone"]).startswith("torchvision:"), step
            assert inputs["mode"] == mode, step
            assert "backbone_model" not in inputs, step
        assert "backbone_model" in jobs["classifier_train"]["inputs"]
        evaluate = jobs["evaluate"]["inputs"]
        assert evaluate["baseline"] == {"path": "${{parent.jobs.baseline_evaluate.outputs.report}}"}
        assert evaluate["baseline_scratch"] == {
            "path": "${{parent.jobs.scratch_evaluate.outputs.report}}"
        }
        assert jobs["evaluate"]["inputs"]["register"]  # azure-ai-ml writes booleans as 1 / 0
        for step in ("baseline_evaluate", "scratch_evaluate"):  # neither is registered
            assert not jobs[step]["inputs"]["register"], step
            assert not {"baseline", "baseline_scratch"} & set(jobs[step]["inputs"]), step


@pytest.mark.parametrize("name", ["moco", "full"])
def test_moco_train_runs_data_parallel_on_the_configured_nodes_and_processes(
    tmp_path: Path, name: str
) -> None:
    config = azure_config(tmp_path, "moco.processes_per_node=4", "moco.nodes=2")
    job = prepared(name, config)
    assert azureml.validate_offline(job, config) == []
    path = azureml.dry_run(job, config)

    step = yaml.safe_load(path.read_text(encoding="utf-8"))["jobs"]["moco_train"]
    assert step["distribution"] == {"type": "pytorch", "process_count_per_instance": 4}
    assert step["resources"]["instance_count"] == 2
    # The step gets the same counts as inputs and checks them against WORLD_SIZE.
    assert (str(step["inputs"]["processes_per_node"]), str(step["inputs"]["nodes"])) == ("4", "2")
    reloaded = load_job(path)
    assert isinstance(reloaded, PipelineJob)
    node = reloaded.jobs["moco_train"]
    assert node.distribution.process_count_per_instance == 4
    assert node.resources.instance_count == 2


@pytest.mark.parametrize("name", ["classifier", "full"])
def test_classifier_train_runs_data_parallel_on_the_configured_nodes_and_processes(
    dumped: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path, name: str
) -> None:
    trained = ["classifier_train"] + (BASELINE_TRAINING if name == "full" else [])
    for step_name in trained:  # one process on one machine unless configured
        default = dumped[name][1]["jobs"][step_name]
        assert default["distribution"] == {"type": "pytorch", "process_count_per_instance": 1}
        assert default["resources"]["instance_count"] == 1

    config = azure_config(tmp_path, "classifier.processes_per_node=4", "classifier.nodes=2")
    job = prepared(name, config)
    assert azureml.validate_offline(job, config) == []
    path = azureml.dry_run(job, config)

    jobs = yaml.safe_load(path.read_text(encoding="utf-8"))["jobs"]
    reloaded = load_job(path)
    assert isinstance(reloaded, PipelineJob)
    for step_name in trained:  # the baselines train like the classifier they are compared with
        step = jobs[step_name]
        assert step["distribution"] == {"type": "pytorch", "process_count_per_instance": 4}
        assert step["resources"]["instance_count"] == 2
        # The step gets the same counts as inputs and checks them against WORLD_SIZE.
        inputs = step["inputs"]
        assert (str(inputs["processes_per_node"]), str(inputs["nodes"])) == ("4", "2")
        node = reloaded.jobs[step_name]
        assert node.distribution.process_count_per_instance == 4
        assert node.resources.instance_count == 2
    if name == "full":  # moco's own counts are unaffected
        assert jobs["moco_train"]["distribution"]["process_count_per_instance"] == 1
        assert jobs["moco_train"]["resources"]["instance_count"] == 1


def test_a_queue_the_global_batch_does_not_divide_is_refused_before_compiling(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"moco.processes_per_node.*multiple of 512"):
        azure_config(tmp_path, "moco.processes_per_node=4", "moco.nodes=2", "moco.queue_size=1000")


def test_local_store_uris_fail_validation_naming_the_input(tmp_path: Path) -> None:
    config = load_config(None, [f"workspace={tmp_path}"])
    problems = azureml.validate_offline(prepared("moco", config), config)
    assert len(problems) == 2
    assert "metadata_uri" in problems[0] and "sqlite:" in problems[0]
    assert "cosmos://" in problems[0]
    assert "blob_uri" in problems[1] and "file:" in problems[1]
    assert ".blob.core.windows.net" in problems[1]


def test_step_without_compute_is_reported(tmp_path: Path) -> None:
    config = azure_config(tmp_path)
    job = prepared("moco", config)
    job.jobs["moco_train"].compute = None
    assert job.settings is not None
    job.settings.default_compute = None
    problems = azureml.validate_offline(job, config)
    assert any("moco_train" in problem and "ompute" in problem for problem in problems)


class FakeJobs:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []

    def create_or_update(self, job: Any, **kwargs: Any) -> Any:
        self.calls.append(("create_or_update", job, kwargs))
        return SimpleNamespace(name="quiet_ant_123", studio_url="https://ml.azure.com/runs/x")

    def stream(self, name: str) -> None:
        self.calls.append(("stream", name, {}))


class FakeComputes:
    """The workspace's compute targets, by name, with their largest node count."""

    def __init__(self, **max_instances: int) -> None:
        self.targets = {
            name: SimpleNamespace(name=name, max_instances=most)
            for name, most in max_instances.items()
        }

    def get(self, name: str) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        if name not in self.targets:
            raise ResourceNotFoundError(f"compute {name} not found")
        return self.targets[name]

    def list(self) -> list[Any]:
        return list(self.targets.values())


def stand_in_workspace(**max_instances: int) -> SimpleNamespace:
    computes = max_instances or {"cpu-cluster": 4, "gpu-cluster": 2}
    return SimpleNamespace(jobs=FakeJobs(), compute=FakeComputes(**computes))


@pytest.fixture
def no_workspace_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in azureml.WORKSPACE_SETTINGS.values():
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.usefixtures("no_workspace_env")
def test_fake_submit_creates_the_job_in_the_experiment_and_streams_it(tmp_path: Path) -> None:
    """A stand-in client records the calls: the Azure ML service cannot be reached from here."""
    config = azure_config(tmp_path, *WORKSPACE)
    job = prepared("moco", config)
    client = stand_in_workspace()
    echoed: list[str] = []
    created = azureml.submit(job, config, ml_client=client, echo=echoed.append)
    assert created.name == "quiet_ant_123"
    assert client.jobs.calls == [
        ("create_or_update", job, {"experiment_name": "catalog-ssl"}),
        ("stream", "quiet_ant_123", {}),
    ]
    assert echoed == ["[sslpipe] submitted quiet_ant_123: https://ml.azure.com/runs/x"]


@pytest.mark.usefixtures("no_workspace_env")
def test_fake_submit_without_workspace_settings_sends_nothing(tmp_path: Path) -> None:
    """A stand-in client: the Azure ML service cannot be reached from this machine."""
    config = azure_config(tmp_path)
    client = SimpleNamespace(jobs=FakeJobs())
    with pytest.raises(azureml.AzureMLError) as err:
        azureml.submit(prepared("moco", config), config, ml_client=client)
    assert [p.split(" ")[0] for p in err.value.problems] == [
        "azureml.subscription_id",
        "azureml.resource_group",
        "azureml.workspace_name",
    ]
    assert client.jobs.calls == []


@pytest.mark.usefixtures("no_workspace_env")
def test_a_compute_the_workspace_lacks_is_named_before_anything_is_sent(tmp_path: Path) -> None:
    """A stand-in client: the Azure ML service cannot be reached from this machine."""
    config = azure_config(tmp_path, *WORKSPACE, "azureml.gpu_compute=gpu-clustr")
    client = stand_in_workspace()
    with pytest.raises(azureml.AzureMLError) as err:
        azureml.submit(prepared("moco", config), config, ml_client=client)
    assert err.value.problems == [
        "compute 'gpu-clustr' (for moco_train) does not exist in the workspace; it has "
        "cpu-cluster, gpu-cluster (set azureml.cpu_compute or azureml.gpu_compute)"
    ]
    assert client.jobs.calls == []


@pytest.mark.usefixtures("no_workspace_env")
def test_more_nodes_than_the_cluster_scales_to_is_refused(tmp_path: Path) -> None:
    """A stand-in client: the Azure ML service cannot be reached from this machine."""
    config = azure_config(tmp_path, *WORKSPACE, "moco.nodes=4", "moco.queue_size=4096")
    client = stand_in_workspace(**{"cpu-cluster": 4, "gpu-cluster": 2})
    with pytest.raises(azureml.AzureMLError) as err:
        azureml.submit(prepared("moco", config), config, ml_client=client)
    assert err.value.problems == [
        "step moco_train asks for 4 nodes but compute 'gpu-cluster' scales to at most 2 "
        "(max_instances); lower the step's nodes or raise the maximum"
    ]
    assert client.jobs.calls == []


def test_workspace_settings_fall_back_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "sub-from-env")
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", "rg-from-env")
    monkeypatch.setenv("AZUREML_WORKSPACE_NAME", "ws-from-env")
    config = azure_config(tmp_path, "azureml.resource_group=rg-from-config")
    assert azureml.workspace_settings(config) == {
        "subscription_id": "sub-from-env",
        "resource_group": "rg-from-config",
        "workspace_name": "ws-from-env",
    }
    assert azureml.validate_offline(prepared("moco", config), config, submit=True) == []


def test_missing_azure_identity_asks_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    config = azure_config(tmp_path, *WORKSPACE)
    with pytest.raises(azureml.AzureMLError, match="pip install azure-identity"):
        azureml.submit(prepared("moco", config), config)


def test_cli_dry_run_writes_and_validates_the_yaml(tmp_path: Path) -> None:
    args = [sys.executable, "execute.py", "--pipeline", "moco", "--backend", "azureml"]
    sets = [f"workspace={tmp_path}", *AZURE_STORES]
    command = [*args, "--dry-run", *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "azureml" / "moco.pipeline.yaml"
    assert f"written to {path}" in result.stdout
    assert isinstance(load_job(path), PipelineJob)


def test_cli_exits_2_with_one_error_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sslpipe.cli.pipelines import main

    code = main(
        [
            "--pipeline",
            "moco",
            "--backend",
            "azureml",
            "--dry-run",
            "--set",
            f"workspace={tmp_path}",
        ]
    )
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("error: input ") for line in lines)
    assert not (tmp_path / "azureml").exists()


@pytest.mark.parametrize("name", ["moco", "full"])
def test_data_prep_runs_one_process_on_each_of_the_configured_nodes(
    tmp_path: Path, name: str
) -> None:
    config = azure_config(tmp_path, "data_prep.nodes=4")
    job = prepared(name, config)
    assert azureml.validate_offline(job, config) == []
    path = azureml.dry_run(job, config)

    jobs = yaml.safe_load(path.read_text(encoding="utf-8"))["jobs"]
    steps = [step for step in jobs if step.startswith("data_prep")]
    assert steps == (["data_prep", "data_prep_labelled"] if name == "full" else ["data_prep"])
    for step in steps:
        assert jobs[step]["distribution"] == {"type": "pytorch", "process_count_per_instance": 1}
        assert jobs[step]["resources"]["instance_count"] == 4
        assert str(jobs[step]["inputs"]["nodes"]) == "4"  # checked against WORLD_SIZE
    reloaded = load_job(path)
    assert isinstance(reloaded, PipelineJob)
    assert reloaded.jobs["data_prep"].resources.instance_count == 4


def test_data_prep_on_one_node_has_no_distribution(
    dumped: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    step = dumped["moco"][1]["jobs"]["data_prep"]
    assert "distribution" not in step and "instance_count" not in step.get("resources", {})
    assert str(step["inputs"]["nodes"]) == "1"
