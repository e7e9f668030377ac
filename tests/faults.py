"""Fault injection for network tests: a TCP proxy that can cut connections mid-response.

``CuttingProxy`` listens on 127.0.0.1 (a free port), forwards every connection to a target
``host:port`` and, when armed with :meth:`CuttingProxy.cut_next`, aborts the next connections
after a given number of response bytes: the client has its headers (and part of the body) when
the connection drops, like a network failure in the middle of a download. The proxy runs its
own event loop in a thread, so code under test may use any loop (or none).

    with CuttingProxy("127.0.0.1", 10000) as proxy:
        proxy.cut_next(connections=2, after_bytes=1_000)
        ...  # talk to http://127.0.0.1:{proxy.port}/...
        assert proxy.cut == 2

:meth:`CuttingProxy.slow_down` makes it a slow network instead: every chunk of every response
waits a while before it is passed on (a blob store far away), which gives a test the time to
kill or cut something in the middle of a run.

``FaultProxy`` is an HTTP-level proxy (to the Cosmos-compatible server or to Azurite) whose
subclasses answer chosen requests themselves (throttling, outages, dropped connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

_CHUNK = 64 * 1024


class CuttingProxy:
    """A TCP forwarder to ``host:port`` that cuts armed connections after N response bytes.

    Attributes (read them from the test's thread):
        port: the proxy's own port on 127.0.0.1.
        connections: connections accepted so far.
        cut: connections cut so far.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.connections = 0
        self.cut = 0
        self._cuts_left = 0
        self._after_bytes = 0
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # --- control, from the test's thread -------------------------------------------------------

    def start(self) -> CuttingProxy:
        """Start listening; returns the proxy (``port`` is set)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut_next(self, *, connections: int, after_bytes: int) -> None:
        """Cut each of the next ``connections`` connections once ``after_bytes`` bytes of its
        response have been forwarded (a response shorter than that passes whole but still
        counts as one of them). ``connections=-1``: every connection from now on."""
        with self._lock:
            self._cuts_left, self._after_bytes = connections, after_bytes

    def slow_down(self, seconds: float) -> None:
        """Hold every chunk of every response (from now on) for ``seconds`` before passing it
        on; 0 for full speed again."""
        with self._lock:
            self.delay_s = seconds

    def stop(self) -> None:
        """Close the listener and every open connection, and end the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> CuttingProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the proxy, in its own loop ------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def _delay(self) -> float:
        with self._lock:
            return self.delay_s

    def _take_cut(self) -> int | None:
        """The byte limit for a new connection, or None when it is not to be cut."""
        with self._lock:
            self.connections += 1
            if self._cuts_left == 0:
                return None
            if self._cuts_left > 0:
                self._cuts_left -= 1
            return self._after_bytes

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(client_in, client_out, self._take_cut())
        finally:
            self._handlers.discard(task)

    async def _forward(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter, limit: int | None
    ) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(*self.target)
        except OSError:
            client_out.transport.abort()
            return
        upload = asyncio.create_task(_pipe(client_in, server_out, None))
        download = asyncio.create_task(_pipe(server_in, client_out, limit, self._delay))
        try:
            await asyncio.wait({upload, download}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (upload, download):
                task.cancel()
            await asyncio.gather(upload, download, return_exceptions=True)
            was_cut = (
                download.done()
                and not download.cancelled()
                and download.exception() is None
                and download.result()
            )
            if was_cut:
                with self._lock:
                    self.cut += 1
                client_out.transport.abort()
            else:
                _close(client_out)
            _close(server_out)


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    limit: int | None,
    delay: Callable[[], float] | None = None,
) -> bool:
    """Copy until EOF, or until ``limit`` bytes (then True: the caller cuts the connection);
    each chunk waits ``delay()`` seconds first."""
    sent = 0
    while True:
        chunk = await reader.read(_CHUNK)
        if not chunk:
            return False
        if delay is not None and (seconds := delay()) > 0:
            await asyncio.sleep(seconds)
        if limit is not None and sent + len(chunk) >= limit:
            writer.write(chunk[: limit - sent])
            await writer.drain()
            return True
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


class FaultProxy:
    """An HTTP(S) proxy in front of a server that may answer requests itself.

    Subclasses decide per request in :meth:`fault`: None forwards it, 0 closes the connection
    without a response, an HTTP status is answered with an error body and
    :meth:`fault_headers`. The account document (``GET /``) is rewritten so that the SDK keeps
    talking to the proxy. With ``cert`` and ``key`` the proxy speaks HTTPS; it speaks to the
    upstream server in the scheme of ``upstream``.
    """

    def __init__(self, upstream: str, *, cert: Path | None = None, key: Path | None = None):
        self.upstream = urlparse(upstream)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        scheme = "http"
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.port = self.server.server_address[1]
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fault(self, method: str, path: str) -> int | None:
        """The fault to inject for this request (see the class docstring); None forwards it."""
        return None

    def fault_headers(self, status: int) -> list[tuple[str, str]]:
        """Headers of an injected error response besides its content type."""
        return []

    def _forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
        host = self.upstream.hostname or "127.0.0.1"
        upstream: http.client.HTTPConnection = (
            http.client.HTTPSConnection(
                host, self.upstream.port, context=ssl._create_unverified_context(), timeout=60
            )
            if self.upstream.scheme == "https"
            else http.client.HTTPConnection(host, self.upstream.port, timeout=60)
        )
        try:
            upstream.request(method, path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if method == "GET" and path == "/":
            data = re.sub(rb"https://[^/\"]+/", self.endpoint.encode(), data)
        return response.status, response.getheaders(), data

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = proxy.fault(self.command, self.path)
                if status == 0:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif status is not None:
                    payload = json.dumps({"code": str(status), "message": "injected"}).encode()
                    headers = [("content-type", "application/json")]
                    self._reply(status, [*headers, *proxy.fault_headers(status)], payload)
                else:
                    skip = ("host", "content-length", "connection")
                    forwarded = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                    self._reply(*proxy._forward(self.command, self.path, body, forwarded))

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
