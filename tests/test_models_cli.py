"""``python -m sslpipe``: promote, predict and embed against a real local registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from classifier_testkit import (
    CLASSES,
    image_folder,
    make_backbone,
    make_classifier,
    tracking_store,
    write_corrupt,
)

from sslpipe.models_cli import main
from sslpipe.registry import (
    configure_tracking,
    register_backbone,
    register_classifier,
    resolve_version,
    set_alias,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A registry with image-classifier version 1 (@candidate) and moco-backbone version 1."""
    root = tmp_path_factory.mktemp("cli")
    with tracking_store(root) as uri:
        configure_tracking()
        with mlflow.start_run(run_name="fixture"):
            register_classifier(
                make_classifier(root / "model"), name="image-classifier", tags={"t": "1"}
            )
            register_backbone(make_backbone(root / "backbone"), name="moco-backbone", tags={})
        set_alias("image-classifier", 1, "candidate")
        yield uri, image_folder(root / "images")


def sslpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sslpipe", *args],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_writes_a_csv_with_an_error_row_for_the_corrupt_file(
    store: tuple[str, Path], tmp_path: Path
) -> None:
    uri, images = store
    done = sslpipe(
        "--tracking-uri",
        uri,
        "predict",
        "image-classifier@candidate",
        str(images),
        "--output",
        "out/predictions.csv",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "label", "confidence", "probabilities", "error"]
    rows = {r.path: r for r in table.itertuples()}
    assert set(rows) == {"a_red.png", "b_red.png", "d_blue.png", "e_broken.jpg", "sub/c_green.png"}
    for path, label in (("a_red.png", "red"), ("sub/c_green.png", "green"), ("d_blue.png", "blue")):
        row = rows[path]
        assert row.label == label and row.error == ""
        probabilities = json.loads(row.probabilities)
        assert list(probabilities) == CLASSES
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert float(row.confidence) == pytest.approx(probabilities[label])
    broken = rows["e_broken.jpg"]
    assert broken.label == "" and broken.probabilities == "" and broken.error
    assert "e_broken.jpg" in done.stderr and "predicted 4 of 5 images" in done.stderr


def test_embed_writes_paths_and_an_n_by_d_float32_array(
    store: tuple[str, Path], tmp_path: Path
) -> None:
    uri, images = store
    output = tmp_path / "embeddings.npz"
    done = sslpipe(
        "embed",
        "moco-backbone",
        str(images),
        "--output",
        str(output),
        "--tracking-uri",
        uri,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(output) as npz:
        paths, embeddings = list(npz["paths"]), npz["embeddings"]
    assert paths == ["a_red.png", "b_red.png", "d_blue.png", "sub/c_green.png"]
    assert embeddings.shape == (4, 512) and embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarity = embeddings @ embeddings.T  # the two red images are each other's nearest
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3])
    assert "e_broken.jpg" in done.stderr


def test_promote_sets_the_alias(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["promote", "image-classifier@candidate", "--alias", "production"]) == 0
    assert capsys.readouterr().out.strip() == (
        "models:/image-classifier@production -> image-classifier version 1"
    )
    assert resolve_version("image-classifier@production") == ("image-classifier", "1")


def test_an_unknown_alias_is_one_error_line_and_exit_code_2(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["predict", "image-classifier@nope", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: registered model 'image-classifier' has no alias 'nope'; its aliases are "
        "@candidate (version 1)"
    )
    assert err.count("\n") == 1
    assert main(["promote", "ghost"]) == 2
    assert "no registered model named 'ghost'" in capsys.readouterr().err


def test_a_model_of_the_wrong_kind_is_refused(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, images = store
    assert main(["embed", "image-classifier", str(images)]) == 2
    assert "is not a backbone model" in capsys.readouterr().err


def test_bad_arguments_exit_2(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["predict", "image-classifier", str(tmp_path / "missing")]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["--tracking-uri", missing, "promote", "image-classifier"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["predict", "image-classifier"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the following arguments are required: INPUT_FOLDER")
    assert err.count("\n") == 1


def test_nothing_predictable_exits_1_and_still_writes_the_csv(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_corrupt(tmp_path / "in" / "bad.jpg")
    output = tmp_path / "p.csv"
    assert main(["predict", "image-classifier", str(tmp_path / "in"), "--output", str(output)]) == 1
    assert "no image could be predicted" in capsys.readouterr().err
    table = pd.read_csv(output, keep_default_na=False)
    assert table["path"].tolist() == ["bad.jpg"] and table["error"][0]
