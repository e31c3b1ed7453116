"""The team's old queue API (``/queue/add``, ``/stream/{id}``, ``/request/{id}``,
``/queue/status``, ``/health``), so its Streamlit pages work with only the URL changed.

Jobs go through the same gate, limits and upstream as every other request. Unlike the old
server: positions are real, tool-call deltas are kept, every ``/stream`` replays the job
from its first chunk, finished jobs are kept for ``--result-ttl`` seconds and then dropped,
and a job whose stream nobody opens within ``--stream-open-timeout`` seconds is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .errors import BadRequest, NotFound, ProxyError, QueueTimeout, ShuttingDown
from .gate import Ticket
from .gated import submit_ticket
from .inbound import client_address, header_map, parse_request, read_body
from .metrics import RequestRecord
from .routes import error_response
from .streaming import upstream_error_message
from .upstream import map_error, read_capped

if TYPE_CHECKING:
    from .app import AppState

log = logging.getLogger("lmgate")
ROUTE = "/queue/add"
POSITION_REPEAT_S = 2.0
SWEEP_EVERY_S = 5.0


def now_iso() -> str:
    return datetime.now().isoformat()


class Job:
    """One /queue/add request: its status record and every event it produced, for replay."""

    def __init__(self, client_id: str, body: dict[str, Any], identity: str, label: str) -> None:
        self.id = str(uuid.uuid4())
        self.client_id = client_id
        self.body = body
        self.identity = identity
        self.label = label
        self.status = "queued"
        self.created_at = now_iso()
        self.started_at: str | None = None
        self.completed_at: str | None = None
        self.text: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.error: str | None = None
        self.queue_entered_position: int | None = None
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.finished_at: float | None = None
        self.stream_opened = False
        self.created_mono = time.monotonic()
        self.ticket: Ticket | None = None
        self.task: asyncio.Task[None] | None = None

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

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.notify()

    def notify(self) -> None:
        """Wake every stream reading this job."""
        self.changed.set()
        self.changed = asyncio.Event()

    def merge_tool_calls(self, deltas: list[dict[str, Any]]) -> None:
        for d in deltas:
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
    """Extension object: routes plus a sweeper that drops old results."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.jobs: dict[str, Job] = {}
        self.stats: dict[str, Any] = {"total_received": 0, "total_processed": 0, "total_errors": 0,
                                      "current_request_id": None}
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
        """Admin cancel of a job that is waiting or running."""
        job = self.jobs.get(request_id)
        if job is None or job.task is None or job.task.done():
            return False
        job.error = reason.message
        job.task.cancel()
        return True

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/queue/add", self.add, methods=["POST"]),
            Route("/queue/status", self.queue_status, methods=["GET"]),
            Route("/stream/{request_id}", self.stream, methods=["GET"]),
            Route("/request/{request_id}", self.request_status, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]

    # -- endpoints -----------------------------------------------------------------------
    async def add(self, request: Request) -> Response:
        st = self.state
        headers = header_map(request.scope)
        try:
            who = st.auth.authenticate(headers, client_address(request.scope))
            if st.draining:
                raise ShuttingDown("lmgate is shutting down")
            raw = await read_body(request.receive, headers, st.settings.max_body)
            doc = _parse_add(raw)
            st.auth.check_model(who, doc["model"])
            st.metrics.label(doc["model"])
            st.auth.check_rate(who)
            client_id = doc.pop("client_id")
            doc["stream"] = True
            job = Job(client_id, doc, who.identity, who.label)
            ticket = Ticket(request_id=job.id, model=doc["model"], identity=who.identity,
                            meta={"client": who.label, "stream": True, "route": ROUTE, "admin": who.admin})
            submit_ticket(st, who, ticket)
        except ProxyError as err:
            rec = RequestRecord(request_id="-", route=ROUTE, client=client_address(request.scope),
                                outcome="rejected", status=err.status, reason=err.code)
            st.observe(rec)
            return error_response(err)
        job.ticket = ticket
        job.queue_entered_position = max(1, ticket.position_at_arrival)
        self.jobs[job.id] = job
        self.stats["total_received"] += 1
        job.task = asyncio.get_running_loop().create_task(self._run(job, ticket))
        return JSONResponse({"status": "queued", "request_id": job.id,
                             "queue_position": job.queue_entered_position},
                            headers={"x-request-id": job.id})

    async def stream(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["request_id"])
        if job is None:
            return _not_found(request.path_params["request_id"])
        job.stream_opened = True
        return EventSourceResponse(self._events(job), ping=15, sep="\n",
                                   headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def request_status(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["request_id"])
        if job is None:
            return _not_found(request.path_params["request_id"])
        return JSONResponse(job.record())

    async def queue_status(self, request: Request) -> Response:
        return JSONResponse({"queue_size": self.state.gate.depth, "stats": self._stats(),
                             "tracked_requests": len(self.jobs)})

    async def health(self, request: Request) -> Response:
        st = self.state
        return JSONResponse({"status": "healthy", "lm_studio_url": st.upstream.base,
                             "queue_size": st.gate.depth, "stats": self._stats(),
                             "version": __version__, "features": ["sse_queue_position_comments",
                                                                  "tool_calling", "openai_compatible"]})

    def _stats(self) -> dict[str, Any]:
        running = self.state.gate.running
        return {**self.stats, "current_request_id": running[0].request_id if running else None}

    # -- the stream a page reads ---------------------------------------------------------
    async def _events(self, job: Job) -> AsyncIterator[str]:
        gate = self.state.gate
        last_pos: int | None = None
        last_sent = 0.0
        while job.status == "queued" and job.ticket is not None:
            pos = gate.position(job.ticket)
            now = time.monotonic()
            if pos > 0 and (pos != last_pos or now - last_sent >= POSITION_REPEAT_S):
                yield _data({"position": pos})
                last_pos, last_sent = pos, now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.changed.wait(), timeout=0.5)
        if job.status != "queued" and job.started_at is not None:
            yield _data({"position": 0})
        sent = 0
        while True:
            while sent < len(job.events):
                yield _data(job.events[sent])
                sent += 1
            if job.status in ("complete", "error"):
                if job.status == "complete":
                    yield _data({"done": True})
                else:
                    yield _data({"error": job.error or "request failed"})
                return
            await job.changed.wait()

    # -- running a job -------------------------------------------------------------------
    async def _run(self, job: Job, ticket: Ticket) -> None:
        st = self.state
        rec = RequestRecord(request_id=job.id, route=ROUTE, client=job.label, model=ticket.model,
                            stream=True, position=ticket.position_at_arrival)
        t0 = time.perf_counter()
        try:
            await self._wait_turn(job, ticket)
            job.status, job.started_at = "processing", now_iso()
            job.notify()
            rec.wait_ms = ticket.waited_s(time.monotonic()) * 1000
            await self._generate(job, rec, t0)
            job.status = "complete"
            self.stats["total_processed"] += 1
            rec.status = 200
        except asyncio.CancelledError:
            job.status, job.error = "error", job.error or "cancelled"
            rec.outcome, rec.status = "client_gone", 499
            self.stats["total_errors"] += 1
        except ProxyError as err:
            job.status, job.error = "error", err.message
            rec.status = err.status
            rec.outcome = "timeout" if isinstance(err, QueueTimeout) or err.status == 504 else "upstream_error"
            self.stats["total_errors"] += 1
        except Exception as exc:  # a bug must still end the job and free the gate
            log.exception("legacy job %s failed", job.id)
            job.status, job.error = "error", f"internal error: {type(exc).__name__}"
            rec.outcome, rec.status = "upstream_error", 500
            self.stats["total_errors"] += 1
        finally:
            st.gate.release(ticket)
            job.completed_at = now_iso()
            job.finished_at = time.monotonic()
            job.notify()
            rec.duration_ms = (time.perf_counter() - t0) * 1000
            st.remember(ticket, rec)
            st.observe(rec)

    async def _wait_turn(self, job: Job, ticket: Ticket) -> None:
        settings = self.state.settings
        deadline = ticket.arrived_at + settings.queue_timeout
        open_deadline = job.created_mono + settings.stream_open_timeout
        while not ticket.waiter.done():
            now = time.monotonic()
            if now >= deadline:
                self.state.gate.cancel(ticket)
                raise QueueTimeout(f"waited {settings.queue_timeout:g} s without reaching the front")
            if not job.stream_opened and now >= open_deadline:
                self.state.gate.cancel(ticket)
                raise ProxyError("nobody opened /stream for this request in time; it was cancelled",
                                 code="stream_not_opened")
            await asyncio.wait((ticket.waiter,), timeout=min(deadline, open_deadline) - now
                               if not job.stream_opened else deadline - now)
        err = ticket.waiter.exception()
        if err is not None:
            raise err

    async def _generate(self, job: Job, rec: RequestRecord, t0: float) -> None:
        st = self.state
        body = json.dumps(job.body).encode()
        req = st.upstream.build("POST", "/v1/chat/completions", b"",
                                [(b"content-type", b"application/json")], body)
        t_up = time.perf_counter()
        response = await st.upstream.send(req)
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
        usage = doc.get("usage")
        if isinstance(usage, dict):
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
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
            job.emit({"chunk": content})
        elif delta.get("tool_calls"):
            job.merge_tool_calls(delta["tool_calls"])
            job.emit({"delta": {k: v for k, v in delta.items() if v is not None},
                      "finish_reason": choices[0].get("finish_reason")})

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        ttl = self.state.settings.result_ttl
        for job_id, job in list(self.jobs.items()):
            if job.finished_at is not None and now - job.finished_at >= ttl:
                del self.jobs[job_id]


def _data(event: dict[str, Any]) -> str:
    return json.dumps(event)


def _parse_add(raw: bytes) -> dict[str, Any]:
    """The checks every gated request gets, plus the old API's own required fields."""
    doc = parse_request(raw)
    if not isinstance(doc.get("client_id"), str):
        raise BadRequest("'client_id' is required (a string)", param="client_id")
    if not isinstance(doc.get("messages"), list) or not doc["messages"]:
        raise BadRequest("'messages' is required (a non-empty list)", param="messages")
    return doc


def _not_found(request_id: str) -> Response:
    return error_response(NotFound(f"Request ID not found: '{request_id}'", code="request_not_found"))
