"""Scenario (e): thousands of streaming clients waiting in line through lmgate.

    holder   a streaming request that the fake upstream keeps open (``bench_hold``) until
             ``POST /release``: it holds lmgate's gate
    canary   the first waiting request; it disconnects while the others wait, so every client
             behind it moves up one place and must be told (``: queue_position=N``)
    clients  N streaming requests on N raw sockets, sent one at a time, each only after lmgate
             acknowledged the previous one with ``: queue_entered=N``: the order they were sent
             is the order they arrived

While they wait: lmgate's RSS, its CPU over a window, and ``GET /queue`` latency. Then the
canary leaves, the holder is released, and every client must be served, in the order sent,
as seen by the fake upstream (each body carries ``bench_index``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

from .client import Conn, HttpError, SseCollector, build_request, chat_request
from .context import Ctx
from .stats import r, summary_ms

HOLDER, CANARY = -2, -3
CONNECT_PARALLEL = 200


class Waiter:
    """One waiting client: its socket, what lmgate told it, and the task that reads it."""

    def __init__(self, index: int, conn: Conn) -> None:
        self.index = index
        self.conn = conn
        self.entered: int | None = None
        self.entered_evt = asyncio.Event()
        self.positions: list[tuple[int, int]] = []
        self.status: int | None = None
        self.col = SseCollector(on_comment=self._comment)
        self.task: asyncio.Task[None] | None = None
        self.error: str | None = None

    def _comment(self, t_ns: int, text: bytes) -> None:
        name, _, value = text.partition(b"=")
        if name == b"queue_entered":
            self.entered = int(value)
            self.entered_evt.set()
        elif name == b"queue_position":
            self.positions.append((t_ns, int(value)))

    def start(self, raw: bytes) -> None:
        self.conn.send(raw)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            head = await self.conn.read_head()
            self.status = head.status
            await self.conn.read_body(head, sink=self.col)
        except (HttpError, asyncio.IncompleteReadError, OSError, ValueError) as exc:
            self.error = repr(exc)
        finally:
            self.entered_evt.set()  # never leave the sender waiting on a failed client

    def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.conn.close()


async def scale(ctx: Ctx) -> dict[str, Any]:
    sz, lm, port = ctx.sizes, ctx.lmgate, ctx.lmgate.port
    n = sz.scale_clients
    out: dict[str, Any] = {"clients": n, "phases_s": {}, "summary": {}, "checks": {}}
    phases = out["phases_s"]
    waiters: list[Waiter] = []
    holder: Waiter | None = None
    canary: Waiter | None = None
    try:
        await ctx.upstream_call("POST", "/reset")
        rss_before = lm.rss_bytes()
        out["summary"]["rss_before_mb"] = r(rss_before / 2**20, 1)

        t = time.perf_counter()
        holder = Waiter(HOLDER, await Conn.open(port))
        holder.start(chat_request(port, stream=True, bench_hold=True, bench_delay_ms=100, bench_index=HOLDER))
        await _until(lambda: holder is not None and holder.col.n_data > 0, 10.0, "holder never streamed")
        canary = Waiter(CANARY, await Conn.open(port))
        canary.start(chat_request(port, stream=True, bench_chunks=sz.scale_chunks, bench_index=CANARY))
        await asyncio.wait_for(canary.entered_evt.wait(), 10.0)

        sem = asyncio.Semaphore(CONNECT_PARALLEL)

        async def connect(i: int) -> Waiter:
            async with sem:
                return Waiter(i, await Conn.open(port, timeout_s=30.0))

        waiters = list(await asyncio.gather(*(connect(i) for i in range(n))))
        phases["connect"] = r(time.perf_counter() - t, 3)

        with ctx.phase("e_admit"):
            t = time.perf_counter()
            for w in waiters:
                w.start(chat_request(port, stream=True, bench_chunks=sz.scale_chunks, bench_index=w.index))
                await asyncio.wait_for(w.entered_evt.wait(), 10.0)
                if w.entered is None:
                    raise RuntimeError(f"client {w.index} was not admitted: status {w.status}, {w.error}")
            phases["admit"] = r(time.perf_counter() - t, 3)
        out["summary"]["admit_per_client_ms"] = r(phases["admit"] * 1000 / n)

        await asyncio.sleep(0.5)
        rss = lm.rss_bytes()
        with ctx.phase("e_waiting"):
            c0, t0 = lm.cpu_s(), time.perf_counter()
            await asyncio.sleep(sz.cpu_window_s)
            cpu, wall = lm.cpu_s() - c0, time.perf_counter() - t0
        out["summary"]["cpu_waiting_pct_of_core"] = r(cpu / wall * 100, 2)
        out["summary"]["cpu_waiting_window_s"] = r(wall, 2)

        with ctx.phase("e_queue_get"):
            lat, size, depth = await _queue_latency(port, sz.queue_samples)
        out["summary"]["queue_get_ms"] = summary_ms(lat)
        out["summary"]["queue_body_bytes"] = size
        out["checks"]["queue_depth_seen"] = depth == n + 1

        # The canary leaves: everyone moves up one place and should hear about it.
        t = time.perf_counter()
        canary.close()
        await _until(lambda: all(w.positions for w in waiters), 15.0, None)
        phases["position_fanout"] = r(time.perf_counter() - t, 3)
        rss = max(rss, lm.rss_bytes())
        out["summary"]["rss_waiting_mb"] = r(rss / 2**20, 1)
        out["summary"]["rss_per_waiting_client_kb"] = r((rss - rss_before) / 1024 / n, 2)

        # Release the holder; the line drains through the gate one by one.
        t = time.perf_counter()
        released_ns = time.perf_counter_ns()
        await ctx.upstream_call("POST", "/release")
        tasks = [w.task for w in waiters if w.task is not None]
        if holder.task is not None:
            tasks.append(holder.task)
        with ctx.phase("e_drain"):
            _done, pending = await asyncio.wait(tasks, timeout=max(30.0, sz.cap_s - 30))
            phases["drain"] = r(time.perf_counter() - t, 3)
        out["summary"]["served_per_s"] = r(n / phases["drain"], 1) if not pending else None
        out["checks"]["drained_in_time"] = not pending

        records = await ctx.upstream_records()
        order = [i for i, _, _ in records if i >= 0]
        out["checks"]["served_in_order"] = order == list(range(n))
        out["checks"]["canary_never_served"] = CANARY not in [i for i, _, _ in records]
        out["checks"]["holder_served"] = holder.col.done_ns is not None
        out["checks"]["entered_in_order"] = all(w.entered == w.index + 2 for w in waiters)
        out["checks"]["every_client_entered"] = all(w.entered is not None for w in waiters)
        out["checks"]["every_client_position_update"] = all(w.positions for w in waiters)
        out["checks"]["positions_never_increase"] = all(
            all(b[1] < a[1] for a, b in itertools.pairwise(w.positions)) for w in waiters)
        out["checks"]["every_client_served"] = all(
            w.status == 200 and w.col.done_ns is not None and w.col.n_data == sz.scale_chunks
            for w in waiters)
        after = sum(1 for w in waiters if any(t_ns >= released_ns for t_ns, _ in w.positions))
        out["summary"]["clients_with_update_after_release"] = after
        out["summary"]["out_of_order_at_upstream"] = sum(
            1 for a, b in itertools.pairwise(order) if b != a + 1)
        errors = [w.error for w in waiters if w.error]
        out["summary"]["client_errors"] = len(errors)
        if errors:
            out["summary"]["first_client_error"] = errors[0]
        return out
    finally:
        for w in waiters:
            w.close()
        for extra in (holder, canary):
            if extra is not None:
                extra.close()
        if holder is not None and holder.col.done_ns is None:
            with contextlib.suppress(OSError, HttpError, asyncio.TimeoutError):
                await ctx.upstream_call("POST", "/release")


async def _until(cond: Any, timeout_s: float, error: str | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() >= deadline:
            if error:
                raise RuntimeError(error)
            return False
        await asyncio.sleep(0.02)
    return True


async def _queue_latency(port: int, samples: int) -> tuple[list[float], int, int | None]:
    """``GET /queue`` one after another on one keep-alive connection: latencies in ms, body size,
    and the depth it reported."""
    conn = await Conn.open(port)
    lat: list[float] = []
    size, depth = 0, None
    try:
        raw = build_request("GET", "/queue", port)
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            head, body = await conn.request(raw)
            lat.append((time.perf_counter_ns() - t0) / 1e6)
            if head.status != 200:
                raise HttpError(f"GET /queue answered {head.status}")
            size = len(body)
        depth = json.loads(body).get("depth")
    finally:
        conn.close()
    return lat, size, depth
