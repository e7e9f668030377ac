"""Unsafe input files (issue 7, item 6).

- Blob names from metadata (``../``, absolute paths, backslashes, NUL) never read or write a
  file outside the local blob container, the ingest images folder or data_prep's output folder.
- Every ``torch.load`` in the code loads tensors only (``weights_only=True``), and a weights or
  checkpoint file carrying a pickled object whose ``__reduce__`` runs code is refused without
  running it.
- A configuration file (or ``--set`` value) with Python YAML tags is refused and runs nothing.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from sslpipe.core.config import ConfigError, load_config
from sslpipe.core.io import read_csv
from sslpipe.data.ingest import ingest_folder
from sslpipe.steps.data_prep import run_data_prep
from sslpipe.stores.local_blob import LocalFolderBlobStore
from sslpipe.stores.sqlite import SQLiteMetadataStore
from tests.conftest import DocumentMaker, ImageMaker

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


def _unsafe_names(tmp_path: Path) -> list[str]:
    """Blob names that would leave a folder if joined naively; each points at a real file."""
    return [
        "../evil.jpeg",
        "../../evil.jpeg",
        "sub/../../evil.jpeg",
        "./../evil.jpeg",
        str(tmp_path / "outside" / "evil.jpeg"),  # absolute
        "//outside/evil.jpeg",
        "..\\evil.jpeg",
        "sub\\..\\..\\evil.jpeg",
        "C:\\outside\\evil.jpeg",
        "evil\x00.jpeg",
        "sub/evil.jpeg\x00/../../../evil.jpeg",
    ]


@pytest.fixture
def outside(tmp_path: Path, make_image: ImageMaker) -> Path:
    """Images at the places that the unsafe names reach from ``<root>/<folder>``.

    ``root`` is a folder inside this test's ``tmp_path``, so that the images planted one and two
    levels up stay in the test's own folder, not in the parent that other tests share.
    """
    root = tmp_path / "root"
    for place in (root, tmp_path, root / "outside"):
        place.mkdir(exist_ok=True)
        (place / "evil.jpeg").write_bytes(make_image())
    return root


def test_the_local_blob_store_refuses_every_unsafe_name(
    outside: Path, make_image: ImageMaker
) -> None:
    store = LocalFolderBlobStore(outside / "container")
    before = _files(outside.parent)
    for name in _unsafe_names(outside):
        with pytest.raises(ValueError, match="unsafe blob name"):
            store.write_sync(name, b"overwritten")
        for call in (store.read, store.info, store.write):
            args = (name, b"x") if call == store.write else (name,)
            with pytest.raises(ValueError, match="unsafe blob name"):
                asyncio.run(call(*args))  # type: ignore[operator]
    assert _files(outside.parent) == before
    assert (outside / "outside" / "evil.jpeg").read_bytes() == make_image()


def test_data_prep_skips_unsafe_blob_paths_and_writes_only_inside_its_output(
    outside: Path, make_image: ImageMaker
) -> None:
    container = outside / "container"
    LocalFolderBlobStore(container).write_sync("good.jpeg", make_image())
    names = _unsafe_names(outside)
    ids_dir = outside / "ids"
    ids_dir.mkdir()
    rows = [{"id": "good", "blob_path": "good.jpeg"}]
    rows += [{"id": f"bad-{i}", "blob_path": name} for i, name in enumerate(names)]
    pd.DataFrame(rows).to_csv(ids_dir / "ids.csv", index=False)
    output = outside / "data"
    before = _files(outside.parent)
    stats = run_data_prep(
        ids_dir=ids_dir,
        blob_uri=container.as_uri(),
        output_dir=output,
        image_size=16,
        concurrency=2,
        max_skipped_fraction=1.0,
    )
    after = _files(outside.parent)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed and all(output in p.parents for p in changed), sorted(changed)
    assert stats["skipped"] == {"unsafe_name": len(names)}
    skipped = read_csv(output / "skipped.csv")
    assert set(skipped["id"]) == {f"bad-{i}" for i in range(len(names))}
    assert set(skipped["reason"]) == {"unsafe_name"}
    manifest = read_csv(output / "manifest.csv")
    assert list(manifest["id"]) == ["good"]
    assert [p.relative_to(output).as_posix() for p in output.rglob("*.jpeg")] == [
        "images/good.jpeg"
    ]


def test_ingest_reads_and_writes_no_file_outside_its_folders(
    outside: Path, make_image: ImageMaker, make_document: DocumentMaker
) -> None:
    photos = outside / "photos"
    photos.mkdir()
    (photos / "good.jpeg").write_bytes(make_image())
    names = _unsafe_names(outside)
    documents = outside / "docs.jsonl"
    documents.write_text(
        "".join(json.dumps(make_document(n)) + "\n" for n in ["good.jpeg", *names]),
        encoding="utf-8",
    )
    container = outside / "container"
    before = _files(outside.parent)
    with SQLiteMetadataStore(outside / "db" / "metadata.db") as store:
        report = ingest_folder(photos, documents, store, LocalFolderBlobStore(container))
        assert store.count() == 1 and store.get("good.jpeg") is not None
    assert dict(report.skipped) == {"unsafe_name": len(names)}
    assert {item["item"] for item in report.skipped_items} == set(names)
    changed = {p for p, s in _files(outside.parent).items() if before.get(p) != s}
    assert all(container in p.parents or outside / "db" in p.parents for p in changed)
    assert [p.relative_to(container).as_posix() for p in container.rglob("*") if p.is_file()] == [
        "good.jpeg"
    ]


# --- model files: tensors only, never a pickled object's code --------------------------------


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """``(line, has weights_only=True)`` of every ``torch.load(...)`` call in a file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = ast.unparse(func)
        if name in ("torch.load", "load") or name.endswith("serialization.load"):
            if name == "load" and not _imports_torch_load(path):
                continue
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            calls.append((node.lineno, safe))
    return calls


def _imports_torch_load(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(
        isinstance(n, ast.ImportFrom)
        and (n.module or "").startswith("torch")
        and any(a.name == "load" for a in n.names)
        for n in ast.walk(tree)
    )


UNSAFE_LOADERS = (
    "pickle.load",
    "pickle.loads",
    "cPickle.load",
    "dill.load",
    "joblib.load",
    "cloudpickle.load",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "torch.jit.load",
    "pd.read_pickle",
    "pandas.read_pickle",
)


def _code_files() -> list[Path]:
    files = [ROOT / "execute.py"]
    for folder in ("sslpipe", "components", "pipelines"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_every_torch_load_in_the_code_is_weights_only() -> None:
    found, unsafe = 0, []
    for path in _code_files():
        for line, safe in _torch_load_calls(path):
            found += 1
            if not safe:
                unsafe.append(f"{path.relative_to(ROOT)}:{line}")
    assert found >= 3  # the backbone, the classifier and the training checkpoint (both steps)
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_pickle_based_loader_is_used_anywhere_in_the_code() -> None:
    used = []
    for path in _code_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in UNSAFE_LOADERS or (
                    name.endswith("np.load") and "allow_pickle" in ast.unparse(node)
                ):
                    used.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not used, used


class _Payload:
    """Unpickling it runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _malicious(path: Path, marker: Path) -> Path:
    """A torch file whose state dict holds the payload beside real tensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    return path


def test_the_malicious_file_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The control: without weights_only the payload runs, so the refusals below mean it."""
    marker = tmp_path / "marker"
    path = _malicious(tmp_path / "evil.pt", marker)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.read_text() == "pwned"


def _backbone_folder(folder: Path) -> None:
    from sslpipe.models.backbone_io import save_backbone
    from sslpipe.models.moco.backbone import BackboneSpec, build_backbone

    spec = BackboneSpec("resnet18", small_stem=True)
    backbone, _ = build_backbone(spec)
    save_backbone(folder, backbone, spec, image_size=32, lineage={})


def _classifier_folder(folder: Path) -> None:
    from sslpipe.models.classifier.model import ClassifierHead, ImageClassifier, save_classifier
    from sslpipe.models.moco.backbone import BackboneSpec, build_backbone

    spec = BackboneSpec("resnet18", small_stem=True)
    backbone, dim = build_backbone(spec)
    model = ImageClassifier(backbone, ClassifierHead(dim, 2, hidden_dim=8, dropout=0.0))
    save_classifier(
        folder, model, spec=spec, classes=["a", "b"], hidden_dim=8, dropout=0.0,
        image_size=32, lineage={},
    )  # fmt: skip


def _load_backbone(folder: Path) -> Any:
    from sslpipe.models.backbone_io import load_backbone_dir

    return load_backbone_dir(folder)


def _load_classifier(folder: Path) -> Any:
    from sslpipe.models.classifier.model import load_classifier_dir

    return load_classifier_dir(folder)


def _resume_training(folder: Path) -> Any:
    # Both training steps resume through the scaffold's checkpoint.
    from sslpipe.models.training.scaffold import Checkpoint

    return Checkpoint(folder).read({})


@pytest.mark.parametrize(
    ("weights_file", "prepare", "load"),
    [
        ("backbone.pt", _backbone_folder, _load_backbone),
        ("classifier.pt", _classifier_folder, _load_classifier),
        ("last.pt", None, _resume_training),
    ],
    ids=["backbone", "classifier", "training-checkpoint"],
)
def test_a_model_file_with_a_pickled_object_is_refused_without_running_it(
    tmp_path: Path,
    weights_file: str,
    prepare: Callable[[Path], None] | None,
    load: Callable[[Path], Any],
) -> None:
    folder = tmp_path / "model"
    if prepare is not None:
        prepare(folder)
    marker = tmp_path / "marker"
    _malicious(folder / weights_file, marker)
    with pytest.raises((pickle.UnpicklingError, ValueError)) as raised:
        load(folder)
    assert not marker.exists(), "the pickled payload ran"
    if prepare is not None:  # the model loaders say which file and why, in one line
        assert str(folder / weights_file) in str(raised.value)
        assert "refusing to load" in str(raised.value)


def test_cached_torchvision_weights_with_a_pickled_object_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import models

    from sslpipe.models.classifier import backbones

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = models.get_model_weights("resnet18").DEFAULT.url
    marker = tmp_path / "marker"
    _malicious(tmp_path / "hub" / "checkpoints" / Path(url).name, marker)
    assert backbones.cached_torchvision_checkpoint("resnet18") is not None
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        backbones._from_torchvision("torchvision:resnet18")
    assert not marker.exists(), "the pickled payload ran"


# --- configuration: YAML, never Python ------------------------------------------------------


def _payloads(marker: Path) -> list[str]:
    return [
        f"workspace: !!python/object/apply:os.system ['touch {marker}']",
        f"moco:\n  epochs: !!python/object/apply:os.system ['touch {marker}']",
        f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
        f"workspace: !!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
        "workspace: !!python/name:os.system",
        "workspace: !!python/module:os",
        f"? !!python/object/apply:os.system ['touch {marker}']\n: 1",
    ]


@pytest.mark.parametrize("index", range(7))
def test_a_config_file_with_python_tags_is_refused_and_runs_nothing(
    tmp_path: Path, index: int
) -> None:
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(_payloads(marker)[index] + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"evil\.yaml is not valid YAML"):
        load_config(config, [])
    assert not marker.exists()


def test_a_set_value_with_python_tags_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, [f"workspace=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_execute_refuses_a_config_with_python_tags_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(_payloads(marker)[0] + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "execute.py", "--pipeline", "moco", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not valid YAML" in lines[0], done.stderr[-2000:]
    assert not marker.exists()
