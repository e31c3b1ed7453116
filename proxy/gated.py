"""One gated request, start to end: admit, wait its turn, forward, relay, release.

Written as plain ASGI so that lmgate decides exactly when headers go out, can watch for
a client disconnect while it waits or relays, and always releases its gate slot:

    handler task ──┬── admission (auth, body, limits, gate.submit)
                   ├── wait for turn  (queue comments for streams; timeout; shutdown)
                   ├── forward upstream, relay bytes as they arrive
                   └── finally: gate.release(ticket)   <- every path goes through here
    watcher task ───── receive() -> http.disconnect: mark gone, cancel the handler task

Shutdown and admin cancellation use the same route as a disconnect: they set a reason on
the exchange and cancel the handler task, which turns the reason into an error response
or a final SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httpx

from . import streaming as sse
from .config import FEEDBACK_MODES
from .errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ProxyError,
    QueueFullError,
    QueueTimeout,
    ShuttingDown,
    UpstreamUnavailable,
)
from .exchange import Exchange, watch_disconnect
from .gate import RUNNING, GateClosed, QueueFull, Ticket
from .inbound import (
    ClientGone,
    Hold,
    Receive,
    Scope,
    Send,
    apply_token_cap,
    ask_for_usage,
    client_request_id,
    header_map,
    new_id,
    parse_request,
    read_body,
    send_error,
    token_limit,
)
from .metrics import RequestRecord
from .upstream import RESPONSE_DROP, map_error, read_capped

if TYPE_CHECKING:
    from .auth import Principal
    from .config import ApiKey
    from .state import AppState

log = logging.getLogger("lmgate")
LISTING_CAP = 4 * 1024 * 1024  # a box's model listing, read to merge several boxes' lists
# The field a key's max_tokens cap is written into when a request names none.
TOKEN_FIELD = {
    "/v1/chat/completions": "max_tokens", "/api/v0/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens", "/api/v0/completions": "max_tokens",
    "/v1/messages": "max_tokens", "/v1/responses": "max_output_tokens",
    "/api/v1/chat": "max_output_tokens",
}


STARTED_AT_ONCE = sse.queue_entered(0) + sse.queue_position(0)
# Model listings answered with every box's models when there are several boxes.
MERGED_LISTINGS = {"/v1/models": ("data", "id"), "/api/v0/models": ("data", "id"),
                   "/api/v1/models": ("models", "key")}
MODEL_DETAIL_ROUTES = frozenset({"/v1/models/{id}", "/api/v0/models/{id}"})
# Streams that may carry lmgate's waiting line as reasoning_content (chat UIs show it).
FEEDBACK_ROUTES = frozenset({"/v1/chat/completions", "/api/v0/chat/completions"})


def feedback_mode(headers: dict[bytes, bytes], who: Principal, default: str) -> str:
    """``X-Queue-Feedback`` over the key's ``feedback`` over ``--feedback``."""
    raw = headers.get(b"x-queue-feedback")
    if raw is not None:
        value = raw.decode("latin-1").strip().lower()
        if value not in FEEDBACK_MODES:
            raise BadRequest(f"X-Queue-Feedback must be one of {', '.join(FEEDBACK_MODES)}, got "
                             f"{value[:40]!r}", param="X-Queue-Feedback", code="invalid_header")
        return value
    if who.key is not None and who.key.feedback:
        return who.key.feedback
    return default


def submit_ticket(st: AppState, who: Principal, ticket: Ticket) -> None:
    """Put a ticket in the gate, within the caller's per-key limit; ProxyErrors otherwise."""
    key = who.key
    if key is not None and key.max_queued is not None and st.gate.waiting_for(who.identity) >= key.max_queued:
        raise QueueFullError(f"key '{key.name}' already has {key.max_queued} requests waiting",
                             code="key_queue_full", retry_after_s=st.eta.retry_after_s(st.gate))
    ticket.waiter = asyncio.get_running_loop().create_future()
    try:
        st.gate.submit(ticket)
    except QueueFull:
        raise QueueFullError(f"the queue is full ({st.gate.max_queue} requests waiting); try again "
                             "later", retry_after_s=st.eta.retry_after_s(st.gate)) from None
    except GateClosed:
        raise ShuttingDown("lmgate is shutting down") from None
    if ticket.state != RUNNING:
        st.watch_aging()


class GatedRequest:
    """Runs one request through the gate. Created per request by the app."""

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
        self.body = b""
        self.hold: Hold | None = None  # this request's share of --max-waiting-bytes
        self.forwarded = False  # sent upstream
        self.stream = False
        self.reasoning = False  # tell the waiting line as reasoning_content chunks
        self.drop_usage = False  # lmgate asked for the usage chunk; the client did not
        self.quota_key: ApiKey | None = None  # its key has a token quota
        self.told_loading = False  # the stream was told its model is being loaded
        self.eta_ms: int | None = None  # estimated wait, taken once at arrival
        self.upstream_name = ""  # the box it was sent to
        self.id_header = [(b"x-request-id", self.rid.encode())]

    # -- entry ---------------------------------------------------------------------------
    async def run(self) -> None:
        st = self.state
        try:
            ticket = await self._admit()
        except ClientGone:
            self.rec.outcome, self.rec.status = "client_gone", 499
            self._finish()
            return
        except ProxyError as err:
            self.rec.outcome, self.rec.status, self.rec.reason = "rejected", err.status, err.code
            await send_error(self.send, err, self.id_header)
            self._finish()
            return
        st.exchanges[ticket] = self.ex
        watcher = asyncio.create_task(watch_disconnect(self.receive, self.ex))
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
            watcher.cancel()
            self._leave(ticket)
            if self.rec.wait_ms is None:  # time actually spent in line, also when it left early
                self.rec.wait_ms = ticket.waited_s(time.monotonic()) * 1000
            st.remember(ticket, self.rec)
            self._finish()

    def _leave(self, ticket: Ticket) -> None:
        """Give back the gate slot and the held body bytes. Idempotent."""
        self.ex.finished = True  # from here on, interrupts change nothing
        self.state.gate.release(ticket)
        self.state.exchanges.pop(ticket, None)
        if self.hold is not None:
            self.hold.release()

    async def passthrough(self, *, admin_only: bool) -> None:
        """Forward at once, without the gate (model listings; admin model management)."""
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
                self.rec.outcome, self.rec.status, self.rec.reason = "rejected", err.status, err.code
                await send_error(self.send, err, self.id_header)
                return
            watcher = asyncio.create_task(watch_disconnect(self.receive, self.ex))
            allowed = None if who.admin else st.auth.allowed_models(who)
            if self.rec.route in MODEL_DETAIL_ROUTES and allowed is not None:
                model = unquote(self.scope["path"].rsplit("/", 1)[-1])
                if not st.auth.may_use(who, model):
                    raise NotFound(f"The model '{model}' does not exist or this key may not use it",
                                   param="model", code="model_not_found")
            if self.scope["method"] == "GET" and self.rec.route in MERGED_LISTINGS and (
                    st.several or allowed is not None):
                await self._merged_listing(who)
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
            self._finish()

    async def _merged_listing(self, who: Principal) -> None:
        """With several boxes a model listing is every box's, merged (first box wins for a
        model that several list), so a chat UI offers every model any box serves; a key with
        an allowlist sees only the models it may use (a chat UI would offer the others, then
        get 403)."""
        st, scope = self.state, self.scope
        field_name, id_key = MERGED_LISTINGS[self.rec.route]
        limited = not who.admin and st.auth.allowed_models(who) is not None

        async def one(up: Any) -> list[Any] | None:
            request = up.build("GET", scope["path"], scope.get("query_string", b""), scope["headers"], b"",
                               self.uid)
            try:
                response = await up.send(request)
            except ProxyError:
                return None
            try:
                body = await read_capped(response, LISTING_CAP)
            finally:
                await response.aclose()
            if response.status_code != 200:
                return None
            try:
                items = json.loads(body).get(field_name)
            except (ValueError, AttributeError):
                return None
            return items if isinstance(items, list) else None

        boxes = [up for up in st.upstreams.values() if up.up is not False]
        lists = await asyncio.gather(*(one(up) for up in boxes))
        if all(items is None for items in lists):
            raise UpstreamUnavailable("no upstream answered the model listing")
        merged: list[Any] = []
        seen: set[str] = set()
        for items in lists:
            for item in items or []:
                key = item.get(id_key) if isinstance(item, dict) else None
                if isinstance(key, str) and key in seen:
                    continue
                if limited and not (isinstance(key, str) and st.auth.may_use(who, key)):
                    continue
                if isinstance(key, str):
                    seen.add(key)
                merged.append(item)
        doc: dict[str, Any] = {"object": "list", field_name: merged} if field_name == "data" \
            else {field_name: merged}
        body = json.dumps(doc).encode()
        self.rec.status = 200
        await self._start(200, [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *self.id_header])
        self.ex.finished = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _admit(self) -> Ticket:
        try:
            return await self._admit_or_fail()
        except BaseException:
            if self.hold is not None:
                self.hold.release()
            raise

    async def _admit_or_fail(self) -> Ticket:
        st = self.state
        who = st.auth.authenticate(self.headers, self.rec.client)
        self.rec.client = who.label
        if st.draining:
            raise ShuttingDown("lmgate is shutting down")
        self.body, self.hold = await read_body(self.receive, self.headers, st.settings.max_body,
                                               st.waiting_bytes)
        doc = parse_request(self.body)
        model = doc["model"]
        self.rec.model, self.stream = model, doc.get("stream") is True
        self.rec.stream = self.stream
        st.auth.check_model(who, model)
        await st.check_servable(model)
        if self.stream and self.rec.route in FEEDBACK_ROUTES:
            self.reasoning = feedback_mode(self.headers, who, st.settings.feedback) == "reasoning"
        cap = st.auth.token_cap(who, doc, TOKEN_FIELD.get(self.rec.route))
        self.body = apply_token_cap(self.body, doc, cap)
        key = who.key
        if key is not None:
            self.rec.key = key.name
            if key.has_quota:
                st.check_quota(key)
                self.body, self.drop_usage = ask_for_usage(self.body, doc, self.rec.route)
                self.quota_key = key
        st.auth.check_rate(who)
        ticket = Ticket(request_id=self.rid, uid=self.uid, model=model, identity=who.identity,
                        priority=key.priority if key is not None else 0,
                        max_tokens=token_limit(doc, cap),
                        meta={"client": who.label, "stream": self.stream, "route": self.rec.route,
                              "admin": who.admin})
        submit_ticket(st, who, ticket)
        st.metrics.label(model)  # admitted: claim a label slot, in arrival order
        self.rec.position = ticket.position_at_arrival
        if ticket.position_at_arrival > 0:
            self.eta_ms = st.eta.eta_ms(st.gate, ticket)
        return ticket

    # -- waiting -------------------------------------------------------------------------
    def _queue_headers(self, ticket: Ticket) -> list[tuple[bytes, bytes]]:
        out = self.id_header + [
            (b"x-queue-position", str(ticket.position_at_arrival).encode()),
            (b"x-queue-depth", str(ticket.depth_at_arrival).encode()),
        ]
        if self.eta_ms is not None:
            out.append((b"x-queue-eta-ms", str(self.eta_ms).encode()))
        return out

    async def _serve(self, ticket: Ticket) -> None:
        if ticket.state != RUNNING:
            if self.stream:
                await self._wait_streaming(ticket)
            else:
                await self._wait_plain(ticket)
        self.rec.wait_ms = ticket.waited_s(time.monotonic()) * 1000
        if self.hold is not None:
            self.hold.release()
        if self.quota_key is not None and ticket.position_at_arrival > 0:
            # checked again as its turn comes: requests admitted together must not all spend
            # a quota that the first of them used up
            self.state.check_quota(self.quota_key)
        await self._forward(ticket)

    def _deadline(self, ticket: Ticket) -> float:
        return ticket.arrived_at + self.state.settings.queue_timeout

    async def _wait_plain(self, ticket: Ticket) -> None:
        timeout = max(0.0, self._deadline(ticket) - time.monotonic())
        await asyncio.wait((ticket.waiter,), timeout=timeout)
        self._check_turn(ticket)

    def _check_turn(self, ticket: Ticket) -> None:
        if not ticket.waiter.done():
            self.state.gate.cancel(ticket)
            raise QueueTimeout(f"waited {self.state.settings.queue_timeout:g} s without reaching "
                               "the front of the queue", retry_after_s=self.state.eta.retry_after_s(self.state.gate))
        err = ticket.waiter.exception()
        if err is not None:
            raise err

    async def _wait_streaming(self, ticket: Ticket) -> None:
        gate = self.state.gate
        await self._start(200, sse.SSE_HEADERS + self._queue_headers(ticket))
        last = ticket.position_at_arrival
        opening = sse.queue_entered(last) + sse.queue_position(last)
        if self.eta_ms is not None:
            opening += sse.comment(f"queue_eta_ms={self.eta_ms}")
        if self.reasoning:
            opening += self._waiting_chunk(last, self.eta_ms)
        await self._write(opening)
        deadline = self._deadline(ticket)
        last_write = time.monotonic()
        while not ticket.waiter.done():
            now = time.monotonic()
            if now >= deadline:
                break
            step = min(sse.POSITION_MIN_INTERVAL_S, deadline - now)
            await asyncio.wait((ticket.waiter,), timeout=step)
            if ticket.waiter.done():
                break
            now = time.monotonic()
            pos = gate.position(ticket)
            if pos != last and pos > 0:
                last = pos
                update = sse.queue_position(pos)
                if self.reasoning:
                    update += self._waiting_chunk(pos, self.state.eta.eta_ms(gate, ticket, pos))
                await self._write(update)
                last_write = now
            elif not self.told_loading and self.state.model_loading(ticket.model):
                await self._write(self._loading_note(ticket.model))
                last_write = now
            elif now - last_write >= sse.KEEPALIVE_S:
                await self._write(sse.keepalive())
                last_write = now
        self._check_turn(ticket)

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
        if self.reasoning:
            note += sse.reasoning_chunk("lmgate-queue-" + self.uid, self.rec.model, f"Loading {model}…\n")
        return note

    def _waiting_chunk(self, position: int, eta_ms: int | None) -> bytes:
        return sse.reasoning_chunk("lmgate-queue-" + self.uid, self.rec.model,
                                   sse.waiting_line(position, eta_ms))

    # -- upstream ------------------------------------------------------------------------
    async def _forward(self, ticket: Ticket | None) -> None:
        st, scope = self.state, self.scope
        for _ in range(len(st.upstreams) + 1):
            if ticket is not None:
                await st.prepare(ticket, lambda _model: self._loading(ticket))
            upstream = st.upstream_for(ticket)
            request = upstream.build(scope["method"], scope["path"], scope.get("query_string", b""),
                                     scope["headers"], self.body, self.uid)
            t_up = time.perf_counter()
            self.forwarded = True
            self.upstream_name = self.rec.upstream = upstream.name
            try:
                response = await upstream.send(request)
            except ProxyError as err:
                upstream.mark_failed()
                if ticket is None or not err.refused or not st.reroute(ticket):
                    raise
            else:
                if self.ex.gone or self.ex.abort is not None:
                    # interrupted while connecting, and the cancel did not reach us (asyncio's
                    # wait_for can swallow one on Python 3.10/3.11): nobody is waiting for this
                    # answer; close it, so the box stops generating, and leave as cancelled
                    await response.aclose()
                    raise asyncio.CancelledError
                break
            # refused before anything was sent: back in line, for another box
            self.forwarded = False
            await self._wait_plain(ticket)
        else:  # pragma: no cover - every box refused in turn; the last refusal was raised
            raise UpstreamUnavailable("no upstream accepted the connection")
        try:
            if self.ex.headers_sent:
                await self._relay_after_wait(response, t_up, ticket)
            else:
                await self._relay_direct(response, t_up, ticket)
        finally:
            await response.aclose()

    async def _relay_direct(self, response: httpx.Response, t_up: float, ticket: Ticket | None) -> None:
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in RESPONSE_DROP]
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        if is_sse:
            replaced = {name for name, _ in sse.NO_BUFFERING}
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
        # a stream that did not wait still says so, the way the team's clients expect
        prefix = STARTED_AT_ONCE if ticket is not None and self.stream and is_sse and response.status_code == 200 else b""
        await self._pump(response, t_up, is_sse, prefix, ticket)

    async def _relay_after_wait(self, response: httpx.Response, t_up: float, ticket: Ticket | None) -> None:
        self.rec.status = response.status_code
        started = sse.queue_position(0)
        if self.state.several:  # its headers left before a box was chosen
            started = sse.comment(f"upstream={self.upstream_name}") + started
        if response.status_code >= 400:
            self.rec.outcome = "upstream_error"
            body = await read_capped(response)
            await self._write(started
                              + sse.error_event(sse.upstream_error_message(response.status_code, body)))
            await self._end()
            return
        await self._pump(response, t_up, True, started, ticket)

    async def _pump(self, response: httpx.Response, t_up: float, is_sse: bool, prefix: bytes = b"",
                    ticket: Ticket | None = None) -> None:
        """Relay the body as it arrives. ``prefix`` (lmgate's own comments) goes out with the
        upstream's first bytes, in the same write, so it costs the first token nothing. What
        the response reports of its tokens is read on the way (``UsageMeter``); a running
        ticket's progress (first byte, tokens streamed) feeds the estimates."""
        send, boundary, rec = self.send, self.ex.boundary, self.rec
        meter = sse.UsageMeter(is_sse)
        remover = sse.UsageRemover() if is_sse and self.drop_usage and rec.status == 200 else None
        first = True
        try:
            async for chunk in response.aiter_raw():
                if first:
                    first = False
                    rec.ttft_ms = (time.perf_counter() - t_up) * 1000
                    if ticket is not None:
                        ticket.first_byte_at = time.monotonic()
                meter.feed(chunk)
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
        except httpx.HTTPError as exc:
            failed = self.state.upstreams.get(self.upstream_name)
            if failed is not None:
                failed.mark_failed()
            raise map_error(exc) from exc
        finally:  # counted however it ended: a stream cut short still used its tokens
            if rec.status < 400 or is_sse:
                rec.prompt_tokens, rec.completion_tokens, rec.total_tokens, rec.tokens_approx = \
                    meter.usage()
        tail = (prefix + remover.flush()) if remover is not None else prefix
        if tail:
            await self._write(tail)
        await self._end()

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

    def _finish(self) -> None:
        self.rec.duration_ms = (time.perf_counter() - self.t0) * 1000
        self.state.observe(self.rec)

