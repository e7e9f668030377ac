"""Third-party noise stays out of the user's log: MLflow's INFO lines when it creates a new
SQLite store's tables, alembic's migration lines, and MLflow's advice (in raw ANSI colours) to
add type hints to our pyfunc models' ``predict``; silenced where they come from, one by one,
while every other warning and error still shows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from sslpipe.core.logs import QUIETED_LOGGERS
from sslpipe.models.registry import _without_predict_hint
from sslpipe.models.training.tracking import require_mlflow
from tests.steps.test_moco_train import SMALL, make_data

REPO = Path(__file__).resolve().parents[1]

# A moco_train step that registers its backbone, as the executor runs one: its own process,
# whose stdout and stderr are the step's log.txt.
REGISTER = """
import sys
from pathlib import Path
from sslpipe.core.config import MocoConfig
from sslpipe.steps.moco_train import run_moco_train

data, out = Path(sys.argv[1]), Path(sys.argv[2])
config = MocoConfig(**{**eval(sys.argv[3]), "epochs": 1})
run_moco_train(data_dir=data, model_dir=out / "model", checkpoint_dir=out / "checkpoint",
               config=config, register=True, resume=False)
"""

NOISE = (
    "Creating initial MLflow database tables",  # mlflow.store.db.utils, INFO
    "Updating database tables",  # mlflow.store.db.utils, INFO
    "alembic",  # "INFO [alembic.runtime.migration] Context impl SQLiteImpl." and the like
    "type hints to the `predict` method",  # MLflow's UserWarning about our pyfunc models
    "\x1b[",  # any ANSI colour code
)


def test_a_registration_into_a_new_sqlite_store_writes_no_third_party_noise(
    tmp_path: Path,
) -> None:
    data = make_data(tmp_path / "data", count=32)
    store = tmp_path / "mlflow.db"
    assert not store.exists()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "SSLPIPE_", "PYTEST_")) and key != "RANK"
    }
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "MLFLOW_EXPERIMENT_NAME": "noise",
        "SSLPIPE_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
        "PYTHONUNBUFFERED": "1",  # as the executor runs a step
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])]),
    }
    done = subprocess.run(
        [sys.executable, "-c", REGISTER, str(data), str(tmp_path / "out"), repr(SMALL)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert store.is_file()  # a new store was created...
    assert "registered models:/moco-backbone/1 (version 1)" in done.stdout, output
    for noise in NOISE:  # ...and said nothing about it
        assert noise not in output, f"{noise!r} in the step's output:\n{output}"


def test_only_the_predict_type_hint_advice_is_dropped() -> None:
    advice = "\x1b[33mAdd type hints to the `predict` method to enable data validation\x1b[0m"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with _without_predict_hint():
            warnings.warn(advice, UserWarning, stacklevel=1)
            warnings.warn("something else the user should see", UserWarning, stacklevel=1)
            warnings.warn("type hints to the `predict` method, but", FutureWarning, stacklevel=1)
        warnings.warn(advice, UserWarning, stacklevel=1)
    assert [(str(w.message), w.category) for w in shown] == [
        ("something else the user should see", UserWarning),
        ("type hints to the `predict` method, but", FutureWarning),
        (advice, UserWarning),  # after the block, as before it
    ]


def test_the_store_housekeeping_loggers_keep_their_warnings() -> None:
    require_mlflow("this test")
    for name in QUIETED_LOGGERS:
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO), name
        assert logger.isEnabledFor(logging.WARNING), name
