"""The last few minutes of the queue, kept by the server.

The status page used to build its chart and its throughput from its own polls, so both
started from nothing whenever the page was opened. The server keeps them instead: one
sample per ``step_s`` of the queue depth, the running requests and the cumulative counters of
finished requests and completion tokens, for ``window_s``. ``GET /queue/history`` returns
them; the page draws the chart and takes the throughput over the last minute from them (the
difference between two counter samples), then goes on with its own polls of ``/queue``.

No I/O here: ``tick`` takes a sample; ``start`` runs a task that ticks until ``stop``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

STEP_S = 1.0
WINDOW_S = 300.0
FIELDS = ("depth", "active", "served", "failed", "completion_tokens")


class _GateLike(Protocol):
    @property
    def depth(self) -> int: ...

    @property
    def active(self) -> int: ...


class _StateLike(Protocol):
    @property
    def gate(self) -> _GateLike: ...

    @property
    def totals(self) -> Mapping[str, int]: ...


class History:
    """A ring of samples, oldest first; each sample is a dict of ``t`` (Unix time) and
    ``FIELDS``."""

    def __init__(self, read: Callable[[], Mapping[str, int]], *, step_s: float = STEP_S,
                 window_s: float = WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        self.read = read
        self.step_s = step_s
        self.window_s = window_s
        self.clock = clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=int(window_s / step_s) + 1)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, state: _StateLike, **kwargs: Any) -> History:
        """Sampling an lmgate ``AppState``: its gate's depth and active count, its totals."""

        def read() -> dict[str, int]:
            totals = state.totals
            return {"depth": state.gate.depth, "active": state.gate.active,
                    "served": totals.get("served", 0), "failed": totals.get("failed", 0),
                    "completion_tokens": totals.get("completion_tokens", 0)}

        return cls(read, **kwargs)

    def tick(self) -> None:
        values = self.read()
        sample: dict[str, Any] = {"t": round(self.clock(), 3)}
        sample.update((name, int(values.get(name, 0))) for name in FIELDS)
        self.samples.append(sample)

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /queue/history`` returns. ``now`` lets a client line the samples up with
        its own clock, which may differ from the server's."""
        now = self.clock()
        since = now - self.window_s
        return {
            "object": "queue.history",
            "now": round(now, 3),
            "step_s": self.step_s,
            "window_s": self.window_s,
            "samples": [s for s in self.samples if s["t"] >= since],
        }

    async def run(self) -> None:
        """Sample every ``step_s`` until cancelled."""
        while True:
            self.tick()
            await asyncio.sleep(self.step_s)

    def start(self) -> None:
        """Sample in the background, on the running event loop (the app's startup)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="lmgate-history")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
