"""The classifier pyfunc: paths, bytes and arrays in; one row per input with label or error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from sslpipe.models.serving.classifier import ImageClassifierModel, model_inputs
from tests.classifier_testkit import CLASSES, COLORS, make_classifier, write_corrupt, write_image


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ImageClassifierModel:
    folder = make_classifier(tmp_path_factory.mktemp("pyfunc") / "model")
    python_model = ImageClassifierModel()
    python_model.load_context(SimpleNamespace(artifacts={"classifier": str(folder)}))
    return python_model


def test_paths_bytes_and_arrays_are_labelled_with_probabilities(
    model: ImageClassifierModel, tmp_path: Path
) -> None:
    red = write_image(tmp_path / "red.png", "red")
    blue_bytes = write_image(tmp_path / "blue.png", "blue").read_bytes()
    green_array = np.full((20, 24, 3), COLORS["green"], dtype=np.uint8)
    out = model.predict(None, [str(red), blue_bytes, green_array, red])

    assert list(out.columns) == ["label", "confidence", *(f"prob_{c}" for c in CLASSES), "error"]
    assert list(out["label"]) == ["red", "blue", "green", "red"]
    assert out["error"].isna().all()
    probs = out[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.allclose(out["confidence"], probs.max(axis=1))
    assert (out["confidence"] > 0.5).all()


def test_a_bad_input_gets_an_error_row_and_the_others_go_on(
    model: ImageClassifierModel, tmp_path: Path
) -> None:
    red = write_image(tmp_path / "red.png", "red")
    corrupt = write_corrupt(tmp_path / "corrupt.jpg")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    inputs = [str(red), str(corrupt), str(tmp_path / "missing.png"), str(text), b"\x00\x01", 42]
    out = model.predict(None, inputs)

    assert len(out) == len(inputs)
    assert out["label"].tolist() == ["red", None, None, None, None, None]
    assert out["error"][0] is None
    errors = out["error"].tolist()[1:]
    assert all(isinstance(e, str) and e for e in errors)
    assert "FileNotFoundError" in errors[1] and "missing.png" in errors[1]
    assert "UnidentifiedImageError" in errors[2]
    assert "TypeError" in errors[4] and "int" in errors[4]
    assert out.loc[1:, "confidence"].isna().all()
    assert out.loc[1:, [f"prob_{c}" for c in CLASSES]].isna().all().all()


def test_a_dataframe_column_a_series_and_a_batch_array_are_accepted(
    model: ImageClassifierModel, tmp_path: Path
) -> None:
    paths = [str(write_image(tmp_path / f"{c}.png", c)) for c in CLASSES]
    frame = pd.DataFrame({"id": [1, 2, 3], "image": paths})
    assert model.predict(None, frame)["label"].tolist() == CLASSES
    assert model.predict(None, pd.Series(paths))["label"].tolist() == CLASSES
    batch = np.stack([np.full((16, 16, 3), COLORS[c], dtype=np.uint8) for c in CLASSES])
    assert model.predict(None, batch)["label"].tolist() == CLASSES
    assert model.predict(None, paths[0])["label"].tolist() == [CLASSES[0]]  # one image
    assert len(model_inputs(np.array(paths, dtype=object))) == 3


def test_batches_give_the_same_answers_as_one_by_one(
    model: ImageClassifierModel, tmp_path: Path
) -> None:
    paths = [str(write_image(tmp_path / f"{i}.png", CLASSES[i % 3])) for i in range(7)]
    whole = model.predict(None, paths)
    model.predictor.batch_size = 2
    try:
        batched = model.predict(None, paths)
    finally:
        model.predictor.batch_size = 64
    pd.testing.assert_frame_equal(whole, batched, atol=1e-6)


def test_an_empty_input_gives_an_empty_table(model: ImageClassifierModel) -> None:
    out = model.predict(None, [])
    assert out.empty and list(out.columns) == model.predictor.columns
