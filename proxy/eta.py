"""Estimated waits, learned from how long requests take. An estimate, never a promise.

The estimate replays the line on the boxes. Each box that can take requests keeps its own
slots (per model: ``Box.slots_for``), its own model(s) in use and its running requests, each
of which frees its slot when its estimated remaining time is up. The waiting requests, in line
order, are handed one by one to the box where each can start first, among the boxes that list
its model: a free slot if its model may join what runs there, otherwise once every slot on
that box is free, plus a swap unless the model is already loaded there. As in the gate, a
request never starts on a box before an earlier one that could use that box. So a run of one
model is cheap, alternating models are not, a request for one box does not wait behind the
requests of another, and the estimates shrink as the running requests progress. A swap waits
for the last of the requests side by side on its box, and the last of several usually ends
well after the average one: by the spread of the model's completion lengths.

An ETA is the time until the box begins on a request: a load it waits for is part of it.

A running request's remaining time comes from what it has done and what requests for its
model usually take:

* a stream past its first byte: the tokens it is still expected to send (the usual completion
  length minus what it has streamed, bounded by its ``max_tokens``) at its own rate once it
  has shown one, else at the model's usual rate;
* a stream before its first byte: what is left of the usual time to first token (and of a
  load, while one runs), then the usual completion, bounded by ``max_tokens``;
* anything else (not streaming, or no token data for its model): the usual duration, bounded
  by what ``max_tokens`` allows, minus the time it has run.

A request that has outlived the usual is not about to end just because it has: it is given
``OVERRUN`` of how far it has gone past the usual once more (at most one more usual request,
never more than its ``max_tokens`` still allows), and while it runs never less than
``MIN_LEFT_S``. Where the model's completion lengths vary a lot, progress says little: the
rest is then blended towards a whole usual request (the lengths' squared coefficient of
variation is the weight; for lengths as spread as an exponential's, the rest is the usual
whatever was done).

What it learns, from requests that finished well, per model: moving averages (the first
observation replaces the guess outright, later ones move it by ``ALPHA``) of the service time,
the completion length, and, from streams that needed no swap, the time to first byte and the
token rate; and the cost of a swap. With nothing learned yet it says nothing (``None``)
rather than inventing a number.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from statistics import NormalDist

from .gate import RUNNING, WAITING, Box, Gate, Ticket

ALPHA = 0.4  # weight of a new observation: reacts within a few requests, not twenty
DEFAULT_SWAP_S = 5.0  # model swap cost until one has been observed
DEFAULT_RETRY_S = 10  # Retry-After before anything has been learned
RETRY_CAP_S = 60  # the longest Retry-After a full line gives
MODEL_CAP = 1000  # models remembered; the oldest goes first
REFRESH_S = 1.0  # a walk is reused for the same gate state this long (running requests age)
MIN_LEFT_S = 0.5  # a running request may always take this long still
SPREAD_ALPHA = 0.1  # the lengths' variance needs more requests than their average
OVERRUN = 1.0  # past the usual, a request is expected to go on about as far again as it overran
OWN_RATE_TOKENS = 8  # a stream's own rate counts once it has streamed this many tokens ...
OWN_RATE_S = 0.5  # ... over at least this long
OWN_RATE_SPREAD = 4.0  # and within this factor of the model's usual rate

_JOIN, _AFTER, _SWAP = 0, 1, 2  # how a request starts on a box: joins, waits for idle, swaps
# the expected largest of k standard normal draws, k = 1 .. 256 (Blom's approximation)
_LARGEST_OF = tuple(NormalDist().inv_cdf((k - 0.375) / (k + 0.25)) for k in range(1, 257))


def _ema(prev: float | None, value: float) -> float:
    return value if prev is None else prev + ALPHA * (value - prev)


def _rest(usual: float, done: float, memoryless: float, most: float | None = None) -> float:
    """What is left of something that usually amounts to ``usual`` once ``done`` is: the
    difference while there is one, then ``OVERRUN`` of how far it has gone past the usual (at
    most ``usual``, or ``most`` when that is known: a request that has run past the usual is a
    long one, and its own limit says how long it may still be); blended towards ``usual``
    itself as far as amounts are ``memoryless``."""
    certain = max(usual - done, min(OVERRUN * (done - usual), usual if most is None else most))
    return (1 - memoryless) * certain + memoryless * usual


@dataclass
class _Usual:
    """What requests for one model usually do (moving averages; None: not seen yet)."""

    length: float | None = None  # completion tokens
    spread: float = 0.0  # their variance, learned slowly
    ttft_s: float | None = None  # start to first byte, of streams
    decode_tokens: float | None = None  # tokens and seconds after the first byte, of streams:
    decode_s: float | None = None  # their ratio is the rate

    @property
    def memoryless(self) -> float:
        """How little a request's progress tells about its rest, 0..1: the lengths' squared
        coefficient of variation (0: all alike, so the rest is the usual minus what is done;
        1: as spread as an exponential's, so the rest is the usual whatever was done)."""
        if not self.length:
            return 0.0
        return min(1.0, self.spread / (self.length * self.length))

    @property
    def rate(self) -> float | None:
        """Tokens per second, once a stream has shown one."""
        if not self.decode_tokens or not self.decode_s:
            return None
        return self.decode_tokens / self.decode_s


@dataclass
class _Lane:
    """One box in the replay; times in seconds from the replay's start."""

    box: Box
    ends: list[float]  # heap: when each busy slot frees up
    latest: float  # when the last of them does
    models: frozenset[str]  # in use: running (or replayed since its last swap); idle: loaded
    resident: frozenset[str]  # loaded
    floor: float = 0.0  # nothing starts here earlier: an earlier request that could use it did
    # with max_skips: the waiting requests that may be overtaken no more and could use it,
    # (key, seq) by key; nobody after them in line starts here before they do
    spent: list[tuple[tuple[int, int, int], int]] = field(default_factory=list)


@dataclass
class _Walk:
    """The line replayed once: seconds from ``at`` until each waiting ticket starts, and
    where the replay stopped, so a ticket appended to the line extends it in one step."""

    version: int
    learned: int
    at: float
    lanes: list[_Lane]
    first_free: float  # when a slot frees up on some box (for a line with nobody waiting)
    listing: dict[str, list[_Lane]] = field(default_factory=dict)  # model -> lanes that list it
    services: dict[tuple[str, int | None], tuple[float, float]] = field(default_factory=dict)
    starts: dict[int, float] = field(default_factory=dict)  # ticket seq -> start
    count: int = 0  # tickets replayed, placed or not (a model no box lists is not placed)
    head: float = math.inf  # the earliest start: when the line moves by one
    last_key: tuple[int, int, int] | None = None


class Estimator:
    """What requests per model usually take, learned; the line replayed from it."""

    def __init__(self) -> None:
        self.by_model: dict[str, float] = {}
        self.cold: set[str] = set()  # models whose only estimate includes a swap
        self.overall_s: float | None = None
        self.swap_s: float | None = None
        self.load_s: dict[str, float] = {}  # explicit loads lmgate made, timed per model
        self._usual: dict[str, _Usual] = {}
        self._last_model: dict[str | None, str] = {}  # per box (None: not given), bounded too
        self._learned = 0  # bumped by every observation: a cached walk is stale after one
        self._walk: _Walk | None = None

    # -- learning ------------------------------------------------------------------------
    def observe(self, model: str, service_s: float, *, switched: bool | None = None,
                box: str | None = None, completion_tokens: int | None = None,
                ttft_s: float | None = None) -> None:
        """A request for ``model`` ran ``service_s`` seconds (start to end).

        ``switched``: whether it had to wait for a model swap; by default inferred from the
        previous observation on the same ``box`` (requests for different models do not
        overlap on one box). ``completion_tokens``: the tokens it generated (exact or
        approximate; None if not known, as for embeddings). ``ttft_s``: for a stream only,
        seconds from its start to its first byte; with ``completion_tokens`` it teaches the
        model's token rate."""
        if service_s < 0 or math.isnan(service_s):
            return
        if switched is None:
            last = self._last_model.get(box)
            switched = last is not None and last != model
        self._last_model[box] = model
        while len(self._last_model) > MODEL_CAP:
            del self._last_model[next(iter(self._last_model))]
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
        self._learn_tokens(model, service_s, switched, completion_tokens, ttft_s)
        self._trim()

    def _learn_tokens(self, model: str, service_s: float, switched: bool,
                      completion_tokens: int | None, ttft_s: float | None) -> None:
        if completion_tokens is None or completion_tokens < 0:
            return
        usual = self._usual.get(model)
        if usual is None:
            usual = self._usual[model] = _Usual()
        if usual.length is not None:
            usual.spread += SPREAD_ALPHA * ((completion_tokens - usual.length) ** 2 - usual.spread)
        usual.length = _ema(usual.length, completion_tokens)
        # a swap's time lands before or after the first byte depending on who loads: such a
        # request says nothing reliable about the time to first byte or the rate
        if ttft_s is None or switched or not 0 <= ttft_s <= service_s:
            return
        usual.ttft_s = _ema(usual.ttft_s, ttft_s)
        decode_s = service_s - ttft_s
        if completion_tokens > 0 and decode_s > 0:
            usual.decode_tokens = _ema(usual.decode_tokens, completion_tokens)
            usual.decode_s = _ema(usual.decode_s, decode_s)

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
        while len(self._usual) > MODEL_CAP:
            del self._usual[next(iter(self._usual))]

    # -- what one request takes ----------------------------------------------------------
    def service_s(self, model: str | None = None) -> float | None:
        """Usual start-to-end time of a request for ``model``; None before any observation."""
        if model is not None and model in self.by_model:
            return self.by_model[model]
        return self.overall_s

    def expected_s(self, model: str, max_tokens: int | None = None) -> float | None:
        """Expected start-to-end time of a request for ``model`` that may generate at most
        ``max_tokens``: from the model's time to first byte, completion length and rate once
        streams have shown them, else its usual duration; None before any observation."""
        usual = self._usual.get(model)
        rate = usual.rate if usual is not None else None
        if usual is not None and rate is not None and usual.length is not None:
            tokens = usual.length if max_tokens is None else min(usual.length, max_tokens)
            return (usual.ttft_s or 0.0) + tokens / rate
        return self.service_s(model)

    def remaining_s(self, ticket: Ticket, now: float) -> float:
        """Expected seconds until the running ``ticket`` ends, never below ``MIN_LEFT_S``
        (0.0 for a ticket that does not run)."""
        if ticket.state != RUNNING:
            return 0.0
        started = ticket.started_at if ticket.started_at is not None else now
        ran = max(0.0, now - started)
        usual = self._usual.get(ticket.model)
        rate = usual.rate if usual is not None else None
        if usual is None or rate is None or usual.length is None:  # only its duration is known
            return max(MIN_LEFT_S, _rest(self.service_s(ticket.model) or 0.0, ran, 0.0))
        ttft, limit = usual.ttft_s or 0.0, ticket.max_tokens
        length = usual.length if limit is None else min(usual.length, limit)
        if not ticket.meta.get("stream"):  # its progress is not seen: judged by its time
            left = _rest(ttft + length / rate, ran, usual.memoryless)
            if limit is not None:
                left = min(left, ttft + limit / rate - ran)
        elif ticket.first_byte_at is None:
            first = ttft + (self._swap(ticket.model) if ticket.meta.get("loading") else 0.0)
            left = max(0.0, first - ran) + length / rate
        else:
            done = ticket.streamed
            most = None if limit is None else max(0.0, limit - done)
            tokens = _rest(usual.length, done, usual.memoryless, most)
            if most is not None:
                tokens = min(tokens, most)
            left = tokens / self._own_rate(ticket, rate, now)
        return max(MIN_LEFT_S, left)

    @staticmethod
    def _own_rate(ticket: Ticket, usual: float, now: float) -> float:
        """A stream's own rate once it has shown one (within a factor of the usual: a stall or
        a burst says little), else the model's usual rate."""
        done = ticket.streamed
        since = now - ticket.first_byte_at if ticket.first_byte_at is not None else 0.0
        if done < OWN_RATE_TOKENS or since < OWN_RATE_S:
            return usual
        return min(usual * OWN_RATE_SPREAD, max(usual / OWN_RATE_SPREAD, done / since))

    # -- estimating ----------------------------------------------------------------------
    def eta_ms(self, gate: Gate, ticket: Ticket, position: int | None = None) -> int | None:
        """Expected wait before ``ticket`` starts, in ms: 0 once it runs, None when nothing has
        been learned yet, no box lists its model, or the ticket has left the gate. A ticket
        that waits for a running request is never told less than ``MIN_LEFT_S``. ``position``
        is accepted for callers that know it; the replay does not need it."""
        if ticket.state == RUNNING or position == 0:
            return 0
        if ticket.state != WAITING or self.overall_s is None:
            return None
        walk = self._replay(gate, ticket)
        start = walk.starts.get(ticket.seq)
        if start is None:
            return None
        return int(self._aged(start, gate.clock() - walk.at) * 1000)

    def retry_after_s(self, gate: Gate) -> int:
        """When to come back after a 429 for a full line, in whole seconds in [1, 60]: about
        when the line moves by one (the first waiting request starts), rounded up; 10 before
        anything has been learned. A replay up to ``REFRESH_S`` old is good enough for that
        hint, so a flood of refused requests costs no replays."""
        if self.overall_s is None:
            return DEFAULT_RETRY_S
        now = gate.clock()
        walk = self._walk if self._fresh(self._walk, now) else None
        if walk is None:
            walk = self._walk = self._walk_line(gate, now)
        head = walk.head if walk.starts else walk.first_free
        wait = self._aged(head, now - walk.at)
        return int(max(1, min(RETRY_CAP_S, math.ceil(wait))))

    @staticmethod
    def _aged(start: float, age: float) -> float:
        """A start replayed ``age`` seconds ago, as seen now: a start that lay behind a running
        request stays at least ``MIN_LEFT_S`` away (the request may always take that long)."""
        return max(start - age, min(start, MIN_LEFT_S))

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
        as the line is replayed without ``max_skips``, a key above every replayed one is the
        end."""
        return (gate.version == walk.version + 1 and gate.depth == walk.count + 1
                and gate.max_skips == 0 and ticket.seq not in walk.starts
                and (walk.last_key is None or ticket.key > walk.last_key))

    @staticmethod
    def _line(gate: Gate) -> list[Ticket]:
        """The waiting tickets in the order they are replayed: line (key) order, which the
        gate keeps per box; with ``max_skips``, the gate's own expected start order."""
        if gate.max_skips or len(gate.boxes) == 1:
            return gate.waiting()
        return sorted((t for t in gate.tickets() if t.state == WAITING), key=lambda t: t.key)

    def _walk_line(self, gate: Gate, now: float) -> _Walk:
        boxes = [b for b in gate.boxes.values() if b.usable]
        if not boxes:  # every box is down: estimate as if they were back
            boxes = [b for b in gate.boxes.values() if not b.removed]
        lanes = []
        for box in boxes:
            ends = [self.remaining_s(t, now) for t in box.running.values()]
            heapq.heapify(ends)
            models = frozenset(t.model for t in box.running.values()) if ends else box.loaded
            lanes.append(_Lane(box, ends, max(ends, default=0.0), models, box.loaded))
        first_free = min((lane.ends[0] if lane.ends else 0.0 for lane in lanes), default=0.0)
        walk = _Walk(gate.version, self._learned, now, lanes, first_free)
        line = self._line(gate)
        if gate.max_skips:
            for ticket in line:
                if ticket.skipped >= gate.max_skips:
                    for lane in self._listing(walk, ticket.model):
                        lane.spent.append((ticket.key, ticket.seq))
            for lane in lanes:
                heapq.heapify(lane.spent)
        for ticket in line:
            self._step(walk, gate, ticket)
        return walk

    @staticmethod
    def _listing(walk: _Walk, model: str) -> list[_Lane]:
        lanes = walk.listing.get(model)
        if lanes is None:
            lanes = walk.listing[model] = [lane for lane in walk.lanes if lane.box.lists(model)]
        return lanes

    @staticmethod
    def _open(walk: _Walk, lane: _Lane, ticket: Ticket) -> bool:
        """With ``max_skips``: is this box open to ``ticket``, or held by a request ahead of it
        in line that may be overtaken no more (and that the gate expects to start later)?"""
        spent = lane.spent
        while spent and spent[0][1] in walk.starts:
            heapq.heappop(spent)
        return not spent or spent[0][0] >= ticket.key

    def _step(self, walk: _Walk, gate: Gate, ticket: Ticket) -> None:
        """``ticket`` starts on the box where it can start first, and holds every box it could
        use until then."""
        model = ticket.model
        walk.count += 1
        walk.last_key = ticket.key
        lanes = self._listing(walk, model)
        usable = [lane for lane in lanes if self._open(walk, lane, ticket)] if gate.max_skips else lanes
        best: _Lane | None = None
        start, how = math.inf, _JOIN
        for lane in usable or lanes:
            at, kind = self._candidate(lane, gate, model)
            if at < start:
                best, start, how = lane, at, kind
        if best is None:
            return
        for lane in lanes:
            lane.floor = max(lane.floor, start)
        service, spread = self._service(walk, model, ticket.max_tokens)
        end = start + service
        if how == _JOIN:
            slots = max(1, best.box.slots_for(model))
            while len(best.ends) >= slots:
                heapq.heappop(best.ends)
            heapq.heappush(best.ends, end)
            if model not in best.models:
                best.models = best.models | {model}
        else:
            best.ends = [end]
            best.models = frozenset({model})
            if how == _SWAP:
                best.resident = (best.resident | {model} if gate.compatible(model, best.resident)
                                 else frozenset({model}))
        busy = len(best.ends)
        if busy > 1 and spread:  # the last of several side by side ends well after the usual
            end += service * spread * _LARGEST_OF[min(busy, len(_LARGEST_OF)) - 1]
        best.latest = max(best.latest, end)  # what a swap on this box waits for
        walk.starts[ticket.seq] = start
        walk.head = min(walk.head, start)

    def _service(self, walk: _Walk, model: str, max_tokens: int | None) -> tuple[float, float]:
        """The expected service time of a request, and the spread (coefficient of variation)
        of its model's lengths; once per walk for each model and limit."""
        key = (model, max_tokens)
        known = walk.services.get(key)
        if known is None:
            usual = self._usual.get(model)
            spread = math.sqrt(usual.memoryless) if usual is not None else 0.0
            known = walk.services[key] = (self.expected_s(model, max_tokens) or 0.0, spread)
        return known

    def _candidate(self, lane: _Lane, gate: Gate, model: str) -> tuple[float, int]:
        """When a request for ``model`` could start on this box, and how: joining what runs
        there (once fewer than its slots are busy), after everything there has ended (its
        model is loaded already), or after that and a swap."""
        if gate.compatible(model, lane.models):
            busy, slots = len(lane.ends), max(1, lane.box.slots_for(model))
            if busy < slots:
                return lane.floor, _JOIN
            return max(lane.floor, sorted(lane.ends)[busy - slots]), _JOIN
        idle = max(lane.floor, lane.latest)
        if model in lane.resident:
            return idle, _AFTER
        return idle + self._swap(model), _SWAP

    def _swap(self, model: str | None = None) -> float:
        if model is not None and model in self.load_s:
            return self.load_s[model]
        return DEFAULT_SWAP_S if self.swap_s is None else self.swap_s
