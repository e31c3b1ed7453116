"""A lean HTTP/1.1 transport for httpx, used for plain-http upstreams (LM Studio on a LAN).

httpx stays the client API; this replaces its connection layer (httpcore + anyio + h11) on
the hot path. Responses are parsed by httptools (C), and body bytes that arrive in one socket
read reach the relay as one chunk, so a burst of small SSE events costs one write downstream
instead of one per event. Connections are kept alive and reused.

What makes it a correct client, and not only a fast one:

- A request goes out at most once. A pooled connection is checked before it is used (closed,
  readable, idle too long); a dead one is replaced before anything is written to it. Once the
  request is written, any failure is the caller's (a 502): the box may have read the request
  and started on it, so sending it again could run it twice. The one retry left is for a write
  the socket refused at once, which put no byte on the wire.
- Interim responses (``100 Continue``, ``103 Early Hints``) are skipped; a ``101`` is an
  error, since lmgate never asks to switch protocols.
- A response head (status line and headers, interim ones included) is bounded to 64 KiB; so
  are trailers, which are otherwise ignored. Reading stops at the bound and the connection is
  closed: httptools keeps a header in memory until it ends.
- Timeouts (connect, write, read) come from each request's httpx timeout and map to httpx's own
  exceptions, so the rest of lmgate cannot tell this transport from the default one. They are
  timers on futures, never ``asyncio.wait_for``: before Python 3.12 that returns a result
  instead of raising when the cancel and the result arrive together, and a cancelled request
  then carries on.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

READ_SIZE_HIGH_WATER = 1024 * 1024
MAX_IDLE_PER_HOST = 64
HEAD_LIMIT = 64 * 1024
SMALL_BODY = 64 * 1024  # sent with the request head in one write
# Servers close idle keep-alive connections after a few seconds (Node and uvicorn: 5 s). A
# request written just as the server closes is lost and, written once, not retried: so a
# connection is not reused once it has been idle for close to that long. A new one costs a
# connect on the LAN, next to requests that take seconds.
IDLE_EXPIRY_S = 4.0
_SWITCHED = "the upstream switched protocols (101); lmgate never asks it to"


class _NotSent(Exception):
    """The socket refused the request at once: no byte of it left this machine."""


class _Connection(asyncio.Protocol):
    """One upstream connection: a protocol that feeds httptools and wakes one waiter."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser: Any = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._fd = -1
        self._poll: Any = None
        self._write_ready: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.buffered = 0
        self.body_events = 0
        self.head_bytes = 0  # fed while the final head was not complete
        self.stalled_bytes = 0  # fed after the head without a body byte (chunk framing, trailers)
        self.headers_done = False
        self.interim = False
        self.keep_alive = False
        self.complete = False
        self.sent = False
        self.error: Exception | None = None
        self.paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            if hasattr(select, "poll"):
                self._poll = select.poll()
                self._poll.register(self._fd, select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if self.complete or self.closed:  # bytes nobody asked for: the connection is spoiled
            self.keep_alive = False
            self.close()
            return
        rest: bytes | memoryview = self._feed_head(data) if not self.headers_done else data
        if rest and self.error is None:
            if self.complete:
                self.keep_alive = False  # more after the response, in the same read
            else:
                self._feed_body(rest)
        if self.error is not None:
            self.close()
        elif self.buffered > READ_SIZE_HIGH_WATER and not self.paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def _feed_head(self, data: bytes) -> bytes | memoryview:
        """Feed no more than the head limit allows; returns what is left once the head is
        complete (body bytes). Over the limit, the request fails without reading further."""
        room = HEAD_LIMIT - self.head_bytes
        rest: bytes | memoryview = b""
        if len(data) <= room:
            self.head_bytes += len(data)
            self._feed(data)
        else:
            view = memoryview(data)
            self.head_bytes = HEAD_LIMIT
            self._feed(view[:room])
            rest = view[room:]
        if not self.headers_done and self.head_bytes >= HEAD_LIMIT:
            self._fail(f"the upstream's response head is over {HEAD_LIMIT // 1024} KiB")
        return rest

    def _feed_body(self, data: bytes | memoryview) -> None:
        """Feed the body. Reads that bring no body byte (chunk framing, trailers) are counted:
        httptools keeps each trailer field in memory until it ends, so they get the head's
        bound."""
        events = self.body_events
        self._feed(data)
        if self.body_events != events or self.complete:
            self.stalled_bytes = 0
            return
        self.stalled_bytes += len(data)
        if self.stalled_bytes > HEAD_LIMIT:
            self._fail(f"the upstream sent over {HEAD_LIMIT // 1024} KiB of chunk framing or trailers")

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_SWITCHED)  # on_headers_complete saw the 101; the rest is another protocol
        except httptools.HttpParserError as exc:
            self._fail(f"invalid HTTP response from upstream: {exc}")

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = httpx.RemoteProtocolError(message)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self.error is None and self._delimited_by_close():
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
    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the same read, to a request never sent
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # afterwards: trailers, which are ignored
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.headers_done:
            return
        status = self.parser.get_status_code()
        if status == 101:
            self.error = httpx.RemoteProtocolError(_SWITCHED)
        elif 100 <= status < 200:
            self.interim = True  # 100 Continue, 103 Early Hints: the answer is still to come
            self.headers.clear()
        else:
            self.status = status
            self.keep_alive = self.parser.should_keep_alive()  # only meaningful here, not later
            self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.body.append(body)
        self.buffered += len(body)
        self.body_events += 1

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False  # httptools goes on with the next response in the same bytes
        elif self.headers_done:
            self.complete = True

    # -- use -----------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None, request: httpx.Request | None) -> None:
        """Until something arrives (or the connection ends); ReadTimeout after ``timeout``.

        The timer fails the waiter rather than cancelling this task, so a cancel from outside
        always arrives here as CancelledError, even when it coincides with data or the timer."""
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

    async def drain(self, timeout: float | None, request: httpx.Request | None) -> None:
        """Until the socket takes more (the request body is flowing); WriteTimeout after
        ``timeout``. A timer that fails the future, as in ``wait``."""
        ready = self._write_ready
        if ready is None or ready.done():
            return
        handle = self.loop.call_later(timeout, _expire, ready) if timeout is not None else None
        try:
            await ready
        except asyncio.TimeoutError:
            self.close()
            raise httpx.WriteTimeout("upstream did not accept the request body in time", request=request) from None
        finally:
            if handle is not None:
                handle.cancel()

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

    def usable(self, now: float) -> bool:
        """May an idle connection carry a request? Only if nothing says it is closing: the
        loop has not seen it close, it is not too old, and its socket is not readable (an idle
        socket is readable when a FIN or a reset has arrived that the loop has not yet read,
        or bytes nobody asked for)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        if now - self.idle_since > IDLE_EXPIRY_S or self._fd < 0:
            return False
        if self._poll is not None:
            return not self._poll.poll(0)
        readable, _, _ = select.select([self._fd], [], [], 0)  # no poll() (Windows)
        return not readable


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _abandon(attempt: asyncio.Task[Any]) -> None:
    """Give up a connect: cancel it, and close whatever connection it made or still makes."""
    if attempt.done():
        _close_connected(attempt)
    else:
        attempt.cancel()
        attempt.add_done_callback(_close_connected)


def _close_connected(attempt: asyncio.Task[Any]) -> None:
    if attempt.cancelled():
        return
    if attempt.exception() is None:  # retrieving it also keeps asyncio from logging it
        attempt.result()[0].close()


class RawRequest:
    """A request as lmgate's hot path hands it to the transport: its head already in bytes
    (building an ``httpx.Request`` and then serialising it costs more than the rest of a
    request's path through lmgate)."""

    __slots__ = ("method", "host", "port", "head", "body", "timeouts")

    def __init__(self, method: str, host: str, port: int, head: bytes, body: bytes,
                 timeouts: dict[str, float | None]) -> None:
        self.method, self.host, self.port = method, host, port
        self.head, self.body, self.timeouts = head, body, timeouts


class RawHeaders:
    """Response headers as received: ``raw`` pairs, and ``get`` by name (any case)."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        wanted = name.lower().encode()
        for key, value in self.raw:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return default


class RawResponse:
    """What ``LeanTransport.send`` answers: status, headers, and the body as it arrives (the
    surface of ``httpx.Response`` that lmgate's relay uses)."""

    __slots__ = ("status_code", "headers", "stream")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], stream: _Body) -> None:
        self.status_code = status_code
        self.headers = RawHeaders(headers)
        self.stream = stream

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self.stream.__aiter__()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Body(httpx.AsyncByteStream):
    def __init__(self, owner: LeanTransport, key: tuple[str, int], conn: _Connection,
                 request: httpx.Request | None, read_timeout: float | None, head_only: bool) -> None:
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


def _with_request(exc: Exception, request: httpx.Request | None) -> Exception:
    if request is not None and isinstance(exc, httpx.RequestError):
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
        body = request.content if isinstance(request.stream, httpx.ByteStream) else await request.aread()
        raw = RawRequest(request.method, url.host, url.port or 80, _request_head(request), body,
                         request.extensions.get("timeout", {}))
        answer = await self._send(raw, request)
        return httpx.Response(answer.status_code, headers=answer.headers.raw, stream=answer.stream,
                              extensions={"http_version": b"HTTP/1.1"})

    async def send(self, raw: RawRequest) -> RawResponse:
        """Send a request whose head is already bytes; httpx's exceptions on failure."""
        return await self._send(raw, None)

    async def _send(self, raw: RawRequest, request: httpx.Request | None) -> RawResponse:
        key, timeouts = (raw.host, raw.port), raw.timeouts
        for attempt in (0, 1):
            conn = await self._acquire(key, timeouts.get("connect"), request, fresh=attempt == 1)
            try:
                return await self._exchange(key, conn, request, raw, timeouts)
            except _NotSent:
                conn.close()
                if attempt == 0 and conn.reused:
                    continue  # a pooled connection that died unseen; nothing of the request went out
                raise httpx.ConnectError("upstream closed the connection before the request was sent",
                                         request=request) from None
            except BaseException:
                conn.close()  # failed or cancelled with the request (maybe) sent: never again
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, key: tuple[str, int], conn: _Connection, request: httpx.Request | None,
                        raw: RawRequest, timeouts: dict[str, float | None]) -> RawResponse:
        head, body = raw.head, raw.body
        transport = conn.transport
        assert transport is not None
        conn.sent = True
        # write(), not writelines(): asyncio's writelines in Python 3.12 (3.12.1 here) never
        # pauses the protocol, so a large body would not wait for the socket, nor time out.
        # A small body goes with the head in one send; a large one is not copied for that.
        if len(body) <= SMALL_BODY:
            transport.write(head + body)
        else:
            transport.write(head)
        if transport.is_closing():
            # The transport tries the socket once, at once; it closes itself only if that send
            # failed, and a failed send wrote nothing.
            raise _NotSent
        if len(body) > SMALL_BODY:
            transport.write(body)
        await conn.drain(timeouts.get("write"), request)
        while not conn.headers_done:
            if conn.error is not None:
                conn.close()
                raise _with_request(conn.error, request)
            await conn.wait(timeouts.get("read"), request)
        stream = _Body(self, key, conn, request, timeouts.get("read"), raw.method == "HEAD")
        return RawResponse(conn.status, conn.headers, stream)

    async def _acquire(self, key: tuple[str, int], connect_timeout: float | None,
                       request: httpx.Request | None, *, fresh: bool) -> _Connection:
        idle = self._idle.get(key)
        if idle and not fresh:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.usable(now):
                    conn.reset()
                    conn.reused = True
                    return conn
                conn.close()
        return await self._connect(key, connect_timeout, request)

    async def _connect(self, key: tuple[str, int], timeout: float | None,
                       request: httpx.Request | None) -> _Connection:
        """A new connection within ``timeout``. The connect runs as its own task and this one
        waits on a future that either the connect or a timer settles, so a cancel always
        reaches the caller as CancelledError; a connect given up (cancelled, timed out) is
        cancelled and any socket it opened is closed."""
        loop = asyncio.get_running_loop()
        host, port = key
        attempt = loop.create_task(loop.create_connection(lambda: _Connection(loop), host, port))
        settled: asyncio.Future[None] = loop.create_future()
        attempt.add_done_callback(lambda _: _settle(settled))
        timer = loop.call_later(timeout, _settle, settled) if timeout is not None else None
        try:
            await settled
        except BaseException:
            _abandon(attempt)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not attempt.done():
            _abandon(attempt)
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request)
        try:
            _, conn = attempt.result()
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}",
                                     request=request) from None
        return conn

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        if not conn.reusable:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(key, [])
        while idle and (idle[0].closed or conn.idle_since - idle[0].idle_since > IDLE_EXPIRY_S):
            idle.pop(0).close()  # the oldest, never picked again: reused is the newest one
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
