"""data_prep entry point: flags match component.yaml one to one."""

from pathlib import Path
from typing import Any

from sslpipe.cli.component import run_component
from sslpipe.data.image_cache import image_cache_dir
from sslpipe.steps.data_prep import run_data_prep


def main(args: dict[str, Any]) -> None:
    # On several nodes the step finds its shard in the launcher's RANK and WORLD_SIZE.
    run_data_prep(
        ids_dir=args["selection"],
        blob_uri=args["blob_uri"],
        output_dir=args["data"],
        image_size=args["image_size"],
        concurrency=args["concurrency"],
        max_skipped_fraction=args["max_skipped_fraction"],
        nodes=args["nodes"],
        # The local executor names the workspace's cache; Azure ML does not: no cache there.
        image_cache=image_cache_dir(),
        cache_max_bytes=args["cache_max_mb"] * 2**20,
    )


if __name__ == "__main__":
    run_component(Path(__file__).with_name("component.yaml"), main)
