"""Wait estimates: a real Gate with a fake clock, and the Estimator replaying its line."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.eta import ALPHA, DEFAULT_SWAP_S, Estimator
from proxy.gate import Gate, QueueFull, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(parallel: int = 1, **kw: object) -> tuple[Gate, Clock, Estimator]:
    clock = Clock()
    gate = Gate(parallel=parallel, clock=clock, **kw)  # type: ignore[arg-type]
    return gate, clock, Estimator()


def submit(gate: Gate, *models: str) -> list[Ticket]:
    out = []
    for i, model in enumerate(models):
        ticket = Ticket(request_id=f"{model}{gate.depth + gate.active}-{i}", model=model)
        gate.submit(ticket)
        out.append(ticket)
    return out


def etas(est: Estimator, gate: Gate) -> list[int | None]:
    return [est.eta_ms(gate, t) for t in gate.waiting()]


def test_nothing_learned_means_no_estimate() -> None:
    gate, _, est = setup()
    running, waiting = submit(gate, "a", "a")
    assert est.eta_ms(gate, running) == 0
    assert est.eta_ms(gate, waiting) is None  # not an invented 10 s
    assert 1 <= est.retry_after_s(gate) <= 120


def test_first_observation_replaces_the_guess_then_moves_by_alpha() -> None:
    est = Estimator()
    est.observe("a", 4.0)
    assert est.service_s("a") == 4.0
    est.observe("a", 8.0)
    assert est.service_s("a") == 4.0 + ALPHA * 4.0
    assert est.service_s("never-seen") == est.overall_s


def test_one_model_counts_what_is_ahead_minus_what_already_ran() -> None:
    gate, clock, est = setup()
    est.observe("a", 10.0)
    submit(gate, "a", "a", "a", "a", "a")  # one runs (started at 0), four wait
    clock.now = 4.0
    assert etas(est, gate) == [6000, 16000, 26000, 36000]


def test_parallel_slots_share_the_line() -> None:
    gate, _, est = setup(parallel=2)
    est.observe("a", 10.0)
    submit(gate, "a", "a", "a", "a", "a", "a")  # two run, four wait
    assert etas(est, gate) == [10000, 10000, 20000, 20000]


def test_a_model_change_waits_for_every_slot_and_pays_the_swap() -> None:
    gate, _, est = setup(parallel=2)
    est.observe("a", 10.0)
    est.observe("b", 2.0, switched=False)
    submit(gate, "a", "b", "b", "a")  # a runs; b, b wait for it to end, then a swap
    swap = DEFAULT_SWAP_S * 1000
    assert etas(est, gate) == [10000 + swap, 10000 + swap, 12000 + 2 * swap]


def test_alternating_models_are_ordered_and_not_inflated() -> None:
    """The issue's case: positions 1-4 read 6.7, 3.8, 10.2, 7.5 s."""
    gate, clock, est = setup()
    for model, seconds in (("a", 3.0), ("a", 3.0), ("b", 1.0 + 4.0), ("b", 1.0), ("a", 3.0 + 4.0)):
        est.observe(model, seconds)  # b: 1 s, a: 3 s, a swap: 4 s (learned from the switches)
    assert est.swap_s == 4.0
    submit(gate, "a", "b", "a", "b", "a")
    clock.now = 1.0
    assert etas(est, gate) == [6000, 11000, 18000, 23000]  # a ends at 3 s, each change +4 s


def test_swap_cost_is_learned_from_requests_that_caused_a_switch() -> None:
    est = Estimator()
    est.observe("a", 10.0)
    est.observe("b", 9.0)  # switched, b unknown: a (high) first guess for b ...
    assert est.service_s("b") == 9.0
    est.observe("b", 3.0)  # ... replaced by the first swap-free observation
    assert est.service_s("b") == 3.0
    est.observe("a", 16.0)  # switched back: 6 s over a's usual 10 s
    assert est.swap_s == 6.0 and est.service_s("a") == 10.0


def test_estimates_shrink_as_the_running_request_progresses() -> None:
    gate, clock, est = setup()
    est.observe("a", 10.0)
    _, waiting = submit(gate, "a", "a")
    assert est.eta_ms(gate, waiting) == 10000
    clock.now = 0.5  # within the cached walk
    assert est.eta_ms(gate, waiting) == 9500
    clock.now = 7.0  # a fresh walk
    assert est.eta_ms(gate, waiting) == 3000
    clock.now = 30.0  # overran: it may end any moment
    assert est.eta_ms(gate, waiting) == 0


def test_the_walk_is_cached_per_gate_version() -> None:
    gate, _, est = setup(max_queue=1000)
    est.observe("a", 1.0)
    submit(gate, "a", *["a"] * 500)
    walks = count_walks(est)
    line = gate.waiting()
    assert [est.eta_ms(gate, t, i + 1) for i, t in enumerate(line)][-1] == 500_000
    assert walks() == 1
    gate.cancel(line[0])
    assert est.eta_ms(gate, line[1]) == 1000 and walks() == 2


def test_a_burst_of_arrivals_extends_the_walk_instead_of_redoing_it() -> None:
    gate, _, est = setup(parallel=2, max_queue=5000)
    est.observe("a", 2.0)
    walks = count_walks(est)
    arrivals = submit(gate, *["a"] * 2)  # both run
    for i in range(3000):  # as gated.py does: the estimate at arrival, after each submit
        (ticket,) = submit(gate, "ab"[i % 7 == 0])
        arrivals.append(ticket)
        assert est.eta_ms(gate, ticket) is not None
    assert walks() == 1
    incremental = etas(est, gate)
    est._walk = None
    assert etas(est, gate) == incremental  # the same as a replay from scratch


def test_refused_requests_cost_no_replays() -> None:
    gate, _, est = setup(max_queue=2)
    est.observe("a", 5.0)
    submit(gate, "a", "a", "a")
    walks = count_walks(est)
    for _ in range(100):
        try:
            submit(gate, "a")
        except QueueFull:
            assert est.retry_after_s(gate) == 5  # the head starts in 5 s: room for one
    assert walks() == 1


def count_walks(est: Estimator) -> Callable[[], int]:
    calls = [0]
    original = est._walk_line

    def counting(*args: object) -> object:
        calls[0] += 1
        return original(*args)  # type: ignore[arg-type]

    est._walk_line = counting  # type: ignore[method-assign]
    return lambda: calls[0]


def test_left_tickets_have_no_estimate() -> None:
    gate, _, est = setup()
    est.observe("a", 1.0)
    running, waiting = submit(gate, "a", "a")
    gate.cancel(waiting)
    assert est.eta_ms(gate, waiting) is None
    gate.release(running)
    assert est.eta_ms(gate, running) is None


def test_retry_after_is_when_the_line_has_room_again() -> None:
    gate, _, est = setup(max_queue=3)
    est.observe("a", 20.0)
    submit(gate, "a", "a", "a", "a")  # one runs, the line is full
    assert est.retry_after_s(gate) == 20  # the head starts: room for one
    est.observe("a", 1000.0, switched=False)
    assert est.retry_after_s(gate) == 120  # capped for the OpenAI SDKs
    est.observe("a", 0.0, switched=False)
    est.observe("a", 0.0, switched=False)
    assert est.retry_after_s(gate) >= 1


@settings(max_examples=150, deadline=None)
@given(
    parallel=st.integers(1, 4),
    max_skips=st.integers(0, 2),
    models=st.lists(st.sampled_from("ABCE"), min_size=1, max_size=25),
    learned=st.lists(st.tuples(st.sampled_from("ABCE"), st.floats(0, 60)), min_size=1, max_size=8),
    elapsed=st.floats(0, 100),
)
def test_estimates_never_decrease_along_the_line(parallel: int, max_skips: int, models: list[str],
                                                  learned: list[tuple[str, float]], elapsed: float) -> None:
    gate, clock, est = setup(parallel=parallel, max_skips=max_skips, groups=[["A", "E"]])
    for model, seconds in learned:
        est.observe(model, seconds)
    for model in models:  # each estimated at arrival, as gated.py does
        (ticket,) = submit(gate, model)
        est.eta_ms(gate, ticket)
    clock.now = elapsed
    values = etas(est, gate)
    assert all(v is not None and v >= 0 for v in values)
    assert values == sorted(values)  # type: ignore[type-var]
    clock.now = 0.0
    extended = etas(est, gate)
    est._walk = None
    assert etas(est, gate) == extended  # extending the replay equals redoing it
