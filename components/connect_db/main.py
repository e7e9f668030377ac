"""connect_db entry point: flags match component.yaml one to one."""

from pathlib import Path
from typing import Any

from sslpipe.cli.component import run_component
from sslpipe.core.config import LabelsConfig
from sslpipe.core.filters import ImageFilter
from sslpipe.data.labelled import parse_split
from sslpipe.steps.connect_db import run_connect_db


def main(args: dict[str, Any]) -> None:
    labels = LabelsConfig(
        level=args["label_level"],
        min_agreement=args["min_agreement"],
        split=parse_split(args["split"]),
        seed=args["split_seed"],
        pin_sortout_testset=args["pin_sortout_testset"],
        balance=args["balance"],
    )
    run_connect_db(
        metadata_uri=args["metadata_uri"],
        blob_uri=args["blob_uri"],
        image_filter=ImageFilter.model_validate_json(args["filter"]),
        mode=args["mode"],
        labels=labels,
        output_dir=args["selection"],
    )


if __name__ == "__main__":
    run_component(Path(__file__).with_name("component.yaml"), main)
