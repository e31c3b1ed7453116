"""Several lmgate replicas, one line, through Redis or Valkey (``--state-url``).

Every replica keeps a mirror of the line: the same pure Gate, fed the same events in the same
order from one Redis stream, the log. The gate is deterministic, and while an event is applied
its clock is pinned to the event's own time (the Redis server's, from the entry's id), so every
mirror decides exactly the same: the same requests start, on the same boxes, and every replica
reports the same positions for the whole group. A replica acts only on its own tickets: it
wakes the handlers that wait for them.

    replica ── XADD log {submit | release | requeue | fail | box state} ──> the log
    every replica ── XREAD the log ──> apply in order to its mirror ──> wake its own waiters
    scheduler (the lease holder) ── XADD {configure | tick | drop | snapshot}, fenced

Arrival order is the order submissions reach Redis (one stream, one sequence of ids). What is
not decided by the log's order is decided by the one replica that holds the lease (renewed
every second, ``--lease-ttl``): aging ticks, dropping the tickets of a replica whose heartbeat
ran out, the configuration in force, and snapshots (a replica that joins, or falls behind a
trimmed log, starts from the latest one). Each lease comes with a fencing number; an event of
an older fence than one already seen is ignored by every mirror, so a scheduler that lost its
lease without knowing it cannot change the line.

Fail closed: without Redis there is no line. New requests get 503 ``state_unavailable`` at once
(``available`` is False), and a replica that cannot reach Redis for ``--lease-ttl`` cuts its
running requests: the others have dropped their slots by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .config import Settings
from .errors import NotFound, ProxyError, ServiceUnavailable
from .gate import RUNNING, WAITING, Box, Gate, GateClosed, KeyQueueFull, QueueFull, Ticket
from .line import _grant, wait_turn

log = logging.getLogger("lmgate")

TICKET_EVENT_FIELDS = ("request_id", "model", "identity", "uid", "meta", "priority", "max_tokens")
SNAPSHOT_EVERY_S = 5.0
READ_BLOCK_MS = 1000
SUBMIT_TIMEOUT_S = 2.0  # a submission not applied by then: the line is unavailable
JOB_ROUTE = "/queue/add"  # old-API jobs: taken over by another replica when theirs stops
BACKLOG_CAP = 10000  # events a replica may have waiting to be written while Redis is away


class StateUnavailable(ServiceUnavailable):
    """The shared state (Redis) cannot be reached: no line, no request (fail closed)."""

    code = "state_unavailable"

    def __init__(self, message: str = "the shared state (Redis) is unreachable; try again shortly") -> None:
        super().__init__(message, retry_after_s=5)


class ConfigMismatch(ServiceUnavailable):
    code = "config_mismatch"


def fingerprint(settings: Settings) -> str:
    """What replicas of one group must agree on: boxes, keys, limits, policy. A replica whose
    fingerprint differs from the scheduler's stays out of service."""
    doc = {
        "boxes": [[b.name, b.url, b.parallel, list(b.models), b.max_loaded, b.max_loaded_bytes]
                  for b in settings.boxes()],
        "keys": [[k.name, k.sha256, list(k.models), k.max_queued, k.rpm, k.max_tokens,
                  k.clamp_max_tokens, k.role, k.priority, k.tokens_per_day, k.tokens_per_month]
                 for k in settings.keys],
        "limits": [settings.max_queue, settings.max_skips, settings.policy, settings.parallel,
                   [sorted(g) for g in settings.groups], settings.max_priority_wait,
                   settings.queue_timeout, settings.load_mode, settings.max_loaded],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def group_prefix(group: str = "lmgate") -> str:
    """The keys of one group (one hash slot, for Redis Cluster)."""
    return f"lmgate:{{{group}}}:"


def redis_client(url: str, *, timeout_s: float = 1.5) -> aioredis.Redis:
    """A client that fails within about ``timeout_s`` when Redis is away."""
    return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def _event_time(entry_id: str | bytes) -> float:
    """The Redis server's time of a log entry, in seconds (its id is milliseconds-seq)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0]) / 1000.0


class SharedLine:
    """The Line of a replica: its mirror of the group's line, kept by the log."""

    def __init__(self, settings: Settings, boxes: Iterable[Box], *, url: str, lease_ttl: float,
                 group: str = "lmgate", replica: str | None = None) -> None:
        self.settings = settings
        self.url = url
        self.lease_ttl = lease_ttl
        self.replica = replica or uuid.uuid4().hex[:12]
        self.prefix = group_prefix(group)
        self.fingerprint = fingerprint(settings)
        self._boxes = list(boxes)
        self._pinned: float | None = None
        self._offset = 0.0  # Redis server time - this process's time.time()
        self.gate = self._fresh_gate()
        self.by_uid: dict[str, Ticket] = {}
        self._local: dict[str, Ticket] = {}  # this replica's tickets, by uid
        self._submits: dict[str, asyncio.Future[None]] = {}
        self._subscribers: list[Callable[[], None]] = []
        self._version = -1
        self.last_id = "0-0"
        self.max_fence = 0
        self.group_fingerprint: str | None = None  # the scheduler's, from its last configure
        self.fence = 0  # ours, while we hold the lease
        self.scheduler = False
        self.available = False
        self.ready = False  # caught up with the log at least once
        self.unavailable_since: float | None = time.monotonic()
        self.on_unavailable: Callable[[], None] | None = None  # cut what runs here
        self.on_scheduler: Callable[[bool], None] | None = None  # became / stopped being scheduler
        self.on_adopt: Callable[[Ticket], None] | None = None  # an old-API job to run here now
        self._released: set[str] = set()
        self._handed: set[str] = set()  # old-API jobs that left this replica for another
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._writing = False
        self._tasks: list[asyncio.Task[None]] = []
        # clients connect on first use; the reader's blocking reads get a longer timeout
        self._redis: aioredis.Redis = redis_client(url)
        self._reader: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=READ_BLOCK_MS / 1000 + 2, socket_connect_timeout=1.5)
        self._last_snapshot = 0.0
        self._mismatch_logged = False
        self._cut = False  # away from Redis longer than the lease: what ran here was cut
        self._epoch = 0  # bumped by a cut
        self.closed = False

    def _fresh_gate(self) -> Gate:
        s = self.settings
        return Gate(max_queue=s.max_queue, max_skips=s.max_skips, policy=s.policy, groups=s.groups,
                    max_priority_wait=s.max_priority_wait, on_start=_grant, clock=self.clock,
                    boxes=[Box(b.name, parallel=b.parallel, models=b.models) for b in self._boxes])

    def clock(self) -> float:
        """The line's time: the applying event's while one is applied, else the Redis
        server's time as this process estimates it (seconds since the epoch)."""
        return self._pinned if self._pinned is not None else time.time() + self._offset

    def key(self, name: str) -> str:
        return self.prefix + name

    def client(self) -> aioredis.Redis:
        """The Redis client of this replica (for the group's counters too)."""
        return self._redis

    # -- the Line interface --------------------------------------------------------------------
    @property
    def view(self) -> Gate:
        return self.gate

    @property
    def holding(self) -> int:
        """This replica's tickets in the group's line, waiting or running."""
        return len(self._local)

    @property
    def config_matches(self) -> bool:
        return self.group_fingerprint is None or self.group_fingerprint == self.fingerprint

    async def submit(self, ticket: Ticket, *, max_queued: int | None = None) -> None:
        if not self.available:
            raise StateUnavailable()
        loop = asyncio.get_running_loop()
        ticket.waiter = loop.create_future()
        ticket.meta["replica"] = self.replica
        done: asyncio.Future[None] = loop.create_future()
        self._local[ticket.uid] = ticket
        self._submits[ticket.uid] = done
        self._emit({"t": "submit", "ticket": {n: getattr(ticket, n) for n in TICKET_EVENT_FIELDS},
                    "max_queued": max_queued})
        await asyncio.wait((done,), timeout=SUBMIT_TIMEOUT_S)
        if not done.done():
            self._submits.pop(ticket.uid, None)
            self._local.pop(ticket.uid, None)
            self._emit({"t": "release", "uid": ticket.uid})  # if it lands later, it leaves at once
            raise StateUnavailable()
        done.result()

    async def wait(self, ticket: Ticket, timeout: float) -> bool:
        return await wait_turn(ticket, timeout)

    def release(self, ticket: Ticket) -> None:
        if ticket.uid in self._released:
            return
        self._released.add(ticket.uid)
        self._emit({"t": "release", "uid": ticket.uid})

    def hand_over(self, ticket: Ticket) -> None:
        """An old-API job this replica will not finish (it shuts down): it keeps its place in
        the group's line (a running one goes back to it) and another replica takes it over.
        Its handler's release afterwards changes nothing."""
        if ticket.uid in self._handed:
            return
        self._handed.add(ticket.uid)
        self._released.add(ticket.uid)
        self._emit({"t": "handoff", "uid": ticket.uid})

    def handed_over(self, ticket: Ticket) -> bool:
        """The job's ticket left this replica for another (hand-over, or this replica was
        taken for gone): its end here is not the job's end."""
        return ticket.uid in self._handed

    def requeue(self, ticket: Ticket) -> None:
        ticket.waiter = asyncio.get_running_loop().create_future()
        self._emit({"t": "requeue", "uid": ticket.uid})

    def fail(self, ticket: Ticket, error: ProxyError) -> None:
        self._emit({"t": "fail", "uid": ticket.uid, "error": [error.status, error.code, error.message]})

    def position(self, ticket: Ticket) -> int:
        return self.gate.position(ticket)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def close(self) -> list[Ticket]:
        """This replica stops: nothing is withdrawn from the group's line here (its waiting
        requests keep their places until the grace ends; see ``withdraw``). It schedules no
        more: the lease goes back now, so another replica takes over the group's time-driven
        changes and the old-API jobs this one hands over."""
        if not self.closed:
            self.closed = True
            self._tasks.append(asyncio.get_running_loop().create_task(self._give_back()))
        return []

    async def _give_back(self) -> None:
        if not self.scheduler:
            return
        self.scheduler = False
        with contextlib.suppress(RedisError, OSError):
            await self._redis.eval(GIVE_BACK, 1, self.key("lease"), self.replica)
        log.info("this replica shuts down: it no longer schedules the group's line")
        if self.on_scheduler is not None:
            self.on_scheduler(False)

    def withdraw(self) -> list[Ticket]:
        """The grace is over: this replica's waiting tickets leave the line."""
        out = [t for t in self._local.values() if t.state == WAITING]
        for t in out:
            self.release(t)
        return out

    # box state: a change goes into the log, and every mirror applies it
    def set_loaded(self, box: str, models: Iterable[str]) -> None:
        self._emit({"t": "loaded", "box": box, "models": sorted(models)})

    def set_catalog(self, box: str, models: Iterable[str] | None) -> None:
        self._emit({"t": "catalog", "box": box, "models": None if models is None else sorted(models)})

    def set_up(self, box: str, up: bool) -> None:
        self._emit({"t": "up", "box": box, "up": up})

    def set_slots(self, box: str, parallel: int, slots: dict[str, int]) -> None:
        self._emit({"t": "slots", "box": box, "parallel": parallel, "slots": slots})

    def add_box(self, box: Box) -> None:
        self._emit({"t": "add_box", "box": box.name, "parallel": box.parallel, "models": list(box.models)})

    def remove_box(self, name: str) -> None:
        self._emit({"t": "remove_box", "box": name})

    def rebalance(self) -> None:
        """Box fields change only through the log here: nothing to start afresh."""

    def reconfigure(self, *, max_queue: int, max_skips: int, groups: Iterable[Iterable[str]],
                    max_priority_wait: float) -> None:
        """A reload: this replica's fingerprint changes; the scheduler puts its configuration
        in force for the group (a replica out of step is out of service until it reloads)."""

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def configure(self, settings: Settings) -> None:
        """After a reload: this replica's configuration and fingerprint; the scheduler puts
        it in force for the group."""
        self.settings = settings
        self.fingerprint = fingerprint(settings)
        if self.scheduler:
            self._emit(self._configure_event())

    # -- writing the log ---------------------------------------------------------------------
    def _emit(self, event: dict[str, Any]) -> None:
        """Append ``event`` to the log, in this replica's order, without waiting."""
        if self._outbox.qsize() < BACKLOG_CAP:
            self._outbox.put_nowait(event)

    async def _writer(self) -> None:
        """One writer: events reach the log in the order this replica made them; whatever
        queued up meanwhile goes in one pipeline. While Redis is away they wait (bounded)."""
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 256:
                batch.append(self._outbox.get_nowait())
            epoch = self._epoch
            self._writing = True
            while epoch == self._epoch:  # a cut makes what waited here stale: dropped
                try:
                    pipe = self._redis.pipeline(transaction=False)
                    for event in batch:
                        event["r"] = self.replica
                        pipe.xadd(self.key("log"), {"e": json.dumps(event)})
                    await pipe.execute()
                    break
                except (RedisError, OSError) as exc:
                    self._down(exc)
                    await asyncio.sleep(0.5)
            self._writing = False

    # -- reading the log ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, catch up with the group's line (from its latest snapshot), and keep up."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._read_forever()),
                       loop.create_task(self._beat_forever())]
        with contextlib.suppress(RedisError, OSError):  # alive before any ticket of ours
            await self._redis.set(self.key(f"hb:{self.replica}"), "1", px=int(self.lease_ttl * 1000))
        deadline = time.monotonic() + 10
        while not self.ready and time.monotonic() < deadline:  # serve once caught up (or not at all)
            await asyncio.sleep(0.02)

    async def _load_snapshot(self) -> None:
        server = await self._redis.time()
        self._offset = server[0] + server[1] / 1e6 - time.time()
        raw = await self._redis.get(self.key("snap"))
        if raw is None:
            return
        doc = json.loads(raw)
        self.gate = Gate.restore(doc["gate"], on_start=_grant, clock=self.clock)
        self.by_uid = {t.uid: t for t in self.gate.tickets()}
        self.last_id, self.max_fence = doc["id"], doc["fence"]
        self._group_config(doc.get("fingerprint"))

    async def _read_forever(self) -> None:
        first = True
        while True:
            try:
                if first:
                    await self._load_snapshot()
                    first = False
                found = await self._reader.xread({self.key("log"): self.last_id}, count=1000,
                                                 block=READ_BLOCK_MS)
                self._up()
                if not found:
                    self.ready = True
                    continue
                _, entries = found[0]
                for entry_id, fields in entries:
                    self._apply(entry_id, fields)
                self.ready = self.ready or len(entries) < 1000
                self._changed()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(0.5)
                if self._cut:
                    # away longer than the lease: the group dropped this replica's requests and
                    # the log may be trimmed past where it stopped; start again from a snapshot
                    first, self._cut = True, False
                    self.gate, self.by_uid, self.last_id = self._fresh_gate(), {}, "0-0"

    def _apply(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> None:
        self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        event = json.loads(fields[b"e"])
        self._pinned = _event_time(entry_id)
        try:
            self._apply_event(event)
        except Exception:  # noqa: BLE001 - one bad event must not stop the line
            log.exception("shared line: could not apply %s", event.get("t"))
        finally:
            self._pinned = None

    def _apply_event(self, e: dict[str, Any]) -> None:
        kind, gate = e["t"], self.gate
        fence = e.get("fence")
        if fence is not None:
            if fence < self.max_fence:
                return  # from a scheduler whose lease was taken over
            self.max_fence = fence
        if kind == "submit":
            self._apply_submit(e)
        elif kind in ("release", "cancel"):
            t = self.by_uid.get(e["uid"])
            if t is not None and t.meta.get("replica") == e["r"]:  # only its holder lets go
                gate.release(t)
                if t.state not in (WAITING, RUNNING):
                    self._forget(t)
        elif kind == "requeue":
            t = self.by_uid.get(e["uid"])
            if t is not None and t.state == RUNNING and t.meta.get("replica") == e["r"]:
                gate.requeue(t)
        elif kind == "handoff":
            t = self.by_uid.get(e["uid"])
            if t is not None and t.meta.get("replica") == e["r"]:
                self._orphan(t)
        elif kind == "adopt":
            self._apply_adopt(e["uids"], e["to"])
        elif kind == "fail":
            t = self.by_uid.get(e["uid"])
            if t is not None and t.state == WAITING:
                gate.cancel(t)
                self._forget(t)
                status, code, message = e["error"]
                err = NotFound(message, code=code) if status == 404 else ProxyError(message, code=code)
                if t.waiter is not None and not t.waiter.done():
                    t.waiter.set_exception(err)
        elif kind == "loaded":
            if e["box"] in gate.boxes:
                gate.set_loaded(e["models"], box=e["box"])
        elif kind == "catalog":
            if e["box"] in gate.boxes:
                gate.set_catalog(e["box"], e["models"])
        elif kind == "up":
            if e["box"] in gate.boxes:
                gate.set_up(e["box"], e["up"])
        elif kind == "slots":
            if e["box"] in gate.boxes:
                gate.set_slots(e["box"], e["parallel"], e["slots"])
        elif kind == "add_box":
            if e["box"] not in gate.boxes:
                gate.add_box(Box(e["box"], parallel=e["parallel"], models=tuple(e["models"])))
        elif kind == "remove_box":
            if e["box"] in gate.boxes and not gate.boxes[e["box"]].removed:
                gate.remove_box(e["box"])
        elif kind == "configure":
            self._apply_configure(e)
        elif kind == "tick":
            gate.tick()
        elif kind == "drop":
            self._apply_drop(e["replica"])

    def _apply_submit(self, e: dict[str, Any]) -> None:
        fields = e["ticket"]
        uid = fields["uid"]
        mine = e["r"] == self.replica
        t = self._local.get(uid) if mine else None
        if t is None:
            t = Ticket(**fields)
            t.meta["replica"] = e["r"]
        done = self._submits.pop(uid, None) if mine else None
        error: Exception | None = None
        max_queued = e.get("max_queued")
        if max_queued is not None and self.gate.waiting_for(t.identity) >= max_queued:
            error = KeyQueueFull("max_queued")
        else:
            try:
                self.gate.submit(t)
            except (QueueFull, GateClosed) as exc:
                error = exc
        if error is None:
            self.by_uid[uid] = t
        elif mine:
            self._local.pop(uid, None)
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
        elif mine and error is None and done is None:
            # submitted, but its handler gave up waiting (Redis slow): it leaves again
            self.release(t)

    def _apply_configure(self, e: dict[str, Any]) -> None:
        gate = self.gate
        gate.reconfigure(max_queue=e["max_queue"], max_skips=e["max_skips"], groups=e["groups"],
                         max_priority_wait=e["max_priority_wait"])
        wanted = {b["name"]: b for b in e["boxes"]}
        for name, box in list(gate.boxes.items()):
            if name not in wanted and not box.removed:
                gate.remove_box(name)
        for name, b in wanted.items():
            if name not in gate.boxes:
                gate.add_box(Box(name, parallel=b["parallel"], models=tuple(b["models"]), up=False))
            else:
                gate.boxes[name].removed = False
                gate.boxes[name].models = tuple(b["models"])
        gate.rebalance()
        self._group_config(e["fingerprint"])

    def _group_config(self, fingerprint: str | None) -> None:
        """The scheduler's configuration, as its fingerprint: out of service while ours differs
        (said once in the log, and again after it matched once)."""
        self.group_fingerprint = fingerprint
        if not self.config_matches and not self._mismatch_logged:
            self._mismatch_logged = True
            log.error("this replica's configuration differs from the group's scheduler's "
                      "(fingerprint %s, the group's %s): out of service until they match "
                      "(reload every replica with the same file)", self.fingerprint, self.group_fingerprint)
        elif self.config_matches:
            self._mismatch_logged = False

    def _apply_drop(self, replica: str) -> None:
        """A replica went silent: its requests' clients are gone with it; their places and
        slots are freed."""
        gate = self.gate
        for t in [t for t in gate.tickets() if t.meta.get("replica") == replica]:
            if t.meta.get("route") == JOB_ROUTE:  # an old-API job: nobody waits on a socket for it
                self._orphan(t)
                continue
            gate.release(t)
            self._forget(t)
            if replica == self.replica and t.waiter is not None and not t.waiter.done():
                t.waiter.set_exception(StateUnavailable("this replica lost its place in the shared "
                                                        "line; try again"))
        if replica == self.replica:
            # taken for dead (its heartbeat ran out): the slots of what runs here are free
            # for the others now, so it is cut
            log.warning("the group took this replica for gone: its requests were dropped")
            if self.on_unavailable is not None:
                self.on_unavailable()

    def _orphan(self, t: Ticket) -> None:
        """An old-API job whose replica stopped: back to its place in line (if it ran), with
        no replica until the scheduler gives it one (``adopt``)."""
        if t.state == RUNNING:
            self.gate.requeue(t)
        if self._local.pop(t.uid, None) is not None:
            self._released.add(t.uid)  # what its old handler does next changes nothing
            self._handed.add(t.uid)
        t.meta["replica"] = None

    def _apply_adopt(self, uids: list[str], to: str) -> None:
        mine = []
        for uid in uids:
            t = self.by_uid.get(uid)
            if t is None or t.meta.get("replica") is not None:
                continue
            t.meta["replica"] = to
            if to == self.replica:
                t.waiter = asyncio.get_running_loop().create_future()
                if t.state == RUNNING:
                    t.waiter.set_result(True)
                self._local[uid] = t
                self._released.discard(uid)
                self._handed.discard(uid)
                mine.append(t)
        if self.on_adopt is not None:
            for t in mine:
                self.on_adopt(t)
            return
        for t in mine:  # nobody here runs old-API jobs: back to the line for another
            self.hand_over(t)

    def _forget(self, t: Ticket) -> None:
        self.by_uid.pop(t.uid, None)
        if self._local.pop(t.uid, None) is not None:
            self._released.discard(t.uid)

    def _changed(self) -> None:
        version = self.gate.version
        if version == self._version:
            return
        self._version = version
        for callback in tuple(self._subscribers):
            callback()

    # -- health, lease, the scheduler's duties ----------------------------------------------------
    def _up(self) -> None:
        if not self.available:
            if self.unavailable_since is not None and self.ready:
                log.info("shared state (Redis) is reachable again")
            self.available = True
            self.unavailable_since = None

    def _down(self, exc: BaseException) -> None:
        if self.available:
            log.warning("shared state (Redis) is unreachable: %s; new requests get 503 until it "
                        "is back", exc)
            self.available = False
            self.unavailable_since = time.monotonic()
        for uid, done in list(self._submits.items()):  # nobody will apply them now
            if not done.done():
                done.set_exception(StateUnavailable())
            self._submits.pop(uid, None)

    async def _beat_forever(self) -> None:
        """Every second: this replica's heartbeat; the lease (take it when free, renew it while
        held); and, as the scheduler, the group's time-driven changes. Long without Redis,
        this replica cuts its running requests (the others have freed their slots)."""
        cut = False
        while True:
            await asyncio.sleep(min(1.0, self.lease_ttl / 3))
            if not self.available:
                if (not cut and self.unavailable_since is not None
                        and time.monotonic() - self.unavailable_since >= self.lease_ttl):
                    cut = self._cut = True
                    self._epoch += 1
                    while not self._outbox.empty():
                        self._outbox.get_nowait()
                    for t in list(self._local.values()):
                        if t.state == WAITING and t.waiter is not None and not t.waiter.done():
                            t.waiter.set_exception(StateUnavailable())
                    self._lost_lease()
                    if self.on_unavailable is not None:
                        self.on_unavailable()
            else:
                cut = False
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                self._down(exc)

    async def _beat(self) -> None:
        ttl_ms = int(self.lease_ttl * 1000)
        r = self._redis
        await r.set(self.key(f"hb:{self.replica}"), "1", px=ttl_ms)
        holder = f"{self.replica}"
        if self.closed:  # shutting down: a heartbeat for what it still holds, no scheduling
            await self._give_back()
            return
        if self.scheduler:
            ok = await r.eval(RENEW, 1, self.key("lease"), holder, ttl_ms)
            if not ok:
                self._lost_lease()
                return
        elif await r.set(self.key("lease"), holder, px=ttl_ms, nx=True):
            # above every fence this mirror has seen, also when Redis came back empty
            self.fence = int(await r.eval(NEXT_FENCE, 1, self.key("fence"), self.max_fence))
            self.scheduler = True
            log.info("this replica schedules the group's line (fence %d)", self.fence)
            self._emit(self._configure_event())
            if self.on_scheduler is not None:
                self.on_scheduler(True)
        if not self.scheduler or not self.ready:
            return
        if self.closed:  # it began to shut down while it took the lease
            await self._give_back()
            return
        now = self.clock()
        due = self.gate.next_aging_at()
        if due is not None and due <= now:
            self._emit({"t": "tick", "fence": self.fence})
        orphans = [t.uid for t in self.gate.tickets() if t.meta.get("replica") is None]
        if orphans:
            self._emit({"t": "adopt", "uids": orphans, "to": self.replica, "fence": self.fence})
        owners = {t.meta.get("replica") for t in self.gate.tickets()} - {None, self.replica}
        if owners:
            names = sorted(str(o) for o in owners)
            beats = await r.mget([self.key(f"hb:{n}") for n in names])
            for name, beat in zip(names, beats):
                if beat is None:
                    log.warning("replica %s went silent: its requests leave the line", name)
                    self._emit({"t": "drop", "replica": name, "fence": self.fence})
        if time.monotonic() - self._last_snapshot >= SNAPSHOT_EVERY_S:
            self._last_snapshot = time.monotonic()
            await self._snapshot()

    async def _snapshot(self) -> None:
        """The line as of the last applied entry, for replicas that join; older entries than
        the previous snapshot are trimmed (every live replica has read them by then)."""
        doc = {"id": self.last_id, "fence": self.max_fence, "fingerprint": self.group_fingerprint,
               "gate": self.gate.snapshot()}
        previous = await self._redis.get(self.key("snap"))
        await self._redis.set(self.key("snap"), json.dumps(doc))
        if previous is not None:
            await self._redis.xtrim(self.key("log"), minid=json.loads(previous)["id"], approximate=True)

    def _configure_event(self) -> dict[str, Any]:
        s = self.settings
        return {"t": "configure", "fence": self.fence, "fingerprint": self.fingerprint,
                "max_queue": s.max_queue, "max_skips": s.max_skips, "groups": [sorted(g) for g in s.groups],
                "max_priority_wait": s.max_priority_wait,
                "boxes": [{"name": b.name, "parallel": b.parallel or s.parallel, "models": list(b.models)}
                          for b in s.boxes()]}

    def _lost_lease(self) -> None:
        if self.scheduler:
            self.scheduler = False
            log.warning("this replica no longer schedules the group's line")
            if self.on_scheduler is not None:
                self.on_scheduler(False)

    async def flushed(self, timeout_s: float = 2.0) -> None:
        """Until every event made so far is in the log (or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while (not self._outbox.empty() or self._writing) and time.monotonic() < deadline and self.available:
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        """Leave the group: write what is still to be written (releases, hand-overs), hand
        the lease back (another replica takes it at once), stop."""
        await self.flushed()
        await self._give_back()  # at once, when ``close`` has not already done it
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self.key(f"hb:{self.replica}"))
        self.stop()
        for client in (self._redis, self._reader):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
NEXT_FENCE = """
local f = redis.call('INCR', KEYS[1])
if f <= tonumber(ARGV[1]) then
  f = tonumber(ARGV[1]) + 1
  redis.call('SET', KEYS[1], f)
end
return f
"""
GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
