"""Estimated waits, learned from how long requests take. An estimate, never a promise.

The estimate replays the line: the waiting requests, in the order the gate expects to start
them, are handed to ``parallel`` slots that free up as the running requests end. A request
for the model (or group) in use takes the first free slot; a request for another model waits
until every slot is free, plus the time a model swap takes. So an estimate never decreases
along the line, counts what is really ahead (a run of one model is cheap, alternating models
are not), and shrinks as the running requests progress.

What it learns, from requests that finished well: a moving average of the service time per
model (the first observation replaces the guess outright, later ones move it by ``ALPHA``)
and of the cost of a swap. With nothing learned yet it says nothing (``None``) rather than
inventing a number.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from .errors import MAX_RETRY_AFTER_S
from .gate import RUNNING, WAITING, Gate, Ticket

ALPHA = 0.4  # weight of a new observation: reacts within a few requests, not twenty
DEFAULT_SWAP_S = 5.0  # model swap cost until one has been observed
DEFAULT_RETRY_S = 10  # Retry-After before anything has been learned
MODEL_CAP = 1000  # models remembered; the oldest goes first
REFRESH_S = 1.0  # a walk is reused for the same gate state this long (running requests age)


def _ema(prev: float | None, value: float) -> float:
    return value if prev is None else prev + ALPHA * (value - prev)


@dataclass
class _Walk:
    """The line replayed once: seconds from ``at`` until each waiting ticket starts, and
    where the replay stopped, so a ticket appended to the line extends it in one step."""

    version: int
    learned: int
    at: float
    slots: list[float]  # heap: when each slot frees up
    latest: float  # when the last of them does
    current: frozenset[str]  # the model(s) in use at the end of the replay
    first_free: float = 0.0
    starts: dict[int, float] = field(default_factory=dict)  # ticket seq -> start
    in_order: list[float] = field(default_factory=list)  # the same, in service order
    last_key: tuple[int, int] | None = None


class Estimator:
    """Service time per model and the swap cost, learned; the line replayed from them."""

    def __init__(self) -> None:
        self.by_model: dict[str, float] = {}
        self.cold: set[str] = set()  # models whose only estimate includes a swap
        self.overall_s: float | None = None
        self.swap_s: float | None = None
        self.load_s: dict[str, float] = {}  # explicit loads lmgate made, timed per model
        self._last_model: str | None = None
        self._learned = 0  # bumped by every observation: a cached walk is stale after one
        self._walk: _Walk | None = None

    # -- learning ------------------------------------------------------------------------
    def observe(self, model: str, service_s: float, *, switched: bool | None = None) -> None:
        """A request for ``model`` ran ``service_s`` seconds (start to end). ``switched``:
        whether it had to wait for a model swap; by default inferred from the previous
        observation's model (requests for different models do not overlap)."""
        if service_s < 0 or math.isnan(service_s):
            return
        if switched is None:
            switched = self._last_model is not None and self._last_model != model
        self._last_model = model
        self._learned += 1
        warm = self.by_model.get(model)
        if not switched:
            fresh = warm is None or model in self.cold  # a swap-free value replaces a cold one
            self.by_model[model] = _ema(None if fresh else warm, service_s)
            self.cold.discard(model)
            self.overall_s = _ema(self.overall_s, service_s)
        elif warm is not None and model not in self.cold:
            self.swap_s = _ema(self.swap_s, max(0.0, service_s - warm))
        elif warm is None:  # no better guess yet: too high, and replaced by the first warm one
            self.by_model[model] = service_s
            self.cold.add(model)
            if self.overall_s is None:
                self.overall_s = service_s
        self._trim()

    def observe_load(self, model: str, seconds: float) -> None:
        """lmgate loaded ``model`` itself and timed it: the swap cost for that model."""
        if seconds < 0 or math.isnan(seconds):
            return
        self.load_s[model] = _ema(self.load_s.get(model), seconds)
        self._learned += 1
        while len(self.load_s) > MODEL_CAP:
            del self.load_s[next(iter(self.load_s))]

    def _trim(self) -> None:
        while len(self.by_model) > MODEL_CAP:
            oldest = next(iter(self.by_model))
            del self.by_model[oldest]
            self.cold.discard(oldest)

    def service_s(self, model: str | None = None) -> float | None:
        """Expected start-to-end time of a request for ``model``; None before any observation."""
        if model is not None and model in self.by_model:
            return self.by_model[model]
        return self.overall_s

    # -- estimating ----------------------------------------------------------------------
    def eta_ms(self, gate: Gate, ticket: Ticket, position: int | None = None) -> int | None:
        """Expected wait before ``ticket`` starts, in ms: 0 once it runs, None when nothing has
        been learned yet or the ticket has left the gate. ``position`` is accepted for callers
        that know it; the line's replay does not need it."""
        if ticket.state == RUNNING or position == 0:
            return 0
        if ticket.state != WAITING or self.overall_s is None:
            return None
        walk = self._replay(gate, ticket)
        start = walk.starts.get(ticket.seq)
        if start is None:
            return None
        return int(max(0.0, start - (gate.clock() - walk.at)) * 1000)

    def retry_after_s(self, gate: Gate) -> int:
        """When to come back after a 429, in whole seconds in [1, 120]: about when the line
        has moved up enough for one more request to fit. A replay up to ``REFRESH_S`` old is
        good enough for that hint, so a flood of refused requests costs no replays."""
        if self.overall_s is None:
            return DEFAULT_RETRY_S
        now = gate.clock()
        walk = self._walk if self._fresh(self._walk, now) else None
        if walk is None:
            walk = self._walk = self._walk_line(gate, now)
        index = max(0, gate.depth - gate.max_queue)
        wait = walk.in_order[index] if index < len(walk.in_order) else walk.first_free
        wait -= now - walk.at
        return int(max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait))))

    def _replay(self, gate: Gate, ticket: Ticket) -> _Walk:
        """The line's replay, reused while the gate and what was learned stay the same (``/queue``
        asks for hundreds of tickets at once) and for at most ``REFRESH_S``; extended by one
        step for a ticket that was just appended (a burst of arrivals stays linear)."""
        now, walk = gate.clock(), self._walk
        if walk is not None and self._fresh(walk, now):
            if walk.version == gate.version:
                return walk
            if self._appended(walk, gate, ticket):
                self._step(walk, gate, ticket)
                walk.version = gate.version
                return walk
        walk = self._walk = self._walk_line(gate, now)
        return walk

    def _fresh(self, walk: _Walk | None, now: float) -> bool:
        """Made with what is known now, and recently: running requests age, so a replay is
        redone at least every ``REFRESH_S``."""
        return walk is not None and walk.learned == self._learned and 0 <= now - walk.at <= REFRESH_S

    @staticmethod
    def _appended(walk: _Walk, gate: Gate, ticket: Ticket) -> bool:
        """Is the only change since the replay ``ticket`` joining the end of the line? One
        version step that added one waiting ticket is one insert and nothing else (a start,
        an end, a cancel or a model change would each have stepped it too); in key order,
        as the line is without ``max_skips``, a key above every replayed one is the end."""
        return (gate.version == walk.version + 1 and gate.depth == len(walk.in_order) + 1
                and gate.max_skips == 0 and ticket.seq not in walk.starts
                and (walk.last_key is None or ticket.key > walk.last_key))

    def _walk_line(self, gate: Gate, now: float) -> _Walk:
        running = gate.running
        ends = sorted((self._remaining(t, now) for t in running), reverse=True)[:gate.parallel]
        slots = ends + [0.0] * (gate.parallel - len(ends))
        heapq.heapify(slots)
        current = frozenset(t.model for t in running) if running else gate.loaded
        walk = _Walk(gate.version, self._learned, now, slots, max(slots), current, slots[0])
        for ticket in gate.waiting():
            self._step(walk, gate, ticket)
        return walk

    def _step(self, walk: _Walk, gate: Gate, ticket: Ticket) -> None:
        """``ticket`` takes the first free slot, or, for another model, waits until every slot
        is free and the model has been swapped in."""
        service = self.service_s(ticket.model) or 0.0
        if gate.compatible(ticket.model, walk.current):
            start = heapq.heappop(walk.slots)
            walk.current = walk.current | {ticket.model}
        else:
            start = walk.latest + self._swap(ticket.model)
            walk.slots = [start] * (gate.parallel - 1)
            walk.current = frozenset({ticket.model})
        heapq.heappush(walk.slots, start + service)
        walk.latest = max(walk.latest, start + service)
        walk.starts[ticket.seq] = start
        walk.in_order.append(start)
        walk.last_key = ticket.key

    def _remaining(self, ticket: Ticket, now: float) -> float:
        expected = self.service_s(ticket.model) or 0.0
        started = ticket.started_at if ticket.started_at is not None else now
        return max(0.0, expected - (now - started))

    def _swap(self, model: str | None = None) -> float:
        if model is not None and model in self.load_s:
            return self.load_s[model]
        return DEFAULT_SWAP_S if self.swap_s is None else self.swap_s
