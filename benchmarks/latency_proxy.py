"""A loopback TCP proxy that adds a fixed latency to every request, and counts those in flight.

Loopback Azurite answers in well under a millisecond, which hides how a client behaves against
Azure Blob Storage, 10-30 ms away. Put this proxy in front of it (or any HTTP server) and every
request reaches the server ``delay_s`` later than it was sent: what a store that far away
costs each request, with the server's own time on top.

It forwards bytes, not HTTP: each chunk a client sends is held for ``delay_s`` from its arrival
(chunks of one connection keep their order), replies pass at once. A keep-alive connection
carries one request at a time (HTTP/1.1 without pipelining, as aiohttp and the Azure SDK send
them), so every request is delayed once; opening a connection costs no round trip of its own
(as TCP and TLS handshakes would), alike for every client. No HTTP is parsed, and the bytes go
from socket to socket through asyncio protocols, so the proxy costs little CPU on a machine
that the contestants share with it.

A request is counted in flight from its first byte at the proxy until the first byte of its
reply: ``stats()`` gives the peak and the time-weighted mean (between the first request and
the last reply) since :meth:`LatencyProxy.reset`.

    python -m benchmarks.latency_proxy --upstream 127.0.0.1:10000 --delay-ms 20 --port 10020

In a program, :class:`LatencyProxy` runs in a thread of its own (``with LatencyProxy(...)``).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class ProxyStats:
    """What went through the proxy since the last reset."""

    requests: int
    peak_in_flight: int
    mean_in_flight: float  # time-weighted, from the first request to the last reply
    seconds: float  # from the first request to the last reply
    cpu_s: float  # CPU time of the proxy's thread


class LatencyProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream`` (host, port), holding each request for
    ``delay_s``; ``port=0`` picks a free one (:attr:`port` once started)."""

    def __init__(
        self, upstream: tuple[str, int], delay_s: float, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream, self.delay_s, self.host, self.port = upstream, delay_s, host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[_ClientSide] = set()
        self._reset_counts()

    # --- control, from any thread --------------------------------------------------------------

    def start(self) -> LatencyProxy:
        """Start listening in the proxy's thread; returns the proxy (``port`` is set)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def reset(self) -> None:
        """Start counting afresh (call it while no request is in flight)."""
        asyncio.run_coroutine_threadsafe(self._reset(), self._loop).result(timeout=10)

    def stats(self) -> ProxyStats:
        """The counts since the last :meth:`reset` (or the start)."""
        return asyncio.run_coroutine_threadsafe(self._stats(), self._loop).result(timeout=10)

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the proxy, in its own thread and event loop -------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(self._accept, self.host, self.port)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        tasks = [c.task for c in self._connections if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _reset_counts(self) -> None:
        self._requests = self._in_flight = self._peak = 0
        self._area = 0.0
        self._first = self._last = self._changed = 0.0
        self._cpu_at_reset = _thread_cpu_s() if threading.current_thread() is self._thread else 0.0

    async def _reset(self) -> None:
        self._reset_counts()

    async def _stats(self) -> ProxyStats:
        seconds = self._last - self._first if self._requests else 0.0
        return ProxyStats(
            requests=self._requests,
            peak_in_flight=self._peak,
            mean_in_flight=self._area / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            cpu_s=_thread_cpu_s() - self._cpu_at_reset,
        )

    def _count(self, change: int) -> None:
        now = time.monotonic()
        if self._in_flight:
            self._area += self._in_flight * (now - self._changed)
        self._changed = now
        self._in_flight += change
        if change > 0:
            if not self._requests:
                self._first = now
            self._requests += 1
            self._peak = max(self._peak, self._in_flight)
        else:
            self._last = now

    def _accept(self) -> asyncio.Protocol:
        return _ClientSide(self)

    def _request_starts(self, connection: _ClientSide) -> None:
        if not connection.waiting:
            connection.waiting = True
            self._count(+1)

    def _reply_starts(self, connection: _ClientSide) -> None:
        if connection.waiting:
            connection.waiting = False
            self._count(-1)


class _ClientSide(asyncio.Protocol):
    """A client's connection: what it sends goes to its own connection to the upstream server
    ``delay_s`` after it came (in order); what the server sends back comes through at once."""

    def __init__(self, proxy: LatencyProxy) -> None:
        self.proxy = proxy
        self.waiting = False  # a request has come and its reply has not started yet
        self.transport: asyncio.Transport | None = None
        self.server: _ServerSide | None = None
        self.held: deque[tuple[float, bytes]] = deque()  # b"": the client's end of file
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self._connect())
        self.proxy._connections.add(self)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _ServerSide(self), *self.proxy.upstream)
        except OSError:
            if self.transport is not None:
                self.transport.abort()
            return
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proxy._request_starts(self)
        self._hold(data)

    def eof_received(self) -> bool:
        self._hold(b"")
        return True  # half-closed: the replies may still be coming

    def _hold(self, data: bytes) -> None:
        self.held.append((asyncio.get_running_loop().time() + self.proxy.delay_s, data))
        if self.timer is None and len(self.held) == 1:
            self.timer = asyncio.get_running_loop().call_at(self.held[0][0], self._flush)

    def _flush(self) -> None:
        """Pass on every chunk that has been held long enough, then wait for the next."""
        if self.timer is not None:
            self.timer.cancel()  # when called before its time (just connected)
            self.timer = None
        if self.server is None or self.server.transport is None:
            return  # not connected yet: _connect flushes
        loop, out = asyncio.get_running_loop(), self.server.transport
        while self.held and self.held[0][0] <= loop.time():
            _, data = self.held.popleft()
            if data:
                out.write(data)
            elif out.can_write_eof():
                out.write_eof()
        if self.held:
            self.timer = loop.call_at(self.held[0][0], self._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy._connections.discard(self)
        self.proxy._reply_starts(self)  # no reply will come
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()
        if self.server is not None and self.server.transport is not None:
            self.server.transport.close()

    def pause_writing(self) -> None:  # the client reads slower than the server sends
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()


class _ServerSide(asyncio.Protocol):
    """The proxy's connection to the upstream server for one client connection."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.client.server = self

    def data_received(self, data: bytes) -> None:
        self.client.proxy._reply_starts(self.client)
        if self.client.transport is not None:
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


def _thread_cpu_s() -> float:
    """CPU time of the calling thread (user + system)."""
    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.latency_proxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--upstream", default="127.0.0.1:10000", help="host:port (Azurite's)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added to every request")
    parser.add_argument("--port", type=int, default=0, help="to listen on (0: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    proxy = LatencyProxy((host, int(port)), args.delay_ms / 1000.0, port=args.port).start()
    print(f"127.0.0.1:{proxy.port} -> {args.upstream}, +{args.delay_ms:g} ms", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    stats = proxy.stats()
    proxy.stop()
    print(
        f"{stats.requests} requests, peak {stats.peak_in_flight} in flight, mean "
        f"{stats.mean_in_flight:.1f}, proxy CPU {stats.cpu_s:.2f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
