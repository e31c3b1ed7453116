"""Cancelling a request always cancels it, whatever the transport was doing at that moment.

``asyncio.wait_for`` before Python 3.12 returns the result instead of raising CancelledError
when the awaited operation completes in the same loop iteration as the cancel. A request
cancelled (a client gone, a shutdown) just as its connection was made, or just as its body was
accepted, then carried on: it was sent to the box and nobody waited for the answer. These tests
cancel at every loop iteration around those two moments, many times over, on both loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from proxy import transport as transport_module
from proxy.transport import LeanTransport

from .test_transport import LOOPS, RawServer, read_request, run

HOPS = 8  # loop iterations after the hook at which to cancel: 0..HOPS-1
CONNECT_TRIALS = 12  # per number of hops
DRAIN_TRIALS = 2
DRAIN_BODY = b"x" * (8 * 1024 * 1024)  # more than loopback takes in one send: the write must wait
SETTLE_S = 10.0  # how long a cancelled request may take to end; it is microseconds when correct


def later(loop: asyncio.AbstractEventLoop, hops: int, fn: Callable[[], None]) -> None:
    """Call ``fn`` after ``hops`` more turns of the loop (0: now)."""
    if hops == 0:
        fn()
    else:
        loop.call_soon(later, loop, hops - 1, fn)


def request(url: str, body: bytes) -> httpx.Request:
    req = httpx.Request("POST", url, content=body)
    # no answer ever comes: a cancel that was swallowed ends in ReadTimeout, not CancelledError
    req.extensions["timeout"] = {"connect": 5.0, "read": 3.0, "write": 5.0, "pool": None}
    return req


async def wait_ended(task: asyncio.Task[Any]) -> None:
    done, _ = await asyncio.wait({task}, timeout=SETTLE_S)
    assert task in done, "the cancelled request did not end"
    if not task.cancelled():
        exc = task.exception()
        pytest.fail(f"the request was cancelled but ended with {exc!r}, not CancelledError")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancel_while_connecting_always_cancels(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel at each of the first loop iterations after the TCP connection is made (before,
    at and after the connect completes): every request ends with CancelledError, the socket is
    closed, and a request that was not yet written when the cancel came never reaches the
    server."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {}
        written_at_cancel: list[bool] = []
        made = 0
        original = transport_module._Connection.connection_made

        def connection_made(conn: Any, transport: asyncio.BaseTransport) -> None:
            nonlocal made
            made += 1
            original(conn, transport)

            def cancel() -> None:
                written_at_cancel.append(conn.sent)
                state["task"].cancel()
            later(loop, state["hops"], cancel)

        monkeypatch.setattr(transport_module._Connection, "connection_made", connection_made)

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            server.requests.append(await read_request(reader))
            await reader.read()  # never answer; until the client closes

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            for hops in range(HOPS):
                for _ in range(CONNECT_TRIALS):
                    state["hops"] = hops
                    state["task"] = asyncio.ensure_future(t.handle_async_request(request(url, b"{}")))
                    await wait_ended(state["task"])
            assert made == HOPS * CONNECT_TRIALS == len(written_at_cancel)
            for n in range(1, made + 1):  # every connection the client made, the server saw closed
                await server.ended.setdefault(n, asyncio.Event()).wait()
            assert server.connections == made and server.open == 0
            # the cancels fell on both sides of the write, so the whole connect was covered
            assert 0 < sum(written_at_cancel) < made
            assert len(server.requests) == sum(written_at_cancel)  # none sent after its cancel
            assert not any(t._idle.values())
            await t.aclose()
    run(body(), loop_kind, limit_s=120)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancel_while_the_body_drains_always_cancels(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body larger than the socket takes at once makes the request wait for the upstream to
    read it (the write timeout runs meanwhile). Cancel at each of the first loop iterations
    after the transport can write again: every request ends with CancelledError."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {}
        resumed = 0
        original = transport_module._Connection.resume_writing

        def resume_writing(conn: Any) -> None:
            nonlocal resumed
            resumed += 1
            original(conn)
            later(loop, state["hops"], state["task"].cancel)

        monkeypatch.setattr(transport_module._Connection, "resume_writing", resume_writing)

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            await reader.read()  # never answer; until the client closes

        server = RawServer(handler)
        async with server as url:
            t = LeanTransport()
            trials = 0
            for hops in range(HOPS):
                for _ in range(DRAIN_TRIALS):
                    trials += 1
                    state["hops"] = hops
                    state["task"] = asyncio.ensure_future(t.handle_async_request(request(url, DRAIN_BODY)))
                    await wait_ended(state["task"])
                    assert resumed == trials, "the body went out without waiting: nothing was tested"
            await t.aclose()
            for n in range(1, server.connections + 1):
                await server.ended.setdefault(n, asyncio.Event()).wait()
    run(body(), loop_kind, limit_s=120)
