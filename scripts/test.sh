#!/usr/bin/env bash
# Set up the environment, then run the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] mypy"
.venv/bin/mypy
echo "[test] local servers: Azurite, Cosmos DB-compatible server, Label Studio (infra/servers.py)"
# Stop the servers afterwards only when this script started them.
if ! .venv/bin/python infra/servers.py status > /dev/null 2>&1; then
    trap '.venv/bin/python infra/servers.py stop' EXIT
fi
.venv/bin/python infra/servers.py start
echo "[test] pytest (the 15 slowest tests are listed at the end)"
.venv/bin/python -m pytest --durations=15 "$@"
