"""classifier_train entry point: flags match component.yaml one to one."""

from pathlib import Path
from typing import Any

from sslpipe.cli.component import run_component
from sslpipe.core.config import ClassifierConfig
from sslpipe.steps.classifier_train import run_classifier_train


def main(args: dict[str, Any]) -> None:
    config = ClassifierConfig(**{name: args[name] for name in ClassifierConfig.model_fields})
    run_classifier_train(
        data_dir=args["data"],
        model_dir=args["model"],
        checkpoint_dir=args["checkpoint"],
        config=config,
        backbone_dir=args["backbone_model"],
        resume=args["resume"],
        skip_unchanged=args["skip_unchanged"],
        model_name=args["model_name"],
    )


if __name__ == "__main__":
    run_component(Path(__file__).with_name("component.yaml"), main)
