"""sync_labels against the real Label Studio: annotations in, metadata documents out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sslpipe.cli.labelstudio import main
from sslpipe.core.filters import ImageFilter
from sslpipe.data.labelstudio.client import LabelStudioClient, LabelStudioError, connect
from sslpipe.data.labelstudio.sync import SyncReport, sync_labels
from sslpipe.stores.sqlite import SQLiteMetadataStore

from .helpers import ProjectMaker, annotate, closed_port_url

# Tasks as imported: an image_id field, or only an image URL (quoted, with a query string).
TASKS = [
    {"image": "https://blob.example/images/d1.jpeg", "image_id": "d1.jpeg"},
    {"image": "https://blob.example/images/d2.jpeg?sv=2024&sig=abc"},
    {"image": "https://blob.example/images/d3.jpeg", "image_id": "d3.jpeg"},
    {"image": "https://blob.example/images/d%204.jpeg"},
    {"image": "https://blob.example/images/d5.jpeg", "image_id": "d5.jpeg"},
    {"image": "https://blob.example/images/nope.jpeg", "image_id": "nope.jpeg"},
    {"image": "https://blob.example/images/"},
]


@dataclass
class Scenario:
    project_id: int
    task_ids: list[int]
    users: list[int]
    annotations: dict[str, int]
    store: SQLiteMetadataStore
    metadata_uri: str


@pytest.fixture
def scenario(
    ls_client: LabelStudioClient,
    make_project: ProjectMaker,
    make_users: Callable[[int], list[int]],
    make_document: Any,
    tmp_path: Path,
) -> Any:
    """Seven tasks annotated by three new users, and a store with six documents."""
    store = SQLiteMetadataStore(tmp_path / "metadata.db")
    store.upsert(
        [
            make_document("d1.jpeg", is_blurred=True, uri_orig="orig-1.jpeg"),
            make_document("d2.jpeg", (999, ["Odd", "9"])),  # stale labels: replaced
            make_document("d3.jpeg"),
            make_document("d 4.jpeg"),
            make_document("d5.jpeg"),
            make_document("other.jpeg", (998, ["Even", "8"])),  # in no task: untouched
        ]
    )
    project_id, tasks = make_project(TASKS)
    ids = [t["id"] for t in tasks]
    u1, u2, u3 = make_users(3)
    annotations = {
        # d1: two annotators agree on Even/2, one also gives Odd/3; a third cancels (skips).
        "d1_u1": annotate(ls_client, ids[0], u1, ["Odd", "3"], ["Even", "2"]),
        "d1_u2": annotate(ls_client, ids[0], u2, ["Even", "2"]),
        "d1_u3": annotate(ls_client, ids[0], u3, was_cancelled=True),
        # d2: one annotation, marked ground truth (the review of open-source Label Studio).
        "d2_u3": annotate(ls_client, ids[1], u3, ["Odd", "5"], ground_truth=True),
        # d3: an empty submission and a real one.
        "d3_u1": annotate(ls_client, ids[2], u1),
        "d3_u2": annotate(ls_client, ids[2], u2, ["Even", "4"]),
        # d 4: a first-level path only.
        "d4_u1": annotate(ls_client, ids[3], u1, ["Odd"]),
        # d5: no annotation; nope.jpeg: no document.
        "nope_u1": annotate(ls_client, ids[5], u1, ["Even", "6"]),
    }
    with store:
        yield Scenario(project_id, ids, [u1, u2, u3], annotations, store, store.uri)


def counts(report: SyncReport) -> tuple[int, int, int]:
    return report.created, report.updated, report.unchanged


@pytest.mark.servers
def test_sync_sets_the_documents_from_the_annotations(
    ls_client: LabelStudioClient, scenario: Scenario
) -> None:
    u1, u2, u3 = scenario.users
    report = sync_labels(ls_client, scenario.project_id, scenario.store)

    assert report.tasks == 7
    assert counts(report) == (3, 1, 1)  # created d1, d3, d 4; updated d2; unchanged d5
    assert [(u.task_id, u.image_id, u.image) for u in report.unmatched] == [
        (scenario.task_ids[5], "nope.jpeg", "nope.jpeg"),
        (scenario.task_ids[6], None, "https://blob.example/images/"),
    ]
    assert report.skipped_by_reason == {"cancelled": 1, "no_annotator": 0, "no_taxonomy": 1}
    assert {(s.annotation_id, s.reason) for s in report.skipped} == {
        (scenario.annotations["d1_u3"], "cancelled"),
        (scenario.annotations["d3_u1"], "no_taxonomy"),
    }

    d1 = scenario.store.get("d1.jpeg")
    assert d1 is not None
    assert d1["labels_with_taxonomy"] == [
        {"annotator_id": u1, "taxonomy": [["Even", "2"], ["Odd", "3"]]},
        {"annotator_id": u2, "taxonomy": [["Even", "2"]]},
    ]
    assert (d1["total_annotations"], d1["has_review"]) == (2, False)
    assert (d1["is_blurred"], d1["uri_orig"], d1["file_hash"]) == (
        True,
        "orig-1.jpeg",
        "hash-d1.jpeg",
    )
    d2 = scenario.store.get("d2.jpeg")
    assert d2 is not None
    assert d2["labels_with_taxonomy"] == [{"annotator_id": u3, "taxonomy": [["Odd", "5"]]}]
    assert (d2["total_annotations"], d2["has_review"]) == (1, True)
    d4 = scenario.store.get("d 4.jpeg")
    assert d4 is not None and d4["labels_with_taxonomy"] == [
        {"annotator_id": u1, "taxonomy": [["Odd"]]}
    ]
    d5 = scenario.store.get("d5.jpeg")
    assert d5 is not None
    assert (d5["labels_with_taxonomy"], d5["total_annotations"], d5["has_review"]) == ([], 0, False)
    other = scenario.store.get("other.jpeg")
    assert other is not None and other["labels_with_taxonomy"][0]["annotator_id"] == 998

    # The store's filter columns follow the new labels.
    def ids(image_filter: ImageFilter) -> list[str]:
        return [d["id"] for d in scenario.store.select(image_filter)]

    assert ids(ImageFilter(require_review=True, exclude_blurred=False)) == ["d2.jpeg"]
    assert ids(ImageFilter(min_annotators=2, exclude_blurred=False)) == ["d1.jpeg"]
    assert ids(ImageFilter(include_labels=[["Odd", "3"]], exclude_blurred=False)) == ["d1.jpeg"]


@pytest.mark.servers
def test_a_second_sync_changes_nothing_and_an_edit_updates_exactly_its_document(
    ls_client: LabelStudioClient, scenario: Scenario
) -> None:
    sync_labels(ls_client, scenario.project_id, scenario.store)
    before = {d["id"]: d for d in scenario.store.select(ImageFilter(exclude_blurred=False))}

    again = sync_labels(ls_client, scenario.project_id, scenario.store)
    assert counts(again) == (0, 0, 5)
    after = {d["id"]: d for d in scenario.store.select(ImageFilter(exclude_blurred=False))}
    assert after == before

    ls_client.sdk.annotations.update(
        id=scenario.annotations["d1_u2"],
        result=[
            {
                "from_name": "taxonomy",
                "to_name": "image",
                "type": "taxonomy",
                "value": {"taxonomy": [["Odd", "7"]]},
            }
        ],
    )
    edited = sync_labels(ls_client, scenario.project_id, scenario.store)
    assert counts(edited) == (0, 1, 4)
    d1 = scenario.store.get("d1.jpeg")
    assert d1 is not None
    assert d1["labels_with_taxonomy"][1] == {
        "annotator_id": scenario.users[1],
        "taxonomy": [["Odd", "7"]],
    }
    changed = {k for k in before if scenario.store.get(k) != before[k]}
    assert changed == {"d1.jpeg"}


@pytest.mark.servers
def test_every_page_size_reads_the_same_tasks(
    label_studio: dict[str, str], scenario: Scenario
) -> None:
    listings = {
        size: [
            t["id"]
            for t in connect(
                label_studio["url"], token=label_studio["token"], page_size=size
            ).tasks(scenario.project_id)
        ]
        for size in (1, 3, 7, 100)
    }
    assert all(ids == scenario.task_ids for ids in listings.values()), listings
    small = connect(label_studio["url"], token=label_studio["token"], page_size=2)
    report = sync_labels(small, scenario.project_id, scenario.store)
    assert counts(report) == (3, 1, 1)


@pytest.mark.servers
def test_an_unknown_project_is_named_in_the_error(
    ls_client: LabelStudioClient, tmp_path: Path
) -> None:
    with (
        SQLiteMetadataStore(tmp_path / "m.db") as store,
        pytest.raises(LabelStudioError, match=r"refused reading page 1 of the tasks of project 9"),
    ):
        sync_labels(ls_client, 987654321, store)


@pytest.mark.servers
def test_a_refused_token_is_reported_without_the_token(label_studio: dict[str, str]) -> None:
    with pytest.raises(LabelStudioError, match=r"refused checking the API token \(HTTP 401") as err:
        connect(label_studio["url"], token="not-the-token-4711")
    assert "not-the-token-4711" not in str(err.value)


def test_an_unreachable_label_studio_changes_nothing(tmp_path: Path, make_document: Any) -> None:
    url = closed_port_url()
    with SQLiteMetadataStore(tmp_path / "m.db") as store:
        store.upsert([make_document("d1.jpeg", (701, ["Even", "2"]))])
        before = store.get("d1.jpeg")
        with pytest.raises(LabelStudioError, match="cannot reach Label Studio") as err:
            connect(url, token="secret-token-0815", max_retries=0)
        message = str(err.value)
        assert url in message and "nothing was changed" in message
        assert "secret-token-0815" not in message
        unchecked = connect(url, token="secret-token-0815", check=False, max_retries=0)
        with pytest.raises(LabelStudioError, match=rf"{url} while reading page 1 of the tasks"):
            sync_labels(unchecked, 3, store)
        assert store.get("d1.jpeg") == before


def test_a_missing_token_says_which_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioError, match="set LABEL_STUDIO_API_KEY"):
        connect("http://127.0.0.1:8080")


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="'ftp://host/x' is not an http"):
        connect("ftp://host/x", token="t")


@pytest.mark.parametrize("url", ["http://labels.example.com", "http://10.0.0.7:8080"])
def test_plain_http_to_another_machine_is_refused_before_the_token_is_sent(url: str) -> None:
    with pytest.raises(ValueError, match=r"plain http to another machine.*use https"):
        connect(url, token="t")


# --- the command line --------------------------------------------------------------------------


@pytest.mark.servers
def test_the_sync_command_prints_the_report(
    label_studio: dict[str, str],
    scenario: Scenario,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio["token"])
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio["url"])
    argv = ["sync-labels", "--project", str(scenario.project_id)]
    code = main([*argv, "--metadata-uri", scenario.metadata_uri])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert (report["created"], report["updated"], report["unchanged"]) == (3, 1, 1)
    assert report["unmatched_count"] == 2
    assert report["skipped_by_reason"]["cancelled"] == 1
    assert label_studio["token"] not in out.out + out.err


def test_the_sync_command_exits_1_with_one_line_when_label_studio_is_down(
    tmp_path: Path,
    make_document: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with SQLiteMetadataStore(tmp_path / "m.db") as store:
        store.upsert([make_document("d1.jpeg")])
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-token-0815")
    url = closed_port_url()
    argv = ["sync-labels", "--project", "3", "--url", url]
    code = main([*argv, "--metadata-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"error: cannot reach Label Studio at {url}")
    assert "secret-token-0815" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metadata-uri", "sqlite:///{tmp}/missing.db"], "no metadata store at"),
        (["--metadata-uri", "sqlite:///{tmp}/m.db", "--url", "ftp://x"], "is not an http(s) URL"),
        (["--config", "{tmp}/missing.yaml"], "config file"),
    ],
)
def test_the_sync_command_exits_2_on_bad_arguments(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    (tmp_path / "m.db").touch()
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "t")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")
    filled = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["sync-labels", "--project", "3", *filled])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
