"""The gate on its own: order, positions, cancellation at every point, no leaked slot."""

from __future__ import annotations

import pytest

from proxy.gate import CANCELLED, DONE, REJECTED, RUNNING, WAITING, Gate, GateClosed, QueueFull, Ticket


class Recorder:
    def __init__(self) -> None:
        self.started: list[str] = []

    def __call__(self, t: Ticket) -> None:
        self.started.append(t.request_id)


def make(**kw: object) -> tuple[Gate, Recorder]:
    rec = Recorder()
    clock = iter(range(10**6))
    gate = Gate(on_start=rec, clock=lambda: float(next(clock)), **kw)  # type: ignore[arg-type]
    return gate, rec


def t(rid: str, model: str = "a", who: str = "") -> Ticket:
    return Ticket(request_id=rid, model=model, identity=who)


def assert_free(gate: Gate) -> None:
    assert gate.active == 0 and gate.depth == 0


def test_fifo_order_and_positions() -> None:
    gate, rec = make()
    tickets = [t(f"r{i}", model="ab"[i % 2]) for i in range(6)]
    for x in tickets:
        gate.submit(x)
    assert [x.position_at_arrival for x in tickets] == [0, 1, 2, 3, 4, 5]
    assert [x.depth_at_arrival for x in tickets] == [0, 1, 2, 3, 4, 5]  # a waiter counts itself
    assert rec.started == ["r0"]
    for i in range(6):
        assert [gate.position(x) for x in tickets[i:]] == list(range(len(tickets) - i))
        gate.release(tickets[i])
    assert rec.started == [f"r{i}" for i in range(6)]
    assert_free(gate)


def test_one_at_a_time_even_for_same_model() -> None:
    gate, rec = make()
    a, b = t("a"), t("b")
    gate.submit(a)
    gate.submit(b)
    assert (a.state, b.state) == (RUNNING, WAITING)
    gate.release(a)
    assert b.state == RUNNING and rec.started == ["a", "b"]


@pytest.mark.parametrize("where", ["head", "middle", "tail"])
def test_cancel_waiting_anywhere_moves_the_rest_up(where: str) -> None:
    gate, rec = make()
    running = t("run")
    gate.submit(running)
    waiting = [t(f"w{i}") for i in range(3)]
    for x in waiting:
        gate.submit(x)
    victim = {"head": waiting[0], "middle": waiting[1], "tail": waiting[2]}[where]
    assert gate.cancel(victim) is True
    assert victim.state == CANCELLED and gate.position(victim) == -1
    rest = [x for x in waiting if x is not victim]
    assert [gate.position(x) for x in rest] == [1, 2]
    gate.release(running)
    assert victim.request_id not in rec.started
    for x in rest:
        gate.release(x)
    assert_free(gate)


def test_cancel_running_frees_the_slot_and_starts_next() -> None:
    gate, rec = make()
    a, b = t("a"), t("b")
    gate.submit(a)
    gate.submit(b)
    assert gate.cancel(a) is True
    assert a.state == CANCELLED and b.state == RUNNING
    gate.release(b)
    assert_free(gate)


def test_release_and_cancel_are_idempotent() -> None:
    gate, rec = make()
    a, b, c = t("a"), t("b"), t("c")
    for x in (a, b, c):
        gate.submit(x)
    gate.release(a)
    gate.release(a)
    gate.cancel(a)
    assert gate.active == 1 and rec.started == ["a", "b"]
    assert gate.cancel(c) and not gate.cancel(c)
    gate.release(c)
    gate.release(b)
    assert_free(gate)
    assert a.state == DONE


def test_release_of_a_waiting_ticket_withdraws_it() -> None:
    """Handlers release in `finally` whatever state the ticket is in."""
    gate, _ = make()
    a, b = t("a"), t("b")
    gate.submit(a)
    gate.submit(b)
    gate.release(b)
    assert b.state == CANCELLED and gate.depth == 0
    gate.release(a)
    assert_free(gate)


def test_queue_full_leaves_gate_unchanged() -> None:
    gate, _ = make(max_queue=2)
    tickets = [t(f"r{i}") for i in range(3)]
    for x in tickets:
        gate.submit(x)
    extra = t("extra")
    version = gate.version
    with pytest.raises(QueueFull):
        gate.submit(extra)
    assert gate.depth == 2 and extra.state == "new" and extra not in gate.tickets()
    assert gate.version >= version
    for x in tickets:
        gate.release(x)
    assert_free(gate)


def test_max_queue_zero_admits_only_immediate_starts() -> None:
    gate, _ = make(max_queue=0)
    a = t("a")
    gate.submit(a)
    with pytest.raises(QueueFull):
        gate.submit(t("b"))
    gate.release(a)
    gate.submit(t("c"))
    assert gate.active == 1


def test_close_rejects_waiting_keeps_running() -> None:
    gate, rec = make()
    a, b, c = t("a"), t("b"), t("c")
    for x in (a, b, c):
        gate.submit(x)
    dropped = gate.close()
    assert dropped == [b, c] and all(x.state == REJECTED for x in dropped)
    assert a.state == RUNNING
    with pytest.raises(GateClosed):
        gate.submit(t("d"))
    gate.release(a)
    assert rec.started == ["a"]
    assert_free(gate)


def test_tickets_and_waiting_list() -> None:
    gate, _ = make()
    a, b, c = t("a"), t("b"), t("c")
    for x in (a, b, c):
        gate.submit(x)
    assert sorted(x.request_id for x in gate.tickets()) == ["a", "b", "c"]
    assert gate.waiting() == [b, c] and gate.running == [a]
    assert gate.depth_by_model() == {"a": 2} and gate.active_by_model() == {"a": 1}


def test_resubmitting_a_ticket_is_an_error() -> None:
    gate, _ = make()
    a = t("a")
    gate.submit(a)
    with pytest.raises(ValueError):
        gate.submit(a)


def test_waited_time_uses_the_injected_clock() -> None:
    gate, _ = make()
    a, b = t("a"), t("b")
    gate.submit(a)  # clock 0 -> arrived 0, started 1
    gate.submit(b)  # arrived 2
    gate.release(a)  # ended 3, b started 4
    assert b.arrived_at == 2.0 and b.started_at == 4.0 and b.waited_s(100.0) == 2.0


# -- model-aware policy ------------------------------------------------------------------
def test_parallel_same_model_overlaps_other_model_waits() -> None:
    gate, rec = make(parallel=3)
    a1, a2, b1, a3 = t("a1", "A"), t("a2", "A"), t("b1", "B"), t("a3", "A")
    for x in (a1, a2, b1, a3):
        gate.submit(x)
    # strict FIFO: a3 may not overtake b1, and b1 may not run beside A
    assert rec.started == ["a1", "a2"]
    assert gate.position(b1) == 1 and gate.position(a3) == 2
    gate.release(a1)
    assert rec.started == ["a1", "a2"]
    gate.release(a2)
    assert rec.started == ["a1", "a2", "b1"]
    gate.release(b1)
    assert rec.started[-1] == "a3"
    assert gate.switches == 2  # A -> B -> A


def test_max_skips_batches_the_loaded_model_within_the_bound() -> None:
    gate, rec = make(parallel=1, max_skips=2)
    first = t("a0", "A")
    gate.submit(first)
    b = t("b", "B")
    gate.submit(b)
    later = [t(f"a{i}", "A") for i in range(1, 5)]
    for x in later:
        gate.submit(x)
    # projected: a1, a2 overtake b (K=2), then b, then a3, a4
    assert [gate.position(x) for x in [later[0], later[1], b, later[2], later[3]]] == [1, 2, 3, 4, 5]
    order = []
    running = first
    while True:
        gate.release(running)
        if not gate.running:
            break
        running = gate.running[0]
        order.append(running.request_id)
    assert order == ["a1", "a2", "b", "a3", "a4"]
    assert b.skipped == 2
    assert gate.switches == 2


def test_groups_run_together_without_a_switch() -> None:
    gate, rec = make(parallel=2, groups=[["chat", "embed"]])
    c, e, other = t("c", "chat"), t("e", "embed"), t("o", "other")
    for x in (c, e, other):
        gate.submit(x)
    assert rec.started == ["c", "e"] and gate.switches == 0
    assert gate.loaded == {"chat", "embed"}
    gate.release(c)
    assert rec.started == ["c", "e"]
    gate.release(e)
    assert rec.started[-1] == "o" and gate.switches == 1


def test_known_loaded_model_is_not_a_switch() -> None:
    gate, _ = make(loaded=["A"])
    gate.submit(t("a", "A"))
    assert gate.switches == 0
    gate2, _ = make()
    gate2.set_loaded(["B"])
    gate2.submit(t("a", "A"))
    assert gate2.switches == 1


def test_fair_policy_round_robins_between_identities() -> None:
    gate, rec = make(policy="fair")
    a_tickets = [t(f"a{i}", who="alice") for i in range(20)]
    for x in a_tickets:
        gate.submit(x)
    bob = t("bob", who="bob")
    gate.submit(bob)
    assert bob.position_at_arrival <= 2
    served: list[str] = []
    while gate.running:
        cur = gate.running[0]
        served.append(cur.request_id)
        gate.release(cur)
    assert served.index("bob") <= 2
    assert [s for s in served if s != "bob"] == [f"a{i}" for i in range(20)]


def test_fifo_policy_serves_bob_after_alice() -> None:
    gate, _ = make(policy="fifo")
    for i in range(20):
        gate.submit(t(f"a{i}", who="alice"))
    bob = t("bob", who="bob")
    gate.submit(bob)
    assert bob.position_at_arrival == 20


def test_waiting_for_counts_per_identity() -> None:
    gate, _ = make()
    gate.submit(t("x", who="alice"))
    gate.submit(t("y", who="alice"))
    gate.submit(t("z", who="bob"))
    assert gate.waiting_for("alice") == 1 and gate.waiting_for("bob") == 1


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        Gate(parallel=0)
    with pytest.raises(ValueError):
        Gate(max_queue=-1)
    with pytest.raises(ValueError):
        Gate(policy="random")
