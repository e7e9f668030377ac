#!/usr/bin/env python3
"""Install, start and stop the local servers the real-backend tests run against. No Docker.

    python infra/servers.py install          # pinned versions, into .sslpipe/servers/
    python infra/servers.py start            # idempotent; waits until each answers
    python infra/servers.py status
    python infra/servers.py env              # export lines for a shell: eval "$(... env)"
    python infra/servers.py stop

The servers, each on a loopback port:

- Azurite (npm ``azurite``), the Blob Storage emulator, on 127.0.0.1:10000, with the
  well-known development account ``devstoreaccount1``;
- ``@vercel/cosmosdb-server`` (npm), which speaks the Cosmos DB REST API (SQL and JavaScript
  UDFs included) over HTTPS with a self-signed certificate, on 127.0.0.1:8081;
- Label Studio (PyPI ``label-studio``, in a virtual environment of its own because its pins
  clash with the project's), on 127.0.0.1:8080, with a preset admin user and API token.

``start`` writes ``.sslpipe/servers/servers.json`` with each endpoint and its credentials
(emulator keys, and the Label Studio token generated at install time). That file is in the
git-ignored workspace; nothing secret is committed. Ports and the folder can be moved with
``SSLPIPE_SERVERS_DIR``, ``SSLPIPE_AZURITE_PORT``, ``SSLPIPE_COSMOS_PORT`` and
``SSLPIPE_LABELSTUDIO_PORT``.

Only the standard library is used so the script runs before the project is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

AZURITE_VERSION = "3.37.0"
COSMOSDB_SERVER_VERSION = "1.0.1"
LABEL_STUDIO_VERSION = "1.23.2"

# Published development credentials of the emulators (documented by Microsoft; not secrets).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
COSMOS_EMULATOR_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)
LABEL_STUDIO_USER = "admin@sslpipe.local"

START_TIMEOUT_S = {"azurite": 60.0, "cosmos": 60.0, "labelstudio": 240.0}


class ServerError(RuntimeError):
    """A server could not be installed or did not come up; the message says which and why."""


def state_dir() -> Path:
    return Path(os.environ.get("SSLPIPE_SERVERS_DIR", ROOT / ".sslpipe" / "servers")).resolve()


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"SSLPIPE_{name.upper()}_PORT", default))


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    command: Callable[[Path], list[str]]
    environment: Callable[[Path], dict[str, str]]
    health_url: str
    description: str

    @property
    def pid_file(self) -> Path:
        return state_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return state_dir() / f"{self.name}.log"


# --- install ---------------------------------------------------------------------------------


def _node_bin(name: str) -> Path:
    return state_dir() / "node" / "node_modules" / ".bin" / name


def _labelstudio_bin() -> Path:
    return state_dir() / "labelstudio-venv" / "bin" / "label-studio"


def _run(command: list[str], what: str) -> None:
    print(f"[servers] {what}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise ServerError(f"{what} failed (exit {done.returncode}):\n" + "\n".join(tail))


def _install_node_packages() -> None:
    wanted = {"azurite": AZURITE_VERSION, "@vercel/cosmosdb-server": COSMOSDB_SERVER_VERSION}
    stamp = state_dir() / "node" / ".installed"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return
    if shutil.which("npm") is None:
        raise ServerError("npm is not on PATH: install Node.js 20+ and npm first")
    prefix = state_dir() / "node"
    prefix.mkdir(parents=True, exist_ok=True)
    packages = [f"{name}@{version}" for name, version in wanted.items()]
    _run(
        ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", *packages],
        f"npm install {' '.join(packages)}",
    )
    stamp.write_text(json.dumps(wanted))


def _install_label_studio() -> None:
    venv = state_dir() / "labelstudio-venv"
    stamp = venv / ".installed"
    if stamp.is_file() and stamp.read_text() == LABEL_STUDIO_VERSION:
        return
    if not (venv / "bin" / "python").is_file():
        _run([sys.executable, "-m", "venv", str(venv)], "create the Label Studio venv")
    _run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         f"label-studio=={LABEL_STUDIO_VERSION}"],
        f"pip install label-studio=={LABEL_STUDIO_VERSION} (its own venv; about 2 minutes)",
    )
    stamp.write_text(LABEL_STUDIO_VERSION)


def _labelstudio_token() -> str:
    """A token made once per install; Label Studio presets the admin user with it."""
    path = state_dir() / "labelstudio.token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(20))
        path.chmod(0o600)
    return path.read_text().strip()


def install(names: list[str]) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    if {"azurite", "cosmos"} & set(names):
        _install_node_packages()
    if "labelstudio" in names:
        _install_label_studio()


# --- the servers -----------------------------------------------------------------------------


def _servers() -> dict[str, Server]:
    azurite_port, cosmos_port = _port("azurite", 10000), _port("cosmos", 8081)
    ls_port = _port("labelstudio", 8080)
    return {
        "azurite": Server(
            name="azurite",
            port=azurite_port,
            command=lambda data: [
                str(_node_bin("azurite-blob")), "--skipApiVersionCheck", "--disableTelemetry",
                "--loose", "--blobHost", HOST, "--blobPort", str(azurite_port),
                "--location", str(data), "--silent",
            ],
            environment=lambda data: {},
            health_url=f"http://{HOST}:{azurite_port}/{AZURITE_ACCOUNT}?comp=list",
            description="Azure Blob Storage emulator",
        ),
        "cosmos": Server(
            name="cosmos",
            port=cosmos_port,
            command=lambda data: [str(_node_bin("cosmosdb-server")), "-p", str(cosmos_port)],
            environment=lambda data: {},
            health_url=f"https://{HOST}:{cosmos_port}/",
            description="Cosmos DB-compatible server (REST API, SQL, UDFs)",
        ),
        "labelstudio": Server(
            name="labelstudio",
            port=ls_port,
            command=lambda data: [
                str(_labelstudio_bin()), "start", "--no-browser", "--internal-host", HOST,
                "--port", str(ls_port),
            ],
            environment=lambda data: {
                "LABEL_STUDIO_USERNAME": LABEL_STUDIO_USER,
                "LABEL_STUDIO_PASSWORD": _labelstudio_token(),
                "LABEL_STUDIO_USER_TOKEN": _labelstudio_token(),
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "LABEL_STUDIO_BASE_DATA_DIR": str(data),
                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
            },
            health_url=f"http://{HOST}:{ls_port}/health",
            description="Label Studio",
        ),
    }


def _answers(url: str) -> bool:
    """True when the server answers HTTP at all (any status: an emulator may say 403 to us)."""
    context = ssl._create_unverified_context()  # loopback emulators with self-signed certs only
    try:
        with urllib.request.urlopen(url, timeout=3, context=context):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _pid(server: Server) -> int | None:
    try:
        pid = int(server.pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


def _start_one(server: Server) -> None:
    if _pid(server) is not None and _answers(server.health_url):
        print(f"[servers] {server.name} already running on {HOST}:{server.port}")
        return
    if _port_taken(server.port):
        raise ServerError(
            f"{server.name}: port {HOST}:{server.port} is taken by another program; stop it or "
            f"set SSLPIPE_{server.name.upper()}_PORT"
        )
    data = state_dir() / f"{server.name}-data"
    data.mkdir(parents=True, exist_ok=True)
    with server.log_file.open("ab") as log:
        process = subprocess.Popen(
            server.command(data),
            cwd=data,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NODE_TLS_REJECT_UNAUTHORIZED": "1", **server.environment(data)},
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
    server.pid_file.write_text(str(process.pid))
    _wait_healthy(server, process)


def _wait_healthy(server: Server, process: subprocess.Popen[bytes]) -> None:
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S[server.name]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = server.log_file.read_text(errors="replace").strip().splitlines()[-15:]
            raise ServerError(
                f"{server.name} exited with code {process.returncode} while starting; "
                f"last lines of {server.log_file}:\n" + "\n".join(tail)
            )
        if _answers(server.health_url):
            seconds = time.monotonic() - started
            print(f"[servers] {server.name} up on {HOST}:{server.port} after {seconds:.0f} s")
            return
        time.sleep(0.5)
    _stop_one(server)
    raise ServerError(
        f"{server.name} did not answer {server.health_url} within "
        f"{START_TIMEOUT_S[server.name]:.0f} s; see {server.log_file}"
    )


def _stop_one(server: Server) -> None:
    pid = _pid(server)
    server.pid_file.unlink(missing_ok=True)
    if pid is None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"[servers] {server.name} stopped")
                return
            time.sleep(0.2)


def connection_info() -> dict[str, dict[str, str]]:
    """Endpoints and credentials of the local servers, as written to servers.json."""
    servers = _servers()
    azurite = servers["azurite"]
    blob_endpoint = f"http://{HOST}:{azurite.port}/{AZURITE_ACCOUNT}"
    return {
        "azurite": {
            "blob_endpoint": blob_endpoint,
            "account_name": AZURITE_ACCOUNT,
            "account_key": AZURITE_KEY,
            "connection_string": (
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};BlobEndpoint={blob_endpoint};"
            ),
        },
        "cosmos": {
            "endpoint": f"https://{HOST}:{servers['cosmos'].port}/",
            "key": COSMOS_EMULATOR_KEY,
        },
        "labelstudio": {
            "url": f"http://{HOST}:{servers['labelstudio'].port}",
            "token": _labelstudio_token(),
            "user": LABEL_STUDIO_USER,
        },
    }


def _environment_lines() -> list[str]:
    info = connection_info()
    values = {
        "AZURE_STORAGE_CONNECTION_STRING": info["azurite"]["connection_string"],
        "SSLPIPE_COSMOS_KEY": info["cosmos"]["key"],
        "LABEL_STUDIO_URL": info["labelstudio"]["url"],
        "LABEL_STUDIO_API_KEY": info["labelstudio"]["token"],
    }
    return [f"export {name}='{value}'" for name, value in values.items()]


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """One start or stop at a time: two test runs starting Label Studio at once would both
    migrate its database and one would fail."""
    state_dir().mkdir(parents=True, exist_ok=True)
    with (state_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def start(names: list[str]) -> None:
    with _exclusive():
        _start(names)


def _start(names: list[str]) -> None:
    install(names)
    servers = _servers()
    for name in names:
        _start_one(servers[name])
    path = state_dir() / "servers.json"
    path.write_text(json.dumps(connection_info(), indent=2))
    path.chmod(0o600)


def stop(names: list[str]) -> None:
    with _exclusive():
        servers = _servers()
        for name in names:
            _stop_one(servers[name])


def status(names: list[str]) -> int:
    servers = _servers()
    down = 0
    for name in names:
        server = servers[name]
        pid, healthy = _pid(server), _answers(server.health_url)
        down += not healthy
        state = "up" if healthy else "down"
        print(f"{name:12s} {state:5s} pid={pid} {server.health_url}  ({server.description})")
    return 1 if down else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("install", "start", "stop", "status", "env"))
    parser.add_argument(
        "--only",
        default="azurite,cosmos,labelstudio",
        help="comma-separated subset of azurite,cosmos,labelstudio",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(_servers()))
    if unknown:
        parser.error(f"unknown server(s) {unknown}; choose from {sorted(_servers())}")
    try:
        if args.action == "install":
            install(names)
        elif args.action == "start":
            start(names)
        elif args.action == "stop":
            stop(names)
        elif args.action == "status":
            return status(names)
        else:
            print("\n".join(_environment_lines()))
    except ServerError as err:
        print(f"[servers] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
