"""Wait estimates: a real Gate with a fake clock, and the Estimator replaying its line."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.eta import ALPHA, DEFAULT_SWAP_S, MIN_LEFT_S, Estimator
from proxy.gate import Box, Gate, QueueFull, Ticket


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
    assert est.retry_after_s(gate) == 10  # the documented guess, for the 429 alone


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
    est.observe("a", 0.0, switched=False)
    est.observe("a", 0.0, switched=False)
    assert est.retry_after_s(gate) >= 1


def learn_tokens(est: Estimator, model: str = "a", *, ttft_s: float = 0.5, tokens: int = 200,
                 rate: float = 20.0, times: int = 3) -> None:
    """Streams of ``tokens`` at ``rate`` after ``ttft_s``, alike (no spread)."""
    for _ in range(times):
        est.observe(model, ttft_s + tokens / rate, switched=False, completion_tokens=tokens, ttft_s=ttft_s)


def stream(gate: Gate, model: str = "a", max_tokens: int | None = None) -> Ticket:
    ticket = Ticket(request_id=f"s{gate.depth + gate.active}", model=model, max_tokens=max_tokens,
                    meta={"stream": True})
    gate.submit(ticket)
    return ticket


def test_a_request_running_longer_than_usual_still_holds_the_next_one_back() -> None:
    """Open WebUI read "Waiting in line: #3, about 1 s" for a 35 s wait: a running request
    that had outlived its model's usual duration counted as ending now (its rest was
    ``max(0, usual - elapsed)``). Now it may always take ``MIN_LEFT_S`` more, and more the
    longer it has run (a quarter of its run, at most one more usual request)."""
    gate, clock, est = setup()
    est.observe("a", 10.0)
    _, waiting = submit(gate, "a", "a")
    clock.now = 10.0
    at_usual = est.eta_ms(gate, waiting)
    assert at_usual is not None and at_usual >= MIN_LEFT_S * 1000
    clock.now = 10.9  # the same walk, aged: still not 0
    assert est.eta_ms(gate, waiting) == MIN_LEFT_S * 1000
    clock.now = 30.0
    overran = est.eta_ms(gate, waiting)
    assert overran is not None and overran > at_usual  # grows with what it has done
    clock.now = 1000.0
    assert est.eta_ms(gate, waiting) == 10000  # capped: one more usual request


def test_a_stream_half_way_through_its_max_tokens_ends_at_its_rate() -> None:
    gate, clock, est = setup()
    learn_tokens(est)  # 0.5 s to first byte, 200 tokens at 20 tokens/s: 10.5 s as a rule
    running = stream(gate, max_tokens=100)
    waiting = stream(gate)
    running.first_byte_at, running.streamed = 0.5, 50
    clock.now = 3.0  # 50 of its 100 tokens in 2.5 s: 50 more at 20 tokens/s
    assert est.eta_ms(gate, waiting) == 2500
    clock.now = 4.5  # a fresh walk: 40 tokens in 4 s, half as fast as usual
    running.streamed = 40
    assert est.eta_ms(gate, waiting) == 6000  # its own rate counts: 60 tokens at 10 tokens/s


def test_a_stream_long_past_the_usual_is_expected_to_use_more_of_its_max_tokens() -> None:
    """What users saw: requests that usually stream 200 tokens, then one asked for 1,000 and
    has streamed 400 at the usual 20 tokens/s. "About 1 s" for the next in line was wrong: a
    request that has gone that far past the usual is a long one, and its max_tokens allows
    600 more. It is expected to go on about as far again as it has overrun (200 tokens, 10 s),
    within what its limit allows."""
    gate, clock, est = setup()
    learn_tokens(est)
    running = stream(gate, max_tokens=1000)
    waiting = stream(gate)
    running.first_byte_at, running.streamed = 0.5, 400
    clock.now = 20.5
    assert est.eta_ms(gate, waiting) == 10000
    running.streamed, clock.now = 950, 48.0  # near its limit: only 50 tokens can follow
    assert est.eta_ms(gate, waiting) == 2500


def test_a_stream_is_expected_to_end_when_its_model_usually_does() -> None:
    gate, clock, est = setup()
    learn_tokens(est)
    running = stream(gate)
    waiting = stream(gate, max_tokens=40)
    after = stream(gate)
    clock.now = 0.2  # no byte yet: the rest of the usual 0.5 s, then 200 tokens
    assert est.eta_ms(gate, waiting) == 10300
    assert est.eta_ms(gate, after) == 10300 + 2500  # 40 tokens at most: 0.5 s + 2 s
    running.first_byte_at, running.streamed = 0.5, 180
    clock.now = 9.5
    assert est.eta_ms(gate, waiting) == 1000  # 20 tokens to go


def test_what_tokens_teach_and_what_a_swap_does_not() -> None:
    est = Estimator()
    learn_tokens(est, times=1)
    assert est.expected_s("a") == 10.5
    assert est.expected_s("a", max_tokens=50) == 0.5 + 50 / 20
    est.observe("a", 99.0, switched=True, completion_tokens=200, ttft_s=60.0)  # a load inside
    assert est.expected_s("a", max_tokens=50) == 3.0
    est.observe("e", 0.2, switched=False)  # no tokens (embeddings): the duration only
    assert est.expected_s("e", max_tokens=50) == 0.2


def test_a_swap_is_inferred_per_box() -> None:
    est = Estimator()
    est.observe("a", 4.0, box="x")
    est.observe("b", 2.0, box="y")
    est.observe("a", 6.0, box="x")  # the same model as last time on x: no swap
    assert est.swap_s is None and est.service_s("a") == 4.0 + ALPHA * 2.0
    est.observe("b", 9.0, box="x")  # another model on x: a swap
    assert est.swap_s == 7.0


def test_retry_after_is_between_1_and_60_s_and_10_s_without_an_estimate() -> None:
    gate, _, est = setup(max_queue=1)
    submit(gate, "a", "a")
    assert est.retry_after_s(gate) == 10
    est.observe("a", 1000.0)
    assert est.retry_after_s(gate) == 60  # capped
    quick = Estimator()
    quick.observe("a", 0.01)
    assert quick.retry_after_s(gate) == 1


def test_retry_after_covers_the_time_the_line_stays_full() -> None:
    """The 429s said 2 s, then 1 s while the line stayed full for 4 s, and the SDKs spent
    their retries: the replay pooled the slots of every box, so the three idle slots of a box
    that does not serve the model looked free. Retry-After is now the first waiting
    request's ETA (the box that serves it replayed with its own slots), rounded up."""
    clock = Clock()
    boxes = [Box("x", models=("a",)), Box("y", parallel=3, models=("b",), loaded=frozenset({"b"}))]
    gate = Gate(boxes=boxes, clock=clock, max_queue=2)
    est = Estimator()
    est.observe("a", 4.0)
    submit(gate, "a", "a", "a")  # one runs for 4 s, two wait: the line is full until it ends
    for now in (0.0, 0.5, 1.5, 2.0, 3.0, 3.9):
        clock.now = now
        with pytest.raises(QueueFull):
            submit(gate, "a")
        head = gate.waiting()[0]
        eta = est.eta_ms(gate, head)
        assert eta is not None and est.retry_after_s(gate) * 1000 >= eta >= (4.0 - now) * 1000 - 1


def two_boxes(x: Box, y: Box) -> tuple[Gate, Clock, Estimator]:
    clock = Clock()
    return Gate(boxes=[x, y], clock=clock, max_queue=100), clock, Estimator()


def test_several_boxes_replay_each_box_with_its_own_slots() -> None:
    """The slots of a box that does not list a model are no use to it: not a sum of slots."""
    gate, _, est = two_boxes(Box("x", models=("a",)),
                             Box("y", parallel=3, models=("b",), loaded=frozenset({"b"})))
    est.observe("a", 10.0)
    submit(gate, *["a"] * 4)  # x runs one; y's three slots are for b only
    assert etas(est, gate) == [10000, 20000, 30000]
    gate, _, est = two_boxes(Box("x"), Box("y", slots={"a": 3}))
    est.observe("a", 10.0)
    submit(gate, *["a"] * 8)  # x runs one, y three (its slots for a), four wait
    assert gate.active == 4
    assert etas(est, gate) == [10000] * 4


def test_each_box_runs_only_the_models_it_lists() -> None:
    gate, clock, est = two_boxes(Box("x", models=("a",)), Box("y", models=("b",)))
    est.observe("a", 10.0)
    est.observe("b", 3.0, switched=False)
    submit(gate, "a", "b")  # one on each box: no swap anywhere
    clock.now = 1.0
    wa, wb, wa2 = submit(gate, "a", "b", "a")
    assert (est.eta_ms(gate, wa), est.eta_ms(gate, wb), est.eta_ms(gate, wa2)) == (9000, 2000, 19000)
    nowhere = Ticket(request_id="c", model="c")
    gate.submit(nowhere)  # no box lists it: it waits, and no estimate is invented
    assert est.eta_ms(gate, nowhere) is None


def test_a_swap_waits_for_the_longest_of_several() -> None:
    """Four requests side by side end, on average, well after the average one: the swap
    after them waits for the last. With alike requests, it waits for the average."""
    def eta_of_the_swap(lengths: list[int]) -> int | None:
        gate, _, est = setup(parallel=4)
        for tokens in lengths:
            est.observe("a", tokens / 20, switched=False, completion_tokens=tokens, ttft_s=0.0)
        est.observe("b", 1.0, switched=False)
        swap_s = est._swap("b")
        submit(gate, *["a"] * 8)  # four run, four wait
        (b,) = submit(gate, "b")
        eta = est.eta_ms(gate, b)
        return None if eta is None else eta - int(swap_s * 1000)

    alike = eta_of_the_swap([200] * 30)
    spread = eta_of_the_swap([100, 300] * 15)
    assert alike is not None and spread is not None
    assert alike == 20000 and spread > 1.3 * alike


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


@settings(max_examples=150, deadline=None)
@given(
    parallel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    slots=st.integers(1, 4),
    max_skips=st.integers(0, 1),
    models=st.lists(st.sampled_from("ABC"), min_size=1, max_size=25),
    learned=st.lists(st.tuples(st.sampled_from("ABC"), st.floats(0.01, 60)), min_size=1, max_size=8),
    elapsed=st.floats(0, 100),
)
def test_several_boxes_never_say_zero_to_a_waiting_request(
        parallel: tuple[int, int], slots: int, max_skips: int, models: list[str],
        learned: list[tuple[str, float]], elapsed: float) -> None:
    clock = Clock()
    boxes = [Box("x", parallel[0], models=("A", "B")),
             Box("y", parallel[1], models=("B", "C"), slots={"B": slots})]
    gate, est = Gate(boxes=boxes, clock=clock, max_skips=max_skips, max_queue=100), Estimator()
    for model, seconds in learned:
        est.observe(model, seconds, switched=False)
    for model in models:
        (ticket,) = submit(gate, model)
        est.eta_ms(gate, ticket)
    extended = etas(est, gate)
    est._walk = None
    assert etas(est, gate) == extended  # extending the replay equals redoing it
    clock.now = elapsed
    assert all(v is not None and v >= MIN_LEFT_S * 1000 for v in etas(est, gate))
