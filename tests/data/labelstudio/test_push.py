"""push_predictions against the real Label Studio: classifier output as taxonomy pre-annotations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest

from sslpipe.cli.labelstudio import main
from sslpipe.data.labelstudio.client import LabelStudioClient
from sslpipe.data.labelstudio.push import (
    PushError,
    project_image_ids,
    push_predictions,
)
from sslpipe.models.serving.blob_predictions import predict_images
from sslpipe.stores.local_blob import LocalFolderBlobStore

from .helpers import ProjectMaker, taxonomy_config

pytestmark = pytest.mark.servers

TASKS = [
    {"image": "https://blob.example/images/a.jpeg", "image_id": "a.jpeg"},
    {"image": "https://blob.example/images/b.jpeg"},
    {"image": "https://blob.example/images/b.jpeg"},  # the same image twice
    {"image": "https://blob.example/images/c.jpeg"},
]


def predictions(**labels: tuple[str | None, float]) -> pd.DataFrame:
    """A classifier-shaped table: ``a=("Even/2", 0.9)`` -> one row for image ``a.jpeg``."""
    rows = [
        {"id": f"{key.replace('_', '.')}.jpeg", "label": label, "confidence": score, "error": None}
        for key, (label, score) in labels.items()
    ]
    return pd.DataFrame(rows, columns=["id", "label", "confidence", "error"])


def by_task(client: LabelStudioClient, project_id: int) -> dict[int, list[dict[str, Any]]]:
    """The project's predictions per task, as the API lists them."""
    found: dict[int, list[dict[str, Any]]] = {}
    for prediction in client.sdk.predictions.list(project=project_id):
        found.setdefault(prediction.task, []).append(prediction.model_dump(mode="json"))
    return found


def paths(prediction: dict[str, Any]) -> list[list[str]]:
    (result,) = prediction["result"]
    assert (result["type"], result["from_name"], result["to_name"]) == (
        "taxonomy",
        "taxonomy",
        "image",
    )
    taxonomy: list[list[str]] = result["value"]["taxonomy"]
    return taxonomy


def test_push_creates_taxonomy_predictions_and_replaces_them(
    ls_client: LabelStudioClient, make_project: ProjectMaker
) -> None:
    project_id, tasks = make_project(TASKS)
    ta, tb1, tb2, tc = (t["id"] for t in tasks)
    table = predictions(a=("Even/2", 0.9), b=("Odd", 0.6), z=("Even", 0.5))
    table.loc[len(table)] = ["e.jpeg", None, float("nan"), "OSError: image file is truncated"]

    first = push_predictions(ls_client, project_id, table, model_version="clf/1")
    assert (first.created, first.replaced, first.unchanged, first.deleted) == (3, 0, 0, 0)
    assert (first.tasks, first.predictions, first.unmatched) == (4, 4, ["z.jpeg"])
    assert first.to_dict()["skipped_by_reason"] == {"error": 1, "no_label": 0, "not_in_taxonomy": 0}
    found = by_task(ls_client, project_id)
    assert sorted(found) == [ta, tb1, tb2]
    assert paths(found[ta][0]) == [["Even", "2"]] and found[ta][0]["score"] == 0.9
    assert paths(found[tb1][0]) == paths(found[tb2][0]) == [["Odd"]]
    assert {p[0]["model_version"] for p in found.values()} == {"clf/1"}
    ids = {t: [p["id"] for p in ps] for t, ps in found.items()}

    again = push_predictions(ls_client, project_id, table, model_version="clf/1")
    assert (again.created, again.replaced, again.unchanged, again.deleted) == (0, 0, 3, 0)
    assert {t: [p["id"] for p in ps] for t, ps in by_task(ls_client, project_id).items()} == ids

    changed = predictions(a=("Odd/3", 0.8), b=("Odd", 0.6), c=("Even/4", 0.7))
    third = push_predictions(ls_client, project_id, changed, model_version="clf/1")
    assert (third.created, third.replaced, third.unchanged, third.deleted) == (1, 1, 2, 1)
    found = by_task(ls_client, project_id)
    assert [len(found[t]) for t in (ta, tb1, tb2, tc)] == [1, 1, 1, 1]
    assert paths(found[ta][0]) == [["Odd", "3"]] and found[ta][0]["score"] == 0.8
    assert paths(found[tc][0]) == [["Even", "4"]]

    other = push_predictions(ls_client, project_id, changed, model_version="clf/2")
    assert (other.created, other.deleted) == (4, 0)
    versions = sorted(
        p["model_version"] for ps in by_task(ls_client, project_id).values() for p in ps
    )
    assert versions == ["clf/1"] * 4 + ["clf/2"] * 4


def test_duplicates_of_a_model_version_are_cleaned_up(
    ls_client: LabelStudioClient, make_project: ProjectMaker
) -> None:
    project_id, tasks = make_project(TASKS[:1])
    task_id = tasks[0]["id"]
    for label in ("Odd", "Even"):
        ls_client.sdk.predictions.create(
            task=task_id,
            result=[
                {
                    "from_name": "taxonomy",
                    "to_name": "image",
                    "type": "taxonomy",
                    "value": {"taxonomy": [[label]]},
                }
            ],
            model_version="clf/1",
        )
    report = push_predictions(
        ls_client, project_id, predictions(a=("Even", 0.5)), model_version="clf/1"
    )
    assert (report.created, report.replaced, report.deleted) == (0, 1, 2)
    (only,) = by_task(ls_client, project_id)[task_id]
    assert paths(only) == [["Even"]] and only["score"] == 0.5


def test_labels_outside_the_taxonomy_and_bad_projects_are_refused(
    ls_client: LabelStudioClient, make_project: ProjectMaker
) -> None:
    project_id, _ = make_project(TASKS[:1])
    report = push_predictions(
        ls_client, project_id, predictions(a=("Blue/2", 0.5)), model_version="m"
    )
    assert report.created == 0
    assert [(s.image_id, s.reason) for s in report.skipped] == [("a.jpeg", "not_in_taxonomy")]
    assert by_task(ls_client, project_id) == {}

    choices = (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="kind" toName="image"><Choice value="x"/></Choices></View>'
    )
    plain, _ = make_project(TASKS[:1], label_config=choices)
    with pytest.raises(PushError, match=rf"project {plain} .* has 0 Taxonomy controls"):
        push_predictions(ls_client, plain, predictions(a=("x", 0.5)), model_version="m")


# --- computing the predictions with a registered classifier ------------------------------------

COLORS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local MLflow registry with the test classifier (labels solid colours) @candidate."""
    from sslpipe.models.registry import configure_tracking, register_classifier, set_alias
    from tests.classifier_testkit import make_classifier, tracking_store

    root = tmp_path_factory.mktemp("registry")
    with tracking_store(root / "mlflow") as uri:
        configure_tracking()
        with mlflow.start_run(run_name="fixture"):
            model_dir = make_classifier(root / "model")
            register_classifier(model_dir, name="image-classifier", tags={})
        set_alias("image-classifier", 1, "candidate")
        yield uri


def test_the_push_command_predicts_the_task_images_from_the_blob_store(
    ls_client: LabelStudioClient,
    make_project: ProjectMaker,
    registry: str,
    label_studio: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.classifier_testkit import write_image

    blobs = LocalFolderBlobStore(tmp_path / "images")
    for name, color in (("r1.png", "red"), ("g 1.png", "green")):
        blobs.write_sync(name, write_image(tmp_path / "src" / name, color).read_bytes())
    project_id, tasks = make_project(
        [
            {"image": "https://blob.example/images/r1.png"},
            {"image": "https://blob.example/images/g%201.png"},
            {"image": "https://blob.example/images/missing.png"},
        ],
        label_config=taxonomy_config({k: [] for k in COLORS}),
    )
    ids = project_image_ids(ls_client, project_id)
    assert ids == ["g 1.png", "missing.png", "r1.png"]
    table = predict_images("image-classifier@candidate", ids, blobs.uri)
    assert list(table["id"]) == ids
    assert list(table["label"]) == ["green", None, "red"]
    assert table["error"].iloc[1].startswith("BlobNotFoundError")
    assert {"prob_red", "prob_green", "prob_blue", "confidence"} <= set(table.columns)

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio["token"])
    argv = ["push-predictions", "--project", str(project_id), "--url", label_studio["url"]]
    argv += ["--model", "image-classifier@candidate", "--blob-uri", blobs.uri]
    code = main([*argv, "--tracking-uri", registry])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert report["model_version"] == "image-classifier/1"
    assert report["model_uri"] == "models:/image-classifier/1"
    assert (report["created"], report["skipped_by_reason"]["error"]) == (2, 1)
    found = by_task(ls_client, project_id)
    assert paths(found[tasks[0]["id"]][0]) == [["red"]]
    assert paths(found[tasks[1]["id"]][0]) == [["green"]]
    assert 0 < found[tasks[0]["id"]][0]["score"] <= 1

    code = main([*argv, "--tracking-uri", registry])
    assert code == 0 and json.loads(capsys.readouterr().out)["unchanged"] == 2


def test_the_push_command_refuses_an_unknown_model_with_exit_2(
    registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["push-predictions", "--project", "1", "--url", "http://127.0.0.1:1"]
    argv += ["--model", "image-classifier@nope", "--blob-uri", (tmp_path / "b").as_uri()]
    code = main([*argv, "--tracking-uri", registry])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: registered model 'image-classifier' has no alias 'nope'")
