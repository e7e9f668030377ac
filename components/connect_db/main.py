"""connect_db entry point: flags match component.yaml one to one."""

from pathlib import Path
from typing import Any

from sslpipe.component_cli import run_component
from sslpipe.filters import ImageFilter
from sslpipe.steps.connect_db import run_connect_db


def main(args: dict[str, Any]) -> None:
    run_connect_db(
        metadata_uri=args["metadata_uri"],
        blob_uri=args["blob_uri"],
        image_filter=ImageFilter.model_validate_json(args["filter"]),
        label_level=args["label_level"],
        output_dir=args["selection"],
    )


if __name__ == "__main__":
    run_component(Path(__file__).with_name("component.yaml"), main)
