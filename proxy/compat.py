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
from typing import TYPE_CHECKING, Any

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .admission import Admission, admit
from .auth import Principal
from .errors import ProxyError, QueueFullError
from .gate import GateClosed, QueueFull, Ticket
from .gated import GatedRequest
from .inbound import ClientGone, Message
from .jobs import Job, JobSink, JobStore, LegacyBody, now_iso
from .legacy_schema import parse_add
from .routes import caller, error_response, viewer

if TYPE_CHECKING:
    from .state import AppState

log = logging.getLogger("lmgate")
ROUTE = "/queue/add"
UPSTREAM_PATH = "/v1/chat/completions"
UPSTREAM_HEADERS = [(b"content-type", b"application/json")]
POSITION_REPEAT_S = 2.0
SWEEP_EVERY_S = 1.0
STOP_MARGIN_S = 2.0  # beyond the grace: the cut-off jobs' own ending
NOT_FOUND = {"error": "Request ID not found"}  # the old server's answer, status 200


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
        self.store = JobStore(state.db)

    async def start(self) -> None:
        await self._restore()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Shutdown: running jobs get the grace period like every running request (when it
        ends they are cut off, and with a state database kept for the next start); then what
        is left is cancelled and everything is saved."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        running = [job.task for job in self.jobs.values() if job.task is not None and not job.task.done()]
        if running:
            await asyncio.wait(running, timeout=self.state.settings.shutdown_grace + STOP_MARGIN_S)
        for job in list(self.jobs.values()):
            if job.task is not None and not job.task.done():
                job.task.cancel()
        await self.store.committed()

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
        job = self._launch(req, adm, client_id)
        job.queue_entered_position = max(1, adm.ticket.position_at_arrival)
        self.store.save(job)
        await self.store.committed()  # on disk before the answer leaves
        return JSONResponse({"status": "queued", "request_id": job.id,
                             "queue_position": job.queue_entered_position},
                            headers={"x-request-id": job.id})

    def _launch(self, req: GatedRequest, adm: Admission, client_id: str) -> Job:
        """An admitted job: tracked, and served in a task of its own."""
        req.adopt(adm)
        job = Job(req, client_id, adm.who.identity)
        req.send = JobSink(job)
        req.on_turn = lambda: self._started(job)
        self.jobs[job.id] = job
        self.stats["total_received"] += 1
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return job

    def _started(self, job: Job) -> None:
        job.started()
        self.store.save(job)

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
        if self.store.durable and job.req.rec.outcome == "shutting_down":
            # stopped by the shutdown: kept as it was (waiting, or running from the start) for
            # the next start of lmgate; its readers get the error and their stream ends
            job.error, job.status = sink.failed, "error"
            job.notify()
            return
        if sink.failed is None:
            job.status = "complete"
            self.stats["total_processed"] += 1
        else:
            job.status, job.error = "error", sink.failed
            self.stats["total_errors"] += 1
        job.completed_at = now_iso()
        job.finished_at = time.monotonic()
        job.finished_unix = time.time()
        job.notify()
        self.store.save(job)
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
        self.store.forget(job_id)

    # -- after a restart -------------------------------------------------------------------
    async def _restore(self) -> None:
        """Put back what the state database kept: finished jobs as results (within
        ``--result-ttl`` and the keep caps), then the unfinished ones in line, the ones that
        were running first (from the start), then the waiting ones in their order."""
        rows = await self.store.load()
        if not rows:
            return
        now, wall = time.monotonic(), time.time()
        ttl = self.state.settings.result_ttl
        unfinished: list[tuple[int, dict[str, Any]]] = []
        for seq, doc in rows:
            if doc["status"] in ("queued", "processing"):
                unfinished.append((seq, doc))
                continue
            age = wall - (doc["finished_unix"] or wall)
            if age >= ttl:
                self.store.forget(doc["id"])
                continue
            job = Job(GatedRequest.detached(self.state, doc["id"], ROUTE), doc["client_id"], doc["identity"])
            job.seq = seq
            job.restore(doc)
            job.finished_at = now - age
            self.jobs[job.id] = job
            self._keep(job)
        unfinished.sort(key=lambda row: (row[1]["status"] != "processing", row[0]))
        back = 0
        for seq, doc in unfinished:
            back += self._requeue(seq, doc)
        if back or self.kept:
            log.info("old queue API: %d unfinished jobs back in line, %d finished results kept "
                     "(from the state database)", back, len(self.kept))

    def _requeue(self, seq: int, doc: dict[str, Any]) -> int:
        """An unfinished job back in line as its owner sent it; 1 if it is."""
        st = self.state
        key = st.auth.key_named(doc["key"]) if doc["key"] else None
        if doc["key"] and key is None:
            log.warning("old queue API: job %s was sent with key '%s', which is no longer "
                        "configured; it is dropped", doc["id"], doc["key"])
            self.store.forget(doc["id"])
            return 0
        who = Principal(identity=doc["identity"], key=key)
        req = GatedRequest.detached(st, doc["id"], ROUTE)
        req.rec.client, req.rec.model, req.rec.key, req.rec.stream = doc["label"], doc["model"], doc["key"], True
        req.upstream_path, req.upstream_query, req.upstream_headers = UPSTREAM_PATH, b"", UPSTREAM_HEADERS
        body = doc["body"].encode("utf-8", "surrogateescape")
        ticket = Ticket(request_id=doc["id"], uid=doc["id"], model=doc["model"], identity=who.identity,
                        priority=key.priority if key is not None else 0,
                        meta={"client": doc["label"], "stream": True, "route": ROUTE, "admin": who.admin})
        try:
            st.line.submit_now(ticket)
        except (QueueFull, GateClosed):
            err = QueueFullError("the line was full when lmgate started again")
            log.warning("old queue API: job %s could not be put back in line: %s", doc["id"], err.message)
            self.store.forget(doc["id"])
            return 0
        st.metrics.label(ticket.model)
        adm = Admission(who, ticket, body, None, True, False, bool(doc["drop_usage"]),
                        key if key is not None and key.has_quota else None, None)
        job = self._launch(req, adm, doc["client_id"])
        job.seq = seq
        job.created_at = doc["created_at"]
        job.queue_entered_position = doc["queue_entered_position"]
        self.stats["total_received"] -= 1  # received before the restart
        self.store.save(job)
        return 1

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
