"""End to end against the three local servers: Cosmos DB-compatible metadata, Azurite images,
Label Studio labels.

The catalog is ingested without labels; three annotators label part of it in a real Label
Studio project (one review, one cancelled annotation, one task whose image is not in the
catalog); ``sync-labels`` brings the labels into Cosmos; the classifier pipeline then runs on
Cosmos and Azurite. Every file the run wrote is searched for the servers' credentials.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from label_studio_sdk import ImportApiRequest

from sslpipe.data.demo import demo_images
from sslpipe.data.labelstudio.client import LabelStudioClient, connect
from sslpipe.stores.cosmos import CosmosMetadataStore
from tests.data.labelstudio.helpers import annotate, create_users, taxonomy_config

REPO = Path(__file__).resolve().parent.parent
CATALOG_SIZE = 360
CLASSIFIER = [
    "classifier.backbone=torchvision:resnet18",
    "data_prep.image_size=36",
    "classifier.image_size=32",
    "classifier.epochs=2",
    "classifier.batch_size=64",
    "evaluate.min_macro_f1=0.0",
]

pytestmark = [pytest.mark.e2e, pytest.mark.servers]


def _environment(
    azurite: dict[str, str], cosmos: dict[str, str], label_studio: dict[str, str]
) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "AZURE_STORAGE_CONNECTION_STRING": azurite["connection_string"],
        "SSLPIPE_COSMOS_KEY": cosmos["key"],
        "LABEL_STUDIO_URL": label_studio["url"],
        "LABEL_STUDIO_API_KEY": label_studio["token"],
    }


def _cosmos_uri(cosmos: dict[str, str], database: str) -> str:
    """``cosmos://host:port/<database>/images`` for the local server's endpoint."""
    return f"cosmos://{urlparse(cosmos['endpoint']).netloc}/{database}/images"


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900, env=env
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _unlabelled_catalog(folder: Path) -> list[dict[str, Any]]:
    """The first demo images as files plus documents without labels; the original documents
    (with the demo's annotations) are returned for the annotators to follow."""
    images_dir = folder / "photos"
    images_dir.mkdir()
    originals, lines = [], []
    for image in itertools.islice(demo_images(), CATALOG_SIZE):
        (images_dir / image.blob_name).write_bytes(image.data)
        originals.append(image.document)
        lines.append(
            json.dumps(
                image.document
                | {"labels_with_taxonomy": [], "total_annotations": 0, "has_review": False}
            )
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return originals


def _label_in_label_studio(
    client: LabelStudioClient, documents: list[dict[str, Any]], users: list[int]
) -> tuple[int, dict[str, dict[str, Any]]]:
    """A project whose tasks are the labelled documents plus one stray image; each demo
    annotator is played by one of three users. Returns the project id and the expected labels
    per document id."""
    labelled = [d for d in documents if d["labels_with_taxonomy"]]
    project = client.sdk.projects.create(
        title=f"sslpipe e2e {uuid.uuid4().hex[:8]}", label_config=taxonomy_config()
    )
    assert project.id is not None
    data = [{"image": f"/data/upload/{d['id']}", "image_id": d["id"]} for d in labelled]
    data.append({"image": "/data/upload/not-in-the-catalog.jpeg"})
    response = client.sdk.projects.import_tasks(
        id=project.id, request=[ImportApiRequest(data=t) for t in data], return_task_ids=True
    )
    task_ids = list(getattr(response, "task_ids", None) or [])
    expected: dict[str, dict[str, Any]] = {}
    for index, (task_id, doc) in enumerate(zip(task_ids, labelled, strict=False)):
        by_user: dict[int, list[list[str]]] = {}
        for annotation in doc["labels_with_taxonomy"]:
            user = users[annotation["annotator_id"] % len(users)]
            by_user.setdefault(user, []).extend(annotation["taxonomy"])
        review = index % 7 == 0
        for number, (user, paths) in enumerate(sorted(by_user.items())):
            annotate(client, task_id, user, *paths, ground_truth=review and number == 0)
        if index % 11 == 0:  # a cancelled annotation does not count
            annotate(client, task_id, users[0], ["Odd", "9"], was_cancelled=True)
        expected[doc["id"]] = {
            "labels_with_taxonomy": [
                {"annotator_id": user, "taxonomy": sorted(map(list, {tuple(p) for p in paths}))}
                for user, paths in sorted(by_user.items())
            ],
            "total_annotations": len(by_user),
            "has_review": review,
        }
    return int(project.id), expected


@pytest.fixture(scope="module")
def servers_run(
    tmp_path_factory: pytest.TempPathFactory,
    azurite: dict[str, str],
    cosmos_server: dict[str, str],
    label_studio: dict[str, str],
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("servers-e2e")
    name = f"e2e{uuid.uuid4().hex[:10]}"
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workspace": str(root / "workspace"),
                "demo": False,
                "stores": {
                    "metadata_uri": _cosmos_uri(cosmos_server, name),
                    "blob_uri": f"{azurite['blob_endpoint']}/{name}",
                },
            }
        )
    )
    env = _environment(azurite, cosmos_server, label_studio)
    client = connect(label_studio["url"], token=label_studio["token"])
    users = create_users(client, 3)
    project_id: int | None = None
    try:
        documents = _unlabelled_catalog(root)
        project_id, expected = _label_in_label_studio(client, documents, users)
        yield {
            "root": root,
            "config": config,
            "env": env,
            "project_id": project_id,
            "expected": expected,
            "metadata_uri": _cosmos_uri(cosmos_server, name),
            "secrets": [
                azurite["account_key"],
                cosmos_server["key"],
                label_studio["token"],
            ],
        }
    finally:
        with contextlib.suppress(Exception):
            if project_id is not None:
                client.sdk.projects.delete(id=project_id)
        for user in users:
            with contextlib.suppress(Exception):
                client.sdk.users.delete(id=user)


def test_ingest_sync_and_train_a_classifier_on_the_three_servers(
    servers_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, config = servers_run, str(servers_run["config"])
    ingested = json.loads(
        _ok(
            _run(
                [
                    "-m", "sslpipe", "ingest", "--images", str(run["root"] / "photos"),
                    "--documents", str(run["root"] / "metadata.jsonl"), "--config", config,
                ],
                run["env"],
            )
        )
    )
    assert ingested["documents"]["created"] == CATALOG_SIZE
    assert ingested["blobs_written"] == CATALOG_SIZE

    sync = ["-m", "sslpipe", "sync-labels", "--project", str(run["project_id"]), "--config", config]
    first = json.loads(_ok(_run(sync, run["env"])))
    expected = run["expected"]
    assert (first["created"], first["updated"]) == (len(expected), 0)
    assert first["unmatched_count"] == 1
    second = json.loads(_ok(_run(sync, run["env"])))
    assert (second["created"], second["updated"], second["unchanged"]) == (0, 0, len(expected))

    monkeypatch.setenv("SSLPIPE_COSMOS_KEY", run["env"]["SSLPIPE_COSMOS_KEY"])
    with CosmosMetadataStore.from_uri(run["metadata_uri"]) as store:
        for doc_id, fields in itertools.islice(expected.items(), 25):
            stored = store.get(doc_id)
            assert stored is not None
            assert {key: stored[key] for key in fields} == fields, doc_id

    args = ["execute.py", "--pipeline", "classifier", "--config", config]
    trained = _ok(_run([*args, *(a for s in CLASSIFIER for a in ("--set", s))], run["env"]))
    assert "registered model image-classifier version 1" in trained
    workspace = run["root"] / "workspace"
    selection = next(workspace.glob("runs/*/connect_db/outputs/*/selection.json"))
    assert json.loads(selection.read_text())["metadata_store"] == run["metadata_uri"]
    stats = json.loads(next(workspace.glob("runs/*/data_prep/outputs/*/stats.json")).read_text())
    assert stats["prepared"] > 0 and stats["downloaded"] == stats["prepared"]
    report = next(workspace.glob("runs/*/evaluate/outputs/*/report.md")).read_text()
    assert "| **macro avg** |" in report


def test_no_credential_reaches_any_file_the_runs_wrote(servers_run: dict[str, Any]) -> None:
    written = [p for p in (servers_run["root"] / "workspace").rglob("*") if p.is_file()]
    assert written, "the pipeline test above writes the workspace"
    for path in written:
        content = path.read_bytes()
        for secret in servers_run["secrets"]:
            assert secret.encode() not in content, f"a credential is in {path}"


def test_the_demo_catalog_reaches_empty_servers_and_the_moco_pipeline_runs_on_them(
    tmp_path: Path,
    azurite: dict[str, str],
    cosmos_server: dict[str, str],
    label_studio: dict[str, str],
) -> None:
    name = f"demo{uuid.uuid4().hex[:10]}"
    sets = [
        f"workspace={tmp_path}",
        f"stores.metadata_uri={_cosmos_uri(cosmos_server, name)}",
        f"stores.blob_uri={azurite['blob_endpoint']}/{name}",
        "filter.limit=64",
        "data_prep.image_size=36",
        "moco.image_size=32",
        "moco.epochs=1",
        "moco.batch_size=32",
        "moco.projection_hidden_dim=128",
        "moco.num_workers=0",
    ]
    args = ["execute.py", "--pipeline", "moco", *(a for s in sets for a in ("--set", s))]
    out = _ok(_run(args, _environment(azurite, cosmos_server, label_studio)))
    assert "building the DEMO catalog" in out
    assert "demo catalog ready: 1797 documents" in out
    assert "registered model moco-backbone version 1" in out
