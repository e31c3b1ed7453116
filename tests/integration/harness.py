"""In-process harness: lmgate served by a real uvicorn on 127.0.0.1 inside the test's event
loop, with a scripted upstream behind an httpx mock transport (respx), so a test can hold,
release, fail or time out the upstream at exactly the point it wants."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import respx
import uvicorn
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.state import AppState
from proxy.config import Settings

SSE = {"content-type": "text/event-stream"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@dataclass
class Seen:
    method: str
    path: str
    headers: httpx.Headers
    body: bytes
    act: str
    started: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Upstream:
    """Scripted upstream. The request body's ``x_act`` picks the behaviour:

    ok        JSON chat.completion at once (with usage)
    hold      JSON after ``release()`` is called for this request
    stream    SSE events from ``self.events``, each its own write
    hold_stream  first event, then waits for ``release()``, then the rest
    status:N  an error response with status N (LM Studio style body)
    connect   raise ConnectError        read_timeout  raise ReadTimeout
    break     two events, then a ReadError mid-stream (between events)
    break_mid  one and a half events, then a ReadError inside an event
    slow_body  headers, then silence until a ReadTimeout
    """

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.listings: list[Seen] = []
        self.events: list[bytes] = sse_events(5)
        self.extra_headers: dict[str, str] = {}  # added to every answer
        self._gates: dict[int, asyncio.Event] = {}
        self.arrived = asyncio.Condition()

    def mock(self) -> respx.MockRouter:
        """respx patches httpx's connection layer: the upstream host is scripted, lmgate's
        own listening address (127.0.0.1) passes through to the real server."""
        router = respx.mock(assert_all_called=False)
        router.route(host="upstream.test").mock(side_effect=self._handle)
        router.route(host="127.0.0.1").pass_through()
        return router

    def release(self, index: int = -1) -> None:
        seen = self.seen[index]
        self._gates.setdefault(id(seen), asyncio.Event()).set()

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.seen) >= n), timeout)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        act = "ok"
        if body:
            with contextlib.suppress(ValueError, AttributeError):
                act = json.loads(body).get("x_act", "ok")
        seen = Seen(request.method, request.url.path, request.headers, body, act)
        if request.method == "GET":  # model listings and lmgate's own probes
            self.listings.append(seen)
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]})
        gate = self._gates.setdefault(id(seen), asyncio.Event())
        self.seen.append(seen)
        seen.started.set()
        async with self.arrived:
            self.arrived.notify_all()
        if act == "connect":
            raise httpx.ConnectError("refused", request=request)
        if act == "read_timeout":
            raise httpx.ReadTimeout("silent", request=request)
        if act.startswith("status:"):
            code = int(act.split(":")[1])
            return httpx.Response(code, json={"error": f"upstream says {code}"})
        if act == "hold":
            await gate.wait()
        if act in ("ok", "hold"):
            return httpx.Response(200, headers=self.extra_headers, json={
                "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
        return httpx.Response(200, headers={**SSE, **self.extra_headers}, stream=_Stream(self, seen, gate, act))


class _Stream(httpx.AsyncByteStream):
    def __init__(self, up: Upstream, seen: Seen, gate: asyncio.Event, act: str) -> None:
        self.up, self.seen, self.gate, self.act = up, seen, gate, act

    async def __aiter__(self) -> AsyncIterator[bytes]:
        events = self.up.events
        try:
            if self.act == "slow_body":
                yield events[0]
                raise httpx.ReadTimeout("silent")
            if self.act == "break":
                yield events[0]
                yield events[1]
                raise httpx.ReadError("connection reset")
            if self.act == "break_mid":
                yield events[0]
                yield events[1][:10]
                raise httpx.ReadError("connection reset")
            for i, event in enumerate(events):
                if i == 1 and self.act == "hold_stream":
                    await self.gate.wait()
                yield event
                await asyncio.sleep(0)
        finally:
            self.seen.closed.set()

    async def aclose(self) -> None:
        self.seen.closed.set()


@contextlib.asynccontextmanager
async def serve(settings: Settings | None = None, **overrides: Any) -> AsyncIterator[Running]:
    """Run lmgate in this loop on a free port; yields a Running handle."""
    up = Upstream()
    settings = (settings or Settings()).with_(upstream="http://upstream.test:1234", **overrides)
    registry = CollectorRegistry()
    with up.mock():
        async with _serve(up, settings, registry) as running:
            yield running


@contextlib.asynccontextmanager
async def _serve(up: Upstream, settings: Settings, registry: CollectorRegistry) -> AsyncIterator[Running]:
    # httpx's default transport, so that respx (which patches httpcore) scripts the upstream
    app = create_app(settings, registry=registry, transport=httpx.AsyncHTTPTransport())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        running = Running(app.state.lmgate, up, client, base, registry, server)
        try:
            yield running
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 15)


@dataclass
class Running:
    state: AppState
    upstream: Upstream
    client: httpx.AsyncClient
    base: str
    registry: CollectorRegistry
    server: uvicorn.Server

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


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    """Run an async test body with an overall bound."""
    async def main() -> None:
        await asyncio.wait_for(coro_fn(), timeout)
    asyncio.run(main())
