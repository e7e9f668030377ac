"""The retraining guard: fingerprints of the prepared data and the training setup, compared with
the tags of the latest registered version in a real (local) MLflow registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sslpipe.models.training.retrain_guard import (
    DATA_TAG,
    SETUP_TAG,
    GuardDecision,
    data_fingerprint,
    decide,
    read_skipped,
    setup_fingerprint,
    write_skipped,
)
from tests.classifier_testkit import make_data, tracking_store, write_image

NAME = "image-classifier"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data(tmp_path / "data")


def _edit_manifest(data_dir: Path, edit: str) -> None:
    manifest = pd.read_csv(data_dir / "manifest.csv", dtype=str, keep_default_na=False)
    if edit == "shuffle":
        manifest = manifest.iloc[::-1]
    elif edit == "etag":
        manifest["etag"] = "0x8DC0FFEE"
    elif edit == "label":
        manifest.loc[0, "label"] = "blue" if manifest.loc[0, "label"] != "blue" else "red"
    elif edit == "split":
        manifest.loc[0, "split"] = "val"
    elif edit == "repeats":
        manifest.loc[0, "repeats"] = "3"
    elif edit == "drop":
        manifest = manifest.iloc[1:]
    manifest.to_csv(data_dir / "manifest.csv", index=False)


class TestDataFingerprint:
    def test_is_stable_for_the_same_data(self, data: Path) -> None:
        assert data_fingerprint(data) == data_fingerprint(data)
        assert len(data_fingerprint(data)) == 16

    @pytest.mark.parametrize("edit", ["shuffle", "etag"])
    def test_ignores_row_order_and_fetch_details(self, data: Path, edit: str) -> None:
        before = data_fingerprint(data)
        _edit_manifest(data, edit)
        assert data_fingerprint(data) == before

    @pytest.mark.parametrize("edit", ["label", "split", "repeats", "drop"])
    def test_changes_with_ids_labels_splits_and_repeats(self, data: Path, edit: str) -> None:
        before = data_fingerprint(data)
        _edit_manifest(data, edit)
        assert data_fingerprint(data) != before

    def test_changes_when_an_image_changes(self, data: Path) -> None:
        before = data_fingerprint(data)
        path = data / pd.read_csv(data / "manifest.csv")["path"][0]
        write_image(path, "green", size=(19, 16))
        assert data_fingerprint(data) != before

    def test_a_missing_image_is_an_error(self, data: Path) -> None:
        (data / pd.read_csv(data / "manifest.csv")["path"][0]).unlink()
        with pytest.raises(FileNotFoundError):
            data_fingerprint(data)


def test_setup_fingerprint_ignores_key_order_only() -> None:
    assert setup_fingerprint({"lr": 0.1, "epochs": 3}) == setup_fingerprint(
        {"epochs": 3, "lr": 0.1}
    )
    assert setup_fingerprint({"lr": 0.1}) != setup_fingerprint({"lr": 0.2})


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[MlflowClient]:
    with tracking_store(tmp_path):
        yield MlflowClient()


def _register(client: MlflowClient, tmp_path: Path, tags: dict[str, str]) -> str:
    if not client.search_registered_models(f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    source = tmp_path / "model"
    source.mkdir(exist_ok=True)
    return str(client.create_model_version(NAME, source.as_uri(), tags=tags).version)


class TestDecide:
    def test_trains_when_nothing_is_registered(self, registry: MlflowClient) -> None:
        decision = decide(NAME, data="a" * 16, setup="b" * 16)
        assert not decision.skip
        assert decision.previous is None
        assert "no registered version" in decision.reason

    def test_skips_when_both_fingerprints_match_the_latest_version(
        self, registry: MlflowClient, tmp_path: Path
    ) -> None:
        _register(registry, tmp_path, {DATA_TAG: "d1", SETUP_TAG: "s1"})
        _register(registry, tmp_path, {DATA_TAG: "d2", SETUP_TAG: "s2"})
        decision = decide(NAME, data="d2", setup="s2")
        assert decision.skip
        assert decision.previous == {"name": NAME, "version": "2", "uri": f"models:/{NAME}/2"}
        assert "unchanged since models:/image-classifier/2" in decision.reason

    def test_only_the_latest_version_counts(self, registry: MlflowClient, tmp_path: Path) -> None:
        _register(registry, tmp_path, {DATA_TAG: "d1", SETUP_TAG: "s1"})
        _register(registry, tmp_path, {DATA_TAG: "d2", SETUP_TAG: "s2"})
        assert not decide(NAME, data="d1", setup="s1").skip

    @pytest.mark.parametrize(
        ("data", "setup", "says"),
        [("d9", "s1", "data d1 -> d9"), ("d1", "s9", "setup s1 -> s9")],
    )
    def test_trains_and_names_what_changed(
        self, registry: MlflowClient, tmp_path: Path, data: str, setup: str, says: str
    ) -> None:
        _register(registry, tmp_path, {DATA_TAG: "d1", SETUP_TAG: "s1"})
        decision = decide(NAME, data=data, setup=setup)
        assert not decision.skip
        assert says in decision.reason

    def test_a_version_without_fingerprints_is_retrained(
        self, registry: MlflowClient, tmp_path: Path
    ) -> None:
        _register(registry, tmp_path, {})
        decision = decide(NAME, data="d1", setup="s1")
        assert not decision.skip
        assert "records no fingerprints" in decision.reason


def test_the_skip_record_round_trips(tmp_path: Path) -> None:
    assert read_skipped(tmp_path) is None
    record = GuardDecision(True, "unchanged", "d1", "s1", {"name": NAME, "version": "2"})
    write_skipped(tmp_path, record, step="classifier_train")
    assert read_skipped(tmp_path) == {
        "step": "classifier_train",
        "skip": True,
        "reason": "unchanged",
        "data_fingerprint": "d1",
        "setup_fingerprint": "s1",
        "previous": {"name": NAME, "version": "2"},
    }
