"""The README's code blocks run as written on the demo workspace (issue 16, item 7).

Every fenced block in README.md is tagged. ``text`` blocks are output and diagrams. ``bash``,
``python`` and ``yaml`` blocks run here, in README order, unless the line right above the fence
is ``<!-- not run by tests: REASON -->`` (the block needs Azure or credentials, or it is a long
job that the test named in REASON runs); :func:`test_every_block_is_run_here_or_marked` checks
that each block is one or the other, so that a new block cannot slip through untested.

Where they run: in a *demo root*, a temporary folder holding links to the repository's files
(``.venv``, ``execute.py``, ``sslpipe/``, ``configs/``, ...) and a ``.sslpipe/`` of its own
that ``execute.py --pipeline full`` filled with the demo catalog, a backbone and a classifier
(at test_execute_e2e.py's tiny sizes), so that the blocks' relative paths (``.sslpipe/…``,
``.venv/bin/python``) mean what they mean in a checkout, and the checkout's own ``.sslpipe/``
is never touched. ``MLFLOW_TRACKING_URI`` is unset, as on a fresh shell.

- ``bash``: line by line (a trailing ``\\`` continues a line); each line must exit 0, except a
  line followed by ``# error: MESSAGE``, which must fail with MESSAGE on stderr.
- ``python``: the whole block, with ``.venv/bin/python``.
- ``yaml``: a block whose first line is ``# NAME.yaml`` is written to NAME.yaml (later blocks
  pass it to ``--config``) and must load as a pipeline configuration.

Substitutions, only where a line as written costs minutes on 2 cores:

- an ``execute.py`` line that would train runs with ``--dry-run`` appended: its flags and keys
  are validated and its steps planned. The training itself is this module's ``--pipeline full``
  run and test_execute_e2e.py's ``moco`` and ``classifier`` runs.
- ``mlflow ui`` gets a free loopback port and one worker, runs until it answers, and must list
  the demo's registered models; then it is stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_execute_e2e import CLASSIFIER, TINY

from sslpipe.core.config import load_config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
LANGUAGES = ("bash", "python", "yaml", "text")
FENCE = re.compile(r"^```(?P<language>\S*)\s*$")
MARK = re.compile(r"^<!-- not run by tests: (?P<reason>\S.*?) -->$")
TEST_REFERENCE = re.compile(r"(?P<path>tests/[\w/]+\.py)(?:::(?P<name>\w+))?")
CONFIG_FILE = re.compile(r"^# (?P<name>[\w.-]+\.ya?ml)\b")
# What a demo root links to in the repository (the README's paths are relative to a checkout).
LINKED = (
    ".venv",
    "benchmarks",
    "components",
    "configs",
    "environments",
    "execute.py",
    "infra",
    "pipelines",
    "pyproject.toml",
    "README.md",
    "scripts",
    "sslpipe",
    "tests",
)
# The demo workspace: the full pipeline at tiny sizes, a quality gate every model passes.
DEMO_SETTINGS = [
    *TINY,
    *CLASSIFIER,
    "classifier.epochs=1",
    "classifier.finetune_epochs=1",
]
TIMEOUT = 900


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip_reason: str | None  # from the marker above the fence; None: the block runs here

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.language or 'untagged'} block)"


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        assert end < len(lines), f"README.md:{index + 1}: the block is never closed"
        mark = MARK.match(lines[index - 1].strip()) if index else None
        blocks.append(
            Block(
                line=index + 1,
                language=fence["language"],
                code="\n".join(lines[index + 1 : end]) + "\n",
                skip_reason=mark["reason"] if mark else None,
            )
        )
        index = end + 1
    return blocks


def bash_commands(code: str) -> list[tuple[str, str | None]]:
    """The block's commands, each with the error its next line says it ends with (or None)."""
    commands: list[tuple[str, str | None]] = []
    pending = ""
    for raw in code.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line:
            continue
        if line.startswith("#"):
            expected = re.match(r"#\s*(error: .+)$", line)
            if expected and commands and commands[-1][1] is None:
                commands[-1] = (commands[-1][0], expected[1])
            continue
        commands.append((line, None))
    return commands


# --- every block is run here or marked ----------------------------------------------------------


def test_every_block_is_run_here_or_marked() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = readme_blocks(text)
    problems: list[str] = []
    for block in blocks:
        if block.language not in LANGUAGES:
            problems.append(f"{block.where}: tag it with one of {', '.join(LANGUAGES)}")
        elif block.language == "text" and block.skip_reason is None:
            commands = [
                line
                for line in block.code.splitlines()
                if line.startswith((".venv/", "python ", "bash ", "az ", "mlflow "))
            ]
            if commands:
                problems.append(f"{block.where}: commands belong in a bash block: {commands[0]}")
        elif (
            block.language == "yaml"
            and block.skip_reason is None
            and not CONFIG_FILE.match(block.code)
        ):
            problems.append(f"{block.where}: start it with '# NAME.yaml', or mark it")
        for path, name in TEST_REFERENCE.findall(block.skip_reason or ""):
            source = REPO / path
            if not source.is_file():
                problems.append(f"{block.where}: its marker names {path}, which does not exist")
            elif name and f"def {name}(" not in source.read_text(encoding="utf-8"):
                problems.append(f"{block.where}: its marker names {path}::{name}, not there")
    marked_lines = {block.line - 1 for block in blocks if block.skip_reason is not None}
    for number, line in enumerate(text.splitlines(), start=1):
        if "not run by tests" in line and number not in marked_lines:
            problems.append(f"README.md:{number}: a marker must be the line right above a fence")
    assert not problems, "\n".join(problems)
    run_here = [b for b in blocks if b.skip_reason is None and b.language != "text"]
    assert {b.language for b in run_here} == {"bash", "python", "yaml"}


def test_the_parsers_read_fences_markers_continuations_and_expected_errors() -> None:
    text = (
        "intro\n\n<!-- not run by tests: needs Azure -->\n```bash\naz login\n```\n"
        "```python\nprint(1)\n```\n"
    )
    azure, snippet = readme_blocks(text)
    assert (azure.line, azure.language, azure.skip_reason) == (4, "bash", "needs Azure")
    assert (snippet.language, snippet.code, snippet.skip_reason) == ("python", "print(1)\n", None)
    code = "# a comment\nrun --a \\\n    --b   # why\nfail --x\n# error: bad x\n\nlast\n"
    assert bash_commands(code) == [
        ("run --a --b   # why", None),
        ("fail --x", "error: bad x"),
        ("last", None),
    ]


# --- the blocks run on the demo workspace -------------------------------------------------------


def block_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like a checkout after ``execute.py --pipeline full`` on the demo."""
    root = tmp_path_factory.mktemp("readme-demo-root")
    for name in LINKED:
        assert (REPO / name).exists(), f"{REPO / name} is missing (bash scripts/setup.sh)"
        (root / name).symlink_to(REPO / name)
    args = [str(root / ".venv/bin/python"), "execute.py", "--pipeline", "full"]
    for item in DEMO_SETTINGS:
        args += ["--set", item]
    done = subprocess.run(
        args, cwd=root, env=block_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _words(command: str) -> list[str] | None:
    """The command's words when it is one plain command (no shell operators), else None."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    if any(w in {"&&", "||", "|", ";", ">", "<"} or "$(" in w for w in words):
        return None
    return words


def _trains(words: list[str]) -> bool:
    return (
        len(words) > 1
        and words[0].endswith("python")
        and words[1] == "execute.py"
        and not {"--dry-run", "--help", "-h"} & set(words)
    )


def _is_mlflow_ui(words: list[str]) -> bool:
    return len(words) > 1 and words[0].endswith("mlflow") and words[1] == "ui"


def _serve_until_it_answers(words: list[str], root: Path) -> str | None:
    """Start ``mlflow ui`` on a free port; None once it lists the demo's models, else why not."""
    port = _free_port()
    command = [*words, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = root / f"mlflow-ui-{port}.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            command,
            cwd=root,
            env=block_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers are stopped with it
        )
    try:
        deadline = time.monotonic() + 300
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/search"
        while time.monotonic() < deadline:
            if server.poll() is not None:
                return f"exited with {server.returncode}: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    names = {m["name"] for m in json.load(response).get("registered_models", [])}
            except OSError:
                time.sleep(1)
                continue
            if {"image-classifier", "moco-backbone"} <= names:
                return None
            return f"it serves another registry: its models are {sorted(names)}"
        return f"no answer on port {port} in 300 s: {log.read_text()[-2000:]}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _run_bash(block: Block, root: Path) -> list[str]:
    failures = []
    for command, expected_error in bash_commands(block.code):
        words = _words(command)
        if words is not None and _is_mlflow_ui(words):
            why = _serve_until_it_answers(words, root)
            if why is not None:
                failures.append(f"{block.where}: {command}: {why}")
            continue
        if words is not None and expected_error is None and _trains(words):
            command = shlex.join([*words, "--dry-run"])
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=root,
            env=block_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        output = f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if expected_error is None and done.returncode != 0:
            failures.append(f"{block.where}: {command}: {output}")
        elif expected_error is not None and (
            done.returncode == 0 or expected_error not in done.stderr
        ):
            failures.append(f"{block.where}: {command}: expected '{expected_error}', {output}")
    return failures


def _run_python(block: Block, root: Path) -> list[str]:
    done = subprocess.run(
        [str(root / ".venv/bin/python"), "-"],
        input=block.code,
        cwd=root,
        env=block_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if done.returncode != 0:
        return [f"{block.where}: exit {done.returncode}\n{done.stderr[-3000:]}"]
    return []


def _write_yaml(block: Block, root: Path) -> list[str]:
    name = CONFIG_FILE.match(block.code)
    assert name is not None  # test_every_block_is_run_here_or_marked
    path = root / name["name"]
    path.write_text(block.code, encoding="utf-8")
    try:
        load_config(path)
    except Exception as err:
        return [f"{block.where}: {path.name} is not a valid configuration: {err}"]
    return []


@pytest.mark.e2e
@pytest.mark.timeout(2 * TIMEOUT)
def test_every_unmarked_block_runs_on_the_demo_workspace(demo_root: Path) -> None:
    runners = {"bash": _run_bash, "python": _run_python, "yaml": _write_yaml}
    failures: list[str] = []
    ran: list[str] = []
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        if block.skip_reason is not None or block.language not in runners:
            continue
        started = time.monotonic()
        failures += runners[block.language](block, demo_root)
        ran.append(f"{block.where}: {time.monotonic() - started:.1f} s")
    assert not failures, "\n\n".join(failures) + "\n\nblocks run:\n" + "\n".join(ran)
    print("\n".join(ran))
