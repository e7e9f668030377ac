#!/usr/bin/env python
"""Start a pipeline: ``python execute.py --pipeline moco`` (see ``--help``), which is
``python -m sslpipe run --pipeline moco``; the runner is sslpipe/cli/pipelines.py."""

import sys

from sslpipe.cli.pipelines import main

if __name__ == "__main__":
    sys.exit(main())
