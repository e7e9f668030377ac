"""``--backend azureml``: the same PipelineJob the local executor runs, sent to Azure ML.

``prepare_job`` puts the steps on the workspace's compute targets, ``validate_offline`` finds
what would fail there (azure-ai-ml's own offline validation plus ours), ``dry_run`` writes the
compiled pipeline YAML, and ``submit`` creates the job with identity-based auth (no secrets).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from azure.ai.ml.entities import PipelineJob

from sslpipe.core.config import ConfigError, PipelineConfig
from sslpipe.execution.azureml_adapter import bound_value

GPU_STEPS = frozenset(
    {"moco_train", "classifier_train", "baseline_classifier_train", "scratch_classifier_train"}
)

# (config field, environment variable it falls back to)
WORKSPACE_SETTINGS = {
    "subscription_id": "AZURE_SUBSCRIPTION_ID",
    "resource_group": "AZURE_RESOURCE_GROUP",
    "workspace_name": "AZUREML_WORKSPACE_NAME",
}

LOCAL_URI_PREFIXES = ("sqlite:", "file:")
URI_ALTERNATIVES = {
    "metadata_uri": "a cosmos://<account>/<database>/<container> URI",
    "blob_uri": "an https://<account>.blob.core.windows.net/<container> URI",
}


class AzureMLError(ConfigError):
    """The job cannot go to Azure ML; ``problems`` has one line per reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def experiment_name(config: PipelineConfig) -> str:
    return config.azureml.experiment_name or config.experiment


def output_dir(config: PipelineConfig) -> Path:
    configured = config.azureml.output_dir
    return configured.expanduser().resolve() if configured else config.workspace_dir / "azureml"


def workspace_settings(
    config: PipelineConfig, environ: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """subscription_id, resource_group, workspace_name: the config, else the environment."""
    env = os.environ if environ is None else environ
    return {
        field: getattr(config.azureml, field) or env.get(variable) or None
        for field, variable in WORKSPACE_SETTINGS.items()
    }


def prepare_job(job: PipelineJob, config: PipelineConfig) -> PipelineJob:
    """Put the training steps on the GPU cluster, the rest on the CPU cluster; name the run."""
    settings = config.azureml
    assert job.settings is not None
    job.settings.default_compute = settings.cpu_compute
    for name, node in job.jobs.items():
        node.compute = settings.gpu_compute if name in GPU_STEPS else settings.cpu_compute
    job.experiment_name = experiment_name(config)
    return job


def _literal(value: Any) -> Any:
    """The literal bound to a pipeline or node input (None when unbound or bound to an output)."""
    data = bound_value(value)
    return data if isinstance(data, str | int | float | bool) else None


def _store_problems(job: PipelineJob) -> list[str]:
    bindings: list[tuple[str, Any]] = [(name, value) for name, value in job.inputs.items()]
    for node_name, node in job.jobs.items():
        bindings += [(f"{node_name}.{name}", value) for name, value in node.inputs.items()]
    problems = []
    for where, value in bindings:
        literal = _literal(value)
        if isinstance(literal, str) and literal.startswith(LOCAL_URI_PREFIXES):
            key = where.rpartition(".")[2]
            instead = URI_ALTERNATIVES.get(key, "a cloud store URI")
            problems.append(
                f"input {where} = {literal!r} is a local store that Azure ML compute cannot "
                f"reach; set stores.{key} to {instead} (configs/azure.yaml is a template)"
            )
    return problems


def _node_problems(job: PipelineJob, reported: Mapping[str, Any]) -> list[str]:
    """Steps without compute or with an unbound required input (unless azure-ai-ml said so)."""
    default_compute = job.settings.default_compute if job.settings else None
    problems = []
    for name, node in job.jobs.items():
        if not (node.compute or default_compute) and f"jobs.{name}.compute" not in reported:
            problems.append(f"step {name} has no compute target (and the job no default)")
        component = node.component
        spec_inputs = getattr(component, "inputs", None) or {}
        for input_name, spec in spec_inputs.items():
            if spec.optional or spec.default is not None:
                continue
            if f"jobs.{name}.inputs.{input_name}" in reported:
                continue
            bound = node.inputs.get(input_name)
            if bound is None or bound_value(bound) is None:
                problems.append(f"step {name}: required input {input_name!r} is not bound")
    return problems


def validate_offline(
    job: PipelineJob, config: PipelineConfig, *, submit: bool = False
) -> list[str]:
    """What would fail on Azure ML, one line each; empty when the job looks submittable.

    ``submit``: also require the workspace settings (a dry-run does not need them).
    """
    result = job._validate()  # azure-ai-ml's own offline checks (the CLI's `az ml job validate`)
    reported: dict[str, Any] = {} if result.passed else dict(result.error_messages)
    problems = [f"{where}: {message}" for where, message in reported.items()]
    problems += _node_problems(job, reported)
    problems += _store_problems(job)
    if submit:
        for field, value in workspace_settings(config).items():
            if not value:
                problems.append(
                    f"azureml.{field} is not set (configure it or set "
                    f"{WORKSPACE_SETTINGS[field]}); it is needed to submit"
                )
    return problems


def dry_run(job: PipelineJob, config: PipelineConfig) -> Path:
    """Write the compiled pipeline YAML to ``<output_dir>/<pipeline>.pipeline.yaml``; return it.

    The file appears atomically (written under a temporary name, then renamed) and is loaded
    back with ``azure.ai.ml.load_job`` as a round-trip check.
    """
    from azure.ai.ml import load_job

    directory = output_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{job.display_name or job.name or 'pipeline'}.pipeline.yaml"
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.unlink(temporary)  # job.dump refuses to overwrite an existing file
    try:
        job.dump(temporary)
        load_job(temporary)
        os.replace(temporary, path)
    except Exception:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _ml_client(config: PipelineConfig) -> Any:
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise AzureMLError(
            ["azure-identity is not installed: pip install azure-identity (needed to submit)"]
        ) from None
    from azure.ai.ml import MLClient

    settings = workspace_settings(config)
    return MLClient(
        DefaultAzureCredential(),
        settings["subscription_id"],
        settings["resource_group"],
        settings["workspace_name"],
    )


def _instance_count(node: Any) -> int:
    resources = getattr(node, "resources", None)
    return int(getattr(resources, "instance_count", None) or 1)


def compute_problems(client: Any, job: PipelineJob) -> list[str]:
    """Compute targets the workspace lacks, and steps asking for more nodes than one scales to.

    Asks the workspace (``client.compute``), so it runs before submitting, not in a dry run.
    """
    from azure.core.exceptions import ResourceNotFoundError

    default = job.settings.default_compute if job.settings else None
    steps_on: dict[str, list[str]] = {}
    for name, node in job.jobs.items():
        steps_on.setdefault(str(node.compute or default), []).append(name)
    problems = []
    for compute, steps in steps_on.items():
        try:
            target = client.compute.get(compute)
        except ResourceNotFoundError:
            known = sorted(str(c.name) for c in client.compute.list())
            problems.append(
                f"compute {compute!r} (for {', '.join(steps)}) does not exist in the workspace; "
                f"it has {', '.join(known) or 'no computes'} (set azureml.cpu_compute or "
                "azureml.gpu_compute)"
            )
            continue
        most = getattr(target, "max_instances", None)
        for step in steps:
            count = _instance_count(job.jobs[step])
            if most is not None and count > int(most):
                problems.append(
                    f"step {step} asks for {count} nodes but compute {compute!r} scales to at "
                    f"most {most} (max_instances); lower the step's nodes or raise the maximum"
                )
    return problems


def submit(
    job: PipelineJob,
    config: PipelineConfig,
    *,
    ml_client: Any = None,
    echo: Callable[[str], None] = print,
    stream: bool = True,
) -> Any:
    """Validate, create the pipeline job in the workspace, print its studio URL, stream it.

    Raises:
        AzureMLError: the job or the workspace settings are invalid, or the workspace lacks a
            compute target or one too small for a step; nothing was sent.
    """
    problems = validate_offline(job, config, submit=True)
    if problems:
        raise AzureMLError(problems)
    client = ml_client if ml_client is not None else _ml_client(config)
    problems = compute_problems(client, job)
    if problems:
        raise AzureMLError(problems)
    created = client.jobs.create_or_update(job, experiment_name=experiment_name(config))
    echo(f"[sslpipe] submitted {created.name}: {created.studio_url}")
    if stream:
        client.jobs.stream(created.name)
    return created
