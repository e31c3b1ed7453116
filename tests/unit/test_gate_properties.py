"""Property-based tests of the gate: random arrivals, cancellations and completions under
every policy, with the invariants checked after each step."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.gate import CANCELLED, DONE, RUNNING, WAITING, Gate, QueueFull, Ticket

MODELS = ["A", "B", "C", "E"]
GROUPS = [["A", "E"]]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("finish"), st.integers(0, 50), st.just(0)),
    st.tuples(st.just("cancel"), st.integers(0, 50), st.just(0)),
)


class Starts:
    def __init__(self) -> None:
        self.order: list[Ticket] = []

    def __call__(self, t: Ticket) -> None:
        self.order.append(t)


def check_invariants(gate: Gate, all_tickets: list[Ticket], use_groups: bool) -> None:
    running = gate.running
    assert len(running) <= gate.parallel
    models = {t.model for t in running}
    if len(models) > 1:
        assert use_groups and any(models <= set(g) for g in GROUPS), models
    for t in all_tickets:
        assert t.skipped <= gate.max_skips
        assert t.state in ("new", WAITING, RUNNING, DONE, CANCELLED)
    assert gate.depth == sum(1 for t in all_tickets if t.state == WAITING)
    assert gate.active == sum(1 for t in all_tickets if t.state == RUNNING)
    # with room to run, something runs
    if gate.depth and not running:
        raise AssertionError("requests wait while nothing runs: a leaked or stuck slot")


def check_positions_truthful(gate: Gate) -> None:
    """Position p means p-1 requests start before it if nothing else arrives."""
    waiting = gate.waiting()
    positions = {t.seq: gate.position(t) for t in waiting}
    assert sorted(positions.values()) == list(range(1, len(waiting) + 1))
    twin = copy.deepcopy(gate)
    starts = Starts()
    twin.on_start = starts
    while twin.running:
        twin.release(twin.running[0])
    started_seqs = [t.seq for t in starts.order]
    for seq, pos in positions.items():
        assert started_seqs.index(seq) == pos - 1, (seq, pos, started_seqs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, min_size=8, max_size=80),
    parallel=st.integers(1, 4),
    max_skips=st.integers(0, 3),
    policy=st.sampled_from(["fifo", "fair"]),
    use_groups=st.booleans(),
    max_queue=st.integers(0, 30),
)
def test_gate_invariants(ops: list[tuple[str, int, int]], parallel: int, max_skips: int, policy: str,
                         use_groups: bool, max_queue: int) -> None:
    starts = Starts()
    gate = Gate(parallel=parallel, max_skips=max_skips, policy=policy, max_queue=max_queue,
                groups=GROUPS if use_groups else (), on_start=starts)
    tickets: list[Ticket] = []
    rejected = 0
    for kind, a, b in ops:
        if kind == "arrive":
            t = Ticket(request_id=f"r{len(tickets)}", model=MODELS[a], identity=f"id{b}")
            try:
                gate.submit(t)
                tickets.append(t)
            except QueueFull:
                rejected += 1
                assert t.state == "new"
        elif kind == "finish" and gate.running:
            gate.release(gate.running[a % len(gate.running)])
        elif kind == "cancel" and tickets:
            gate.cancel(tickets[a % len(tickets)])
        check_invariants(gate, tickets, use_groups)
        if not use_groups:
            check_positions_truthful(gate)
    # drain: everything admitted is served or cancelled, nothing leaks
    while gate.running:
        gate.release(gate.running[0])
    assert gate.active == 0 and gate.depth == 0
    for t in tickets:
        assert t.state in (DONE, CANCELLED)
        if t.state == DONE:
            assert t in starts.order
    assert len(starts.order) == len(set(map(id, starts.order)))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), max_skips=st.integers(1, 4))
def test_swap_batching_switches_less_and_respects_the_bound(seed: int, max_skips: int) -> None:
    """Mixed 60/40 workload arriving faster than service: K > 0 swaps less than K = 0."""
    import random

    def run(k: int) -> tuple[int, int]:
        rnd = random.Random(seed)
        gate = Gate(parallel=1, max_skips=k, max_queue=10_000)
        tickets = []
        for i in range(120):
            t = Ticket(request_id=str(i), model="A" if rnd.random() < 0.6 else "B")
            gate.submit(t)
            tickets.append(t)
            if i % 2 == 1 and gate.running:  # two arrivals per completion
                gate.release(gate.running[0])
        while gate.running:
            gate.release(gate.running[0])
        return gate.switches, max(t.skipped for t in tickets)

    strict_switches, strict_skips = run(0)
    batched_switches, batched_skips = run(max_skips)
    assert strict_skips == 0
    assert batched_skips <= max_skips
    assert batched_switches <= strict_switches
