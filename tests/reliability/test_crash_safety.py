"""Crash safety (issue 7, item 3).

- Every file the package writes goes through ``sslpipe/core/io.py``'s atomic helpers (a temporary
  name, then a rename): a scan of the source finds each direct write (``open(..., "w")``,
  ``write_text``, ``write_bytes``, ``torch.save``, ``to_csv``, ``savefig``, ``np.save``,
  ``shutil.copy*``, ...) whose target is not the temporary path of ``atomic_path`` /
  ``atomic_open``, and fails naming file:line unless it is allowed below with its reason.
- data_prep SIGKILLed halfway (a real process over a slow store: the local folder, and Azurite
  behind a slow proxy) and run again into the same folder downloads only the images the killed
  run had not finished, and ends with the outputs of an uninterrupted run, byte for byte.
- moco_train and classifier_train SIGKILLed in the middle of epoch 2 (a real process, slowed by
  an optimizer-step hook that also tells the test which step it is at) and resumed reach the
  same weights as an uninterrupted run, bit for bit, on CPU with the fixed seed.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch
from PIL import Image

from sslpipe.core.config import ClassifierConfig, MocoConfig
from sslpipe.core.io import read_journal
from sslpipe.steps import classifier_train, moco_train
from sslpipe.steps.data_prep import PROGRESS_FILE, run_data_prep
from sslpipe.stores.azure_blob import CONNECTION_STRING_ENV, AzureBlobStore
from sslpipe.stores.local_blob import LocalFolderBlobStore
from tests.faults import CuttingProxy
from tests.steps.test_classifier_train import FAST, make_labelled_data
from tests.steps.test_moco_train import SMALL, make_data

REPO = Path(__file__).resolve().parents[2]

# --- every write is atomic ---------------------------------------------------------------------

# Calls that write a file, by method name: which argument names the file (None: the object the
# method is called on, as in ``path.write_text(...)``).
_WRITERS: dict[str, int | None] = {
    "write_text": None, "write_bytes": None, "to_csv": 0, "to_json": 0, "to_parquet": 0,
    "to_pickle": 0, "savefig": 0, "save": 0, "savez": 0, "savez_compressed": 0, "savetxt": 0,
    "copy": 1, "copyfile": 1, "copy2": 1, "move": 1, "copytree": 1, "symlink_to": None,
}  # fmt: skip
_ATOMIC = {"atomic_path", "atomic_open"}
_IN_MEMORY = {"BytesIO", "StringIO"}
# file, function, the call's text up to its first parenthesis -> why it may write directly.
ALLOWED = {
    ("sslpipe/execution/local.py", "_run_step", "open"):
        "the step's log.txt, appended line by line while the step runs: a killed run keeps "
        "every line it wrote, and no step reads it back",
    ("sslpipe/execution/local.py", "_execute", "record.save"):
        "RunRecord.save is write_json (atomic)",
    ("sslpipe/execution/local.py", "_save", "record.save"): "RunRecord.save is write_json (atomic)",
    ("sslpipe/execution/environments.py", "write_pins", "path.write_text"):
        "a developer command that regenerates the committed requirements files (git shows "
        "a half-written one); no run writes or reads them",
}  # fmt: skip


def _name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _write_mode(call: ast.Call, position: int) -> bool:
    """Whether ``open``'s mode (positional ``position`` or ``mode=``) may write."""
    node = call.args[position] if len(call.args) > position else None
    node = next((k.value for k in call.keywords if k.arg == "mode"), node)
    if node is None:
        return False
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(set(node.value) & set("wax+"))
    return True  # computed: cannot tell, so it counts


def _written(call: ast.Call) -> ast.expr | None:
    """The expression naming the file that ``call`` writes, or None when it writes none."""
    func, name = call.func, _name(call)
    receiver = func.value if isinstance(func, ast.Attribute) else None
    module = receiver.id if isinstance(receiver, ast.Name) else None
    if name == "open":
        if module == "os":  # os.open(path, flags): any flag that writes
            flags = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
            writes = any(f in flags for f in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND"))
            return call.args[0] if writes else None
        if receiver is None:  # open(path, mode)
            return call.args[0] if call.args and _write_mode(call, 1) else None
        if module == "Image":  # PIL's Image.open reads
            return None
        return receiver if _write_mode(call, 0) else None  # path.open(mode)
    if name == "save" and module == "torch":
        return call.args[1] if len(call.args) > 1 else None
    if name in _WRITERS and receiver is not None:
        position = _WRITERS[name]
        if position is None:
            return receiver
        return call.args[position] if len(call.args) > position else None
    return None


def _buffers(node: ast.AST) -> set[str]:
    """The names that ``node`` binds to an in-memory buffer (``buffer = io.BytesIO()``)."""
    if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
        return set()
    if _name(node.value) not in _IN_MEMORY:
        return set()
    return {target.id for target in node.targets if isinstance(target, ast.Name)}


def direct_writes(source: str, file_name: str) -> list[tuple[str, int, str, str]]:
    """(file, line, function, call) of every write in ``source`` whose target is not the
    temporary path of an ``atomic_path`` / ``atomic_open`` (or a file opened on one), nor an
    in-memory buffer, in the same function."""
    found = set()
    for function in ast.walk(ast.parse(source, file_name)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        safe: set[str] = set()
        for node in ast.walk(function):
            if isinstance(node, ast.With | ast.AsyncWith):
                for item in node.items:
                    made, bound = item.context_expr, item.optional_vars
                    if not (isinstance(made, ast.Call) and isinstance(bound, ast.Name)):
                        continue
                    on_safe = any(isinstance(a, ast.Name) and a.id in safe for a in made.args)
                    if _name(made) in _ATOMIC or (_name(made) == "open" and on_safe):
                        safe.add(bound.id)
            safe |= _buffers(node)
        for node in ast.walk(function):
            target = _written(node) if isinstance(node, ast.Call) else None
            if target is not None and not (isinstance(target, ast.Name) and target.id in safe):
                found.add((file_name, node.lineno, function.name, ast.unparse(node)))
    return sorted(found)


def test_the_scan_finds_every_kind_of_direct_write() -> None:
    source = """
def bad(path, frame, fig, model, data):
    open(path, "w").write("x")
    with open(path, mode="ab") as f: f.write(b"x")
    path.open("w")
    path.write_text("x")
    path.write_bytes(b"x")
    torch.save(model, path)
    frame.to_csv(path)
    fig.savefig(path)
    np.save(path, data)
    shutil.copyfile(data, path)
    os.open(path, os.O_WRONLY | os.O_CREAT)

def good(path, frame, fig, model, image):
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"x")
        torch.save(model, tmp)
        fig.savefig(tmp)
        shutil.copyfile(image, tmp)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, a=1)
    with atomic_open(path) as f:
        frame.to_csv(f)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    open(path).read()
    Image.open(path)
    path.read_text()
"""
    found = direct_writes(source, "x.py")
    assert {function for _, _, function, _ in found} == {"bad"}
    assert [line for _, line, _, _ in found] == list(range(3, 14))


def test_every_file_the_package_writes_is_written_atomically() -> None:
    found = []
    for path in sorted((REPO / "sslpipe").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative == "sslpipe/core/io.py":
            continue  # the atomic helpers themselves, and the append-only journal
        found += direct_writes(path.read_text(encoding="utf-8"), relative)
    used = set()
    unexplained = []
    for file_name, line, function, call in found:
        key = (file_name, function, call.split("(")[0])
        if key in ALLOWED:
            used.add(key)
        else:
            unexplained.append(f"{file_name}:{line} in {function}(): {call[:100]}")
    assert not unexplained, (
        "direct writes to a final path (use sslpipe.core.io.atomic_path / atomic_open / "
        "write_json / write_csv, or allow them here with the reason):\n" + "\n".join(unexplained)
    )
    assert used == set(ALLOWED), f"allowed but no longer found: {set(ALLOWED) - used}"


# --- data_prep killed halfway ------------------------------------------------------------------

COUNT = 48  # images in the container
# Runs the data_prep component with every blob read delayed (a slow disk or network).
SLOW_LOCAL_STORE = """
import asyncio, os, runpy, sys
sys.path.insert(0, os.getcwd())  # the repository: components/
from sslpipe.stores.local_blob import LocalFolderBlobStore

delay = float(sys.argv[1])
read_if_changed = LocalFolderBlobStore.read_if_changed

async def slow(self, name, etag):
    await asyncio.sleep(delay)
    return await read_if_changed(self, name, etag)

LocalFolderBlobStore.read_if_changed = slow
sys.argv = ["data_prep", *sys.argv[2:]]
runpy.run_module("components.data_prep.main", run_name="__main__")
"""


def _blobs() -> dict[str, bytes]:
    blobs = {}
    for i in range(COUNT):
        image = Image.new("RGB", (40 + i % 5, 30), (5 * i, 100, 200 - 3 * i))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        blobs[f"img{i:02d}.jpeg"] = buffer.getvalue()
    return blobs


def _ids(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{i:02d}.jpeg" for i in range(COUNT)]
    pd.DataFrame({"id": names, "blob_path": names, "label": "x"}).to_csv(
        folder / "ids.csv", index=False
    )
    return folder


def _kill_when(process: subprocess.Popen[bytes], done: Callable[[], bool], what: str) -> None:
    """SIGKILL ``process`` as soon as ``done()``; fail if it ends or takes too long first."""
    deadline = time.monotonic() + 180
    try:
        while not done():
            assert process.poll() is None, f"the process ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within 180 s"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _journal_ids(out: Path) -> set[str]:
    return {str(record["id"]) for record in read_journal(out / PROGRESS_FILE)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != "stats.json"}  # fmt: skip


class SlowContainer:
    """A container with COUNT images, and how to start a data_prep process that reads it
    slowly: ``command(ids_dir, out)`` and its environment."""

    def __init__(self, uri: str, command: Callable[[Path, Path], list[str]], env: dict[str, str]):
        self.uri, self.command, self.env = uri, command, env


def _component_args(uri: str, ids_dir: Path, out: Path) -> list[str]:
    return ["--selection", str(ids_dir), "--blob_uri", uri, "--data", str(out),
            "--image_size", "24", "--concurrency", "2"]  # fmt: skip


@pytest.fixture(params=["local-folder", pytest.param("azure-blob", marks=pytest.mark.servers)])
def slow_container(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SlowContainer]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    if request.param == "local-folder":
        store = LocalFolderBlobStore(tmp_path / "blobs")
        for name, data in _blobs().items():
            store.write_sync(name, data)
        script = tmp_path / "slow_store.py"
        script.write_text(SLOW_LOCAL_STORE)

        def local(ids_dir: Path, out: Path) -> list[str]:
            args = _component_args(store.uri, ids_dir, out)
            return [sys.executable, str(script), "0.05", *args]

        yield SlowContainer(store.uri, local, env)
        return
    azurite = request.getfixturevalue("azurite")
    port = urlparse(azurite["blob_endpoint"]).port
    assert port is not None
    with CuttingProxy("127.0.0.1", port) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}/{azurite['account_name']}"
        connection = azurite["connection_string"].replace(azurite["blob_endpoint"], endpoint)
        monkeypatch.setenv(CONNECTION_STRING_ENV, connection)
        uri = f"{endpoint}/crash-{uuid.uuid4().hex[:12]}"
        azure = AzureBlobStore.from_uri(uri, create=True)

        async def put() -> None:
            try:
                for name, data in _blobs().items():
                    await azure.write(name, data)
            finally:
                await azure.close()

        asyncio.run(put())
        proxy.slow_down(0.1)

        def remote(ids_dir: Path, out: Path) -> list[str]:
            args = _component_args(uri, ids_dir, out)
            return [sys.executable, "-m", "components.data_prep.main", *args]

        yield SlowContainer(uri, remote, {**env, CONNECTION_STRING_ENV: connection})
        proxy.slow_down(0)


def test_a_data_prep_killed_halfway_fetches_only_what_is_missing_next_time(
    slow_container: SlowContainer, tmp_path: Path
) -> None:
    ids_dir = _ids(tmp_path / "ids")
    out = tmp_path / "killed"
    process = subprocess.Popen(
        slow_container.command(ids_dir, out), cwd=REPO, env=slow_container.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _kill_when(process, lambda: len(_journal_ids(out)) >= 8, "8 journaled images")
    finished = _journal_ids(out)
    assert 8 <= len(finished) < COUNT
    assert not (out / "manifest.csv").exists()
    for name in finished:  # each journaled image is whole
        with Image.open(out / "images" / name) as image:
            image.load()

    stats = run_data_prep(
        ids_dir=ids_dir, blob_uri=slow_container.uri, output_dir=out, image_size=24, concurrency=2
    )
    assert (stats["reused"], stats["downloaded"]) == (len(finished), COUNT - len(finished))
    assert stats["prepared"] == COUNT and not (out / PROGRESS_FILE).exists()

    straight = tmp_path / "straight"
    run_data_prep(
        ids_dir=ids_dir,
        blob_uri=slow_container.uri,
        output_dir=straight,
        image_size=24,
        concurrency=2,
    )
    assert _files(out) == _files(straight)  # manifest, skipped list, every image


def test_a_journal_line_for_a_file_changed_since_is_not_trusted(tmp_path: Path) -> None:
    store = LocalFolderBlobStore(tmp_path / "blobs")
    for name, data in list(_blobs().items())[:4]:
        store.write_sync(name, data)
    ids_dir = tmp_path / "ids"
    ids_dir.mkdir()
    names = sorted(_blobs())[:4]
    pd.DataFrame({"id": names, "blob_path": names}).to_csv(ids_dir / "ids.csv", index=False)
    out = tmp_path / "data"
    run_data_prep(ids_dir=ids_dir, blob_uri=store.uri, output_dir=out, image_size=24)
    # As a killed run would leave it: no manifest, a journal of every image, one image then
    # rewritten by a later run that was killed before journaling it, one journal line cut short.
    records = [json.dumps(r) for r in _records_of(out, names)]
    (out / "manifest.csv").unlink()
    (out / PROGRESS_FILE).write_text("\n".join(records) + "\n" + records[0][:20])
    (out / "images" / names[1]).write_bytes((out / "images" / names[1]).read_bytes() + b"\0")
    stats = run_data_prep(ids_dir=ids_dir, blob_uri=store.uri, output_dir=out, image_size=24)
    assert (stats["reused"], stats["downloaded"]) == (3, 1)


def _records_of(out: Path, names: list[str]) -> list[dict[str, Any]]:
    manifest = pd.read_csv(out / "manifest.csv", dtype=str).set_index("id")
    records = []
    for name in names:
        stat = (out / "images" / name).stat()
        row = manifest.loc[name]
        records.append({"id": name, "path": row["path"], "etag": row["etag"],
                        "width": int(row["width"]), "height": int(row["height"]),
                        "blob_path": row["blob_path"], "image_size": 24,
                        "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size})  # fmt: skip
    return records


# --- training killed in the middle of an epoch -------------------------------------------------

# Runs a training step function with a hook after every optimizer step: it appends a line to
# the marker file (the test counts them) and sleeps, so that the kill lands inside an epoch.
STEP_HOOK_RUNNER = """
import json, os, sys, time
sys.path.insert(0, os.getcwd())  # the repository
from pathlib import Path
from torch.optim.optimizer import register_optimizer_step_post_hook

marker, delay, which, arguments = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]

def hook(optimizer, args, kwargs):
    with open(marker, "a") as f:
        f.write("step\\n")
    time.sleep(delay)

register_optimizer_step_post_hook(hook)
kw = json.loads(arguments)
paths = {k: Path(kw[k]) for k in ("data_dir", "model_dir", "checkpoint_dir")}
if which == "moco":
    from sslpipe.core.config import MocoConfig
    from sslpipe.steps.moco_train import run_moco_train
    run_moco_train(**paths, config=MocoConfig(**kw["config"]), register=False)
else:
    from sslpipe.core.config import ClassifierConfig
    from sslpipe.steps.classifier_train import run_classifier_train
    run_classifier_train(**paths, config=ClassifierConfig(**kw["config"]))
"""


@pytest.fixture()
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "tests",
        "SSLPIPE_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
        "SSLPIPE_RUN_ID": "run-42",
        "TORCH_HOME": str(tmp_path / "torch-home"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SSLPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
    return env


def _train(tmp_path: Path, which: str, arguments: dict[str, Any], delay_s: float = 0.0) -> Any:
    """Start the training in a process of its own (each run loads the code afresh)."""
    runner, marker = tmp_path / "runner.py", tmp_path / "steps.txt"
    runner.write_text(STEP_HOOK_RUNNER)
    argv = [sys.executable, str(runner), str(marker), str(delay_s), which, json.dumps(arguments)]
    errors = subprocess.PIPE if delay_s == 0 else subprocess.DEVNULL
    return subprocess.Popen(
        argv, cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=errors
    )


def _run_to_the_end(tmp_path: Path, which: str, arguments: dict[str, Any]) -> None:
    process = _train(tmp_path, which, arguments)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]


def _kill_inside_epoch_2(
    tmp_path: Path, which: str, arguments: dict[str, Any], steps_per_epoch: int
) -> None:
    """Run the training slowed by the step hook and SIGKILL it after step 2 of epoch 2."""
    marker = tmp_path / "steps.txt"
    marker.unlink(missing_ok=True)
    process = _train(tmp_path, which, arguments, delay_s=0.5)

    def steps() -> int:
        return len(marker.read_text().splitlines()) if marker.exists() else 0

    _kill_when(process, lambda: steps() >= steps_per_epoch + 2, "a step inside epoch 2")
    assert steps() < 2 * steps_per_epoch  # killed before epoch 2 ended


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def _arguments(data: Path, tmp_path: Path, name: str, config: Any) -> dict[str, Any]:
    return {
        "data_dir": str(data),
        "model_dir": str(tmp_path / name),
        "checkpoint_dir": str(tmp_path / f"{name}-checkpoint"),
        "config": config.model_dump(),
    }


def test_moco_killed_mid_epoch_resumes_to_the_same_weights(
    tmp_path: Path, tracking: dict[str, str]
) -> None:
    data = make_data(tmp_path / "data", count=48)  # 3 steps of 16 per epoch
    config = MocoConfig(epochs=2, **SMALL)
    resumed = _arguments(data, tmp_path, "resumed", config)
    _kill_inside_epoch_2(tmp_path, "moco", resumed, steps_per_epoch=3)
    checkpoint_file = tmp_path / "resumed-checkpoint" / moco_train.CHECKPOINT_FILE
    assert torch.load(checkpoint_file, weights_only=True)["epoch"] == 1  # epoch 2 was cut off
    assert not (tmp_path / "resumed" / "backbone.pt").exists()

    _run_to_the_end(tmp_path, "moco", resumed)  # resumes from the checkpoint of epoch 1
    _run_to_the_end(tmp_path, "moco", _arguments(data, tmp_path, "straight", config))
    _assert_same_weights(
        torch.load(tmp_path / "straight" / "backbone.pt", weights_only=True),
        torch.load(tmp_path / "resumed" / "backbone.pt", weights_only=True),
    )


def test_classifier_killed_mid_epoch_resumes_to_the_same_weights(
    tmp_path: Path, tracking: dict[str, str]
) -> None:
    data = make_labelled_data(tmp_path / "data")  # 24 training images: 3 steps of 8 per epoch
    config = ClassifierConfig(
        **{**FAST, "patience": 10}, backbone="torchvision:resnet18", mode="head", epochs=2
    )
    resumed = _arguments(data, tmp_path, "resumed", config)
    _kill_inside_epoch_2(tmp_path, "classifier", resumed, steps_per_epoch=3)
    checkpoint_file = tmp_path / "resumed-checkpoint" / classifier_train.CHECKPOINT_FILE
    assert torch.load(checkpoint_file, weights_only=True)["epoch"] == 1
    assert not (tmp_path / "resumed" / "classifier.pt").exists()

    _run_to_the_end(tmp_path, "classifier", resumed)
    _run_to_the_end(tmp_path, "classifier", _arguments(data, tmp_path, "straight", config))
    _assert_same_weights(
        torch.load(tmp_path / "straight" / "classifier.pt", weights_only=True),
        torch.load(tmp_path / "resumed" / "classifier.pt", weights_only=True),
    )
