"""How right are the wait estimates? A replay on a simulated clock, no servers.

The pure ``Gate`` runs with an injected clock; a seeded synthetic workload modelled on the
simulator (per-model token rates, times to first token and completion lengths drawn from
seeded distributions, ``max_tokens`` sometimes set, streams and plain requests, an
embeddings model, a 1 s load on every swap) comes from several clients that each send a
request, wait for it to end, think, and send the next. Every request that has to wait is
given an ETA at arrival by the estimator before this change (copied below as
``PreviousEstimator``) and by ``proxy.eta.Estimator``, both learning from the same finished
requests, in the same run; its actual wait (arrival until the box begins on it, a load
included, as the ETA means it) is compared with both.

    python -m bench.eta [--seeds 3] [--requests 40]

Relative error is ``|estimate - actual| / actual`` over the waits of at least ``MIN_WAIT_S``
(shorter ones make any relative error huge); bias is the median of the signed error
(positive: too high). "zero" counts ETAs of 0 given to a waiting request.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.eta import Estimator
from proxy.gate import RUNNING, WAITING, Box, Gate, Ticket

from .stats import pct

LOAD_S = 1.0  # a swap, as the demo's simulated boxes take
MIN_WAIT_S = 1.0
MAX_TOKENS_CHOICES = (64, 128, 256, 512)

QWEN, LLAMA, EMBED = "qwen2.5-7b-instruct", "llama-3.2-3b-instruct", "text-embedding-nomic-embed-text-v1.5"


@dataclass(frozen=True)
class ModelSim:
    """How one model behaves: medians of lognormal draws per request."""

    name: str
    rate: float  # tokens per second (0: an embeddings model)
    ttft_s: float
    length: float  # completion tokens
    duration_s: float = 0.0  # embeddings only


MODELS = {
    QWEN: ModelSim(QWEN, 20.0, 0.4, 120.0),
    LLAMA: ModelSim(LLAMA, 35.0, 0.25, 200.0),
    EMBED: ModelSim(EMBED, 0.0, 0.0, 0.0, duration_s=0.15),
}


@dataclass(frozen=True)
class BoxSim:
    name: str
    models: tuple[str, ...]
    parallel: int
    slots: int | None = None  # per model, as LM Studio reports it (None: box.parallel)


@dataclass(frozen=True)
class Scenario:
    name: str
    boxes: tuple[BoxSim, ...]
    clients: int
    think_s: float  # mean pause between a client's requests


def _demo(parallel: int, slots: int | None = None) -> tuple[BoxSim, ...]:
    """The demo's two boxes: one chat model on both, one more model only on each."""
    return BoxSim("a", (QWEN, EMBED), parallel, slots), BoxSim("b", (QWEN, LLAMA), parallel, slots)


SCENARIOS = (
    Scenario("1 box, parallel 1", (BoxSim("one", (QWEN, LLAMA, EMBED), 1),), clients=6, think_s=8.0),
    Scenario("1 box, parallel 4", (BoxSim("one", (QWEN, LLAMA, EMBED), 4),), clients=20, think_s=8.0),
    Scenario("2 boxes, parallel 1", _demo(1), clients=10, think_s=8.0),
    Scenario("2 boxes, parallel 4", _demo(4), clients=36, think_s=8.0),
    # LM Studio reports 4 slots per loaded model while lmgate's own --parallel stays 1
    Scenario("2 boxes, 4 slots per model (demo)", _demo(1, slots=4), clients=36, think_s=8.0),
)


# -- the estimator before this change, for comparison ----------------------------------------
class PreviousEstimator:
    """``proxy/eta.py`` as it was: one duration average per model, the line replayed on the
    sum of the boxes' ``parallel`` slots, a running request's rest = average - elapsed (>= 0).
    Its replay is redone where the original extended it by one step: the same numbers."""

    ALPHA, DEFAULT_SWAP_S, REFRESH_S = 0.4, 5.0, 1.0

    def __init__(self) -> None:
        self.by_model: dict[str, float] = {}
        self.cold: set[str] = set()
        self.overall_s: float | None = None
        self.swap_s: float | None = None
        self._last_model: str | None = None
        self._learned = 0
        self._walk: tuple[int, int, float, dict[int, float]] | None = None

    def _ema(self, prev: float | None, value: float) -> float:
        return value if prev is None else prev + self.ALPHA * (value - prev)

    def observe(self, model: str, service_s: float) -> None:
        switched = self._last_model is not None and self._last_model != model
        self._last_model = model
        self._learned += 1
        warm = self.by_model.get(model)
        if not switched:
            fresh = warm is None or model in self.cold
            self.by_model[model] = self._ema(None if fresh else warm, service_s)
            self.cold.discard(model)
            self.overall_s = self._ema(self.overall_s, service_s)
        elif warm is not None and model not in self.cold:
            self.swap_s = self._ema(self.swap_s, max(0.0, service_s - warm))
        elif warm is None:
            self.by_model[model] = service_s
            self.cold.add(model)
            if self.overall_s is None:
                self.overall_s = service_s

    def _service(self, model: str) -> float:
        return self.by_model.get(model, self.overall_s or 0.0)

    def eta_ms(self, gate: Gate, ticket: Ticket) -> int | None:
        if ticket.state == RUNNING:
            return 0
        if ticket.state != WAITING or self.overall_s is None:
            return None
        now, walk = gate.clock(), self._walk
        if (walk is None or walk[:2] != (gate.version, self._learned)
                or not 0 <= now - walk[2] <= self.REFRESH_S):
            walk = self._walk = (gate.version, self._learned, now, self._starts(gate, now))
        start = walk[3].get(ticket.seq)
        return None if start is None else int(max(0.0, start - (now - walk[2])) * 1000)

    @staticmethod
    def _parallel(gate: Gate) -> int:
        """What ``gate.parallel`` was then: the boxes' own ``parallel``, summed."""
        usable = [b.parallel for b in gate.boxes.values() if b.usable]
        return sum(usable) if usable else sum(b.parallel for b in gate.boxes.values())

    def _starts(self, gate: Gate, now: float) -> dict[int, float]:
        running, parallel = gate.running, self._parallel(gate)
        ends = sorted((max(0.0, self._service(t.model) - (now - (t.started_at or now))) for t in running),
                      reverse=True)[:parallel]
        slots = ends + [0.0] * (parallel - len(ends))
        heapq.heapify(slots)
        latest = max(slots)
        current = frozenset(t.model for t in running) if running else gate.loaded
        swap = self.DEFAULT_SWAP_S if self.swap_s is None else self.swap_s
        starts: dict[int, float] = {}
        for t in gate.waiting():
            service = self._service(t.model)
            if gate.compatible(t.model, current):
                start = heapq.heappop(slots)
                current = current | {t.model}
            else:
                start = latest + swap
                slots = [start] * (parallel - 1)
                current = frozenset({t.model})
            heapq.heappush(slots, start + service)
            latest = max(latest, start + service)
            starts[t.seq] = start
        return starts


# -- the replay ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class Job:
    """One request: what it will do (drawn at arrival) and what happened."""

    client: int
    ticket: Ticket
    tokens: int
    rate: float
    ttft_s: float
    duration_s: float  # embeddings
    begin: float = 0.0  # the box begins on it (after a load)
    first_byte: float = math.inf
    end: float = math.inf
    etas: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Sample:
    estimate_s: float | None
    actual_s: float


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


def draw(rng: random.Random, client: int, seq: int, favourite: str) -> Job:
    """A request: mostly the client's favourite model; ``max_tokens`` one time in three."""
    model = favourite if rng.random() < 0.8 else rng.choice((QWEN, LLAMA, EMBED))
    sim = MODELS[model]
    if sim.rate == 0:
        ticket = Ticket(request_id=f"r{seq}", model=model, meta={"stream": False})
        return Job(client, ticket, 0, 0.0, 0.0, _lognormal(rng, sim.duration_s, 0.3))
    max_tokens = rng.choice(MAX_TOKENS_CHOICES) if rng.random() < 1 / 3 else None
    tokens = max(1, round(_lognormal(rng, sim.length, 0.7)))
    tokens = min(tokens, max_tokens or 4096)
    ticket = Ticket(request_id=f"r{seq}", model=model, max_tokens=max_tokens,
                    meta={"stream": rng.random() < 0.8})
    return Job(client, ticket, tokens, _lognormal(rng, sim.rate, 0.1), _lognormal(rng, sim.ttft_s, 0.4), 0.0)


def replay(scenario: Scenario, seed: int, per_client: int) -> dict[str, list[Sample]]:
    """Run one scenario; the samples per estimator."""
    rng = random.Random(seed)
    clock = Clock()
    started: list[Ticket] = []
    boxes = [Box(b.name, parallel=b.parallel, models=b.models, loaded=frozenset({b.models[0]}),
                 slots={m: b.slots for m in b.models} if b.slots else {}) for b in scenario.boxes]
    gate = Gate(boxes=boxes, clock=clock, max_queue=100_000, on_start=started.append)
    estimators: dict[str, PreviousEstimator | Estimator] = {"previous": PreviousEstimator(),
                                                             "new": Estimator()}
    samples: dict[str, list[Sample]] = {name: [] for name in estimators}
    events: list[tuple[float, int, str, object]] = []
    order = itertools.count()
    favourites = [(QWEN, LLAMA)[c % 2] for c in range(scenario.clients)]
    left = [per_client] * scenario.clients
    jobs: dict[Ticket, Job] = {}
    ready_at = {b.name: 0.0 for b in boxes}
    switches = {b.name: 0 for b in boxes}

    def push(at: float, kind: str, what: object) -> None:
        heapq.heappush(events, (at, next(order), kind, what))

    def begin_started() -> None:
        for name, box in gate.boxes.items():  # a swap: the box loads before it begins on anything
            if box.switches > switches[name]:
                switches[name] = box.switches
                ready_at[name] = clock.now + LOAD_S
        for ticket in started:
            job = jobs[ticket]
            job.begin = max(clock.now, ready_at[ticket.box or ""])
            if job.rate:
                job.first_byte = job.begin + job.ttft_s
                job.end = job.first_byte + job.tokens / job.rate
            else:
                job.end = job.first_byte = job.begin + job.duration_s
            push(job.end, "end", job)
        started.clear()

    def progress() -> None:
        """What the relay would have recorded by now."""
        for ticket in gate.running:
            job = jobs[ticket]
            if clock.now >= job.first_byte:
                ticket.first_byte_at = job.first_byte
                if ticket.meta.get("stream") and job.rate:
                    ticket.streamed = min(job.tokens, int((clock.now - job.first_byte) * job.rate))

    for c in range(scenario.clients):
        push(rng.expovariate(1 / scenario.think_s), "arrive", c)
    seq = 0
    while events:
        clock.now, _, kind, what = heapq.heappop(events)
        progress()
        if kind == "arrive":
            assert isinstance(what, int)
            seq += 1
            job = draw(rng, what, seq, favourites[what])
            jobs[job.ticket] = job
            gate.submit(job.ticket)
            begin_started()
            if job.ticket.state == WAITING:
                job.etas = {name: est.eta_ms(gate, job.ticket) for name, est in estimators.items()}
            continue
        assert isinstance(what, Job)
        job, ticket = what, what.ticket
        gate.release(ticket)
        begin_started()
        service = job.end - (ticket.started_at or 0.0)
        for name, est in estimators.items():
            if isinstance(est, Estimator):
                stream = bool(ticket.meta.get("stream"))
                est.observe(ticket.model, service, box=ticket.box,
                            completion_tokens=job.tokens if job.rate else None,
                            ttft_s=job.first_byte - (ticket.started_at or 0.0) if stream else None)
            else:
                est.observe(ticket.model, service)
            if name in job.etas:
                eta = job.etas[name]
                samples[name].append(Sample(None if eta is None else eta / 1000,
                                            job.begin - ticket.arrived_at))
        del jobs[ticket]
        left[job.client] -= 1
        if left[job.client]:
            push(clock.now + rng.expovariate(1 / scenario.think_s), "arrive", job.client)
    return samples


# -- the report ------------------------------------------------------------------------------
@dataclass
class Row:
    waits: int  # waits of at least MIN_WAIT_S with an estimate
    median: float | None
    p90: float | None
    bias: float | None
    zero: int
    none: int


def summarize(samples: list[Sample]) -> Row:
    judged = [s for s in samples if s.estimate_s is not None and s.actual_s >= MIN_WAIT_S]
    errors = [abs(s.estimate_s - s.actual_s) / s.actual_s for s in judged if s.estimate_s is not None]
    signed = [(s.estimate_s - s.actual_s) / s.actual_s for s in judged if s.estimate_s is not None]
    return Row(len(judged), pct(errors, 50), pct(errors, 90), pct(signed, 50),
               sum(1 for s in samples if s.estimate_s == 0), sum(1 for s in samples if s.estimate_s is None))


def _pc(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.0f}%" if signed else f"{value * 100:.0f}%"


def table(results: dict[str, dict[str, list[Sample]]]) -> str:
    lines = ["| scenario | estimator | waits | median rel. error | p90 rel. error | bias (median) "
             "| zero ETAs | no ETA |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    everything: dict[str, list[Sample]] = {}
    for scenario, per in results.items():
        for name, samples in per.items():
            everything.setdefault(name, []).extend(samples)
            lines.append(_line(scenario, name, summarize(samples)))
    for name, samples in everything.items():
        lines.append(_line("**all**", name, summarize(samples)))
    return "\n".join(lines)


def _line(scenario: str, name: str, row: Row) -> str:
    return (f"| {scenario} | {name} | {row.waits} | {_pc(row.median)} | {_pc(row.p90)} | "
            f"{_pc(row.bias, signed=True)} | {row.zero} | {row.none} |")


def run(seeds: int, per_client: int, scenarios: tuple[Scenario, ...] = SCENARIOS,
        progress: Callable[[str], None] | None = None) -> dict[str, dict[str, list[Sample]]]:
    results: dict[str, dict[str, list[Sample]]] = {}
    for scenario in scenarios:
        merged: dict[str, list[Sample]] = {}
        for seed in range(seeds):
            for name, samples in replay(scenario, seed, per_client).items():
                merged.setdefault(name, []).extend(samples)
        results[scenario.name] = merged
        if progress is not None:
            progress(scenario.name)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eta", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs per scenario, seeds 0..N-1 (default 3)")
    parser.add_argument("--requests", type=int, default=40, help="requests per client (default 40)")
    args = parser.parse_args(argv)
    print(table(run(max(1, args.seeds), max(1, args.requests))))


if __name__ == "__main__":
    main()
