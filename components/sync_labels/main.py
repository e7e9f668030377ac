"""sync_labels entry point: flags match component.yaml one to one."""

from pathlib import Path
from typing import Any

from sslpipe.cli.component import run_component
from sslpipe.data.labelstudio.step import run_sync_labels


def main(args: dict[str, Any]) -> None:
    run_sync_labels(
        metadata_uri=args["metadata_uri"],
        labelstudio_url=args["labelstudio_url"],
        project_id=args["project_id"],
        image_id_field=args["image_id_field"],
        output_dir=args["report"],
    )


if __name__ == "__main__":
    run_component(Path(__file__).with_name("component.yaml"), main)
