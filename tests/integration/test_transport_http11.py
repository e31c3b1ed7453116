"""The lean transport as an HTTP/1.1 client: when a request may be sent again, interim (1xx)
responses, the bound on a response head, ``101`` and trailers. Each test talks to a server on
127.0.0.1 that writes exact bytes, so the client meets what a misbehaving box would send."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import threading
import tracemalloc

import httpx
import pytest
from typing_extensions import Self

from proxy import transport as transport_module
from proxy.errors import UpstreamUnavailable
from proxy.transport import LeanTransport
from proxy.upstream import map_error

from .test_transport import LOOPS, RawServer, idle_connection, read_request, run, send, socket_fd

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
FLOOD_BYTES = 20 * 1024 * 1024
HEAD_LIMIT = 64 * 1024  # DESIGN: a response head over 64 KiB is a 502
MEMORY_BOUND = 4 * 1024 * 1024  # what reading a refused head may cost at most (tracemalloc peak)


def request_bodies(requests: list[bytes]) -> list[bytes]:
    return [r.partition(b"\r\n\r\n")[2] for r in requests]


# -- a request is sent twice only when the first copy cannot have arrived -------------------

@pytest.mark.parametrize("loop_kind", LOOPS)
def test_request_read_by_the_box_is_never_sent_again(loop_kind: str) -> None:
    """Regression: a reused keep-alive connection that failed with no response byte was
    retried on a fresh one, but the box may have read the request (and begun a generation)
    before it closed, so it ran twice. Fix: a request is retried only when its connection was
    known closed before the request was written; here it raises, which lmgate answers with 502.
    Reproduce: a server that answers one request, reads the next on the same connection and
    closes without answering."""
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                server.requests.append(await read_request(reader))
                if len(server.requests) == 2:
                    return  # read it, then close without a word
                writer.write(OK)
                await writer.drain()

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            _, data, _ = await send(t, url, body=b'{"n":1}')
            assert data == b"ok"
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await send(t, url, body=b'{"n":2}')
            assert isinstance(map_error(caught.value), UpstreamUnavailable)
            assert request_bodies(server.requests) == [b'{"n":1}', b'{"n":2}']
            assert server.connections == 1
            await t.aclose()
    run(body(), loop_kind)


class ThreadedServer:
    """A blocking server in a thread, so that it can close its side of a connection while the
    client's event loop is not running: the client's socket then holds a FIN (``reset=False``)
    or a reset its loop has not yet seen, which is the moment a pooled connection is most
    likely to be taken for reuse. It answers one request per connection; the first connection
    is then closed when the test says so."""

    def __init__(self, *, reset: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reset = reset
        self.received: list[bytes] = []  # everything each connection read, by connection
        self.close_first = threading.Event()
        self.first_closed = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)

    async def __aenter__(self) -> Self:
        self.accepter.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)  # the loop runs meanwhile, so the client's closes happen

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close() alone does not
        except OSError:
            pass
        self.sock.close()
        self.close_first.set()
        self.accepter.join(10)
        for thread in self.threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            index = len(self.received)
            self.received.append(b"")
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(10)
        with conn:
            try:
                self._read_request(conn, index)
                conn.sendall(OK)
                if index == 0:
                    self.close_first.wait(10)
                    if self.reset:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        conn.close()  # with a zero linger: a reset, not a FIN
                        self.first_closed.set()
                        return
                    conn.shutdown(socket.SHUT_WR)  # a FIN, but whatever still comes is read
                    self.first_closed.set()
                while data := conn.recv(65536):  # until the client closes its side
                    self.received[index] += data
            except OSError:
                pass

    def _read_request(self, conn: socket.socket, index: int) -> None:
        while b"\r\n\r\n{}" not in self.received[index]:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("client went away")
            self.received[index] += data


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connection_closed_while_idle_is_replaced_without_writing_to_it(loop_kind: str) -> None:
    """Regression: a pooled connection whose FIN had arrived but not yet been handled by the
    loop was written to, and the request sent again on a fresh one when the close showed up.
    Fix: a pooled connection is checked (closed, readable, too old) before it is used, and a
    closed one is replaced before anything is written. Reproduce: half-close the server's side
    while the client's loop is blocked, wait for the FIN to reach the client socket, then send."""
    async def body() -> None:
        async with ThreadedServer() as server:
            t = LeanTransport()
            url = f"http://127.0.0.1:{server.port}"
            _, data, _ = await send(t, url)
            assert data == b"ok"
            fd = socket_fd(idle_connection(t))
            server.close_first.set()
            assert server.first_closed.wait(10)  # blocks the loop on purpose: it must not see the FIN
            readable, _, _ = select.select([fd], [], [], 10)
            assert readable, "the FIN did not reach the client socket"
            _, data, _ = await send(t, url)
            assert data == b"ok"
            await t.aclose()
        assert len(server.received) == 2
        assert server.received[0].count(b"POST / HTTP/1.1") == 1  # nothing was written after its FIN
        assert server.received[1].count(b"POST / HTTP/1.1") == 1
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_write_refused_at_once_is_sent_on_a_fresh_connection(loop_kind: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The one retry left: a pooled connection that passed its check but whose socket refuses
    the write at once (the reset arrived in between; here the check is switched off) put no
    byte on the wire, so the request goes out on a fresh connection, once."""
    async def body() -> None:
        async with ThreadedServer(reset=True) as server:
            t = LeanTransport()
            url = f"http://127.0.0.1:{server.port}"
            await send(t, url)
            fd = socket_fd(idle_connection(t))
            server.close_first.set()
            assert server.first_closed.wait(10)  # blocks the loop on purpose: it must not see the reset
            readable, _, _ = select.select([fd], [], [], 10)
            assert readable, "the reset did not reach the client socket"
            monkeypatch.setattr(transport_module._Connection, "usable", lambda self, now: True)
            _, data, _ = await send(t, url)
            assert data == b"ok"
            await t.aclose()
        assert [r.count(b"POST / HTTP/1.1") for r in server.received] == [1, 1]
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connection_idle_too_long_is_not_reused(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection idle for about as long as servers keep them is not reused: the server may
    be closing it right then, and a request lost that way is not sent again. (The idle limit
    is set below 0 here so as not to wait for it.)"""
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                server.requests.append(await read_request(reader))
                writer.write(OK)
                await writer.drain()

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            await send(t, url)
            await send(t, url)
            assert server.connections == 1
            monkeypatch.setattr(transport_module, "IDLE_EXPIRY_S", -1.0)
            await send(t, url)
            await server.ended.setdefault(1, asyncio.Event()).wait()  # the old one was closed
            assert server.connections == 2 and len(server.requests) == 3
            await t.aclose()
    run(body(), loop_kind)


# -- interim responses --------------------------------------------------------------------

@pytest.mark.parametrize("loop_kind", LOOPS)
def test_interim_1xx_responses_are_skipped(loop_kind: str) -> None:
    """``103 Early Hints`` and ``100 Continue`` come before the real answer; they are not the
    answer. The parser then reads the final response on the same connection, whether the two
    arrive in one read or several, and the connection stays reusable."""
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                req = await read_request(reader)
                server.requests.append(req)
                if b"/together" in req:
                    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                                 b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-final: yes\r\n\r\nfinal")
                else:
                    for part in (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </y>\r\n",
                                 b"\r\n", b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n",
                                 b"4\r\nlast\r\n0\r\n\r\n"):
                        writer.write(part)
                        await writer.drain()
                await writer.drain()

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            resp, data, _ = await send(t, url + "/together")
            assert (resp.status_code, data) == (200, b"final")
            assert resp.headers.get("x-final") == "yes" and "link" not in resp.headers
            resp, data, _ = await send(t, url + "/apart")
            assert (resp.status_code, data) == (201, b"last")
            assert "link" not in resp.headers
            resp, data, _ = await send(t, url + "/together")
            assert (resp.status_code, data) == (200, b"final")
            assert server.connections == 1
            await t.aclose()
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_switching_protocols_is_an_error_and_closes_the_connection(loop_kind: str) -> None:
    """lmgate never asks to upgrade, so a ``101`` is a broken upstream: a RemoteProtocolError
    (502), and the connection, now speaking something else, is closed."""
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n\x81\x05hello")
            await writer.drain()
            await reader.read()  # until the client closes

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await send(t, url)
            assert isinstance(map_error(caught.value), UpstreamUnavailable)
            await server.ended[1].wait()  # closed by the client
            assert not any(t._idle.values())
            await t.aclose()
    run(body(), loop_kind)


# -- the response head is bounded -----------------------------------------------------------

class Flood:
    """A handler that sends ``prefix``, then 20 MB of filler, then ``suffix``, and records
    whether it got to the end (it should not: the client stops reading long before)."""

    def __init__(self, prefix: bytes, suffix: bytes) -> None:
        self.prefix, self.suffix = prefix, suffix
        self.sent_all = False

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(self.prefix)
        block = b"a" * 65536
        for _ in range(FLOOD_BYTES // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write(self.suffix)
        await writer.drain()
        self.sent_all = True


async def refused_cheaply(url: str, flood: Flood) -> tuple[BaseException, int]:
    """Send one request under tracemalloc; the exception it ends with and the peak growth."""
    t = LeanTransport()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with pytest.raises(httpx.HTTPError) as caught:
            await send(t, url)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    await t.aclose()
    return caught.value, peak


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_response_head_over_64_kib_is_refused_without_buffering_it(loop_kind: str) -> None:
    """Regression: a head of any size was collected in memory until it ended (a 20 MB header
    took 20 MB and more). Fix: reading stops and the connection is closed as soon as the head
    passes 64 KiB; the request ends with a RemoteProtocolError, a 502 in lmgate."""
    async def body() -> None:
        flood = Flood(b"HTTP/1.1 200 OK\r\nx-big: ", b"\r\ncontent-length: 2\r\n\r\nok")
        server = RawServer(flood)
        async with server as url:
            exc, peak = await refused_cheaply(url, flood)
            assert isinstance(exc, httpx.RemoteProtocolError), exc
            assert isinstance(map_error(exc), UpstreamUnavailable)
            assert peak < MEMORY_BOUND, f"reading the head cost {peak / 2**20:.1f} MiB"
            await server.ended[1].wait()
            assert not flood.sent_all  # the client closed instead of reading on
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_head_limit_is_exact(loop_kind: str) -> None:
    """A head of exactly 64 KiB (interim responses included) is read; one byte more is not."""
    async def body() -> None:
        def head(size: int, interim: bytes = b"") -> bytes:
            start = interim + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pad: "
            end = b"\r\n\r\n"
            return start + b"p" * (size - len(start) - len(end)) + end + b"ok"

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                req = await read_request(reader)
                interim = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" if b"/interim" in req else b""
                size = HEAD_LIMIT + (1 if b"/over" in req else 0)
                data = head(size, interim)
                for i in range(0, len(data), 1000):  # in many small reads, as a slow box sends it
                    writer.write(data[i:i + 1000])
                    await writer.drain()

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            for path in ("/at", "/interim/at"):
                _, data, _ = await send(t, url + path)
                assert data == b"ok"
            for path in ("/over", "/interim/over"):
                with pytest.raises(httpx.RemoteProtocolError):
                    await send(t, url + path)
            assert server.connections == 2  # each refused head closed its connection
            await t.aclose()
    run(body(), loop_kind)


# -- trailers -------------------------------------------------------------------------------

@pytest.mark.parametrize("loop_kind", LOOPS)
def test_trailers_are_ignored_and_the_connection_reused(loop_kind: str) -> None:
    """Trailer fields after a chunked body are neither headers nor body, and a response that
    ended with them leaves its connection ready for the next request."""
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                server.requests.append(await read_request(reader))
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
                             b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\nx-more: 1\r\n\r\n")
                await writer.drain()

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            for _ in range(3):
                resp, data, _ = await send(t, url)
                assert data == b"hello world"
                assert "x-checksum" not in resp.headers and "x-more" not in resp.headers
            assert server.connections == 1 and len(server.requests) == 3
            await t.aclose()
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_huge_trailers_are_not_buffered(loop_kind: str) -> None:
    """Trailers are ignored, but the parser still collects each field until it ends: a 20 MB
    trailer is bounded like a head (the body already read is delivered, then an error)."""
    async def body() -> None:
        flood = Flood(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-big: ",
                      b"\r\n\r\n")
        server = RawServer(flood)
        async with server as url:
            exc, peak = await refused_cheaply(url, flood)
            assert isinstance(exc, httpx.RemoteProtocolError), exc
            assert peak < MEMORY_BOUND, f"reading the trailers cost {peak / 2**20:.1f} MiB"
            await server.ended[1].wait()
            assert not flood.sent_all
    run(body(), loop_kind)
