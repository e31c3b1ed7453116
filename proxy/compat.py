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

With replicas (``--state-url``) a job's document and events live in the group's Redis
(``SharedJobs``): any replica answers ``/request/{id}`` and ``/stream/{id}`` for it (positions
from its mirror of the line, events as they reach Redis), the old counters are the group's,
and a job whose replica stops (shut down, or gone silent) keeps its place in line and is
taken over by another replica, which runs it again from the start.
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

from redis.exceptions import RedisError
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .admission import Admission, admit
from .auth import Principal
from .errors import ProxyError, QueueFullError
from .gate import WAITING, GateClosed, QueueFull, Ticket
from .gated import GatedRequest
from .inbound import ClientGone, Message
from .jobs import Job, JobSink, JobStore, LegacyBody, now_iso, record_of
from .legacy_schema import parse_add
from .routes import caller, error_response, viewer
from .shared import StateUnavailable
from .shared_jobs import SharedJobs

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
SAVE_TIMEOUT_S = 2.0  # with replicas: a job Redis has not confirmed by then is not queued
REMOTE_RECHECK_S = 5.0  # a stream read on another replica: the job's document looked at again
RESTARTED = ("interrupted: the replica running this request stopped, and another one runs it again "
             "from the start; open /stream again to follow it")


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
        shared = state.shared
        self.shared_jobs = (None if shared is None else
                            SharedJobs(shared.client(), shared.prefix, lambda: state.settings.result_ttl))
        self.store: JobStore | SharedJobs = self.shared_jobs or JobStore(state.db)

    async def start(self) -> None:
        if self.shared_jobs is not None:
            assert self.state.shared is not None
            self.shared_jobs.start()
            self.state.shared.on_adopt = self._adopt
            self.state.on_grace_end = self._hand_over_all
        else:
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
        if self.shared_jobs is not None:
            await self.shared_jobs.aclose()
        else:
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
        if not await self._committed():  # on disk (or in the group's Redis) before the answer leaves
            err = StateUnavailable("the job could not be saved to the shared state (Redis); it was "
                                   "not queued, try again shortly")
            self.cancel(job, err)
            return error_response(err)
        return JSONResponse({"status": "queued", "request_id": job.id,
                             "queue_position": job.queue_entered_position},
                            headers={"x-request-id": job.id})

    async def _committed(self) -> bool:
        """Everything saved so far is kept: True. Redis that does not confirm within
        ``SAVE_TIMEOUT_S`` makes it False (a file on disk is waited for)."""
        if self.shared_jobs is None:
            await self.store.committed()
            return True
        try:
            await asyncio.wait_for(self.shared_jobs.committed(), timeout=SAVE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False
        return True

    def _launch(self, req: GatedRequest, adm: Admission, client_id: str, *, new: bool = True) -> Job:
        """An admitted job (``new``), or one put back in line: tracked, and served in a task
        of its own."""
        req.adopt(adm)
        job = Job(req, client_id, adm.who.identity)
        req.send = JobSink(job)
        req.on_turn = lambda: self._started(job)
        if self.shared_jobs is not None:
            job.publish = self.shared_jobs.event
        self.jobs[job.id] = job
        if new:
            self._count("total_received")
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return job

    def _count(self, name: str) -> None:
        self.stats[name] += 1
        if self.shared_jobs is not None:
            self.shared_jobs.count(name)

    def _started(self, job: Job) -> None:
        job.started()
        self.store.save(job)

    async def stream(self, request: Request) -> Response:
        who, job = self._owned(request)
        events: AsyncIterator[str] | None = None
        if job is not None:
            job.stream_opened = True
            events = self._events(job, who.identity)
        else:
            doc = await self._remote(request, who)
            if doc is not None:
                events = self._remote_events(doc, who.identity)
        if events is None:
            return JSONResponse(NOT_FOUND)
        return EventSourceResponse(
            events, ping=15, sep="\n", headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            shutdown_grace_period=self.state.settings.shutdown_grace + 2)

    async def request_status(self, request: Request) -> Response:
        who, job = self._owned(request)
        if job is None:
            doc = await self._remote(request, who)
            if doc is None:
                return JSONResponse(NOT_FOUND)
            assert self.shared_jobs is not None
            self.shared_jobs.seen(who.identity, None, self.state.settings.stream_open_timeout)
            return JSONResponse(record_of(doc))
        now = time.monotonic()
        job.last_interest = self.interest[who.identity] = now  # polling is interest too
        return JSONResponse(job.record())

    async def _remote(self, request: Request, who: Principal) -> dict[str, Any] | None:
        """With replicas: the document of a job another replica runs (or ran), if the caller
        may see it."""
        if self.shared_jobs is None:
            return None
        try:
            doc = await self.shared_jobs.fetch(request.path_params["request_id"])
        except (RedisError, OSError):
            raise StateUnavailable() from None
        if doc is None or not (who.admin or who.identity == doc["identity"]):
            return None
        return doc

    async def queue_status(self, request: Request) -> Response:
        stats, tracked = await self._stats(request)
        return JSONResponse({"queue_size": self.state.line.view.depth, "stats": stats,
                             "tracked_requests": tracked})

    async def health(self, request: Request) -> Response:
        st = self.state
        stats, _ = await self._stats(request)
        return JSONResponse({"status": "healthy", "lm_studio_url": st.fleet.first.base,
                             "queue_size": st.line.view.depth, "stats": stats,
                             "version": __version__, "features": ["sse_queue_position_comments",
                                                                  "tool_calling", "openai_compatible"]})

    async def _stats(self, request: Request) -> tuple[dict[str, Any], int]:
        """The old counters (the group's, with replicas) and how many jobs are kept;
        ``current_request_id`` only to its owner (or an admin)."""
        who = viewer(self.state, request)
        current = None
        for t in self.state.line.view.running:
            if who is not None and (who.admin or who.identity == t.identity):
                current = t.request_id
                break
        counts: dict[str, int] = self.stats
        tracked = len(self.jobs)
        if self.shared_jobs is not None:
            try:
                counts, tracked = await self.shared_jobs.stats()
            except (RedisError, OSError):
                raise StateUnavailable() from None
        return {**counts, "current_request_id": current}, tracked

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

    async def _remote_events(self, doc: dict[str, Any], identity: str) -> AsyncIterator[str]:
        """A job another replica runs, read here: positions from this replica's mirror of the
        line while it waits, then its events as they reach Redis, from the first."""
        shared, jobs = self.state.shared, self.shared_jobs
        assert shared is not None and jobs is not None
        job_id, attempt = doc["id"], int(doc.get("attempt", 0))
        patience = self.state.settings.stream_open_timeout
        jobs.seen(identity, job_id, patience)
        changed = asyncio.Event()
        unsubscribe = shared.subscribe(changed.set)
        last_pos: int | None = None
        last_sent = 0.0
        try:
            while (t := shared.by_uid.get(job_id)) is not None and t.state == WAITING:
                pos = shared.position(t)
                now = time.monotonic()
                if pos > 0 and (pos != last_pos or now - last_sent >= POSITION_REPEAT_S):
                    yield json.dumps({"position": pos})
                    last_pos, last_sent = pos, now
                changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=POSITION_REPEAT_S)
        finally:
            unsubscribe()
        if last_pos is not None:  # it waited: maybe handed over meanwhile, to a new attempt
            try:
                current = await jobs.fetch(job_id)
            except (RedisError, OSError):
                current = None
            if current is not None:
                attempt = int(current.get("attempt", 0))
        after, quiet_since, touched = "0", time.monotonic(), time.monotonic()
        while True:
            try:
                entries = await jobs.read(job_id, attempt, after, block_ms=1000)
                now = time.monotonic()
                if now - touched >= patience / 3:
                    jobs.seen(identity, job_id, patience)
                    touched = now
                if not entries:
                    if now - quiet_since < REMOTE_RECHECK_S:
                        continue
                    quiet_since = now
                    current = await jobs.fetch(job_id)
                    if current is None:
                        yield json.dumps({"error": "the request is no longer kept"})
                        return
                    if int(current.get("attempt", 0)) != attempt:
                        yield json.dumps({"error": RESTARTED})
                        return
                    continue
            except (RedisError, OSError):
                yield json.dumps({"error": "the shared state (Redis) is unreachable; poll "
                                  "/request/{id} again shortly"})
                return
            quiet_since = time.monotonic()
            for entry_id, fields in entries:
                after = entry_id
                if b"d" in fields:
                    yield fields[b"d"].decode()
                elif b"end" in fields:
                    yield fields[b"end"].decode()
                    return
                else:  # restart: the attempt this stream followed will not go on
                    yield json.dumps({"error": RESTARTED})
                    return

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
        shared = self.state.shared
        if shared is not None and job.req.adm is not None and shared.handed_over(job.ticket):
            # another replica runs it again: this one's readers are told, nothing is saved
            job.error, job.status = RESTARTED, "error"
            job.notify()
            self.jobs.pop(job.id, None)
            return
        if self.store.durable and job.req.rec.outcome == "shutting_down":
            # stopped by the shutdown: kept as it was (waiting, or running from the start) for
            # the next start of lmgate; its readers get the error and their stream ends
            job.error, job.status = sink.failed, "error"
            job.notify()
            return
        if sink.failed is None:
            job.status = "complete"
            self._count("total_processed")
        else:
            job.status, job.error = "error", sink.failed
            self._count("total_errors")
        job.completed_at = now_iso()
        job.finished_at = time.monotonic()
        job.finished_unix = time.time()
        job.notify()
        self.store.save(job)
        if self.shared_jobs is not None:
            self.shared_jobs.end(job, json.dumps({"done": True} if job.status == "complete"
                                                 else {"error": job.error or "request failed"}))
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
        self.store.forget(job_id, job.attempt)

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
        job = self._revive(doc, None)
        if job is None:
            self.store.forget(doc["id"])
            return 0
        job.seq = seq
        self.store.save(job)
        return 1

    def _revive(self, doc: dict[str, Any], ticket: Ticket | None) -> Job | None:
        """An unfinished job from its document, served here: with ``ticket``, its place in
        the group's line (taken over from a replica that stopped), else put back in line."""
        st = self.state
        key = st.auth.key_named(doc["key"]) if doc["key"] else None
        if doc["key"] and key is None:
            log.warning("old queue API: job %s was sent with key '%s', which is no longer "
                        "configured; it is dropped", doc["id"], doc["key"])
            return None
        who = Principal(identity=doc["identity"], key=key)
        req = GatedRequest.detached(st, doc["id"], ROUTE)
        req.rec.client, req.rec.model, req.rec.key, req.rec.stream = doc["label"], doc["model"], doc["key"], True
        req.upstream_path, req.upstream_query, req.upstream_headers = UPSTREAM_PATH, b"", UPSTREAM_HEADERS
        body = doc["body"].encode("utf-8", "surrogateescape")
        if ticket is None:
            ticket = Ticket(request_id=doc["id"], uid=doc["id"], model=doc["model"], identity=who.identity,
                            priority=key.priority if key is not None else 0,
                            meta={"client": doc["label"], "stream": True, "route": ROUTE, "admin": who.admin})
            try:
                st.line.submit_now(ticket)
            except (QueueFull, GateClosed):
                err = QueueFullError("the line was full when lmgate started again")
                log.warning("old queue API: job %s could not be put back in line: %s", doc["id"], err.message)
                return None
        st.metrics.label(ticket.model)
        adm = Admission(who, ticket, body, None, True, False, bool(doc["drop_usage"]),
                        key if key is not None and key.has_quota else None, None)
        job = self._launch(req, adm, doc["client_id"], new=False)
        job.created_at = doc["created_at"]
        job.queue_entered_position = doc["queue_entered_position"]
        return job

    # -- with replicas: jobs whose replica stopped ----------------------------------------------
    def _hand_over_all(self) -> None:
        """This replica's grace is over: its unfinished jobs keep their places in the group's
        line and another replica takes them over (a running one runs again from the start)."""
        shared = self.state.shared
        assert shared is not None
        handed = 0
        for job in list(self.jobs.values()):
            if job.status in ("queued", "processing") and job.req.adm is not None:
                shared.hand_over(job.ticket)
                handed += 1
        if handed:
            log.info("old queue API: %d unfinished %s handed over to the group", handed,
                     "job" if handed == 1 else "jobs")

    def _adopt(self, ticket: Ticket) -> None:
        asyncio.get_running_loop().create_task(self._take_over(ticket))

    async def _take_over(self, ticket: Ticket) -> None:
        """A job of a replica that stopped, given to this one by the group's scheduler."""
        shared, jobs = self.state.shared, self.shared_jobs
        assert shared is not None and jobs is not None
        try:
            doc = await jobs.fetch(ticket.uid)
        except (RedisError, OSError):
            shared.hand_over(ticket)  # another try, maybe elsewhere
            return
        if doc is None or doc["status"] not in ("queued", "processing"):
            shared.release(ticket)
            return
        job = self._revive(doc, ticket)
        if job is None:
            shared.release(ticket)
            jobs.forget(doc["id"], int(doc.get("attempt", 0)))
            return
        before = int(doc.get("attempt", 0))
        job.attempt = before + 1  # its events start afresh; streams of the old attempt are told
        jobs.restarted(job.id, before)
        self.store.save(job)
        log.info("old queue API: job %s taken over from a replica that stopped (it %s)", job.id,
                 "runs again from the start" if doc["status"] == "processing" else "keeps its place")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            for job in self.sweep(time.monotonic()):
                if await self._watched_elsewhere(job):
                    continue
                self.cancel(job, ProxyError("nobody opened /stream for this request in time; it "
                                            "was cancelled", code="stream_not_opened"))

    def sweep(self, now: float) -> list[Job]:
        """Drop expired results; the running jobs that look abandoned from here."""
        settings = self.state.settings
        for job_id, job in list(self.kept.items()):
            if job.finished_at is not None and now - job.finished_at >= settings.result_ttl:
                self._forget(job_id)
        patience = settings.stream_open_timeout
        abandoned = [job for job in self.jobs.values()
                     if job.status == "processing" and not job.stream_opened and self._abandoned(job, now, patience)]
        for identity, seen in list(self.interest.items()):
            if now - seen > patience and identity not in self.readers:
                del self.interest[identity]
        return abandoned

    async def _watched_elsewhere(self, job: Job) -> bool:
        """With replicas: its owner reads it, or polls, through another replica."""
        if self.shared_jobs is None:
            return False
        try:
            opened, seen = await self.shared_jobs.interest(job.id, job.identity)
        except (RedisError, OSError):
            return True  # cannot tell: not cancelled on a guess
        if opened:
            job.stream_opened = True
        if seen:
            job.last_interest = time.monotonic()
        return opened or seen

    def _abandoned(self, job: Job, now: float, patience: float) -> bool:
        """Generating for ``patience`` seconds with no sign of life from its owner: no stream
        of theirs open, no stream opened or poll of theirs in that time."""
        if job.identity in self.readers:
            return False
        last = max(job.started_mono or now, job.last_interest, self.interest.get(job.identity, 0.0))
        return now - last >= patience


async def _unused_send(message: Message) -> None:  # pragma: no cover - replaced by the job's sink
    raise RuntimeError("a job answers through its sink")
