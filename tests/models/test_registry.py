"""The registry: the classifier registered by evaluate, loaded by alias in a fresh process,
promoted, and clear errors for references that name nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sslpipe.models.registry import (
    ModelReferenceError,
    load_classifier,
    load_embedder,
    model_uri,
    model_version_identity,
    promote,
    resolve_version,
    set_alias,
)
from sslpipe.steps.evaluate import run_evaluate
from tests.classifier_testkit import (
    image_folder,
    make_classifier,
    make_data,
    tracking_store,
)

NAME = "image-classifier"

# Loads a registered model the way a downstream service would: MLflow alone, by URI.
PREDICT_FOLDER = """
import json, sys
from pathlib import Path
import mlflow
*uris, folder = sys.argv[1:]
files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())
results = []
for uri in uris:
    out = mlflow.pyfunc.load_model(uri).predict(files)
    results.append({"files": [Path(f).name for f in files], "labels": out["label"].tolist(),
                    "errors": out["error"].tolist(), "columns": list(out.columns)})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store where evaluate registered the classifier (version 1, alias candidate)."""
    root = tmp_path_factory.mktemp("registry")
    with tracking_store(root):
        result = run_evaluate(
            model_dir=make_classifier(root / "model"),
            data_dir=make_data(root / "data"),
            output_dir=root / "report",
            min_macro_f1=0.5,
            model_name=NAME,
        )
        assert result["registered"]["alias"] == "candidate"
        yield root


def run_fresh(uris: list[str], folder: Path) -> list[dict]:
    """Load each URI in a new Python process and predict every file of ``folder``."""
    done = subprocess.run(
        [sys.executable, "-c", PREDICT_FOLDER, *uris, str(folder)],
        cwd=folder,
        env=dict(os.environ),  # the tracking URI, as a service would have it
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: list[dict] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def test_promote_then_fresh_processes_load_candidate_and_production(
    store: Path, tmp_path: Path
) -> None:
    promoted = promote(f"{NAME}@candidate")
    assert promoted == {
        "name": NAME,
        "version": "1",
        "alias": "production",
        "uri": f"models:/{NAME}@production",
        "previous": None,
    }
    aliases = MlflowClient().get_registered_model(NAME).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1", "production": "1"}

    # One new process (the start-up is the slow part) loads both aliases, as a service would.
    folder = image_folder(tmp_path / "images")
    for result in run_fresh([f"models:/{NAME}@candidate", f"models:/{NAME}@production"], folder):
        by_file = {
            name: (label, error)
            for name, label, error in zip(
                result["files"], result["labels"], result["errors"], strict=True
            )
        }
        assert by_file["a_red.png"] == ("red", None)
        assert by_file["b_red.png"] == ("red", None)
        assert by_file["c_green.png"] == ("green", None)
        assert by_file["d_blue.png"] == ("blue", None)
        for bad in ("e_broken.jpg", "notes.txt"):
            label, error = by_file[bad]
            assert label is None and error, bad
        assert result["columns"] == [
            "label",
            "confidence",
            "prob_blue",
            "prob_green",
            "prob_red",
            "error",
        ]


def test_references_resolve_to_existing_versions(store: Path) -> None:
    assert resolve_version(NAME) == (NAME, "1")
    assert resolve_version(f"{NAME}/latest") == (NAME, "1")
    assert resolve_version(f"{NAME}/1") == (NAME, "1")
    assert resolve_version(f"{NAME}@candidate") == (NAME, "1")


def test_references_that_name_nothing_are_clear_errors(store: Path) -> None:
    with pytest.raises(
        ModelReferenceError,
        match=r"registered model 'image-classifier' has no alias 'nope'; its aliases are "
        r"@candidate \(version 1\)",
    ):
        load_classifier(f"{NAME}@nope")
    with pytest.raises(ModelReferenceError, match="has no version 9; its versions are 1"):
        promote(f"{NAME}/9")
    with pytest.raises(ModelReferenceError, match="no registered model named 'ghost'"):
        promote("ghost@candidate")
    with pytest.raises(ModelReferenceError, match="is not valid; expected 'name'"):
        resolve_version("not a name")
    with pytest.raises(ModelReferenceError, match="alias 'v2' is not valid"):
        set_alias(NAME, 1, "v2")


def test_load_classifier_returns_the_pyfunc_and_refuses_other_kinds(
    store: Path, tmp_path: Path
) -> None:
    model = load_classifier(f"{NAME}/1")
    blue = store / "data" / "images" / "t5.png"
    assert model.predict([str(blue)])["label"].tolist() == ["blue"]
    with pytest.raises(ModelReferenceError, match="is not a backbone model"):
        load_embedder(NAME)


def test_an_alias_moves_to_the_promoted_version(store: Path) -> None:
    set_alias(NAME, 1, "staging")
    moved = promote(NAME, alias="staging")  # same version: stays, previous is itself
    assert moved["previous"] == "1" and moved["version"] == "1"
    assert resolve_version(f"{NAME}@staging") == (NAME, "1")


def test_model_uri_keeps_its_grammar(store: Path) -> None:
    assert model_uri(NAME) == f"models:/{NAME}/1"
    assert model_uri(f"{NAME}/4") == f"models:/{NAME}/4"  # not looked up, as before
    assert model_uri(f"{NAME}@any") == f"models:/{NAME}@any"
    with pytest.raises(ModelReferenceError, match="is not valid"):
        model_uri("@alias")


def test_a_reference_resolves_in_the_registry_it_is_given(store: Path, tmp_path: Path) -> None:
    """How the local executor pins a reference for a run, whatever MLflow points at now."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
        try:
            assert resolve_version(f"{NAME}@candidate", tracking_uri=uri) == (NAME, "1")
            identity = model_version_identity(NAME, "1", tracking_uri=uri)
        finally:
            mlflow.set_tracking_uri(uri)
    assert identity["run_id"] and identity["created"]
    # A registry that does not exist yet holds nothing, and is not created to find that out.
    missing = tmp_path / "none" / "mlflow.db"
    with pytest.raises(ModelReferenceError, match=f"no registered model named '{NAME}' in"):
        resolve_version(NAME, tracking_uri=f"sqlite:///{missing}")
    assert not missing.parent.exists()
