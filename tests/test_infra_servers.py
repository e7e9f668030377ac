"""infra/servers.py: the script that installs, starts and stops the local servers."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "infra" / "servers.py"


def _servers(*args: str, state: Path, **ports: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "SSLPIPE_SERVERS_DIR": str(state)}
    env |= {f"SSLPIPE_{name.upper()}_PORT": port for name, port in ports.items()}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False
    )


def test_status_says_down_and_fails_when_nothing_runs(tmp_path: Path) -> None:
    done = _servers("status", "--only", "cosmos", state=tmp_path, cosmos="1")
    assert done.returncode == 1
    assert done.stdout.split()[:2] == ["cosmos", "down"]


def test_an_unknown_server_name_is_refused(tmp_path: Path) -> None:
    done = _servers("start", "--only", "azurite,postgres", state=tmp_path)
    assert done.returncode == 2
    assert "unknown server(s) ['postgres']" in done.stderr


def test_env_prints_the_credentials_as_exports_and_keeps_the_token_stable(tmp_path: Path) -> None:
    first = _servers("env", state=tmp_path, labelstudio="18080").stdout.splitlines()
    second = _servers("env", state=tmp_path, labelstudio="18080").stdout.splitlines()
    assert first == second
    names = [line.split("=", 1)[0] for line in first]
    assert names == [
        "export AZURE_STORAGE_CONNECTION_STRING",
        "export SSLPIPE_COSMOS_KEY",
        "export LABEL_STUDIO_URL",
        "export LABEL_STUDIO_API_KEY",
    ]
    assert "export LABEL_STUDIO_URL='http://127.0.0.1:18080'" in first
    assert (tmp_path / "labelstudio.token").stat().st_mode & 0o077 == 0


@pytest.mark.servers
def test_started_servers_answer_on_loopback(
    azurite: dict[str, str], cosmos_server: dict[str, str], label_studio: dict[str, str]
) -> None:
    assert azurite["blob_endpoint"].startswith("http://127.0.0.1:")
    assert cosmos_server["endpoint"].startswith("https://127.0.0.1:")
    with urllib.request.urlopen(f"{label_studio['url']}/health", timeout=10) as answer:
        assert answer.status == 200


def test_a_taken_port_is_reported_instead_of_starting_a_second_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        # install is skipped by pretending it happened: the check comes before any process starts
        node = tmp_path / "node"
        node.mkdir()
        (node / ".installed").write_text(
            '{"azurite": "3.37.0", "@vercel/cosmosdb-server": "1.0.1"}'
        )
        done = _servers("start", "--only", "azurite", state=tmp_path, azurite=port)
    assert done.returncode == 1
    assert f"port 127.0.0.1:{port} is taken by another program" in done.stderr
