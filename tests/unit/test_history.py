"""The server-side history behind the status page: samples, the window, the snapshot."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from proxy.history import FIELDS, History


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_state(depth: int = 0, active: int = 0, **totals: int) -> SimpleNamespace:
    base = {"served": 0, "failed": 0, "rejected": 0, "completion_tokens": 0}
    return SimpleNamespace(gate=SimpleNamespace(depth=depth, active=active), totals={**base, **totals})


def test_samples_read_the_state_each_tick() -> None:
    clock, state = Clock(), fake_state()
    history = History.of(state, clock=clock)
    history.tick()
    state.gate.depth, state.gate.active = 3, 1
    state.totals.update(served=5, failed=1, completion_tokens=400)
    clock.now += 1
    history.tick()
    first, second = history.snapshot()["samples"]
    assert set(first) == {"t", *FIELDS}
    assert first == {"t": 1_700_000_000.0, "depth": 0, "active": 0, "served": 0, "failed": 0,
                     "completion_tokens": 0}
    assert second == {"t": 1_700_000_001.0, "depth": 3, "active": 1, "served": 5, "failed": 1,
                      "completion_tokens": 400}


def test_only_the_window_is_kept_and_shown() -> None:
    clock = Clock()
    history = History.of(fake_state(), clock=clock, step_s=1.0, window_s=10.0)
    for _ in range(50):
        history.tick()
        clock.now += 1
    snap = history.snapshot()
    assert len(history.samples) <= 11
    assert snap["now"] == clock.now and snap["window_s"] == 10.0 and snap["step_s"] == 1.0
    assert all(clock.now - s["t"] <= 10.0 for s in snap["samples"])
    clock.now += 60  # nothing sampled for a minute (a stalled loop): nothing stale is shown
    assert history.snapshot()["samples"] == []


def test_start_ticks_in_the_background_until_stopped() -> None:
    async def body() -> None:
        history = History.of(fake_state(depth=2), step_s=0.01)
        history.start()
        history.start()  # idempotent
        await asyncio.sleep(0.1)
        history.stop()
        count = len(history.samples)
        assert count >= 3 and history.samples[-1]["depth"] == 2
        await asyncio.sleep(0.05)
        assert len(history.samples) == count

    asyncio.run(body())
