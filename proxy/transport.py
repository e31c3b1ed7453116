"""A lean HTTP/1.1 transport for httpx, used for plain-http upstreams (LM Studio on a LAN).

httpx stays the client API; this replaces its connection layer (httpcore + anyio + h11) on
the hot path. Responses are parsed by httptools (C), and body bytes that arrive in one socket
read reach the relay as one chunk, so a burst of small SSE events costs one write downstream
instead of one per event. Connections are kept alive and reused; a reused connection that
turns out to be closed before any response byte arrives is retried once on a fresh one.

Timeouts come from each request's httpx timeout (connect, read, write) and map to httpx's own
exceptions, so the rest of lmgate cannot tell this transport from the default one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

READ_SIZE_HIGH_WATER = 1024 * 1024
MAX_IDLE_PER_HOST = 64


class _Connection(asyncio.Protocol):
    """One upstream connection: a protocol that feeds httptools and wakes one waiter."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser: Any = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.reused = False
        self._write_ready: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.buffered = 0
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.error: Exception | None = None
        self.paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"invalid HTTP response from upstream: {exc}")
            self.close()
        if self.buffered > READ_SIZE_HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self._delimited_by_close():
            self.complete = True  # no length, not chunked: the body ends with the connection
        if not self.complete and self.error is None:
            if self.headers_done:
                self.error = httpx.RemoteProtocolError("upstream closed the connection mid-response")
            else:
                self.error = httpx.RemoteProtocolError("upstream closed the connection without a response")
        self._wake()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    def _delimited_by_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def pause_writing(self) -> None:
        self._write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self._write_ready = None

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful here, not later
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- use -----------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None, request: httpx.Request) -> None:
        """Until something arrives (or the connection ends); ReadTimeout after ``timeout``."""
        waiter = self.waiter = self.loop.create_future()
        handle = None
        if timeout is not None:
            handle = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except asyncio.TimeoutError:
            self.close()
            raise httpx.ReadTimeout("upstream sent nothing within the read timeout", request=request) from None
        finally:
            self.waiter = None
            if handle is not None:
                handle.cancel()

    async def drain(self, timeout: float | None, request: httpx.Request) -> None:
        ready = self._write_ready
        if ready is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except asyncio.TimeoutError:
            self.close()
            raise httpx.WriteTimeout("upstream did not accept the request body in time", request=request) from None

    def take_body(self) -> bytes:
        body = self.body
        chunk = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return (self.complete and not self.closed and self.keep_alive
                and self.transport is not None and not self.transport.is_closing())


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class _Body(httpx.AsyncByteStream):
    def __init__(self, owner: LeanTransport, key: tuple[str, int], conn: _Connection,
                 request: httpx.Request, read_timeout: float | None, head_only: bool) -> None:
        self.owner, self.key, self.conn, self.request = owner, key, conn, request
        self.read_timeout = read_timeout
        self.done = head_only
        if head_only:
            conn.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        while not self.done:
            if conn.body:
                yield conn.take_body()
                continue
            if conn.complete:
                self.done = True
                self.owner._release(self.key, conn)
                return
            if conn.error is not None:
                self.done = True
                conn.close()
                raise _with_request(conn.error, self.request)
            await conn.wait(self.read_timeout, self.request)

    async def aclose(self) -> None:
        if not self.done:  # abandoned mid-body: the connection cannot be reused
            self.done = True
            self.conn.close()


def _with_request(exc: Exception, request: httpx.Request) -> Exception:
    if isinstance(exc, httpx.RequestError):
        exc.request = request
    return exc


class LeanTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 over asyncio protocols; plain http only."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol("the lean transport speaks plain http only", request=request)
        key = (url.host, url.port or 80)
        timeouts = request.extensions.get("timeout", {})
        head = _request_head(request)
        body = request.content if isinstance(request.stream, httpx.ByteStream) else await request.aread()
        for attempt in (0, 1):
            conn = await self._acquire(key, timeouts.get("connect"), request, fresh=attempt == 1)
            try:
                return await self._exchange(key, conn, request, head, body, timeouts)
            except httpx.RemoteProtocolError:
                conn.close()
                if attempt == 0 and conn.reused and not conn.got_bytes:
                    continue  # an idle keep-alive connection the upstream had closed
                raise
            except BaseException:
                conn.close()  # cancelled or failed before the body: never reuse it
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, key: tuple[str, int], conn: _Connection, request: httpx.Request, head: bytes,
                        body: bytes, timeouts: dict[str, float | None]) -> httpx.Response:
        assert conn.transport is not None
        conn.transport.writelines([head, body] if body else [head])
        await conn.drain(timeouts.get("write"), request)
        while not conn.headers_done:
            if conn.error is not None:
                conn.close()
                raise _with_request(conn.error, request)
            await conn.wait(timeouts.get("read"), request)
        stream = _Body(self, key, conn, request, timeouts.get("read"), request.method == "HEAD")
        return httpx.Response(conn.status, headers=conn.headers, stream=stream,
                              extensions={"http_version": b"HTTP/1.1"})

    async def _acquire(self, key: tuple[str, int], connect_timeout: float | None, request: httpx.Request,
                       *, fresh: bool) -> _Connection:
        idle = self._idle.get(key)
        while idle and not fresh:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing() and not conn.closed:
                conn.reset()
                conn.reused = True
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), key[0], key[1]), connect_timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}",
                                     request=request) from None
        return conn

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        if not conn.reusable:
            conn.close()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE_PER_HOST:
            conn.close()
            return
        idle.append(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _request_head(request: httpx.Request) -> bytes:
    parts = [request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        parts += [name, b": ", value, b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)
