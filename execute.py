#!/usr/bin/env python
"""Start a pipeline: ``python execute.py --pipeline moco`` (see ``--help``)."""

import sys

from sslpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
