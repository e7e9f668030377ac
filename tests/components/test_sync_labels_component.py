"""The sync_labels component: its YAML contract, its entry point, and a run as Azure ML would."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.ai.ml import load_component

from sslpipe.cli.component import build_parser, load_spec, run_component
from sslpipe.stores.sqlite import SQLiteMetadataStore

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO / "components" / "sync_labels" / "component.yaml"
PLACEHOLDER = re.compile(r"\$\{\{(inputs|outputs)\.(\w+)\}\}")
ARGV = ["--metadata_uri", "sqlite:///m.db", "--labelstudio_url", "http://ls:8080"]
ARGV += ["--project_id", "7", "--report", "r"]


def spec() -> dict[str, Any]:
    return load_spec(SPEC_PATH)


def test_the_component_loads_with_azure_ml() -> None:
    component = load_component(source=SPEC_PATH)
    assert component.name == "sslpipe_sync_labels"
    assert set(component.inputs) == {
        "metadata_uri",
        "labelstudio_url",
        "project_id",
        "image_id_field",
    }
    assert set(component.outputs) == {"report"}


def test_no_input_carries_a_secret() -> None:
    assert not [name for name in spec()["inputs"] if re.search(r"token|key|secret|pass", name)]


def test_every_placeholder_is_declared_once_and_follows_its_flag() -> None:
    data = spec()
    used = PLACEHOLDER.findall(data["command"])
    for kind in ("inputs", "outputs"):
        assert sorted(n for k, n in used if k == kind) == sorted(data[kind]), kind
    pairs = re.findall(r"--(\w+) '?\$\{\{(?:inputs|outputs)\.(\w+)\}\}", data["command"])
    assert len(pairs) == len(used) and all(flag == value for flag, value in pairs), pairs
    assert data["command"].startswith("python -m components.sync_labels.main ")


def test_the_parser_accepts_the_rendered_command() -> None:
    data = spec()
    values = {
        "metadata_uri": "cosmos://acct/db/coll",
        "labelstudio_url": "https://ls.example",
        "project_id": "12",
        "image_id_field": "blob name",
    }

    def fill(match: re.Match[str]) -> str:
        kind, key = match.groups()
        return values[key] if kind == "inputs" else f"/mnt/azureml/out/{key}"

    argv = shlex.split(PLACEHOLDER.sub(fill, data["command"]))[3:]
    args = vars(build_parser(data).parse_args(argv))
    assert args == {
        "metadata_uri": "cosmos://acct/db/coll",
        "labelstudio_url": "https://ls.example",
        "project_id": 12,
        "image_id_field": "blob name",
        "report": Path("/mnt/azureml/out/report"),
    }


def load_main(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``components/sync_labels/main.py`` with its step function replaced by a recorder."""
    calls: list[dict[str, Any]] = []
    stub = types.ModuleType("sslpipe.data.labelstudio.step")
    stub.run_sync_labels = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sslpipe.data.labelstudio.step", stub)
    module_spec = importlib.util.spec_from_file_location(
        "_main_sync_labels", SPEC_PATH.parent / "main.py"
    )
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    setattr(module, "calls", calls)  # noqa: B010 - read by the tests
    return module


def test_main_passes_every_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_main(monkeypatch)
    run_component(SPEC_PATH, module.main, ARGV)
    run_component(SPEC_PATH, module.main, [*ARGV, "--image_id_field", "blob"])
    default, named = module.calls
    assert default == {
        "metadata_uri": "sqlite:///m.db",
        "labelstudio_url": "http://ls:8080",
        "project_id": 7,
        "image_id_field": "image_id",
        "output_dir": Path("r"),
    }
    assert named["image_id_field"] == "blob"


def sync_labels(*argv: str, token: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LABEL_STUDIO_API_KEY"}
    if token is not None:
        env["LABEL_STUDIO_API_KEY"] = token
    command = [sys.executable, "-m", "components.sync_labels.main", *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("token", [None, "secret-token-0815"])
def test_a_failing_run_exits_1_with_one_line_and_writes_nothing(
    tiny_catalog: Any, token: str | None
) -> None:
    out = tiny_catalog.root / "report"
    url = closed_port_url()
    result = sync_labels(
        "--metadata_uri", tiny_catalog.metadata_uri, "--labelstudio_url", url,
        "--project_id", "3", "--report", str(out), token=token,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: sslpipe_sync_labels: ")
    assert url in last and "nothing was changed" in last
    assert ("set LABEL_STUDIO_API_KEY" in last) is (token is None)
    assert "secret-token-0815" not in result.stderr + result.stdout
    assert not out.exists()


@pytest.mark.servers
def test_the_component_syncs_a_project_and_writes_its_report(
    label_studio: dict[str, str], tiny_catalog: Any
) -> None:
    from label_studio_sdk import ImportApiRequest, LabelStudio

    sdk = LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])
    config = (
        '<View><Image name="image" value="$image"/><Taxonomy name="taxonomy" toName="image">'
        '<Choice value="Even"><Choice value="2"/></Choice><Choice value="Odd"/></Taxonomy></View>'
    )
    project = sdk.projects.create(title=f"component {uuid.uuid4().hex[:10]}", label_config=config)
    assert project.id is not None
    try:
        imported = sdk.projects.import_tasks(
            id=project.id,
            request=[
                ImportApiRequest(data={"image": "https://x/images/c.jpeg"}),
                ImportApiRequest(data={"image": "https://x/images/zz.jpeg"}),
            ],
            return_task_ids=True,
        )
        task_id = getattr(imported, "task_ids", [])[0]  # an untyped extra field
        result = [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                   "value": {"taxonomy": [["Even", "2"]]}}]  # fmt: skip
        sdk.annotations.create(id=task_id, result=result, ground_truth=True)
        out = tiny_catalog.root / "report"
        run = sync_labels(
            "--metadata_uri", tiny_catalog.metadata_uri,
            "--labelstudio_url", label_studio["url"],
            "--project_id", str(project.id), "--report", str(out), token=label_studio["token"],
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
    finally:
        sdk.projects.delete(id=project.id)
    assert (report["created"], report["updated"], report["unchanged"]) == (1, 0, 0)
    assert [u["image_id"] for u in report["unmatched"]] == ["zz.jpeg"]
    assert report["labelstudio_url"] == label_studio["url"]
    assert label_studio["token"] not in run.stdout + run.stderr
    with SQLiteMetadataStore(tiny_catalog.db_path) as store:
        document = store.get("c.jpeg")
    assert document is not None
    assert document["labels_with_taxonomy"][0]["taxonomy"] == [["Even", "2"]]
    assert (document["total_annotations"], document["has_review"]) == (1, True)
