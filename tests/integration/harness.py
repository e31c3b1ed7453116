"""In-process harness: lmgate served as in production (``uvicorn_config``: its uvicorn
settings and client-bounds HTTP protocol; its own upstream transport) on 127.0.0.1 inside
the test's event loop, in front of a scripted upstream that is a real HTTP server in the
same loop. A test holds, releases, fails or times out the upstream at exactly the point it
wants, and every fault is real socket behaviour: a refused connect, a silent socket, a
connection reset mid-stream.

Concurrent tasks (all in the test's loop)::

    test body ──httpx──▶ lmgate (LmgateServer, GuardedProtocol) ──LeanTransport──▶ box
                                                                   (BoxServer: uvicorn + Upstream)

``serve()`` starts a box with a fresh ``Upstream`` script unless it is given one
(``box=``), then lmgate pointed at it; on the way out lmgate stops first, then the box.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.__main__ import LmgateServer, uvicorn_config
from proxy.app import create_app
from proxy.config import Settings, box_name
from proxy.listen import BACKLOG, bind_listeners
from proxy.state import AppState

SSE = {"content-type": "text/event-stream"}
LISTING = {"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}
COMPLETION = {"object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
START_S = 10.0  # a server that is not listening by then fails the test
STOP_S = 15.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def chat_body(model: str = "m1", *, stream: bool = False, act: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}],
            "x_act": act, **extra}


def sse_events(n: int, tag: str = "") -> list[bytes]:
    out = []
    for i in range(n):
        chunk = {"id": "c", "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"content": f"{tag}{i} "}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


# -- plain ASGI helpers for scripted boxes ----------------------------------------------------
async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def start_response(send: Send, status: int, headers: dict[str, str]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


async def send_json(send: Send, status: int, doc: object, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(doc).encode()
    await start_response(send, status, {**(headers or {}), "content-type": "application/json",
                                        "content-length": str(len(body))})
    await send({"type": "http.response.body", "body": body})


async def send_chunk(send: Send, data: bytes) -> None:
    """One write of a chunked body (no content-length: uvicorn frames it as a chunk)."""
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def end_body(send: Send) -> None:
    await send({"type": "http.response.body", "body": b""})


def abort(scope: Scope) -> None:
    """Reset the connection that carries this request (what a crashed box does): bytes
    already written are delivered, then the peer reads ECONNRESET."""
    scope["extensions"]["box.abort"]()


@contextlib.asynccontextmanager
async def until_disconnect(receive: Receive) -> AsyncIterator[asyncio.Task[None]]:
    """A task that ends when lmgate closes the connection (call after the body is read)."""
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.create_task(watch())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the scripted upstream ----------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: httpx.Headers
    body: bytes
    act: str
    started: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # answered, or lmgate hung up
    released: asyncio.Event = field(default_factory=asyncio.Event)


class Upstream:
    """The scripted box, a plain ASGI app. A GET (model listings, lmgate's own checks)
    gets ``LISTING``; any other request is recorded in ``seen`` and its body's ``x_act``
    picks the behaviour:

    ok           JSON chat.completion at once (with usage)
    hold         JSON after ``release()`` is called for this request
    stream       SSE events from ``self.events``, each its own write (chunk)
    hold_stream  first event, then waits for ``release()``, then the rest
    status:N     an error response with status N (LM Studio style body)
    read_timeout  silence: no answer at all, until lmgate gives up and hangs up (give the
                 test a short ``read_timeout``)
    reset        the request is read, then the connection is reset with no answer at all
    break        two events, then the connection is reset (between events)
    break_mid    one and a half events, then the connection is reset (inside an event)
    slow_body    headers and the first event, then silence until lmgate hangs up

    A refused connection is not something a request can ask for, since it has connected by
    then: ``async with box.refusing()`` stops the server listening, so connects are
    refused for real. An unknown act is answered 500 and fails the test when ``serve()``
    ends."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.listings: list[Seen] = []
        self.events: list[bytes] = sse_events(5)
        self.extra_headers: dict[str, str] = {}  # added to every answer
        self.arrived = asyncio.Condition()
        self.mistakes: list[str] = []

    def release(self, index: int = -1) -> None:
        self.seen[index].released.set()

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.seen) >= n), timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = await read_body(receive)
        act = "ok"
        if body:
            with contextlib.suppress(ValueError, AttributeError):
                act = json.loads(body).get("x_act", "ok")
        seen = Seen(scope["method"], scope["path"], httpx.Headers(scope["headers"]), body, act)
        try:
            if seen.method == "GET":
                self.listings.append(seen)
                await send_json(send, 200, LISTING)
                return
            self.seen.append(seen)
            seen.started.set()
            async with self.arrived:
                self.arrived.notify_all()
            async with until_disconnect(receive) as gone:
                await self._answer(seen, scope, send, gone)
        finally:
            seen.closed.set()

    async def _answer(self, seen: Seen, scope: Scope, send: Send, gone: asyncio.Task[None]) -> None:
        act = seen.act
        if act.startswith("status:"):
            code = int(act.split(":")[1])
            await send_json(send, code, {"error": f"upstream says {code}"})
        elif act in ("ok", "hold"):
            if act == "hold" and not await _released(seen, gone):
                return
            await send_json(send, 200, COMPLETION, self.extra_headers)
        elif act == "read_timeout":
            await gone
        elif act == "reset":
            abort(scope)
            await gone
        elif act in ("stream", "hold_stream", "slow_body", "break", "break_mid"):
            await self._stream(seen, scope, send, gone)
        else:
            self.mistakes.append(f"unknown x_act {act!r}")
            await send_json(send, 500, {"error": f"the scripted upstream has no act {act!r}"})

    async def _stream(self, seen: Seen, scope: Scope, send: Send, gone: asyncio.Task[None]) -> None:
        events, act = self.events, seen.act
        await start_response(send, 200, {**SSE, **self.extra_headers})
        if act in ("slow_body", "break", "break_mid"):
            writes = {"slow_body": events[:1], "break": events[:2], "break_mid": [events[0], events[1][:10]]}
            for data in writes[act]:
                await send_chunk(send, data)
            if act != "slow_body":
                abort(scope)
            await gone
            return
        for i, event in enumerate(events):
            if i == 1 and act == "hold_stream" and not await _released(seen, gone):
                return
            await send_chunk(send, event)
            await asyncio.sleep(0)
        await end_body(send)


async def _released(seen: Seen, gone: asyncio.Task[None]) -> bool:
    """Until ``release()`` (True) or lmgate hung up (False)."""
    if seen.released.is_set():
        return True
    released = asyncio.create_task(seen.released.wait())
    try:
        await asyncio.wait({released, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        released.cancel()
    return seen.released.is_set()


# -- a box: an ASGI app on a real socket -------------------------------------------------------
class _BoxProtocol(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's protocol, plus what a scripted box needs: the app can reset its connection
    (``abort(scope)``), and the box learns when its last connection has closed."""

    box: BoxServer

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"box.abort": self.transport.abort}

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.connections:
            self.box.all_closed.set()


class _BoxUvicorn(uvicorn.Server):
    """uvicorn for a box: started and stopped on events (no 0.1 s ticks), and it leaves the
    process's signal handlers to lmgate's server."""

    def __init__(self, config: uvicorn.Config, box: BoxServer) -> None:
        super().__init__(config)
        self.box = box  # whose ``all_closed`` its connections set
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        await self.on_tick(0)
        await self.stop.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # from here on, connects are refused
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        tasks = set(self.server_state.tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_S)
            assert not pending, f"the box still answers {len(pending)} request(s) after {STOP_S} s"
        self.box.all_closed.clear()
        if self.server_state.connections:
            await asyncio.wait_for(self.box.all_closed.wait(), STOP_S)


class BoxServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in the running loop: one upstream box.

    The port is held from construction to ``close()`` by a bound socket that never listens
    (SO_REUSEPORT lets the listening one share it), so while the server is stopped connects
    are refused for real and nothing else can take the port."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.all_closed = asyncio.Event()
        self._holder = _reuse_port_socket()
        try:
            self._holder.bind(("127.0.0.1", 0))
        except BaseException:
            self._holder.close()
            raise
        self.port = int(self._holder.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = box_name(self.url)  # lmgate's name for it in X-Upstream, /queue, metrics
        self._server: _BoxUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BoxServer:
        try:
            await self.start()
        except BaseException:
            self._holder.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        assert self._server is None, "already serving"
        sock = _reuse_port_socket()
        try:
            sock.bind(("127.0.0.1", self.port))
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        protocol = type("BoxProtocol", (_BoxProtocol,), {"box": self})
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", log_level="warning",
                                log_config=None, access_log=False, proxy_headers=False)
        server = _BoxUvicorn(config, self)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await _until_started(server.ready, task, f"box {self.name}")
        except BaseException:
            sock.close()
            raise
        self._server, self._task = server, task

    async def stop(self) -> None:
        server, task = self._server, self._task
        if server is None or task is None:
            return
        self._server = self._task = None
        server.stop.set()
        await asyncio.wait_for(task, STOP_S * 2)

    async def close(self) -> None:
        try:
            await self.stop()
        finally:
            self._holder.close()

    @contextlib.asynccontextmanager
    async def refusing(self) -> AsyncIterator[None]:
        """The box goes away (its connections closed, nothing listening: connects are
        refused) and comes back on the same port afterwards."""
        await self.stop()
        try:
            yield
        finally:
            await self.start()


def _reuse_port_socket() -> socket.socket:
    # IPPROTO_TCP named, as getaddrinfo names it: asyncio sets TCP_NODELAY on the accepted
    # connections only then (with proto 0 a response's second write waits for a delayed ACK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


async def _until_started(ready: asyncio.Event, task: asyncio.Task[None], what: str) -> None:
    waiter = asyncio.create_task(ready.wait())
    try:
        done, _ = await asyncio.wait({waiter, task}, timeout=START_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task in done:
        task.result()
        raise AssertionError(f"{what} stopped while starting")
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise AssertionError(f"{what} did not start within {START_S} s")


# -- lmgate -----------------------------------------------------------------------------------
class _Lmgate(LmgateServer):
    """lmgate's own server class, its startup and shutdown untouched; the harness learns
    when it is listening, and its main loop ends on an event rather than a 0.1 s tick."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config, state)
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        await self.on_tick(0)
        await self.stop.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # Ctrl-C during a test
        super().handle_exit(sig, frame)
        self.loop.call_soon_threadsafe(self.stop.set)

    def exit(self) -> None:
        self.should_exit = True
        self.stop.set()


@dataclass
class Running:
    state: AppState
    upstream: Any  # the box's app: an ``Upstream`` unless the test brought its own
    box: BoxServer
    client: httpx.AsyncClient
    base: str
    registry: CollectorRegistry
    server: LmgateServer

    @property
    def box_name(self) -> str:
        """The box's name in X-Upstream, /queue and metric labels."""
        return self.box.name

    async def assert_gate_free(self) -> None:
        """Nothing holds or waits in the gate, and a normal request goes straight through."""
        for _ in range(200):
            if self.state.gate.active == 0 and self.state.gate.depth == 0 and not self.state.exchanges:
                break
            await asyncio.sleep(0.01)
        assert self.state.gate.active == 0, "a slot leaked"
        assert self.state.gate.depth == 0
        r = await self.client.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 200, r.text
        assert r.headers["x-queue-position"] == "0"

    async def wait_depth(self, n: int, timeout: float = 5.0) -> None:
        async def check() -> None:
            while self.state.gate.depth != n:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(check(), timeout)


@contextlib.asynccontextmanager
async def serve(settings: Settings | None = None, *, box: BoxServer | None = None,
                transport: httpx.AsyncBaseTransport | None = None,
                **overrides: Any) -> AsyncIterator[Running]:
    """Run lmgate in this loop on a free port of 127.0.0.1, in front of ``box`` (by default
    a fresh scripted ``Upstream``, started here and stopped after lmgate); yields a Running
    handle. ``upstream`` is the box's URL unless ``overrides`` names another.

    ``transport`` replaces lmgate's upstream transport; only for what a box on 127.0.0.1
    cannot play (a box on another machine), never for the request path in general."""
    async with contextlib.AsyncExitStack() as stack:
        if box is None:
            box = await stack.enter_async_context(BoxServer(Upstream()))
        settings = (settings or Settings()).with_(**{"upstream": box.url, **overrides})
        yield await stack.enter_async_context(_serve(settings, box, transport))
        mistakes = getattr(box.app, "mistakes", [])
        assert not mistakes, mistakes


@contextlib.asynccontextmanager
async def _serve(settings: Settings, box: BoxServer,
                 transport: httpx.AsyncBaseTransport | None) -> AsyncIterator[Running]:
    registry = CollectorRegistry()
    app = create_app(settings, registry=registry, transport=transport)
    sockets = bind_listeners("127.0.0.1", 0)  # bound before serving, as ``lmgate`` does
    port = int(sockets[0].getsockname()[1])
    server = _Lmgate(uvicorn_config(app, settings.with_(host="127.0.0.1", port=port)), app.state.lmgate)
    task = asyncio.create_task(server.serve(sockets=sockets))
    try:
        await _until_started(server.ready, task, "lmgate")
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            yield Running(app.state.lmgate, box.app, box, client, base, registry, server)
    finally:
        if not task.done():
            server.exit()
            await asyncio.wait_for(task, STOP_S)
        for sock in sockets:
            sock.close()


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    """Run an async test body with an overall bound."""
    async def main() -> None:
        await asyncio.wait_for(coro_fn(), timeout)
    asyncio.run(main())
