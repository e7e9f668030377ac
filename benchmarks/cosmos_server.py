"""A private Cosmos DB-compatible server for the benchmarks, apart from the shared one.

The benchmark's queries keep the single-threaded server busy for minutes, which would stall
the tests of anyone sharing ``infra/servers.py``'s server, and it holds 100,000 documents in
memory. So the benchmarks start the same program (installed by ``infra/servers.py install``)
on a port of their own and leave it running, with its documents, for the next run:

    python -m benchmarks.cosmos_server status|stop

Port: ``SSLPIPE_BENCH_COSMOS_PORT`` (default 18081).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from benchmarks.common import CACHE, log, servers

PORT = int(os.environ.get("SSLPIPE_BENCH_COSMOS_PORT", "18081"))
HOST = "127.0.0.1"
_PID = CACHE / "cosmos-server.pid"


def _pid() -> int | None:
    try:
        pid = int(_PID.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _answers() -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, PORT)) == 0


def start() -> dict[str, str]:
    """The private server's endpoint and key, starting it when it is not running."""
    module = servers()
    info = {"endpoint": f"https://{HOST}:{PORT}/", "key": module.COSMOS_EMULATOR_KEY}
    if _pid() is not None and _answers():
        return info
    if _answers():
        raise RuntimeError(
            f"port {HOST}:{PORT} is taken by another program; set SSLPIPE_BENCH_COSMOS_PORT"
        )
    binary = module.state_dir() / "node" / "node_modules" / ".bin" / "cosmosdb-server"
    if not binary.is_file():
        module.install(["cosmos"])
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "cosmos-server.log").open("ab") as output:
        process = subprocess.Popen(
            [str(binary), "-p", str(PORT)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _PID.write_text(str(process.pid))
    deadline = time.monotonic() + 60
    while not _answers():
        if process.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"the benchmark's Cosmos server did not start; see {CACHE}")
        time.sleep(0.3)
    log(f"started a private Cosmos-compatible server on {HOST}:{PORT} (pid {process.pid})")
    return info


def stop() -> None:
    pid = _pid()
    _PID.unlink(missing_ok=True)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)


def main(argv: list[str]) -> int:
    if argv == ["stop"]:
        stop()
        return 0
    if argv == ["status"]:
        pid = _pid()
        print(f"running, pid {pid}, port {PORT}" if pid and _answers() else "not running")
        return 0
    print("usage: python -m benchmarks.cosmos_server status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
