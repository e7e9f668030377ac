"""End to end: a second ``execute.py --pipeline moco`` in the same workspace downloads no image
again (the workspace's image cache, issue 16 item 3), although its data_prep runs again into a
new run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "filter.limit=48",
    "data_prep.image_size=36",
    "moco.image_size=32",
    "moco.epochs=1",
    "moco.batch_size=16",
    "moco.projection_hidden_dim=64",
    "moco.num_workers=0",
    "moco.knn_every=0",
]

pytestmark = pytest.mark.e2e


def _execute(workspace: Path, *extra: str) -> str:
    args = [sys.executable, "execute.py", "--pipeline", "moco", "--set", f"workspace={workspace}"]
    for item in TINY:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "SSLPIPE_IMAGE_CACHE"}
    done = subprocess.run([*args, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**env, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _data_prep(run: Path) -> tuple[dict[str, int], dict[str, bytes]]:
    outputs = next(run.glob("data_prep/outputs/*"))
    images = {p.name: p.read_bytes() for p in (outputs / "images").rglob("*.jpeg")}
    return json.loads((outputs / "stats.json").read_text()), images


def test_a_rerun_of_data_prep_takes_every_image_from_the_workspace_cache(tmp_path: Path) -> None:
    _execute(tmp_path)
    _execute(tmp_path, "--force-rerun")  # data_prep runs again, into the new run's folder
    first, second = sorted((tmp_path / "runs").iterdir())
    before, images_before = _data_prep(first)
    after, images_after = _data_prep(second)
    assert before["prepared"] == before["downloaded"] == 48
    assert (after["prepared"], after["downloaded"], after["reused"]) == (48, 0, 48)
    assert images_after == images_before
    assert len(list((tmp_path / "cache" / "images").rglob("*.img"))) == 48
