"""evaluate entry point: flags match component.yaml one to one."""

from pathlib import Path
from typing import Any

from sslpipe.cli.component import run_component
from sslpipe.core.config import EvaluateConfig
from sslpipe.steps.evaluate import run_evaluate


def main(args: dict[str, Any]) -> None:
    config = EvaluateConfig(**{name: args[name] for name in EvaluateConfig.model_fields})
    run_evaluate(
        model_dir=args["model"],
        data_dir=args["data"],
        output_dir=args["report"],
        min_macro_f1=config.min_macro_f1,
        model_name=config.model_name,
        baseline_dir=args["baseline"],
        baseline_scratch_dir=args["baseline_scratch"],
        register=args["register"],
    )


if __name__ == "__main__":
    run_component(Path(__file__).with_name("component.yaml"), main)
