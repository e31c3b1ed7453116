"""Old-API jobs shared by a group of replicas (``--state-url``): every job's document and
events live in the group's Redis, so that a job submitted on one replica can be polled and
streamed on any other, and taken over when its replica stops.

    job:<id>            the job's document (``Job.doc()``), with its attempt number
    jobev:<id>:<n>      attempt n's events, in order: {d: event} ... then {end: event}, or
                        {restart: 1} when another replica starts it again from the beginning
    jobs                every kept job (a sorted set, by arrival)
    jobstats            the old counters (total_received, total_processed, total_errors)
    opened:<id>         someone opened /stream for the job (on any replica)
    seen:<identity>     the job's owner showed interest lately (a stream open, a poll)

Writes go through one writer, in the order they were made: a job's events reach Redis in
order and before its end. ``committed`` waits until everything so far is written, as the
state database's does, so ``/queue/add`` answers only once the job is in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .jobs import Job

log = logging.getLogger("lmgate")

COUNTERS = ("total_received", "total_processed", "total_errors")
BACKLOG_CAP = 100_000  # writes waiting while Redis is away; beyond, the newest are dropped


class SharedJobs:
    """The jobs of the group, in Redis. ``ttl`` gives the seconds a finished job is kept."""

    durable = True

    def __init__(self, client: aioredis.Redis, prefix: str, ttl: Callable[[], float]) -> None:
        self.redis = client
        self.prefix = prefix
        self.ttl = ttl
        self._outbox: asyncio.Queue[tuple[str, tuple[Any, ...], asyncio.Future[None] | None]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    def key(self, name: str) -> str:
        return self.prefix + name

    def events_key(self, job_id: str, attempt: int) -> str:
        return self.key(f"jobev:{job_id}:{attempt}")

    # -- writing, in order -----------------------------------------------------------------
    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_forever())

    async def aclose(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.committed(), timeout=2.0)
        if self._writer is not None:
            self._writer.cancel()

    def _put(self, op: str, *args: Any) -> None:
        if self._outbox.qsize() < BACKLOG_CAP:
            self._outbox.put_nowait((op, args, None))

    async def committed(self) -> None:
        """Until every write made so far has reached Redis."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait(("mark", (), done))
        await done

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 512:
                batch.append(self._outbox.get_nowait())
            while True:
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    for op, args, _ in batch:
                        self._queue(pipe, op, args)
                    await pipe.execute()
                    break
                except (RedisError, OSError) as exc:
                    log.debug("old-API jobs: write to Redis failed (%s); trying again", exc)
                    await asyncio.sleep(0.5)
            for _, _, done in batch:
                if done is not None and not done.done():
                    done.set_result(None)

    def _queue(self, pipe: Any, op: str, args: tuple[Any, ...]) -> None:
        ttl_ms = max(1000, int(self.ttl() * 1000))
        if op == "save":
            job_id, doc, finished = args
            pipe.set(self.key(f"job:{job_id}"), doc, px=ttl_ms if finished else None)
            # scored by when it expires: an unfinished job never, a finished one with its ttl
            pipe.zadd(self.key("jobs"), {job_id: time.time() + ttl_ms / 1000 if finished else "+inf"})
        elif op == "event":
            job_id, attempt, data = args
            pipe.xadd(self.events_key(job_id, attempt), {"d": data})
        elif op == "end":
            job_id, attempt, data = args
            stream = self.events_key(job_id, attempt)
            pipe.xadd(stream, {"end": data})
            pipe.pexpire(stream, ttl_ms)
        elif op == "restart":
            job_id, attempt = args
            stream = self.events_key(job_id, attempt)
            pipe.xadd(stream, {"restart": "1"})
            pipe.pexpire(stream, ttl_ms)
        elif op == "forget":
            job_id, attempt = args
            pipe.delete(self.key(f"job:{job_id}"), self.events_key(job_id, attempt),
                        self.key(f"opened:{job_id}"))
            pipe.zrem(self.key("jobs"), job_id)
        elif op == "count":
            (name,) = args
            pipe.hincrby(self.key("jobstats"), name, 1)
        elif op == "seen":
            identity, job_id, patience_ms = args
            pipe.set(self.key(f"seen:{identity}"), "1", px=patience_ms)
            if job_id:
                pipe.set(self.key(f"opened:{job_id}"), "1", px=ttl_ms)
        # "mark": nothing to write; its future is set once what came before it is written

    # -- the JobStore interface --------------------------------------------------------------
    def save(self, job: Job) -> None:
        doc = job.doc()
        doc["attempt"] = job.attempt
        finished = job.status not in ("queued", "processing")
        self._put("save", job.id, json.dumps(doc), finished)

    def forget(self, job_id: str, attempt: int = 0) -> None:
        self._put("forget", job_id, attempt)

    async def load(self) -> list[tuple[int, dict[str, Any]]]:
        """Nothing to put back at start: the group's line still holds the unfinished jobs,
        and another replica takes over those whose replica stopped."""
        return []

    # -- what only a group has ------------------------------------------------------------------
    def event(self, job: Job, data: str) -> None:
        self._put("event", job.id, job.attempt, data)

    def end(self, job: Job, data: str) -> None:
        self._put("end", job.id, job.attempt, data)

    def restarted(self, job_id: str, attempt: int) -> None:
        """Attempt ``attempt`` of the job will not go on (its replica stopped): the streams
        reading it are told."""
        self._put("restart", job_id, attempt)

    def count(self, name: str) -> None:
        self._put("count", name)

    def seen(self, identity: str, job_id: str | None, patience_s: float) -> None:
        self._put("seen", identity, job_id or "", max(1000, int(patience_s * 1000)))

    async def fetch(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.key(f"job:{job_id}"))
        return None if raw is None else json.loads(raw)

    async def read(self, job_id: str, attempt: int, after: str, block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        found = await self.redis.xread({self.events_key(job_id, attempt): after}, count=500, block=block_ms)
        if not found:
            return []
        return [(i.decode() if isinstance(i, bytes) else i, f) for i, f in found[0][1]]

    async def interest(self, job_id: str, identity: str) -> tuple[bool, bool]:
        """(someone opened the job's stream on some replica, its owner showed interest lately)."""
        opened, seen = await self.redis.exists(self.key(f"opened:{job_id}")), \
            await self.redis.exists(self.key(f"seen:{identity}"))
        return bool(opened), bool(seen)

    async def stats(self) -> tuple[dict[str, int], int]:
        """The group's old counters, and how many jobs it keeps."""
        raw = await self.redis.hgetall(self.key("jobstats"))
        counts = {name: int(raw.get(name.encode(), 0)) for name in COUNTERS}
        await self.redis.zremrangebyscore(self.key("jobs"), "-inf", time.time())
        return counts, int(await self.redis.zcard(self.key("jobs")))
