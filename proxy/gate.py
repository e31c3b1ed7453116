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
    A ticket that has waited ``max_priority_wait`` seconds joins the band of the highest
    priority (``top_priority``) at its arrival place there, so no later arrival of any
    priority overtakes it from then on. Aging needs the clock, and the gate never reads it
    on its own: the owner calls ``tick()`` at ``next_aging_at()``.

Swap batching
    With ``max_skips = K > 0`` a waiting request for the model that is loaded may start ahead
    of earlier requests for other models, but no ticket is overtaken more than K times. With
    K = 0 the order is strict.

Positions
    ``0`` means started without waiting; ``N >= 1`` means N-1 requests start before this one
    if nothing else arrives. With K = 0 that is the index in the sorted list (a bisect); with
    K > 0 it comes from a projection of the policy, cached until the gate changes.
"""

from __future__ import annotations

import bisect
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


class GateError(Exception):
    """A ticket could not be admitted."""


class QueueFull(GateError):
    """The waiting line is at its limit."""


class GateClosed(GateError):
    """The gate is shutting down and admits nothing."""


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
    rank: int = 0  # -priority, or -top_priority once aged
    state: str = "new"
    arrived_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    position_at_arrival: int = 0
    depth_at_arrival: int = 0
    skipped: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.rank, self.tag, self.seq)

    def waited_s(self, now: float) -> float:
        end = self.started_at if self.started_at is not None else (self.ended_at or now)
        return max(0.0, end - self.arrived_at)


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
        top_priority: int = 0,
        max_priority_wait: float = 60.0,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        if max_queue < 0 or max_skips < 0:
            raise ValueError("limits must be >= 0")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        if max_priority_wait < 0:
            raise ValueError("max_priority_wait must be >= 0")
        self.parallel = parallel
        self.max_queue = max_queue
        self.max_skips = max_skips
        self.policy = policy
        self.groups: tuple[frozenset[str], ...] = tuple(frozenset(g) for g in groups)
        self.on_start = on_start
        self.clock = clock
        self.top_priority = top_priority
        self.max_priority_wait = max_priority_wait
        self.closed = False
        self.switches = 0
        self.version = 0
        self._loaded: frozenset[str] = frozenset(loaded)
        self._order: list[tuple[int, int, int]] = []
        self._young: deque[Ticket] = deque()  # waiting below the top band, by arrival
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
        return self._loaded

    @property
    def running(self) -> list[Ticket]:
        return list(self._running.values())

    def waiting(self) -> list[Ticket]:
        """Waiting tickets in the order they are expected to start."""
        if self.max_skips == 0:
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
        if self.max_skips == 0:
            return bisect.bisect_left(self._order, ticket.key) + 1
        return self._projected()[ticket.seq] + 1

    def depth_by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self._waiting.values():
            out[t.model] = out.get(t.model, 0) + 1
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
        self._age()
        self._seq += 1
        ticket.seq = self._seq
        ticket.arrived_at = self.clock()
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
        del self._running[ticket.seq]
        ticket.state = DONE
        ticket.ended_at = self.clock()
        self._forget_if_idle(ticket.identity)
        self._age()
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
        self._age()
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

    def set_loaded(self, models: Iterable[str]) -> None:
        """Record what the upstream reports as loaded (not counted as a switch)."""
        self._loaded = frozenset(models)
        self._bump()

    def tickets(self) -> list[Ticket]:
        """Every running and waiting ticket (in no particular order)."""
        return [*self._running.values(), *self._waiting.values()]

    # -- internals ---------------------------------------------------------------------
    def _bump(self) -> None:
        self.version += 1

    def _insert(self, ticket: Ticket) -> None:
        ticket.state = WAITING
        self._waiting[ticket.seq] = ticket
        key = ticket.key
        if not self._order or self._order[-1] < key:
            self._order.append(key)
        else:
            bisect.insort(self._order, key)
        self._per_identity[ticket.identity] = self._per_identity.get(ticket.identity, 0) + 1
        if ticket.rank > -self.top_priority:
            self._young.append(ticket)
        self._bump()

    def _age(self) -> bool:
        """Move every ticket that has waited ``max_priority_wait`` into the top band. Tickets
        age in arrival order (one bound for all), so ``_young`` is consumed from the front."""
        young, changed = self._young, False
        if not young:
            return False
        now, wait = self.clock(), self.max_priority_wait
        while young and (young[0].state != WAITING or young[0].arrived_at + wait <= now):
            ticket = young.popleft()
            if ticket.state != WAITING:
                continue
            i = bisect.bisect_left(self._order, ticket.key)
            del self._order[i]
            ticket.rank = -self.top_priority
            bisect.insort(self._order, ticket.key)
            changed = True
        if changed:
            self._bump()
        return changed

    def next_aging_at(self) -> float | None:
        """Clock time at which the next waiting ticket ages (None: nobody will)."""
        young = self._young
        while young and young[0].state != WAITING:
            young.popleft()
        return young[0].arrived_at + self.max_priority_wait if young else None

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

    def _pick(self, current: frozenset[str], busy: bool) -> int | None:
        """Index in ``_order`` of the ticket to start next, or None to wait."""
        head = self._waiting[self._order[0][2]]
        if self.compatible(head.model, current):
            return 0
        if self.max_skips:
            waiting = ((self._waiting[k[2]].model, self._waiting[k[2]].skipped) for k in self._order)
            found = self._overtaker(waiting, current)
            if found is not None:
                return found
        return None if busy else 0

    def _overtaker(self, waiting: Iterable[tuple[str, int]], current: frozenset[str]) -> int | None:
        """Index of the first waiting request after the head whose model may run with
        ``current`` and that may overtake everyone ahead of it (each skipped < max_skips).
        ``waiting`` gives (model, times skipped) in service order."""
        worst = 0
        for i, (model, skipped) in enumerate(waiting):
            if i and self.compatible(model, current):
                return i
            worst = max(worst, skipped)
            if worst >= self.max_skips:
                return None
        return None

    def _joined(self, model: str, models: frozenset[str]) -> frozenset[str]:
        """The model set after ``model`` starts: added to a compatible set, else replacing it."""
        return models | {model} if self.compatible(model, models) else frozenset({model})

    def _dispatch(self) -> list[Ticket]:
        started: list[Ticket] = []
        while self._order and len(self._running) < self.parallel:
            busy = bool(self._running)
            current = frozenset(t.model for t in self._running.values()) if busy else self._loaded
            i = self._pick(current, busy)
            if i is None:
                break
            for k in self._order[:i]:
                self._waiting[k[2]].skipped += 1
            ticket = self._waiting[self._order[i][2]]
            self._remove_waiting(ticket, starting=True)
            self._start(ticket)
            started.append(ticket)
        if started:
            self._bump()
        return started

    def _start(self, ticket: Ticket) -> None:
        ticket.state = RUNNING
        ticket.started_at = self.clock()
        self._running[ticket.seq] = ticket
        self._vtime = max(self._vtime, ticket.tag)
        if not self.compatible(ticket.model, self._loaded):
            self.switches += 1
        self._loaded = self._joined(ticket.model, self._loaded)

    def _notify(self, started: list[Ticket]) -> None:
        if self.on_start is not None:
            for t in started:
                self.on_start(t)

    def _projected(self) -> dict[int, int]:
        """Rank of every waiting ticket in the expected start order (policy replayed)."""
        if self._projection is not None and self._projection[0] == self.version:
            return self._projection[1]
        order = [self._waiting[k[2]] for k in self._order]
        skipped = [t.skipped for t in order]
        busy = bool(self._running)
        current = frozenset(t.model for t in self._running.values()) if busy else self._loaded
        ranks: dict[int, int] = {}
        while order:
            pick = 0
            if not self.compatible(order[0].model, current):
                pick = self._overtaker(zip((t.model for t in order), skipped), current) or 0
            for i in range(pick):
                skipped[i] += 1
            t = order.pop(pick)
            del skipped[pick]
            ranks[t.seq] = len(ranks)
            current = self._joined(t.model, current)
        self._projection = (self.version, ranks)
        return ranks
