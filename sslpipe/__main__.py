"""``python -m sslpipe COMMAND``: the commands beside the pipelines.

- models (sslpipe/models_cli.py): ``promote``, ``predict``, ``embed``
- data (sslpipe/data_cli.py): ``ingest``, ``install-udf``
- Label Studio (sslpipe/labelstudio/cli.py): ``sync-labels``, ``push-predictions``

Pipelines run with ``python execute.py`` (sslpipe/cli.py).
"""

import sys
from collections.abc import Callable, Sequence

DATA_COMMANDS = ("ingest", "install-udf")
LABEL_STUDIO_COMMANDS = ("sync-labels", "push-predictions")


def _entry(argv: Sequence[str]) -> Callable[[Sequence[str]], int]:
    command = argv[0] if argv else ""
    if command in DATA_COMMANDS:
        from sslpipe.data_cli import main as data_main

        return data_main
    if command in LABEL_STUDIO_COMMANDS:
        from sslpipe.labelstudio.cli import main as label_studio_main

        return label_studio_main
    from sslpipe.models_cli import main as models_main

    return models_main


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(_entry(arguments)(arguments))
