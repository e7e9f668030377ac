"""``python -m sslpipe COMMAND``: every command (see sslpipe/cli/__init__.py)."""

import sys

from sslpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
