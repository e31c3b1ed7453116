"""One gated request, start to end: admit, wait its turn, forward, relay, release.

Written as plain ASGI so that lmgate decides exactly when headers go out, can watch for
a client disconnect while it waits or relays, and always releases its place in line:

    handler task ──┬── admission (admission.py: keys, body, limits, quota, line.submit)
                   ├── wait for turn  (queue comments for streams; timeout; shutdown)
                   ├── forward (forward.py), relay bytes as they arrive
                   └── finally: line.release(ticket)   <- every path goes through here
    watcher task ───── receive() -> http.disconnect: mark gone, cancel the handler task

Shutdown and admin cancellation use the same route as a disconnect: they set a reason on
the exchange and cancel the handler task, which turns the reason into an error response
or a final SSE error event. The old queue API runs its jobs through the same ``serve``,
with a sink in place of a client connection (compat.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httpx

from . import listings
from . import streaming as sse
from .admission import Admission, admit
from .errors import Forbidden, NotFound, ProxyError, QueueTimeout, ShuttingDown
from .exchange import Exchange, watch
from .forward import UpstreamResponse, forward
from .gate import RUNNING, Ticket
from .inbound import (
    ClientGone,
    Receive,
    Scope,
    Send,
    client_request_id,
    header_map,
    new_id,
    read_body,
    send_error,
)
from .metrics import RequestRecord
from .upstream import RESPONSE_DROP, Upstream

if TYPE_CHECKING:
    import httpx

    from .state import AppState

STARTED_AT_ONCE = sse.queue_entered(0) + sse.queue_position(0)
# What must not pass when lmgate changes a response's bytes (comments, usage taken out).
CHANGED_BYTES_DROP = frozenset({b"content-length", b"content-encoding"})


class GatedRequest:
    """Runs one request through the line. Created per request by the app."""

    def __init__(self, state: AppState, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        self.state = state
        self.scope = scope
        self.receive = receive
        self.send = send
        self.headers = header_map(scope)
        self.t0 = time.perf_counter()
        self.uid = new_id()
        self.rid = client_request_id(self.headers) or self.uid
        self.rec = RequestRecord(request_id=self.rid, route=route, client=state.client_of(scope, self.headers))
        self.ex = Exchange(asyncio.current_task())
        self.adm: Admission | None = None
        self.body = b""
        self.stream = False
        self.forwarded = False  # sent upstream
        self.told_loading = False  # the stream was told its model is being loaded
        self.upstream_name = ""  # the box it was sent to
        self.id_header = [(b"x-request-id", self.rid.encode())]
        self.on_turn: Callable[[], None] | None = None  # its turn came (the old API's "processing")
        # what goes upstream: the client's path and headers, unless an adapter says otherwise
        self.upstream_path: str = scope["path"]
        self.upstream_query: bytes = scope.get("query_string", b"")
        self.upstream_headers: list[tuple[bytes, bytes]] | None = None

    @classmethod
    def detached(cls, state: AppState, uid: str, route: str) -> GatedRequest:
        """A request with no client connection of its own (an old-API job put back in line
        when lmgate starts again), known by ``uid``."""
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b"",
                 "client": None}
        req = cls(state, scope, _nothing_to_receive, _nowhere, route)
        req.uid = req.rid = req.rec.request_id = uid
        req.id_header = [(b"x-request-id", uid.encode())]
        return req

    # -- entry ---------------------------------------------------------------------------
    async def run(self) -> None:
        """An HTTP request on a gated route: admitted, then served while its client watches."""
        try:
            self.adopt(await admit(self.state, self.rec, self.headers, self.receive,
                                   path=self.upstream_path, uid=self.uid, rid=self.rid))
        except ClientGone:
            self.rec.outcome, self.rec.status = "client_gone", 499
            self.finish()
            return
        except ProxyError as err:
            self.refuse(err)
            await send_error(self.send, err, self.id_header)
            self.finish()
            return
        watcher = watch(self.scope, self.receive, self.ex)
        try:
            await self.serve()
        finally:
            if watcher is not None:
                watcher.cancel()

    async def passthrough(self, *, admin_only: bool) -> None:
        """Forward at once, without the line (model listings; admin model management)."""
        st = self.state
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                who = st.auth.authenticate(self.headers, self.rec.client)
                self.rec.client = who.label
                if admin_only and not who.admin:
                    raise Forbidden("model management (load, unload, download) needs an admin key",
                                    code="admin_only")
                self.body, _ = await read_body(self.receive, self.headers, st.settings.max_body)
            except ProxyError as err:
                self.refuse(err)
                await send_error(self.send, err, self.id_header)
                return
            watcher = watch(self.scope, self.receive, self.ex)
            route = self.rec.route
            if route in listings.MODEL_DETAIL_ROUTES and listings.limited(st, who):
                model = unquote(self.scope["path"].rsplit("/", 1)[-1])
                if not st.auth.may_use(who, model):
                    raise NotFound(f"The model '{model}' does not exist or this key may not use it",
                                   param="model", code="model_not_found")
            if self.scope["method"] == "GET" and listings.needs_rewrite(st, route, who):
                body = await listings.listing(st, route, self.scope["path"], self.scope.get("query_string", b""),
                                              self.scope["headers"], who, self.uid)
                await self._start(200, [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), *self.id_header])
                self.ex.finished = True
                await self.send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await self._forward(None)
        except ClientGone:
            self.rec.outcome, self.rec.status = "client_gone", 499
        except asyncio.CancelledError:
            if not self._ours():
                raise
            await self._interrupted()
        except ProxyError as err:
            await self._fail(err)
        finally:
            self.ex.finished = True
            if watcher is not None:
                watcher.cancel()
            self.finish()

    def adopt(self, adm: Admission) -> None:
        self.adm, self.body, self.stream = adm, adm.body, adm.stream

    def refuse(self, err: ProxyError) -> None:
        self.rec.outcome, self.rec.status, self.rec.reason = "rejected", err.status, err.code

    async def serve(self) -> None:
        """Wait for the admitted ticket's turn, forward, relay; release on every path. Runs in
        the task an interrupt (disconnect, shutdown, admin cancel) should cancel."""
        assert self.adm is not None
        st, ticket = self.state, self.adm.ticket
        self.ex.task = asyncio.current_task()
        st.requests.register(ticket, self.ex)
        try:
            await self._serve(ticket)
        except asyncio.CancelledError:
            if not self._ours():
                raise
            self._leave(ticket)  # the slot is free before any last write to the client
            await self._interrupted()
        except ProxyError as err:
            self._leave(ticket)
            await self._fail(err)
        finally:
            self.ex.finished = True
            self._leave(ticket)
            if self.rec.wait_ms is None:  # time actually spent in line, also when it left early
                self.rec.wait_ms = ticket.waited_s(st.line.view.clock()) * 1000
            st.fleet.used(ticket)
            st.requests.remember(ticket, self.rec)
            self.finish()

    def _leave(self, ticket: Ticket) -> None:
        """Give back the place in line and the held body bytes. Idempotent."""
        self.ex.finished = True  # from here on, interrupts change nothing
        self.state.line.release(ticket)
        self.state.requests.unregister(ticket)
        assert self.adm is not None
        if self.adm.hold is not None:
            self.adm.hold.release()

    # -- waiting -------------------------------------------------------------------------
    def _queue_headers(self, ticket: Ticket) -> list[tuple[bytes, bytes]]:
        assert self.adm is not None
        out = self.id_header + [
            (b"x-queue-position", str(ticket.position_at_arrival).encode()),
            (b"x-queue-depth", str(ticket.depth_at_arrival).encode()),
        ]
        if self.adm.eta_ms is not None:
            out.append((b"x-queue-eta-ms", str(self.adm.eta_ms).encode()))
        return out

    async def _serve(self, ticket: Ticket) -> None:
        assert self.adm is not None
        if ticket.state != RUNNING:
            if self.stream:
                await self._wait_streaming(ticket)
            else:
                await self._wait_plain(ticket)
        self.rec.wait_ms = ticket.waited_s(self.state.line.view.clock()) * 1000
        if self.adm.hold is not None:
            self.adm.hold.release()
        if self.adm.quota_key is not None and ticket.position_at_arrival > 0:
            # checked again as its turn comes: requests admitted together must not all spend
            # a quota that the first of them used up
            await self.state.check_quota(self.adm.quota_key)
        if self.on_turn is not None:
            self.on_turn()
        await self._forward(ticket)

    def _deadline(self, ticket: Ticket) -> float:
        return ticket.arrived_at + self.state.settings.queue_timeout

    async def _wait_plain(self, ticket: Ticket) -> None:
        line = self.state.line
        if not await line.wait(ticket, self._deadline(ticket) - line.view.clock()):
            self._timed_out(ticket)

    def _timed_out(self, ticket: Ticket) -> None:
        line = self.state.line
        line.release(ticket)
        raise QueueTimeout(f"waited {self.state.settings.queue_timeout:g} s without reaching "
                           "the front of the queue", retry_after_s=self.state.eta.retry_after_s(line.view))

    async def _wait_streaming(self, ticket: Ticket) -> None:
        assert self.adm is not None
        st, eta_ms = self.state, self.adm.eta_ms
        line = st.line
        await self._start(200, sse.SSE_HEADERS + self._queue_headers(ticket))
        last = ticket.position_at_arrival
        opening = sse.queue_entered(last) + sse.queue_position(last)
        if eta_ms is not None:
            opening += sse.comment(f"queue_eta_ms={eta_ms}")
        if self.adm.reasoning:
            opening += self._waiting_chunk(last, eta_ms)
        await self._write(opening)
        deadline = self._deadline(ticket)
        clock = line.view.clock  # the line's time: deadlines count from the ticket's arrival
        last_write = clock()
        while True:
            now = clock()
            if now >= deadline:
                self._timed_out(ticket)
            if await line.wait(ticket, min(sse.POSITION_MIN_INTERVAL_S, deadline - now)):
                return
            now = clock()
            pos = line.position(ticket)
            if pos != last and pos > 0:
                last = pos
                update = sse.queue_position(pos)
                if self.adm.reasoning:
                    update += self._waiting_chunk(pos, st.eta.eta_ms(line.view, ticket, pos))
                await self._write(update)
                last_write = now
            elif not self.told_loading and st.fleet.model_loading(ticket.model):
                await self._write(self._loading_note(ticket.model))
                last_write = now
            elif now - last_write >= sse.KEEPALIVE_S:
                await self._write(sse.keepalive())
                last_write = now

    async def _loading(self, ticket: Ticket) -> None:
        """Its model is about to be loaded (tens of seconds with real LM Studio): a stream
        says so at once, before the load starts. One that has not answered yet (it did not
        wait) gets its headers now, as a waiting stream does; a plain request can only wait."""
        if self.ex.finished or not self.stream or self.told_loading:
            return
        opening = b""
        if not self.ex.headers_sent:
            await self._start(200, sse.SSE_HEADERS + self._queue_headers(ticket)
                              + [(b"x-upstream", (ticket.box or "").encode())])
            opening = sse.queue_entered(0)
        await self._write(opening + self._loading_note(ticket.model))

    def _loading_note(self, model: str) -> bytes:
        self.told_loading = True
        note = sse.comment(f"model_loading={model}")
        if self.adm is not None and self.adm.reasoning:
            note += sse.reasoning_chunk("lmgate-queue-" + self.uid, self.rec.model, f"Loading {model}…\n")
        return note

    def _waiting_chunk(self, position: int, eta_ms: int | None) -> bytes:
        return sse.reasoning_chunk("lmgate-queue-" + self.uid, self.rec.model,
                                   sse.waiting_line(position, eta_ms))

    # -- upstream ------------------------------------------------------------------------
    def _build(self, upstream: Upstream) -> httpx.Request:
        scope = self.scope
        headers = scope["headers"] if self.upstream_headers is None else self.upstream_headers
        if self.stream:  # lmgate may add to this stream's bytes: they must come unencoded
            headers = [(k, v) for k, v in headers if k.lower() != b"accept-encoding"]
            headers.append((b"accept-encoding", b"identity"))
        return upstream.build(scope["method"], self.upstream_path, self.upstream_query, headers,
                              self.body, self.uid)

    def _sending(self, upstream: Upstream) -> None:
        self.forwarded = True
        self.upstream_name = self.rec.upstream = upstream.name

    async def _forward(self, ticket: Ticket | None) -> None:
        t_up = time.perf_counter()
        response = await forward(self.state.fleet, ticket, self._build,
                                 loading=None if ticket is None else (lambda: self._loading(ticket)),
                                 wait_again=self._wait_again, sending=self._sending)
        try:
            if self.ex.gone or self.ex.abort is not None:
                # interrupted while connecting, and the cancel did not reach us (asyncio's
                # wait_for can swallow one on Python 3.10/3.11): nobody is waiting for this
                # answer; close it, so the box stops generating, and leave as cancelled
                raise asyncio.CancelledError
            if self.ex.headers_sent:
                await self._relay_after_wait(response, t_up, ticket)
            else:
                await self._relay_direct(response, t_up, ticket)
        finally:
            await response.aclose()

    async def _wait_again(self, ticket: Ticket) -> None:
        """Its box refused it before anything was sent: back in line, for another box."""
        self.forwarded = False
        await self._wait_plain(ticket)

    async def _relay_direct(self, response: UpstreamResponse, t_up: float, ticket: Ticket | None) -> None:
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in RESPONSE_DROP]
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        # a stream that did not wait still says so, the way the team's clients expect
        prefix = STARTED_AT_ONCE if (ticket is not None and self.stream and is_sse
                                     and response.status_code == 200) else b""
        if is_sse:
            replaced = {name for name, _ in sse.NO_BUFFERING}
            if prefix or self._drops_usage(response):
                replaced |= CHANGED_BYTES_DROP
            headers = [(k, v) for k, v in headers if k.lower() not in replaced] + sse.NO_BUFFERING
        if ticket is not None:
            headers += self._queue_headers(ticket)
            headers.append((b"x-upstream", self.upstream_name.encode()))
            if not self.stream:
                headers.append((b"x-queue-wait-ms", str(int(self.rec.wait_ms or 0)).encode()))
        else:
            headers += self.id_header
        self.rec.status = response.status_code
        if response.status_code >= 400:
            self.rec.outcome = "upstream_error"
        await self._start(response.status_code, headers)
        await self._pump(response, t_up, is_sse, prefix, ticket)

    def _drops_usage(self, response: UpstreamResponse) -> bool:
        """lmgate asked for the usage chunk and the client did not: it is taken out again
        (only from bytes it can read, a stream answered 200 and not encoded)."""
        return (self.adm is not None and self.adm.drop_usage and response.status_code == 200
                and response.headers.get("content-encoding", "identity") == "identity")

    async def _relay_after_wait(self, response: UpstreamResponse, t_up: float, ticket: Ticket | None) -> None:
        self.rec.status = response.status_code
        started = sse.queue_position(0)
        if self.state.fleet.several:  # its headers left before a box was chosen
            started = sse.comment(f"upstream={self.upstream_name}") + started
        if response.status_code >= 400:
            self.rec.outcome = "upstream_error"
            body = await response.read_capped()
            await self._write(started
                              + sse.error_event(sse.upstream_error_message(response.status_code, body)))
            await self._end()
            return
        await self._pump(response, t_up, True, started, ticket)

    async def _pump(self, response: UpstreamResponse, t_up: float, is_sse: bool, prefix: bytes = b"",
                    ticket: Ticket | None = None) -> None:
        """Relay the body as it arrives. ``prefix`` (lmgate's own comments) goes out with the
        upstream's first bytes, in the same write, so it costs the first token nothing. What
        the response reports of its tokens is read on the way (``UsageMeter``); a running
        ticket's progress (first byte, tokens streamed) feeds the estimates. A broken box
        ends the relay with a ProxyError (``UpstreamResponse.broken``). With a quota shared by
        replicas, the tokens are in Redis before the client sees the end (``_settle``)."""
        send, boundary, rec = self.send, self.ex.boundary, self.rec
        meter = sse.UsageMeter(is_sse)
        remover = sse.UsageRemover() if is_sse and self._drops_usage(response) else None
        first = True
        # a quota shared by replicas: the count is in Redis before the client sees the end
        settle = self.adm is not None and self.adm.quota_key is not None and self.state.shared is not None
        left = None if is_sse or not settle else _declared_length(response)
        try:
            async for chunk in response.raw():
                if first:
                    first = False
                    rec.ttft_ms = (time.perf_counter() - t_up) * 1000
                    if ticket is not None:
                        ticket.first_byte_at = self.state.line.view.clock()
                meter.feed(chunk)
                if settle:
                    if left is not None:
                        left -= len(chunk)
                    if (b"data: [DONE]" in chunk) if is_sse else (left is not None and left <= 0):
                        settle = False  # the client's last bytes: counted first
                        await self._settle(meter, is_sse)
                if ticket is not None:
                    ticket.streamed = meter.deltas
                if remover is not None:
                    chunk = remover.feed(chunk)
                    if not chunk:
                        continue
                if prefix:
                    boundary.feed(prefix)
                    chunk, prefix = prefix + chunk, b""
                boundary.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:  # a broken or silent box
            self._count(meter, is_sse)
            raise response.broken(exc) from exc
        except BaseException:  # counted however it ended: a stream cut short used its tokens
            self._count(meter, is_sse)
            raise
        tail = (prefix + remover.flush()) if remover is not None else prefix
        if tail:
            await self._write(tail)
        if settle:
            await self._settle(meter, is_sse)
        await self._end()
        self._count(meter, is_sse)  # after the last byte: not on the client's clock

    async def _settle(self, meter: sse.UsageMeter, is_sse: bool) -> None:
        """Count what the response used against its key's quota now, before its end reaches
        the client (observing it later counts only what came after)."""
        self._count(meter, is_sse)
        rec = self.rec
        if rec.key and rec.total_tokens and rec.total_tokens > 0:
            rec.quota_counted = rec.total_tokens
            await self.state.quotas.settle(rec.key, rec.total_tokens)

    def _count(self, meter: sse.UsageMeter, is_sse: bool) -> None:
        rec = self.rec
        if rec.status < 400 or is_sse:
            rec.prompt_tokens, rec.completion_tokens, rec.total_tokens, rec.tokens_approx = meter.usage()

    # -- writing -------------------------------------------------------------------------
    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.ex.headers_sent = True
        self.rec.status = status  # what the client got, whatever happens after
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _write(self, data: bytes) -> None:
        self.ex.boundary.feed(data)
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def _end(self) -> None:
        self.ex.finished = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _fail(self, err: ProxyError) -> None:
        """Report an error on whatever the client has seen so far."""
        rec = self.rec
        if rec.outcome == "ok":
            rec.outcome = "timeout" if err.status in (503, 504) else "upstream_error"
        if isinstance(err, ShuttingDown):
            # refused while waiting (a rejection, counted as one), or cut off when the grace
            # ran out; the log says which status the client got
            rec.outcome = "shutting_down"
            rec.reason = None if self.forwarded else err.code
        if not self.ex.headers_sent:
            rec.status = err.status
            self.ex.finished = True  # before the last write: a disconnect now changes nothing
            await send_error(self.send, err, self.id_header)
            return
        if not self.ex.boundary.clean:
            # The upstream broke off inside an event: close that event so the error below
            # is read as an event of its own (the broken one is already lost).
            await self._write(b"\n\n")
        await self._write(err.sse_event())
        await self._end()

    def _ours(self) -> bool:
        """Was this cancellation ours (disconnect, shutdown, admin cancel)? Then it is absorbed;
        anyone else's (the server stopping the task) must go on up."""
        task = asyncio.current_task()
        if not (self.ex.gone or self.ex.abort) or task is None:
            return False
        if hasattr(task, "uncancel"):  # Python 3.11+ counts cancel requests; 3.10 does not
            task.uncancel()
        return True

    async def _interrupted(self) -> None:
        if self.ex.gone:
            self.rec.outcome = "client_gone"
            if not self.rec.status:
                self.rec.status = 499
            return
        assert self.ex.abort is not None
        await self._fail(self.ex.abort)

    def finish(self) -> None:
        self.rec.duration_ms = (time.perf_counter() - self.t0) * 1000
        self.state.observe(self.rec)


async def _nothing_to_receive() -> dict[str, object]:  # pragma: no cover - never read
    return {"type": "http.disconnect"}


async def _nowhere(message: dict[str, object]) -> None:  # pragma: no cover - replaced by a sink
    raise RuntimeError("a detached request answers through its sink")


def _declared_length(response: UpstreamResponse) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None
