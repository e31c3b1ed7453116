"""The team's old queue API (``/queue/add``, ``/stream/{id}``, ``/request/{id}``,
``/queue/status``, ``/health``), so its Streamlit pages work with only the URL changed.

Jobs go through the same gate, keys, limits and upstream as every other request, and they
belong to whoever submitted them: someone else's id gets the old server's answer for an
unknown id. Where the team's code depends on the old server it behaves like it (lenient
bodies, 422 ``detail`` errors, positions only while waiting); beyond that: positions are
real, tool-call deltas are kept, every ``/stream`` replays the job from its first chunk,
finished results are kept within ``--max-kept-results`` / ``--max-kept-bytes`` /
``--result-ttl``, and a job is cancelled as abandoned only when it has been generating for
``--stream-open-timeout`` seconds with no sign of interest from its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .auth import Principal
from .errors import ProxyError, QueueTimeout, ShuttingDown
from .gate import Ticket
from .gated import submit_ticket
from .inbound import Hold, apply_token_cap, header_map, parse_request, read_body
from .legacy_schema import parse_add
from .metrics import RequestRecord
from .routes import caller, error_response, viewer
from .streaming import read_usage, upstream_error_message
from .upstream import map_error, read_capped

if TYPE_CHECKING:
    from .state import AppState

log = logging.getLogger("lmgate")
ROUTE = "/queue/add"
POSITION_REPEAT_S = 2.0
SWEEP_EVERY_S = 1.0
EVENT_OVERHEAD = 80  # bytes a kept event costs beyond its text (string and list slot)
NOT_FOUND = {"error": "Request ID not found"}  # the old server's answer, status 200


def now_iso() -> str:
    return datetime.now().isoformat()


class Job:
    """One /queue/add request: its status record and every event it produced, for replay.
    The request body is held only until the job starts."""

    def __init__(self, client_id: str, body: bytes, who: Principal) -> None:
        self.id = str(uuid.uuid4())
        self.client_id = client_id
        self.body: bytes | None = body
        self.identity = who.identity
        self.label = who.label
        self.key_name = who.key.name if who.key is not None else None
        self.status = "queued"
        self.created_at = now_iso()
        self.started_at: str | None = None
        self.completed_at: str | None = None
        self.text: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.error: str | None = None
        self.queue_entered_position: int | None = None
        self.events: list[str] = []  # serialized, as sent on /stream
        self.size = 0  # bytes kept for this job, roughly
        self.changed = asyncio.Event()
        self.started_mono: float | None = None
        self.finished_at: float | None = None
        self.last_interest = time.monotonic()
        self.stream_opened = False
        self.ticket: Ticket | None = None
        self.task: asyncio.Task[None] | None = None
        self.hold: Hold | None = None

    def record(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "client_id": self.client_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "result": "".join(self.text) if self.status == "complete" and self.text else None,
            "tool_calls": self.tool_calls or None,
            "error": self.error,
            "queue_entered_position": self.queue_entered_position,
        }

    def emit(self, event: dict[str, Any], text: str = "") -> None:
        data = json.dumps(event)
        self.events.append(data)
        self.size += len(data) + len(text) + EVENT_OVERHEAD
        self.notify()

    def notify(self) -> None:
        """Wake every stream reading this job."""
        self.changed.set()
        self.changed = asyncio.Event()

    def merge_tool_calls(self, deltas: list[Any]) -> None:
        for d in deltas:
            if not isinstance(d, dict):
                continue
            idx = d.get("index", 0) if isinstance(d.get("index"), int) else 0
            while len(self.tool_calls) <= idx:
                self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            slot = self.tool_calls[idx]
            if d.get("id"):
                slot["id"] = d["id"]
            if d.get("type"):
                slot["type"] = d["type"]
            fn = d.get("function") or {}
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""


class LegacyQueue:
    """Extension object: routes, the jobs, and a sweeper for old results and abandoned jobs."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.jobs: dict[str, Job] = {}
        self.kept: OrderedDict[str, Job] = OrderedDict()  # finished, oldest first
        self.kept_bytes = 0
        self.stats: dict[str, Any] = {"total_received": 0, "total_processed": 0, "total_errors": 0}
        self.interest: dict[str, float] = {}  # identity -> last /stream or /request from it
        self.readers: dict[str, int] = {}  # identity -> open /stream connections
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for job in list(self.jobs.values()):
            if job.task is not None and not job.task.done():
                job.task.cancel()

    def cancel(self, request_id: str, reason: ProxyError) -> bool:
        """Admin cancel (or shutdown) of a job that is waiting or running."""
        job = self.jobs.get(request_id)
        if job is None or job.task is None or job.task.done():
            return False
        job.error = reason.message
        job.task.cancel()
        return True

    def cut_off(self, reason: ProxyError) -> None:
        """End of the shutdown grace: every running job ends with an error event."""
        for job in list(self.jobs.values()):
            if job.status == "processing":
                self.cancel(job.id, reason)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/queue/add", self.add, methods=["POST"]),
            Route("/queue/status", self.queue_status, methods=["GET"]),
            Route("/stream/{request_id}", self.stream, methods=["GET"]),
            Route("/request/{request_id}", self.request_status, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]

    # -- who may see what ----------------------------------------------------------------
    def _owned(self, request: Request) -> tuple[Principal, Job | None]:
        """The caller and the job the path names, if the caller may see it."""
        who = caller(self.state, request)
        job = self.jobs.get(request.path_params["request_id"])
        if job is not None and not (who.admin or who.identity == job.identity):
            job = None
        return who, job

    # -- endpoints -----------------------------------------------------------------------
    async def add(self, request: Request) -> Response:
        st = self.state
        headers = header_map(request.scope)
        client = st.client_of(request.scope, headers)
        hold: Hold | None = None
        try:
            who = st.auth.authenticate(headers, client)
            if st.draining:
                raise ShuttingDown("lmgate is shutting down")
            raw, hold = await read_body(request.receive, headers, st.settings.max_body, st.waiting_bytes)
            doc, problems = parse_add(raw)
            if doc is None:
                if hold is not None:
                    hold.release()
                self._refused(client, 422, "invalid_body")
                return JSONResponse({"detail": problems}, status_code=422)
            client_id = doc.pop("client_id")
            doc["stream"] = True  # the old server always streamed from upstream
            key = who.key
            if key is not None and key.has_quota:
                st.check_quota(key)
                doc["stream_options"] = {"include_usage": True}  # read here, never passed on
            body = json.dumps(doc).encode()
            doc = parse_request(body)
            st.auth.check_model(who, doc["model"])
            await st.check_servable(doc["model"])
            body = apply_token_cap(body, doc, st.auth.token_cap(who, doc, "max_tokens"))
            st.auth.check_rate(who)
            job = Job(client_id, body, who)
            ticket = Ticket(request_id=job.id, uid=job.id, model=doc["model"], identity=who.identity,
                            priority=key.priority if key is not None else 0,
                            meta={"client": who.label, "stream": True, "route": ROUTE, "admin": who.admin})
            submit_ticket(st, who, ticket)
        except ProxyError as err:
            if hold is not None:
                hold.release()
            self._refused(client, err.status, err.code)
            return error_response(err)
        st.metrics.label(ticket.model)
        job.ticket, job.hold = ticket, hold
        job.queue_entered_position = max(1, ticket.position_at_arrival)
        self.jobs[job.id] = job
        self.stats["total_received"] += 1
        job.task = asyncio.get_running_loop().create_task(self._run(job, ticket))
        return JSONResponse({"status": "queued", "request_id": job.id,
                             "queue_position": job.queue_entered_position},
                            headers={"x-request-id": job.id})

    def _refused(self, client: str, status: int, code: str | None) -> None:
        self.state.observe(RequestRecord(request_id="-", route=ROUTE, client=client,
                                         outcome="rejected", status=status, reason=code))

    async def stream(self, request: Request) -> Response:
        who, job = self._owned(request)
        if job is None:
            return JSONResponse(NOT_FOUND)
        job.stream_opened = True
        return EventSourceResponse(
            self._events(job, who.identity), ping=15, sep="\n",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            shutdown_grace_period=self.state.settings.shutdown_grace + 2)

    async def request_status(self, request: Request) -> Response:
        who, job = self._owned(request)
        if job is None:
            return JSONResponse(NOT_FOUND)
        now = time.monotonic()
        job.last_interest = self.interest[who.identity] = now  # polling is interest too
        return JSONResponse(job.record())

    async def queue_status(self, request: Request) -> Response:
        return JSONResponse({"queue_size": self.state.gate.depth, "stats": self._stats(request),
                             "tracked_requests": len(self.jobs)})

    async def health(self, request: Request) -> Response:
        st = self.state
        return JSONResponse({"status": "healthy", "lm_studio_url": st.upstream.base,
                             "queue_size": st.gate.depth, "stats": self._stats(request),
                             "version": __version__, "features": ["sse_queue_position_comments",
                                                                  "tool_calling", "openai_compatible"]})

    def _stats(self, request: Request) -> dict[str, Any]:
        """The old counters; ``current_request_id`` only to its owner (or an admin)."""
        who = viewer(self.state, request)
        current = None
        for t in self.state.gate.running:
            if who is not None and (who.admin or who.identity == t.identity):
                current = t.request_id
                break
        return {**self.stats, "current_request_id": current}

    # -- the stream a page reads ---------------------------------------------------------
    async def _events(self, job: Job, identity: str) -> AsyncIterator[str]:
        self.readers[identity] = self.readers.get(identity, 0) + 1
        self.interest[identity] = time.monotonic()
        try:
            async for event in self._replay(job):
                yield event
        finally:
            left = self.readers.get(identity, 1) - 1
            if left:
                self.readers[identity] = left
            else:
                self.readers.pop(identity, None)
            self.interest[identity] = time.monotonic()

    async def _replay(self, job: Job) -> AsyncIterator[str]:
        gate = self.state.gate
        last_pos: int | None = None
        last_sent = 0.0
        while job.status == "queued" and job.ticket is not None:
            pos = gate.position(job.ticket)
            now = time.monotonic()
            if pos > 0 and (pos != last_pos or now - last_sent >= POSITION_REPEAT_S):
                yield json.dumps({"position": pos})
                last_pos, last_sent = pos, now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.changed.wait(), timeout=0.5)
        sent = 0
        while True:
            while sent < len(job.events):
                yield job.events[sent]
                sent += 1
            if job.status in ("complete", "error"):
                yield json.dumps({"done": True} if job.status == "complete"
                                 else {"error": job.error or "request failed"})
                return
            await job.changed.wait()

    # -- running a job -------------------------------------------------------------------
    async def _run(self, job: Job, ticket: Ticket) -> None:
        st = self.state
        rec = RequestRecord(request_id=job.id, route=ROUTE, client=job.label, model=ticket.model,
                            stream=True, position=ticket.position_at_arrival, key=job.key_name)
        t0 = time.perf_counter()
        try:
            await self._wait_turn(ticket)
            key = st.auth.key_named(job.key_name)
            if key is not None and key.has_quota and ticket.position_at_arrival > 0:
                st.check_quota(key)  # again as its turn comes, as for every gated request
            job.status, job.started_at, job.started_mono = "processing", now_iso(), time.monotonic()
            job.notify()
            rec.wait_ms = ticket.waited_s(time.monotonic()) * 1000
            await self._generate(job, rec)
            job.status = "complete"
            self.stats["total_processed"] += 1
            rec.status = 200
        except asyncio.CancelledError:
            job.status, job.error = "error", job.error or "cancelled"
            rec.outcome, rec.status = "client_gone", 499
            if rec.wait_ms is None:
                rec.wait_ms = ticket.waited_s(time.monotonic()) * 1000
            self.stats["total_errors"] += 1
        except ProxyError as err:
            job.status, job.error = "error", err.message
            rec.status = err.status
            rec.outcome = "timeout" if isinstance(err, QueueTimeout) or err.status == 504 else "upstream_error"
            if isinstance(err, ShuttingDown):
                rec.outcome = "shutting_down"
                rec.reason = err.code if job.started_mono is None else None
            self.stats["total_errors"] += 1
        except Exception as exc:  # a bug must still end the job and free the gate
            log.exception("legacy job %s failed", job.id)
            job.status, job.error = "error", f"internal error: {type(exc).__name__}"
            rec.outcome, rec.status = "upstream_error", 500
            self.stats["total_errors"] += 1
        finally:
            st.gate.release(ticket)
            self._drop_body(job)
            job.completed_at = now_iso()
            job.finished_at = time.monotonic()
            job.notify()
            self._keep(job)
            rec.duration_ms = (time.perf_counter() - t0) * 1000
            st.remember(ticket, rec)
            st.observe(rec)

    def _drop_body(self, job: Job) -> None:
        job.body = None
        if job.hold is not None:
            job.hold.release()

    async def _wait_turn(self, ticket: Ticket) -> None:
        timeout = self.state.settings.queue_timeout
        await asyncio.wait((ticket.waiter,), timeout=max(0.0, ticket.arrived_at + timeout - time.monotonic()))
        if not ticket.waiter.done():
            self.state.gate.cancel(ticket)
            raise QueueTimeout(f"waited {timeout:g} s without reaching the front")
        err = ticket.waiter.exception()
        if err is not None:
            raise err

    async def _generate(self, job: Job, rec: RequestRecord) -> None:
        st = self.state
        assert job.body is not None
        if job.ticket is not None:
            await st.prepare(job.ticket)
        upstream = st.upstream_for(job.ticket)
        rec.upstream = upstream.name
        req = upstream.build("POST", "/v1/chat/completions", b"",
                             [(b"content-type", b"application/json")], job.body, job.id)
        self._drop_body(job)  # handed on: a running job holds no request body
        t_up = time.perf_counter()
        response = await upstream.send(req)
        try:
            if response.status_code >= 400:
                raw = await read_capped(response)
                error = upstream_error_message(response.status_code, raw)["error"]
                raise ProxyError(error["message"], code=error["code"])
            buf = b""
            try:
                async for chunk in response.aiter_raw():
                    if rec.ttft_ms is None:
                        rec.ttft_ms = (time.perf_counter() - t_up) * 1000
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        self._line(job, rec, line.strip())
            except httpx.HTTPError as exc:
                raise map_error(exc) from exc
            if buf.strip():
                self._line(job, rec, buf.strip())
        finally:
            await response.aclose()

    def _line(self, job: Job, rec: RequestRecord, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]" or not payload:
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if "error" in doc:
            err = doc["error"]
            raise ProxyError(str(err.get("message") if isinstance(err, dict) else err), code="upstream_error")
        usage = read_usage(doc)
        if usage is not None:
            rec.prompt_tokens, rec.completion_tokens, rec.total_tokens, _ = usage
        choices = doc.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return
        delta = choices[0].get("delta") or {}
        content = delta.get("content")
        if content:
            job.text.append(content)
            if rec.completion_tokens is None or rec.tokens_approx:
                rec.completion_tokens = (rec.completion_tokens or 0) + 1
                rec.tokens_approx = True
            job.emit({"chunk": content}, content)
        elif delta.get("tool_calls"):
            job.merge_tool_calls(delta["tool_calls"])
            job.emit({"delta": {k: v for k, v in delta.items() if v is not None},
                      "finish_reason": choices[0].get("finish_reason")})

    # -- keeping results within bounds ---------------------------------------------------
    def _keep(self, job: Job) -> None:
        self.kept[job.id] = job
        self.kept_bytes += job.size
        settings = self.state.settings
        while self.kept and (len(self.kept) > settings.max_kept_results
                             or self.kept_bytes > settings.max_kept_bytes):
            self._forget(next(iter(self.kept)))

    def _forget(self, job_id: str) -> None:
        job = self.kept.pop(job_id)
        self.kept_bytes -= job.size
        self.jobs.pop(job_id, None)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        settings = self.state.settings
        for job_id, job in list(self.kept.items()):
            if job.finished_at is not None and now - job.finished_at >= settings.result_ttl:
                self._forget(job_id)
        patience = settings.stream_open_timeout
        for job in list(self.jobs.values()):
            if job.status == "processing" and not job.stream_opened and self._abandoned(job, now, patience):
                self.cancel(job.id, ProxyError("nobody opened /stream for this request in time; it "
                                               "was cancelled", code="stream_not_opened"))
        for identity, seen in list(self.interest.items()):
            if now - seen > patience and identity not in self.readers:
                del self.interest[identity]

    def _abandoned(self, job: Job, now: float, patience: float) -> bool:
        """Generating for ``patience`` seconds with no sign of life from its owner: no stream
        of theirs open, no stream opened or poll of theirs in that time."""
        if job.identity in self.readers:
            return False
        last = max(job.started_mono or now, job.last_interest, self.interest.get(job.identity, 0.0))
        return now - last >= patience
