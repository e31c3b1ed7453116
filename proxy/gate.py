"""The gate: decides which request reaches the upstream next.

The resource it protects is the *loaded model*. Any number of requests may wait; at most
``parallel`` run at once, and every running request uses the same model (or models that an
operator declared as a group that stays loaded together). A request for another model waits
until every running request has finished.

The gate is pure: no I/O, no asyncio, no clock except an injected one. Every public method
runs to completion and leaves the gate in a consistent state, so it needs no locks when it is
owned by one event loop. Starting a request is reported through ``on_start``; the async layer
turns that into a resolved future.

Service order
    Waiting tickets are kept sorted by ``(rank, tag, seq)``. ``rank`` is minus the ticket's
    priority (higher priority first). ``seq`` is the arrival number. Under the ``fifo`` policy
    ``tag == seq``; under ``fair`` the tag is a virtual round number per identity (round robin
    between identities, FIFO within one).

Priority aging
    A ticket that has waited ``max_priority_wait`` seconds joins the aged band, above every
    priority, in arrival order (its key becomes ``(AGED_RANK, seq, seq)``), so no later
    arrival of any priority, under any policy, overtakes it from then on, whatever a reload
    does to the keys' priorities. Every ticket ages (in arrival order, so an earlier one is
    always aged first). Aging needs the clock, and the gate never reads it on its own: the
    owner calls ``tick()`` at ``next_aging_at()``.

Reconfiguring
    Limits, groups, the skip budget and the aging bound change through ``reconfigure`` (a
    reload), which re-applies them to the waiting line and starts whatever may start now.

Swap batching
    With ``max_skips = K > 0`` a waiting request for the model that is loaded may start ahead
    of earlier requests for other models, but no ticket is overtaken more than K times. With
    K = 0 the order is strict.

Boxes
    The gate may hand requests to several upstream servers ("boxes"). Each box has its own
    slots (``parallel``) and its own loaded model or group; the waiting line is one line. A
    request starts on the first box that can run it now: one whose running or loaded model
    is compatible and that has a free slot, then an idle box that lists the model (a swap).
    The order holds per box: a waiting request that could use a box keeps later requests
    off it (up to ``max_skips`` overtakes), while a request no earlier one could use starts
    at once on its own box, so nobody waits behind a request for another box.

Positions
    ``0`` means started without waiting; ``N >= 1`` means N-1 requests start before this one
    if nothing else arrives (and the running ones end in the order they started). With one box
    and K = 0 that is the index in the sorted list (a bisect); otherwise it comes from a replay
    of the dispatch rules, cached until the gate changes.
"""

from __future__ import annotations

import bisect
import fnmatch
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

WAITING = "waiting"
RUNNING = "running"
DONE = "done"
CANCELLED = "cancelled"
REJECTED = "rejected"

POLICIES = ("fifo", "fair")
AGED_RANK = -(10**9)  # above every priority a key may have (|priority| <= 1000)


class GateError(Exception):
    """A ticket could not be admitted."""


class QueueFull(GateError):
    """The waiting line is at its limit."""


class GateClosed(GateError):
    """The gate is shutting down and admits nothing."""


class KeyQueueFull(GateError):
    """The identity already has as many requests waiting as its key allows."""


@dataclass(eq=False)
class Ticket:
    """One request's place in the gate. Identity is by object, not by value."""

    request_id: str
    model: str
    identity: str = ""
    uid: str = ""  # lmgate's own id, unique; request_id may be one the client chose
    meta: dict[str, Any] = field(default_factory=dict)
    waiter: Any = None
    priority: int = 0
    seq: int = 0
    tag: int = 0
    rank: int = 0  # -priority, or AGED_RANK once aged
    aged: bool = False
    state: str = "new"
    arrived_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    position_at_arrival: int = 0
    depth_at_arrival: int = 0
    skipped: int = 0
    box: str | None = None  # the box it runs (or last ran) on
    # progress of a running request, for estimates: the token limit it asked for (after a
    # key's cap), when its first upstream byte arrived, and tokens streamed so far (approx.)
    max_tokens: int | None = None
    first_byte_at: float | None = None
    streamed: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.rank, self.tag, self.seq)

    def waited_s(self, now: float) -> float:
        end = self.started_at if self.started_at is not None else (self.ended_at or now)
        return max(0.0, end - self.arrived_at)


@dataclass(eq=False)
class Box:
    """One upstream server's share of the gate: its slots and what it has loaded."""

    name: str
    parallel: int = 1
    models: tuple[str, ...] = ()  # globs of the models it may serve; empty: any
    catalog: frozenset[str] | None = None  # the models the server lists; None: not known
    up: bool = True
    removed: bool = False  # taken out by a reload: ends what runs, starts nothing new
    loaded: frozenset[str] = frozenset()
    switches: int = 0
    running: dict[int, Ticket] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)  # per model, where it differs

    def slots_for(self, model: str) -> int:
        return self.slots.get(model, self.parallel)

    @property
    def slots_in_force(self) -> int:
        """The slots of what runs on the box now (or, idle, of what it has loaded): what a
        person reads as its ``parallel``."""
        models = {t.model for t in self.running.values()} or self.loaded
        return max((self.slots_for(m) for m in models), default=self.parallel)

    def lists(self, model: str) -> bool:
        if not self.lists_glob(model):
            return False
        return self.catalog is None or model in self.catalog

    def lists_glob(self, model: str) -> bool:
        """Is ``model`` among the models this box may serve (its configured globs)?"""
        return not self.models or any(fnmatch.fnmatchcase(model, g) for g in self.models)

    @property
    def usable(self) -> bool:
        return self.up and not self.removed


@dataclass
class _Slotview:
    """A box as the dispatch rules see it (real, or a copy in a replay)."""

    name: str
    slots: Callable[[str], int]
    lists: Callable[[str], bool]
    running: list[str]  # models, one per running request
    loaded: frozenset[str]


class Gate:
    """FIFO (or fair) admission of requests to one upstream, model-aware."""

    def __init__(
        self,
        *,
        parallel: int = 1,
        max_queue: int = 100,
        max_skips: int = 0,
        policy: str = "fifo",
        groups: Iterable[Iterable[str]] = (),
        loaded: Iterable[str] = (),
        on_start: Callable[[Ticket], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_priority_wait: float = 60.0,
        boxes: Iterable[Box] | None = None,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        if max_queue < 0 or max_skips < 0:
            raise ValueError("limits must be >= 0")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        if max_priority_wait < 0:
            raise ValueError("max_priority_wait must be >= 0")
        self.boxes: dict[str, Box] = {}
        for box in (boxes if boxes is not None else [Box("", parallel, loaded=frozenset(loaded))]):
            if box.parallel < 1:
                raise ValueError("parallel must be >= 1")
            self.boxes[box.name] = box
        if not self.boxes:
            raise ValueError("a gate needs at least one box")
        self.max_queue = max_queue
        self.max_skips = max_skips
        self.policy = policy
        self.groups: tuple[frozenset[str], ...] = tuple(frozenset(g) for g in groups)
        self.on_start = on_start
        self.clock = clock
        self.max_priority_wait = max_priority_wait
        self.closed = False
        self.version = 0
        self._order: list[tuple[int, int, int]] = []
        self._young: deque[Ticket] = deque()  # waiting and not aged yet, by arrival
        self._waiting: dict[int, Ticket] = {}
        self._running: dict[int, Ticket] = {}
        self._seq = 0
        self._vtime = 0
        self._last_tag: dict[str, int] = {}
        self._per_identity: dict[str, int] = {}
        self._projection: tuple[int, dict[int, int]] | None = None

    # -- reading -----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._order)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def loaded(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for box in self.boxes.values():
            out |= box.loaded
        return out

    @property
    def parallel(self) -> int:
        """Slots in force on the boxes that can take requests (all boxes if none can)."""
        usable = [b.slots_in_force for b in self.boxes.values() if b.usable]
        return sum(usable) if usable else sum(b.slots_in_force for b in self.boxes.values())

    @property
    def switches(self) -> int:
        return sum(b.switches for b in self.boxes.values())

    def serves(self, model: str) -> bool:
        """Does any box (up or down, not removed) list ``model``?"""
        return any(b.lists(model) for b in self.boxes.values() if not b.removed)

    @property
    def running(self) -> list[Ticket]:
        return list(self._running.values())

    def waiting(self) -> list[Ticket]:
        """Waiting tickets in the order they are expected to start."""
        if self._simple:
            return [self._waiting[key[2]] for key in self._order]
        ranks = self._projected()
        return sorted(self._waiting.values(), key=lambda t: ranks[t.seq])

    def waiting_for(self, identity: str) -> int:
        return self._per_identity.get(identity, 0)

    def position(self, ticket: Ticket) -> int:
        """0 if running, N >= 1 while waiting, -1 once it has left the gate."""
        if ticket.state == RUNNING:
            return 0
        if ticket.state != WAITING:
            return -1
        if self._simple:
            return bisect.bisect_left(self._order, ticket.key) + 1
        return self._projected()[ticket.seq] + 1

    @property
    def _simple(self) -> bool:
        """One box and strict order: positions are indices in the line."""
        return self.max_skips == 0 and len(self.boxes) == 1

    def depth_by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self._waiting.values():
            out[t.model] = out.get(t.model, 0) + 1
        return out

    def active_by_box_model(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for t in self._running.values():
            k = (t.box or "", t.model)
            out[k] = out.get(k, 0) + 1
        return out

    def active_by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self._running.values():
            out[t.model] = out.get(t.model, 0) + 1
        return out

    # -- changing ----------------------------------------------------------------------
    def submit(self, ticket: Ticket) -> None:
        """Admit a ticket: it starts now (``on_start`` is called) or waits.

        Raises QueueFull or GateClosed, leaving the gate unchanged.
        """
        if self.closed:
            raise GateClosed("shutting down")
        if ticket.state != "new":
            raise ValueError("ticket already submitted")
        now = self.clock()
        self._age(now)
        self._seq += 1
        ticket.seq = self._seq
        ticket.arrived_at = now
        ticket.rank = -ticket.priority
        if self.policy == "fair":
            last = self._last_tag.get(ticket.identity, 0)
            ticket.tag = max(last + 1, self._vtime)
            self._last_tag[ticket.identity] = ticket.tag
        else:
            ticket.tag = ticket.seq
        self._insert(ticket)
        started = self._dispatch()
        if ticket.state == WAITING and len(self._order) > self.max_queue:
            self._remove_waiting(ticket)
            ticket.state = "new"
            self._bump()
            raise QueueFull(f"queue is full ({self.max_queue} waiting)")
        ticket.position_at_arrival = self.position(ticket)
        ticket.depth_at_arrival = len(self._order)  # a waiting ticket counts itself
        self._notify(started)

    def release(self, ticket: Ticket) -> None:
        """A running ticket has finished (any outcome). Idempotent."""
        if ticket.state == WAITING:
            self.cancel(ticket)
            return
        if ticket.state != RUNNING:
            return
        self._off_box(ticket)
        ticket.state = DONE
        ticket.ended_at = self.clock()
        self._forget_if_idle(ticket.identity)
        self._age(ticket.ended_at)
        self._bump()
        self._notify(self._dispatch())

    def cancel(self, ticket: Ticket) -> bool:
        """Withdraw a ticket wherever it is. True if it was waiting or running."""
        if ticket.state == RUNNING:
            self.release(ticket)
            ticket.state = CANCELLED
            return True
        if ticket.state != WAITING:
            return False
        self._remove_waiting(ticket)
        ticket.state = CANCELLED
        ticket.ended_at = self.clock()
        self._age(ticket.ended_at)
        self._bump()
        self._notify(self._dispatch())
        return True

    def close(self) -> list[Ticket]:
        """Admit nothing more; withdraw and return every waiting ticket."""
        self.closed = True
        dropped = self.waiting()
        for t in dropped:
            self._remove_waiting(t)
            t.state = REJECTED
            t.ended_at = self.clock()
        self._bump()
        return dropped

    def set_loaded(self, models: Iterable[str], box: str | None = None) -> None:
        """Record what a box reports as loaded (not counted as a switch)."""
        self._box(box).loaded = frozenset(models)
        self._bump()
        self._notify(self._dispatch())

    def set_slots(self, box: str, parallel: int, slots: dict[str, int]) -> None:
        """A box's slots: ``parallel`` for any model, ``slots`` for the models that differ."""
        b = self._box(box)
        if (b.parallel, b.slots) != (parallel, slots):
            b.parallel, b.slots = parallel, dict(slots)
            self._bump()
            self._notify(self._dispatch())

    def set_catalog(self, box: str, models: Iterable[str] | None) -> None:
        """The models a box lists (None: not known, so it is tried for any model)."""
        self._box(box).catalog = None if models is None else frozenset(models)
        self._bump()
        self._notify(self._dispatch())

    def set_up(self, box: str, up: bool) -> None:
        """A box that refuses connections is skipped until it is back."""
        b = self._box(box)
        if b.up != up:
            b.up = up
            self._bump()
            self._notify(self._dispatch())

    def add_box(self, box: Box) -> None:
        if box.name in self.boxes:
            raise ValueError(f"box {box.name!r} exists")
        self.boxes[box.name] = box
        self._bump()
        self._notify(self._dispatch())

    def remove_box(self, name: str) -> None:
        """Start nothing more on a box; it leaves once its running requests have ended."""
        box = self.boxes[name]
        box.removed = True
        if not box.running:
            del self.boxes[name]
        self._bump()
        self._notify(self._dispatch())

    def requeue(self, ticket: Ticket) -> None:
        """A running ticket whose box refused it before anything was sent goes back to its
        place in the line (same key), to start on another box or when this one is back. Give
        it a fresh ``waiter`` first: it may start again at once."""
        if ticket.state != RUNNING:
            return
        self._off_box(ticket)
        ticket.started_at = None
        self._insert(ticket, fresh=False)
        self._notify(self._dispatch())

    def _off_box(self, ticket: Ticket) -> None:
        """A running ticket leaves its box; a removed box leaves with its last one."""
        del self._running[ticket.seq]
        box = self.boxes.get(ticket.box or "")
        if box is not None:
            box.running.pop(ticket.seq, None)
            if box.removed and not box.running:
                del self.boxes[box.name]

    def _box(self, name: str | None) -> Box:
        if name is None:
            return next(iter(self.boxes.values()))
        return self.boxes[name]

    def tickets(self) -> list[Ticket]:
        """Every running and waiting ticket (in no particular order)."""
        return [*self._running.values(), *self._waiting.values()]

    # -- as plain data ------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-able data: a gate ``restore``d from it decides everything
        exactly as this one would (waiters and callbacks are not part of it)."""
        return {
            "limits": {"max_queue": self.max_queue, "max_skips": self.max_skips, "policy": self.policy,
                       "groups": [sorted(g) for g in self.groups],
                       "max_priority_wait": self.max_priority_wait},
            "closed": self.closed, "version": self.version, "seq": self._seq, "vtime": self._vtime,
            "last_tag": dict(self._last_tag),
            "boxes": [{"name": b.name, "parallel": b.parallel, "models": list(b.models),
                       "catalog": None if b.catalog is None else sorted(b.catalog), "up": b.up,
                       "removed": b.removed, "loaded": sorted(b.loaded), "switches": b.switches,
                       "slots": dict(b.slots)} for b in self.boxes.values()],
            "waiting": [_ticket_doc(self._waiting[key[2]]) for key in self._order],
            "running": [_ticket_doc(t) for t in self._running.values()],
            "young": [t.seq for t in self._young if t.state == WAITING],
        }

    @classmethod
    def restore(cls, doc: dict[str, Any], *, on_start: Callable[[Ticket], None] | None = None,
                clock: Callable[[], float] = time.monotonic) -> Gate:
        """A gate in the state ``snapshot`` described."""
        limits = doc["limits"]
        boxes = [Box(b["name"], parallel=b["parallel"], models=tuple(b["models"]),
                     catalog=None if b["catalog"] is None else frozenset(b["catalog"]), up=b["up"],
                     removed=b["removed"], loaded=frozenset(b["loaded"]), switches=b["switches"],
                     slots=dict(b["slots"])) for b in doc["boxes"]]
        gate = cls(max_queue=limits["max_queue"], max_skips=limits["max_skips"], policy=limits["policy"],
                   groups=limits["groups"], max_priority_wait=limits["max_priority_wait"],
                   on_start=on_start, clock=clock, boxes=boxes)
        gate.closed, gate.version = doc["closed"], doc["version"]
        gate._seq, gate._vtime, gate._last_tag = doc["seq"], doc["vtime"], dict(doc["last_tag"])
        for t in map(_ticket_of, doc["running"]):
            gate._running[t.seq] = t
            gate.boxes[t.box or ""].running[t.seq] = t
        by_seq = {}
        for t in map(_ticket_of, doc["waiting"]):
            gate._waiting[t.seq] = t
            gate._order.append(t.key)
            gate._per_identity[t.identity] = gate._per_identity.get(t.identity, 0) + 1
            by_seq[t.seq] = t
        gate._young.extend(by_seq[seq] for seq in doc["young"] if seq in by_seq)
        return gate

    # -- internals ---------------------------------------------------------------------
    def _bump(self) -> None:
        self.version += 1

    def _insert(self, ticket: Ticket, fresh: bool = True) -> None:
        ticket.state = WAITING
        self._waiting[ticket.seq] = ticket
        key = ticket.key
        if not self._order or self._order[-1] < key:
            self._order.append(key)
        else:
            bisect.insort(self._order, key)
        self._per_identity[ticket.identity] = self._per_identity.get(ticket.identity, 0) + 1
        if fresh and not ticket.aged:
            self._young.append(ticket)
        self._bump()

    def _age(self, now: float | None = None) -> bool:
        """Move every ticket that has waited ``max_priority_wait`` into the aged band. Tickets
        age in arrival order (one bound for all), so ``_young`` is consumed from the front.
        True when the line's order changed (a ticket that keeps its place changes nothing)."""
        young, changed = self._young, False
        while young and young[0].state != WAITING:  # started or gone: nothing to age
            young.popleft()
        if not young:
            return False
        now = self.clock() if now is None else now
        wait, order = self.max_priority_wait, self._order
        while young and (young[0].state != WAITING or young[0].arrived_at + wait <= now):
            ticket = young.popleft()
            if ticket.state != WAITING:
                continue
            i = bisect.bisect_left(order, ticket.key)
            del order[i]
            ticket.rank, ticket.tag, ticket.aged = AGED_RANK, ticket.seq, True
            j = bisect.bisect_left(order, ticket.key)
            order.insert(j, ticket.key)
            changed = changed or i != j
        if changed:
            self._bump()
        return changed

    def next_aging_at(self) -> float | None:
        """Clock time at which the next waiting ticket ages (None: nobody will)."""
        young = self._young
        while young and young[0].state != WAITING:
            young.popleft()
        return young[0].arrived_at + self.max_priority_wait if young else None

    def reconfigure(self, *, max_queue: int | None = None, max_skips: int | None = None,
                    groups: Iterable[Iterable[str]] | None = None,
                    max_priority_wait: float | None = None) -> None:
        """New limits from a reload. Waiting tickets keep their place (an aged one stays
        aged); a shorter aging bound ages whoever has now waited it; then whatever may start
        now starts. Tickets already waiting beyond a lowered ``max_queue`` stay."""
        if max_queue is not None:
            if max_queue < 0:
                raise ValueError("limits must be >= 0")
            self.max_queue = max_queue
        if max_skips is not None:
            if max_skips < 0:
                raise ValueError("limits must be >= 0")
            self.max_skips = max_skips
        if groups is not None:
            self.groups = tuple(frozenset(g) for g in groups)
        if max_priority_wait is not None:
            if max_priority_wait < 0:
                raise ValueError("max_priority_wait must be >= 0")
            self.max_priority_wait = max_priority_wait
        self._age()
        self.rebalance()

    def rebalance(self) -> None:
        """Limits or boxes changed from outside (a reload): start whatever may start now."""
        self._bump()
        self._notify(self._dispatch())

    def tick(self) -> None:
        """Apply aging due by now; start whatever that lets start."""
        if self._age():
            self._notify(self._dispatch())

    def _remove_waiting(self, ticket: Ticket, *, starting: bool = False) -> None:
        i = bisect.bisect_left(self._order, ticket.key)
        del self._order[i]
        del self._waiting[ticket.seq]
        left = self._per_identity[ticket.identity] - 1
        if left:
            self._per_identity[ticket.identity] = left
        else:
            del self._per_identity[ticket.identity]
            if not starting:
                self._forget_if_idle(ticket.identity)

    def _forget_if_idle(self, identity: str) -> None:
        """Fair policy: an identity with nothing waiting or running starts afresh next time."""
        if identity in self._per_identity:
            return
        if any(t.identity == identity for t in self._running.values()):
            return
        self._last_tag.pop(identity, None)

    def compatible(self, model: str, models: frozenset[str] | set[str]) -> bool:
        """May ``model`` run while ``models`` are running (or loaded)?"""
        if not models or models == {model}:
            return True
        together = set(models) | {model}
        return any(together <= g for g in self.groups)

    def _fits(self, model: str, v: _Slotview) -> bool:
        """May ``model`` start on this box without a swap: compatible with what runs there,
        or, on an idle box, loaded there (one of its resident models) or compatible with it."""
        if v.running:
            return self.compatible(model, frozenset(v.running))
        return model in v.loaded or self.compatible(model, v.loaded)

    def _joined(self, model: str, models: frozenset[str]) -> frozenset[str]:
        """The model set after ``model`` starts: added to a compatible set, else replacing it."""
        return models | {model} if self.compatible(model, models) else frozenset({model})

    def _views(self) -> list[_Slotview]:
        return [_Slotview(b.name, b.slots_for, b.lists, [t.model for t in b.running.values()], b.loaded)
                for b in self.boxes.values() if b.usable]

    def _choose(self, n: int, model: Callable[[int], str], skipped: Callable[[int], int],
                views: list[_Slotview]) -> tuple[int, _Slotview, list[int]] | None:
        """The next start among ``n`` waiting requests in line order (``model(i)``,
        ``skipped(i)``): (index, box, indices it overtakes), or None.

        First without a swap: in line order, a request whose model may join what its box runs
        (or has loaded, when idle), on a box with a free slot that no earlier waiting request
        could use, or that it may overtake them on (each skipped < max_skips). Then, still in
        line order, the first request with an idle box that lists its model and that no
        earlier request could use: a swap."""
        blockers: dict[str, list[int]] = {}
        every = len(views)
        for i in range(n):
            m = model(i)
            fallback: tuple[int, _Slotview, list[int]] | None = None
            mine: list[_Slotview] = []
            for v in views:
                if not v.lists(m):
                    continue
                mine.append(v)
                if len(v.running) >= v.slots(m):
                    continue
                if not self._fits(m, v):
                    continue
                ahead = blockers.get(v.name)
                if not ahead:
                    return i, v, []
                if fallback is None and self.max_skips and all(skipped(a) < self.max_skips for a in ahead):
                    fallback = (i, v, ahead)
            if fallback is not None:
                return fallback
            for v in mine:
                blockers.setdefault(v.name, []).append(i)
            if len(blockers) == every and not self.max_skips:
                break  # every box is held by someone earlier: nothing later may start
        taken: set[str] = set()
        for i in range(n):
            m = model(i)
            for v in views:
                if v.name in taken or not v.lists(m):
                    continue
                if not v.running:
                    return i, v, []
                taken.add(v.name)
            if len(taken) == every:
                break
        return None

    def _dispatch(self) -> list[Ticket]:
        started: list[Ticket] = []
        if not self._order:
            return started
        views = self._views()
        order, waiting = self._order, self._waiting

        def model(i: int) -> str:
            return waiting[order[i][2]].model

        def skipped(i: int) -> int:
            return waiting[order[i][2]].skipped

        while order and views:
            found = self._choose(len(order), model, skipped, views)
            if found is None:
                break
            i, view, overtaken = found
            for a in overtaken:
                waiting[order[a][2]].skipped += 1
            ticket = waiting[order[i][2]]
            self._remove_waiting(ticket, starting=True)
            box = self.boxes[view.name]
            self._start(ticket, box)
            view.running.append(ticket.model)
            view.loaded = box.loaded
            started.append(ticket)
        if started:
            self._bump()
        return started

    def _start(self, ticket: Ticket, box: Box) -> None:
        ticket.state = RUNNING
        ticket.started_at = self.clock()
        ticket.box = box.name
        self._running[ticket.seq] = ticket
        box.running[ticket.seq] = ticket
        if not ticket.aged:  # an aged ticket's tag is its arrival number, not a fair round
            self._vtime = max(self._vtime, ticket.tag)
        if ticket.model not in box.loaded and not self.compatible(ticket.model, box.loaded):
            box.switches += 1
        box.loaded = self._joined(ticket.model, box.loaded)

    def _notify(self, started: list[Ticket]) -> None:
        if self.on_start is not None:
            for t in started:
                self.on_start(t)

    def _projected(self) -> dict[int, int]:
        """Rank of every waiting ticket in the expected start order: the dispatch rules
        replayed on a copy, the running requests ending in the order they started."""
        if self._projection is not None and self._projection[0] == self.version:
            return self._projection[1]
        views = self._views()
        line = [self._waiting[k[2]] for k in self._order]
        never = [t for t in line if not any(v.lists(t.model) for v in views)]
        line = [t for t in line if any(v.lists(t.model) for v in views)]
        skipped = [t.skipped for t in line]
        ends: list[tuple[str, str]] = [(t.box or "", t.model) for t in self._running.values()]
        by_name = {v.name: v for v in views}
        ranks: dict[int, int] = {}
        while line:
            found = (self._choose(len(line), lambda i: line[i].model, skipped.__getitem__, views)
                     if views else None)
            if found is None:
                if not ends:
                    break
                name, model = ends.pop(0)
                v = by_name.get(name)
                if v is not None:
                    v.running.remove(model)
                continue
            i, v, overtaken = found
            for a in overtaken:
                skipped[a] += 1
            t = line.pop(i)
            del skipped[i]
            ranks[t.seq] = len(ranks)
            v.running.append(t.model)
            v.loaded = self._joined(t.model, v.loaded)
            ends.append((v.name, t.model))
        for t in [*line, *never]:  # cannot start on any box that is up: last, in line order
            ranks[t.seq] = len(ranks)
        self._projection = (self.version, ranks)
        return ranks


TICKET_FIELDS = ("request_id", "model", "identity", "uid", "meta", "priority", "seq", "tag", "rank",
                 "aged", "state", "arrived_at", "started_at", "ended_at", "position_at_arrival",
                 "depth_at_arrival", "skipped", "box", "max_tokens")


def _ticket_doc(t: Ticket) -> dict[str, Any]:
    return {name: getattr(t, name) for name in TICKET_FIELDS}


def _ticket_of(doc: dict[str, Any]) -> Ticket:
    return Ticket(**{name: doc[name] for name in TICKET_FIELDS})
