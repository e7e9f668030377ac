"""``python execute.py`` (``python -m sslpipe run``): run a pipeline locally, or on Azure ML
(``--backend azureml``).

Exit codes: 0 success, 1 a step failed, 2 the configuration or command line is invalid.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sslpipe.cli.commands import config_arguments
from sslpipe.core.config import ConfigError, PipelineConfig, load_config
from sslpipe.core.io import read_json

EPILOG = """\
examples:
  python execute.py --pipeline moco
  python execute.py --pipeline moco --set moco.epochs=10 --set filter.limit=500
  python execute.py --pipeline classifier --set classifier.backbone=moco-backbone@latest
  python execute.py --pipeline classifier --set classifier.backbone=torchvision:resnet18
  python execute.py --pipeline full                     # moco, classifier, two baselines
  python execute.py --pipeline moco --config my.yaml --dry-run
  python execute.py --pipeline moco --resume            # continue the last failed run
  python execute.py --pipeline full --backend azureml --dry-run \
      --set stores.metadata_uri=cosmos://acct/db/coll \
      --set stores.blob_uri=https://acct.blob.core.windows.net/images

configuration keys (--set KEY=VALUE parses VALUE as YAML; defaults in sslpipe/core/config.py):
"""


def library_dir() -> Path:
    """The library's folder: its code is in every step's cache key, beside the component's own
    folder, so a change to any module a step imports reruns the step."""
    import sslpipe

    return Path(sslpipe.__file__).resolve().parent


def _epilog() -> str:
    from sslpipe.core.config import PipelineConfig, known_keys

    sections: dict[str, list[str]] = {}
    for key in known_keys(PipelineConfig):
        section, _, name = key.rpartition(".")
        sections.setdefault(section, []).append(name)
    lines = [f"  {', '.join(sections.pop(''))}"]
    lines += [f"  {section}.{{{','.join(names)}}}" for section, names in sections.items()]
    return EPILOG + "\n".join(lines) + "\n"


def build_parser(prog: str = "execute.py") -> argparse.ArgumentParser:
    from pipelines import PIPELINES

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a self-supervised learning pipeline on an image catalog.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pipeline", required=True, choices=sorted(PIPELINES), help="which pipeline to run"
    )
    parser.add_argument(
        "--backend",
        choices=["local", "azureml"],
        help="where to run it (default: the config's backend, local: the embedded default); "
        "azureml submits the same pipeline to an Azure ML workspace, or with --dry-run writes "
        "and validates its YAML",
    )
    config_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved steps and parameters (azureml: write the pipeline YAML); "
        "run nothing",
    )
    parser.add_argument(
        "--force-rerun",
        action="store_true",
        help="run every step even when its earlier outputs could be reused",
    )
    parser.add_argument(
        "--no-demo",
        action="store_true",
        help="do not build the demo catalog when the metadata store is empty",
    )
    schedules = parser.add_argument_group(
        "schedules (Azure ML)", "retrain on a cron trigger; needs --backend azureml"
    )
    schedules.add_argument(
        "--schedule",
        metavar="CRON",
        help="create or update a JobSchedule that submits this pipeline, e.g. '0 3 * * 1' "
        "(Mondays 03:00); with --dry-run it is validated and written as YAML",
    )
    schedules.add_argument(
        "--time-zone", default="UTC", help="Azure ML time zone of --schedule (default UTC)"
    )
    schedules.add_argument("--schedule-name", help="default: sslpipe-<pipeline>-retrain")
    schedules.add_argument("--list-schedules", action="store_true", help="list and exit")
    schedules.add_argument("--disable-schedule", metavar="NAME", help="disable and exit")
    schedules.add_argument("--delete-schedule", metavar="NAME", help="delete and exit")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_ID",
        help="continue a failed run (default: the latest) from where it stopped",
    )
    return parser


def _quiet_azure_sdk() -> None:
    # azure-ai-ml announces its experimental classes on every import; that is noise here.
    logging.getLogger("azure").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="azure")
    warnings.filterwarnings("ignore", module="mlflow")


def _echo(message: str) -> None:
    print(message, flush=True)


def prepare_workspace(config: PipelineConfig, *, demo: bool) -> None:
    """Create the workspace and, on an empty embedded store, the demo catalog."""
    from sslpipe.data.demo import demo_images
    from sslpipe.data.ingest import ingest_images
    from sslpipe.stores import open_blob_store, open_metadata_store

    config.workspace_dir.mkdir(parents=True, exist_ok=True)
    with open_metadata_store(config.metadata_uri) as store:
        if store.count() > 0:
            return
        if not demo:
            raise ConfigError(
                f"the metadata store {config.metadata_uri} is empty and --no-demo was given; "
                "ingest your catalog first or allow the demo catalog"
            )
        _echo(
            "[sslpipe] the metadata store is empty: building the DEMO catalog from scikit-learn's "
            "handwritten digits (1,797 images) in "
            f"{config.workspace_dir} (use --no-demo or --set demo=false to turn this off)"
        )
        report = ingest_images(demo_images(), store, open_blob_store(config.blob_uri, create=True))
        _echo(
            f"[sslpipe] demo catalog ready: {report.created} documents, blobs in {config.blob_uri}"
        )


def _mlflow_environment(config: PipelineConfig) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": config.tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": config.experiment,
        "SSLPIPE_ARTIFACT_ROOT": str(config.artifact_root),
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
    }


def _new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()


def _latest_failed_run(runs_dir: Path) -> str:
    for run_dir in sorted(runs_dir.glob("*"), reverse=True):
        record = run_dir / "run.json"
        if record.is_file() and read_json(record).get("status") != "completed":
            return run_dir.name
    raise ConfigError(f"--resume: no unfinished run in {runs_dir}")


def run_local(pipeline: str, config: PipelineConfig, args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import PIPELINES
    from sslpipe.execution import LocalExecutor, PipelineGraph, StepFailedError
    from sslpipe.execution.live import project_live_state
    from sslpipe.models.registry import configure_tracking

    graph = PipelineGraph.from_pipeline_job(PIPELINES[pipeline](config))
    environment = _mlflow_environment(config)
    # Registry references, the registry and cached weights are resolved as the run sees them.
    live_state = project_live_state()

    def local_executor() -> LocalExecutor:
        return LocalExecutor(
            config.workspace_dir,
            force_rerun=args.force_rerun,
            env=environment,
            library_paths=[library_dir()],
            echo=_echo,
            live_state=live_state,
        )

    if args.dry_run:
        executor = local_executor()
        for step in executor.plan(graph):
            _print_plan_step(step)
        return 0

    prepare_workspace(config, demo=config.demo and not args.no_demo)
    configure_tracking(
        config.tracking_uri, experiment=config.experiment, artifact_root=config.artifact_root
    )
    run_id = (
        _latest_failed_run(config.workspace_dir / "runs")
        if args.resume == "latest"
        else (args.resume or _new_run_id())
    )
    with mlflow.start_run(
        run_name=f"{pipeline}-{run_id}",
        tags={"sslpipe.pipeline": pipeline, "sslpipe.run_id": run_id},
    ) as parent:
        environment |= {
            "SSLPIPE_RUN_ID": run_id,
            "SSLPIPE_MLFLOW_PARENT_RUN_ID": parent.info.run_id,
        }
        executor = local_executor()
        try:
            record = executor.resume(run_id) if args.resume else executor.run(graph, run_id=run_id)
        except StepFailedError as err:
            mlflow.set_tag("sslpipe.status", "failed")
            _echo(f"[sslpipe] FAILED: {err}")
            _echo(
                f"[sslpipe] fix the cause, then continue with: python execute.py --pipeline "
                f"{pipeline} --resume {run_id}"
            )
            return 1
    _print_summary(config, record)
    return 0


def run_azureml(pipeline: str, config: PipelineConfig, args: argparse.Namespace) -> int:
    """The same pipeline job on Azure ML: validated, then written (--dry-run) or submitted."""
    from pipelines import PIPELINES
    from sslpipe.execution import azureml

    # azure.ai.ml sets its own logger to INFO: its experimental-class notices on dump/load.
    logging.getLogger("azure.ai.ml").setLevel(logging.ERROR)
    job = azureml.prepare_job(PIPELINES[pipeline](config), config)
    if not args.dry_run:
        azureml.submit(job, config, echo=_echo)
        return 0
    problems = azureml.validate_offline(job, config)
    if problems:
        raise azureml.AzureMLError(problems)
    path = azureml.dry_run(job, config)
    _echo(f"[sslpipe] azureml dry run: pipeline job validated and written to {path}")
    return 0


def _schedule_action(args: argparse.Namespace) -> bool:
    return bool(
        args.schedule or args.list_schedules or args.disable_schedule or args.delete_schedule
    )


def run_schedules(
    pipeline: str, config: PipelineConfig, args: argparse.Namespace, *, ml_client: Any = None
) -> int:
    """--schedule / --list-schedules / --disable-schedule / --delete-schedule on Azure ML."""
    from pipelines import PIPELINES
    from sslpipe.execution import azureml, schedules

    if (args.backend or config.backend) != "azureml":
        raise ConfigError("schedules run on Azure ML: add --backend azureml")
    request = None
    if args.schedule:
        name = args.schedule_name or f"sslpipe-{pipeline}-retrain"
        request = schedules.ScheduleRequest(name, args.schedule, args.time_zone).validated()
        config = config.for_schedule()
        job = azureml.prepare_job(PIPELINES[pipeline](config), config)
        problems = azureml.validate_offline(job, config, submit=not args.dry_run)
        if problems:
            raise azureml.AzureMLError(problems)
        schedule = schedules.build_schedule(job, request, pipeline=pipeline)
        if args.dry_run:
            path = azureml.output_dir(config) / f"{request.name}.schedule.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # dump refuses to overwrite
            schedule.dump(path)
            _echo(f"[sslpipe] schedule validated and written to {path}")
            return 0
    client = ml_client if ml_client is not None else azureml._ml_client(config)
    if request is not None:
        schedules.create_or_update(client, schedule, echo=_echo)
    if args.disable_schedule:
        schedules.disable(client, args.disable_schedule)
        _echo(f"[sslpipe] schedule {args.disable_schedule} disabled")
    if args.delete_schedule:
        schedules.delete(client, args.delete_schedule)
        _echo(f"[sslpipe] schedule {args.delete_schedule} deleted")
    if args.list_schedules:
        for row in schedules.list_schedules(client):
            state = "enabled" if row["enabled"] else "disabled"
            _echo(f"{row['name']}  '{row['cron']}'  {row['time_zone']}  {state}")
    return 0


def _print_plan_step(step: dict[str, Any]) -> None:
    """One step of ``--dry-run``: reuse (which run) or run (why), then the values it gets."""
    if step.get("would_reuse"):
        # A reuse after a step that always runs holds only if that step writes the same again.
        assumes = "; ".join(step.get("assumes") or [])
        decision = f"reuse run {step.get('reused_from')}" + (f", if {assumes}" if assumes else "")
    else:
        decision = f"run ({step.get('reason') or 'no cache key'})"
    _echo(f"step {step.get('name')}: {decision}")
    configured = step.get("configured") or {}
    notes = step.get("notes") or {}
    effective = step.get("effective") or {}
    for key, value in sorted((step.get("parameters") or {}).items()):
        _echo(f"    {key} = {_plan_value(key, value, configured, notes, effective)}")


def _plan_value(
    key: str,
    value: Any,
    configured: dict[str, Any],
    notes: dict[str, str],
    effective: dict[str, Any],
) -> str:
    """The value a step will use, and where it differs from the configured one, why."""
    if key in effective:
        return f"{effective[key].value} ({effective[key].why})"
    if key in configured:
        return f"{value} (configured {configured[key]})"
    if key in notes:
        return f"{value} ({notes[key]})"
    return str(value)


def _print_summary(config: PipelineConfig, record: Any) -> None:
    run_dir = config.workspace_dir / "runs" / record.run_id
    _echo(f"[sslpipe] run {record.run_id} completed; run record: {run_dir / 'run.json'}")
    for name, step in record.steps.items():
        for output, path in (step.outputs or {}).items():
            _echo(f"[sslpipe]   {name}.{output}: {path}")
            skipped = Path(path) / "skipped.json"
            if skipped.is_file():
                _echo(f"[sslpipe] {name} skipped training: {read_json(skipped)['reason']}")
            _print_knn_gain(name, Path(path) / "metrics.json")
            report = Path(path) / "report.md"
            if report.is_file():
                _echo(f"[sslpipe] report: {report}")
            registered = Path(path) / "registered_model.json"
            if registered.is_file():
                _print_registered(config, step, read_json(registered))


def _print_registered(config: PipelineConfig, step: Any, info: dict[str, Any]) -> None:
    """The model a step registered, or, when the step was reused, the one it registered then:
    a reused step registers nothing, and saying so keeps users from looking for a new version."""
    alias = f" (alias @{info['alias']})" if info.get("alias") else ""
    model = f"model {info['name']} version {info['version']}{alias}"
    where = f"{info['uri']} (tracking: {config.tracking_uri})"
    if step.status == "reused":
        _echo(
            f"[sslpipe] {step.name} reused run {step.reused_from}, so nothing was registered "
            f"now; it reuses {model}, registered by that run: {where}"
        )
    else:
        _echo(f"[sslpipe] registered {model}: {where}")


def _print_knn_gain(step: str, metrics_file: Path) -> None:
    """What pre-training bought, from moco_train's kNN monitor (epoch 0 is random init)."""
    if not metrics_file.is_file():
        return
    knn = read_json(metrics_file).get("knn_top1") or []
    if len(knn) < 2:
        return
    verdict = "better than" if knn[-1] > knn[0] else "NOT better than"
    _echo(
        f"[sslpipe] {step}: kNN top-1 on the labelled images: random init {knn[0]:.3f}, "
        f"after pre-training {knn[-1]:.3f} ({knn[-1] - knn[0]:+.3f}, {verdict} random init)"
    )


def main(argv: Sequence[str] | None = None, *, prog: str = "execute.py") -> int:
    """Run ``python execute.py`` with ``argv`` (default: the process's arguments)."""
    _quiet_azure_sdk()
    args = build_parser(prog).parse_args(argv)
    overrides = list(args.overrides)
    try:
        config = load_config(args.config, overrides)
        if _schedule_action(args):
            return run_schedules(args.pipeline, config, args)
        if (args.backend or config.backend) == "azureml":
            return run_azureml(args.pipeline, config, args)
        return run_local(args.pipeline, config, args)
    except ConfigError as err:
        # AzureMLError (a ConfigError) carries several problems: one line each.
        for problem in getattr(err, "problems", None) or [str(err)]:
            print(f"error: {problem}", file=sys.stderr)
        return 2


def run_command(argv: Sequence[str]) -> int:
    """``python -m sslpipe run ARGUMENTS``: ``argv`` starts with the command's name."""
    from sslpipe.cli.commands import PROG

    return main(list(argv[1:]), prog=f"{PROG} {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
