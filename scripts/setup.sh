#!/usr/bin/env bash
# Create the project's virtual environment at .venv/ and install the project into it.
# Idempotent: a second call only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($python_bin --version)"
    "$python_bin" -m venv .venv
fi

stamp=.venv/.sslpipe-installed
wanted=$(cat pyproject.toml | .venv/bin/python -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "[setup] installing sslpipe and its dependencies (torch and torchvision from PyPI: a few minutes the first time)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    echo "$wanted" > "$stamp"
fi
echo "[setup] ready: .venv/bin/python"
