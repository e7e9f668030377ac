"""``python -m sslpipe``: the model commands (promote, predict, embed); see sslpipe/models_cli.py.

Pipelines run with ``python execute.py`` (sslpipe/cli.py).
"""

import sys

from sslpipe.models_cli import main

sys.exit(main())
