"""moco_train entry point: flags match component.yaml one to one."""

from pathlib import Path
from typing import Any

from sslpipe.cli.component import run_component
from sslpipe.core.config import MocoConfig
from sslpipe.steps.moco_train import run_moco_train


def main(args: dict[str, Any]) -> None:
    config = MocoConfig(**{name: args[name] for name in MocoConfig.model_fields})
    run_moco_train(
        data_dir=args["data"],
        model_dir=args["model"],
        checkpoint_dir=args["checkpoint"],
        config=config,
        resume=args["resume"],
        skip_unchanged=args["skip_unchanged"],
    )


if __name__ == "__main__":
    run_component(Path(__file__).with_name("component.yaml"), main)
