"""Client connections held to their bounds, below the application.

uvicorn's HTTP protocol accepts a request head of any size, waits forever for a head or a
body that trickles in, keeps a connection whose client stopped reading as long as the
client likes, and accepts as many connections as the process has file descriptors. Each
of those lets one careless or hostile client hold memory, sockets, or (through a stream
it no longer reads) the gate itself. This subclass of uvicorn's httptools protocol adds:

- a 64 KiB limit on a request head: 431 and the connection closed;
- ``--client-read-timeout``: the head must arrive within T s of the connection opening (or
  of the previous response), the body within T s after the head: 408 and closed;
- ``--client-write-timeout``: a write buffer the client leaves undrained for T s aborts the
  connection, which the application sees as a disconnect (its gate slot is freed);
- ``--max-connections``: a connection beyond the cap gets 503 and is closed at once.

It relies on a few uvicorn internals (``cycle``, ``connections``, the parser callbacks);
the tests attack every bound through real sockets, so a uvicorn change that breaks one
fails loudly.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import HeadersTooLarge, ProxyError, RequestTimeout, TooManyConnections

log = logging.getLogger("lmgate")
HEAD_LIMIT = 64 * 1024

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - no httptools: uvicorn's h11 protocol, with its own head limit
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ClientLimits:
    read_timeout: float
    write_timeout: float
    max_connections: int
    head_limit: int = HEAD_LIMIT


def protocol_class(limits: ClientLimits) -> Any:
    """The HTTP protocol to hand uvicorn (``Config(http=...)``), or "h11" where httptools is
    missing (h11 then bounds the head itself; see ``build_server``)."""
    if HttpToolsProtocol is None:  # pragma: no cover
        return "h11"
    return type("LmgateHttpProtocol", (GuardedProtocol,), {"limits": limits})


DISCONNECT_HOOK = "lmgate.disconnect"  # the scope key of a request's DisconnectHook


class DisconnectHook:
    """Tells a request at once that its client's connection is gone, without a task of its
    own waiting on ``receive()`` for each request. A handler sets ``callback``; a hook that
    fired before that says so in ``fired``."""

    __slots__ = ("callback", "fired")

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None
        self.fired = False

    def fire(self) -> None:
        if self.fired:
            return
        self.fired = True
        if self.callback is not None:
            self.callback()


def raw_response(err: ProxyError) -> bytes:
    """A complete HTTP/1.1 error response that ends the connection."""
    body = err.to_json()
    reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
              503: b"Service Unavailable"}.get(err.status, b"Error")
    return b"".join([
        b"HTTP/1.1 %d " % err.status, reason, b"\r\n",
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n", body,
    ])


if HttpToolsProtocol is not None:

    class GuardedProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        limits: ClientLimits

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # the head or body deadline: what is due (None: nothing), when, and one timer per
            # connection that is moved only when it fires early (arming and disarming every
            # request cost two timers each; see ``_arm``)
            self._timer: asyncio.TimerHandle | None = None
            self._due: Callable[[], None] | None = None
            self._deadline = 0.0
            self._write_timer: asyncio.TimerHandle | None = None
            self._phase = "idle"  # idle -> head -> body -> busy (answering) -> idle
            self._head_bytes = 0
            self._refused: ProxyError | None = None
            self._hook: DisconnectHook | None = None  # the current request's

        # -- connection ------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > self.limits.max_connections:
                self._refuse(TooManyConnections(
                    f"lmgate has {self.limits.max_connections} open connections "
                    "(--max-connections); try again shortly"))
                return
            self._arm(self._head_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()  # nothing may keep a closed connection's protocol alive
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)
            # uvicorn cancels its keep-alive timer only for a clean close: after a reset the
            # timer would hold this protocol (and its buffers) for --timeout-keep-alive
            keep_alive = getattr(self, "timeout_keep_alive_task", None)
            if keep_alive is not None:
                keep_alive.cancel()
                self.timeout_keep_alive_task = None
            if self._hook is not None:
                self._hook.fire()

        def data_received(self, data: bytes) -> None:
            if self._refused is not None:
                return
            super().data_received(data)
            if self._phase in ("idle", "head") and self._refused is None:
                # The whole read belongs to an unfinished head; a read is at most a few
                # hundred KiB, so this bounds what a huge head can make us hold.
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.head_limit:
                    self._refuse(self._too_large())

        # -- parser callbacks ------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._phase = "head"
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self.limits.head_limit:
                self._refused = self._too_large()
                raise HeadTooLarge()  # httptools stops; uvicorn calls send_400_response
            self._phase = "body"
            self._arm(self._body_timed_out)
            super().on_headers_complete()
            self._hook = self.scope[DISCONNECT_HOOK] = DisconnectHook()
            if self.scope.get("http_version") == "1.0" and self.cycle is not None:
                _close_delimited(self.cycle)

        def on_message_complete(self) -> None:
            self._disarm()
            self._phase = "busy"
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._phase == "busy":
                self._phase = "idle"
            if self._phase != "body" and not self.transport.is_closing():
                self._arm(self._head_timed_out)

        def send_400_response(self, msg: str) -> None:
            if self._refused is not None:
                self._close_with(self._refused)
                return
            super().send_400_response(msg)

        # -- flow control: a client that stops reading ------------------------------------
        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_timed_out)

        def resume_writing(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().resume_writing()

        def _write_timed_out(self) -> None:
            self._write_timer = None
            log.info("client %s left lmgate's writes unread for %g s (--client-write-timeout); "
                     "connection closed", _peer(self.client), self.limits.write_timeout)
            self.transport.abort()  # close() would wait for the buffer to drain: never

        # -- deadlines ---------------------------------------------------------------------
        def _arm(self, callback: Callable[[], None]) -> None:
            """``callback`` is due ``--client-read-timeout`` s from now. The connection's timer
            stays where it is when it would fire no later than that; firing early, it moves
            on to the deadline (``_check``)."""
            self._due = callback
            self._deadline = self.loop.time() + self.limits.read_timeout
            if self._timer is None:
                self._timer = self.loop.call_at(self._deadline, self._check)

        def _disarm(self) -> None:
            self._due = None  # the timer, if any, finds nothing due when it fires

        def _check(self) -> None:
            self._timer = None
            due = self._due
            if due is None:
                return
            if self.loop.time() < self._deadline:
                self._timer = self.loop.call_at(self._deadline, self._check)
                return
            self._due = None
            due()

        def _stop_timer(self) -> None:
            self._due = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _head_timed_out(self) -> None:
            if self._phase == "head":
                self._refuse(RequestTimeout(f"the request head did not arrive within "
                                            f"{self.limits.read_timeout:g} s"))
            elif not self.transport.is_closing():
                self.transport.close()  # idle between requests: nothing to answer

        def _body_timed_out(self) -> None:
            cycle = self.cycle
            if cycle is not None and (cycle.response_complete or not cycle.more_body):
                return
            err = RequestTimeout(f"the request body did not arrive within {self.limits.read_timeout:g} s")
            self._refuse(err)
            if cycle is not None:
                cycle.disconnected = True  # the application now reads a disconnect
                cycle.message_event.set()

        # -- ending ------------------------------------------------------------------------
        def _too_large(self) -> ProxyError:
            return HeadersTooLarge(f"the request head is over {self.limits.head_limit // 1024} KiB")

        def _refuse(self, err: ProxyError) -> None:
            self._refused = err
            self._close_with(err)

        def _close_with(self, err: ProxyError) -> None:
            self._stop_timer()
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self.transport.abort()  # mid-response: no room for another answer
                return
            self.transport.write(raw_response(err))
            self.transport.close()


def _close_delimited(cycle: Any) -> None:
    """An HTTP/1.0 client cannot read ``Transfer-Encoding: chunked``, which uvicorn uses for
    every response without a ``Content-Length`` (a stream). For such a client the body is
    written as it comes and ended by closing the connection, as HTTP/1.0 has it. The cycle's
    task has not started yet, so its ``send`` can still be wrapped."""
    send = cycle.send
    delimited = False

    async def send_10(message: Any) -> None:
        nonlocal delimited
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            if b"content-length" not in names and cycle.scope["method"] != "HEAD":
                delimited = True
                cycle.chunked_encoding = False
                cycle.keep_alive = False
                cycle.expected_content_length = sys.maxsize
        elif delimited and message["type"] == "http.response.body" and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))  # the end: nothing is owed
        await send(message)

    cycle.send = send_10


class HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing an oversized head."""


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


def raise_fd_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` connections plus its own files, where the OS allows
    (POSIX soft limit up to the hard limit; nothing to do on Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # pragma: no cover
            log.warning("could not raise the open-file limit to %d; --max-connections %d may not "
                        "be reachable", target, wanted)
