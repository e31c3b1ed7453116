"""The lean upstream transport against a raw socket server that writes exact bytes:
framing, keep-alive reuse, a stale connection, timeouts and early closes.

The helpers here (``RawServer``, ``send``, ``run``, ``LOOPS``) are shared with the other
``test_transport_*`` modules. lmgate runs on uvloop where it is installed and on asyncio's own
loop elsewhere, and the two differ in when they call a protocol back, so the tests that depend
on that order run on both.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
import pytest

from proxy.transport import LeanTransport, _Connection

try:
    import uvloop
except ImportError:  # pragma: no cover - Windows, PyPy
    uvloop = None  # type: ignore[assignment]

LOOPS = ["asyncio", "uvloop"] if uvloop is not None else ["asyncio"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


class RawServer:
    """An asyncio server on 127.0.0.1 running ``handler(reader, writer, n)`` for its n-th
    connection (from 1), then closing it; ``ended[n]`` is set once that connection is closed."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.ended: dict[int, asyncio.Event] = {}
        self.all_closed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.open += 1
            self.all_closed.clear()
            n = self.connections
            ended = self.ended.setdefault(n, asyncio.Event())
            try:
                await self.handler(reader, writer, n)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
                self.open -= 1
                if not self.open:
                    self.all_closed.set()
                ended.set()
        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def run(coro: Coroutine[Any, Any, None], loop_kind: str = "asyncio", limit_s: float = 30.0) -> None:
    """Run one test body on a fresh loop of the given kind, bounded by ``limit_s``."""
    async def main() -> None:
        await asyncio.wait_for(coro, limit_s)

    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def idle_connection(t: LeanTransport) -> _Connection:
    """The one pooled connection (a look inside the transport)."""
    [conn] = [c for idle in t._idle.values() for c in idle]
    return conn


def socket_fd(conn: _Connection) -> int:
    assert conn.transport is not None
    return int(conn.transport.get_extra_info("socket").fileno())


async def send(t: LeanTransport, url: str, *, method: str = "POST", body: bytes = b"{}",
               read: float = 5.0) -> tuple[httpx.Response, bytes, list[bytes]]:
    req = httpx.Request(method, url, content=body if method == "POST" else None)
    req.extensions["timeout"] = {"connect": 2.0, "read": read, "write": 2.0, "pool": None}
    resp = await t.handle_async_request(req)
    chunks = [c async for c in resp.stream]  # type: ignore[union-attr]
    return resp, b"".join(chunks), chunks


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_content_length_and_chunked_bodies_with_keep_alive_reuse(loop_kind: str) -> None:
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                req = await read_request(reader)
                server.requests.append(req)
                if b"/chunked" in req:
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                                 b"content-type: text/event-stream\r\n\r\n")
                    for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\nx-a: 1\r\nx-a: 2\r\n\r\nhello")
                await writer.drain()

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            resp, data, _ = await send(t, url + "/plain?q=1", body=b'{"model": "m"}')
            assert resp.status_code == 201 and data == b"hello"
            assert resp.headers.get_list("x-a") == ["1", "2"]
            assert server.requests[0].startswith(b"POST /plain?q=1 HTTP/1.1\r\n")
            assert server.requests[0].endswith(b'\r\n\r\n{"model": "m"}')
            resp, data, _ = await send(t, url + "/chunked")
            assert data == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
            await send(t, url + "/plain")
            assert server.connections == 1  # one kept-alive connection for all three
            await t.aclose()
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_keep_alive_connection_closed_by_the_server_is_replaced(loop_kind: str) -> None:
    """The server closed its idle connection (as servers do after their keep-alive timeout):
    the next request goes out on a new one, whether or not the loop has seen the close yet."""
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            # then close the idle connection, as servers do after their keep-alive timeout

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            await send(t, url)
            conn = idle_connection(t)
            await server.ended.setdefault(1, asyncio.Event()).wait()
            if not conn.closed:  # the loop has not seen the close yet: let the FIN land, unseen
                assert select.select([socket_fd(conn)], [], [], 10)[0], "no FIN reached the client"
            _, data, _ = await send(t, url)
            assert data == b"ok" and server.connections == 2
            await t.aclose()
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_body_delimited_by_connection_close_and_head(loop_kind: str) -> None:
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            req = await read_request(reader)
            if req.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.5)
                return
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
            await writer.drain()

        async with RawServer(handler) as url:
            t = LeanTransport()
            _, data, _ = await send(t, url)
            assert data == b"until the end"
            resp, data, _ = await send(t, url, method="HEAD")
            assert resp.status_code == 200 and data == b""
            await t.aclose()
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_timeouts_and_failures_map_to_httpx_errors(loop_kind: str) -> None:
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            req = await read_request(reader)
            if b"/silent" in req:
                await asyncio.sleep(5)
            elif b"/cut" in req:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                await writer.drain()
            elif b"/garbage" in req:
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                await writer.drain()

        async with RawServer(handler) as url:
            t = LeanTransport()
            with pytest.raises(httpx.ReadTimeout):
                await send(t, url + "/silent", read=0.2)
            with pytest.raises(httpx.RemoteProtocolError):
                await send(t, url + "/cut")
            with pytest.raises(httpx.RemoteProtocolError):
                await send(t, url + "/garbage")
            await t.aclose()
        with pytest.raises(httpx.ConnectError):
            await send(LeanTransport(), url)  # the server is gone now
        with pytest.raises(httpx.UnsupportedProtocol):
            await LeanTransport().handle_async_request(httpx.Request("GET", "https://example.invalid/"))
    run(body(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_abandoned_body_closes_the_connection_at_once(loop_kind: str) -> None:
    async def body() -> None:
        closed = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await reader.read()  # returns when the client closes
            closed.set()

        async with RawServer(handler) as url:
            t = LeanTransport()
            req = httpx.Request("POST", url, content=b"{}")
            req.extensions["timeout"] = {"connect": 2.0, "read": 5.0, "write": 2.0, "pool": None}
            resp = await t.handle_async_request(req)
            it = resp.stream.__aiter__()  # type: ignore[union-attr]
            assert await it.__anext__() == b"first"
            await resp.aclose()
            await asyncio.wait_for(closed.wait(), 1.0)
            await t.aclose()
    run(body(), loop_kind)
