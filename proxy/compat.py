"""The team's old queue API (``/queue/add``, ``/stream/{id}``, ``/request/{id}``,
``/queue/status``, ``/health``), so its Streamlit pages work with only the URL changed.

A job is a gated request like any other: ``/queue/add`` admits it through the same admission
(keys, limits, quotas, token caps, box choice: the same fault, the same answer as on
``/v1``), and its task serves it through the same wait, forward and relay
(``GatedRequest.serve``: reroute when a box refuses, errors mapped in one place), with a
``JobSink`` where a client connection would be. The sink turns the relayed stream into the old
events. What is the old server's own stays here: lenient bodies and 422 ``detail`` errors,
positions only while waiting, the status record, replay of every ``/stream`` from the first
chunk, results kept within ``--max-kept-results`` / ``--max-kept-bytes`` / ``--result-ttl``,
and a job cancelled as abandoned only when it has been generating for
``--stream-open-timeout`` seconds with no sign of interest from its owner.

Jobs belong to whoever submitted them: someone else's id gets the old server's answer for an
unknown id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .admission import admit
from .auth import Principal
from .errors import ProxyError
from .gated import GatedRequest
from .inbound import ClientGone, Message
from .legacy_schema import parse_add
from .routes import caller, error_response, viewer
from .streaming import upstream_error_message

if TYPE_CHECKING:
    from .state import AppState

log = logging.getLogger("lmgate")
ROUTE = "/queue/add"
UPSTREAM_PATH = "/v1/chat/completions"
UPSTREAM_HEADERS = [(b"content-type", b"application/json")]
POSITION_REPEAT_S = 2.0
SWEEP_EVERY_S = 1.0
EVENT_OVERHEAD = 80  # bytes a kept event costs beyond its text (string and list slot)
ERROR_KEEP = 64 * 1024  # bytes of an error answer kept for its message
NOT_FOUND = {"error": "Request ID not found"}  # the old server's answer, status 200


def now_iso() -> str:
    return datetime.now().isoformat()


class LegacyBody(ProxyError):
    """A ``/queue/add`` body the old server would have refused: 422 with its ``detail`` list."""

    status = 422
    type = "invalid_request_error"
    code = "invalid_body"

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__("invalid body")
        self.problems = problems

    def body(self) -> dict[str, Any]:  # type: ignore[override]
        return {"detail": self.problems}


class Job:
    """One /queue/add request: its status record and every event it produced, for replay."""

    def __init__(self, req: GatedRequest, client_id: str, who: Principal) -> None:
        self.req = req
        self.id = req.uid
        self.client_id = client_id
        self.identity = who.identity
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
        self.task: asyncio.Task[None] | None = None

    @property
    def ticket(self) -> Any:
        assert self.req.adm is not None
        return self.req.adm.ticket

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

    def started(self) -> None:
        """Its turn came."""
        self.status, self.started_at, self.started_mono = "processing", now_iso(), time.monotonic()
        self.notify()

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


class JobSink:
    """Where a job's response goes instead of a client connection: the relayed SSE stream is
    read line by line into the old events (``{"chunk": text}`` per content delta, tool-call
    deltas whole); an error event, or an error answer, becomes the job's error."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.status = 0
        self.buf = b""
        self.error_body = bytearray()
        self.failed: str | None = None  # the error the response ended with

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        data = message.get("body", b"")
        if self.status >= 400:
            self.error_body += data[:ERROR_KEEP - len(self.error_body)]
            if not message.get("more_body", False):
                self.failed = upstream_error_message(self.status, bytes(self.error_body))["error"]["message"]
            return
        buf = self.buf + data if self.buf else data
        *lines, self.buf = buf.split(b"\n")
        for line in lines:
            self._line(line.strip())
        if not message.get("more_body", False) and self.buf.strip():
            self._line(self.buf.strip())
            self.buf = b""

    def _line(self, line: bytes) -> None:
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
        job = self.job
        if "error" in doc:
            err = doc["error"]
            self.failed = str(err.get("message") if isinstance(err, dict) else err)
            return
        choices = doc.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return
        delta = choices[0].get("delta") or {}
        content = delta.get("content")
        if content:
            job.text.append(content)
            job.emit({"chunk": content}, content)
        elif delta.get("tool_calls"):
            job.merge_tool_calls(delta["tool_calls"])
            job.emit({"delta": {k: v for k, v in delta.items() if v is not None},
                      "finish_reason": choices[0].get("finish_reason")})


class LegacyQueue:
    """The old API's routes, its jobs, and a sweeper for old results and abandoned jobs."""

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
        """Admit a job as a gated request to ``/v1/chat/completions`` (streamed upstream, as
        the old server did), answer at once, and serve it in a task of its own."""
        st = self.state
        req = GatedRequest(st, request.scope, request.receive, _unused_send, ROUTE)
        req.rid = req.rec.request_id = req.uid  # a job is known by lmgate's own id
        req.id_header = [(b"x-request-id", req.uid.encode())]
        req.upstream_path, req.upstream_query, req.upstream_headers = UPSTREAM_PATH, b"", UPSTREAM_HEADERS
        client_id = ""

        def rewrite(raw: bytes) -> bytes:
            nonlocal client_id
            doc, problems = parse_add(raw)
            if doc is None:
                raise LegacyBody(problems)
            client_id = doc.pop("client_id")
            doc["stream"] = True  # the old server always streamed from upstream
            return json.dumps(doc).encode()

        try:
            adm = await admit(st, req.rec, req.headers, request.receive, path=UPSTREAM_PATH,
                              uid=req.uid, rid=req.uid, rewrite=rewrite)
        except ClientGone:
            req.rec.outcome, req.rec.status = "client_gone", 499
            req.finish()
            return Response(status_code=499)
        except ProxyError as err:
            req.refuse(err)
            req.finish()
            return error_response(err)
        req.adopt(adm)
        job = Job(req, client_id, adm.who)
        req.send = JobSink(job)
        req.on_turn = job.started
        job.queue_entered_position = max(1, adm.ticket.position_at_arrival)
        self.jobs[job.id] = job
        self.stats["total_received"] += 1
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return JSONResponse({"status": "queued", "request_id": job.id,
                             "queue_position": job.queue_entered_position},
                            headers={"x-request-id": job.id})

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
        return JSONResponse({"queue_size": self.state.line.view.depth, "stats": self._stats(request),
                             "tracked_requests": len(self.jobs)})

    async def health(self, request: Request) -> Response:
        st = self.state
        return JSONResponse({"status": "healthy", "lm_studio_url": st.fleet.first.base,
                             "queue_size": st.line.view.depth, "stats": self._stats(request),
                             "version": __version__, "features": ["sse_queue_position_comments",
                                                                  "tool_calling", "openai_compatible"]})

    def _stats(self, request: Request) -> dict[str, Any]:
        """The old counters; ``current_request_id`` only to its owner (or an admin)."""
        who = viewer(self.state, request)
        current = None
        for t in self.state.line.view.running:
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
        line = self.state.line
        last_pos: int | None = None
        last_sent = 0.0
        while job.status == "queued":
            pos = line.position(job.ticket)
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
    async def _run(self, job: Job) -> None:
        sink = job.req.send
        assert isinstance(sink, JobSink)
        try:
            await job.req.serve()
        except asyncio.CancelledError:
            sink.failed = sink.failed or "cancelled"
            raise
        except Exception as exc:  # a bug must still end the job; serve() freed its place
            log.exception("legacy job %s failed", job.id)
            sink.failed = f"internal error: {type(exc).__name__}"
        finally:
            self._end(job, sink)

    def _end(self, job: Job, sink: JobSink) -> None:
        if sink.failed is None and job.req.rec.outcome == "client_gone":
            sink.failed = "cancelled"
        if sink.failed is None:
            job.status = "complete"
            self.stats["total_processed"] += 1
        else:
            job.status, job.error = "error", sink.failed
            self.stats["total_errors"] += 1
        job.completed_at = now_iso()
        job.finished_at = time.monotonic()
        job.notify()
        self._keep(job)

    def cancel(self, job: Job, reason: ProxyError) -> None:
        """Cut a job off (abandoned): it ends with ``reason`` as its error."""
        job.req.ex.interrupt(reason)

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
                self.cancel(job, ProxyError("nobody opened /stream for this request in time; it "
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


async def _unused_send(message: Message) -> None:  # pragma: no cover - replaced by the job's sink
    raise RuntimeError("a job answers through its sink")
