"""Scenarios (a)-(d): each runs the same work against the fake upstream directly and through
lmgate, interleaved round by round, and returns per-round figures, a summary and checks."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from proxy.gated import STARTED_AT_ONCE

from .client import Conn, HttpError, SseCollector, chat_request
from .context import DIRECT, LMGATE, Ctx, Meter
from .stats import diff, median, pct, r, ratio, summary_ms

SIDES = (DIRECT, LMGATE)


# -- (a) sequential non-streaming ----------------------------------------------------------
async def sequential(ctx: Ctx) -> dict[str, Any]:
    sz = ctx.sizes
    rounds: list[dict[str, Any]] = []
    bodies: dict[str, bytes] = {}
    for rn in range(sz.rounds):
        for side in ctx.sides(rn):
            rounds.append(await _sequential_round(ctx, side, rn, bodies))
    out: dict[str, Any] = {"rounds": rounds, "summary": {}, "checks": {}}
    for side in SIDES:
        mine = [x for x in rounds if x["side"] == side]
        out["summary"][side] = {
            "p50_ms": r(median(x["p50_ms"] for x in mine)),
            "p99_ms": r(median(x["p99_ms"] for x in mine)),
            "requests": sum(x["n"] for x in mine),
            "lmgate_cpu_s": r(sum(x["lmgate_cpu_s"] for x in mine)),
            "upstream_cpu_s": r(sum(x["upstream_cpu_s"] for x in mine)),
            "client_cpu_s": r(sum(x["client_cpu_s"] for x in mine)),
        }
    s = out["summary"]
    n_lm, n_di = s[LMGATE]["requests"], s[DIRECT]["requests"]
    out["summary"]["added_p50_ms"] = diff(s[LMGATE]["p50_ms"], s[DIRECT]["p50_ms"])
    out["summary"]["added_p99_ms"] = diff(s[LMGATE]["p99_ms"], s[DIRECT]["p99_ms"])
    out["summary"]["lmgate_cpu_ms_per_request"] = r(s[LMGATE]["lmgate_cpu_s"] * 1000 / max(1, n_lm))
    out["summary"]["client_cpu_ms_per_request"] = r(s[DIRECT]["client_cpu_s"] * 1000 / max(1, n_di))
    out["summary"]["upstream_cpu_ms_per_request"] = r(s[DIRECT]["upstream_cpu_s"] * 1000 / max(1, n_di))
    out["checks"]["all_200"] = all(x["ok"] == x["n"] for x in rounds)
    out["checks"]["bodies_identical"] = bool(bodies.get(DIRECT)) and bodies.get(DIRECT) == bodies.get(LMGATE)
    return out


async def _sequential_round(ctx: Ctx, side: str, rn: int, bodies: dict[str, bytes]) -> dict[str, Any]:
    port, n = ctx.port(side), ctx.sizes.seq_requests
    raw = chat_request(port)
    conn = await Conn.open(port)
    try:
        for _ in range(ctx.sizes.seq_warmup):
            head, body = await conn.request(raw)
        lat_ns: list[int] = []
        ok = 0
        clock = time.perf_counter_ns
        reader_head, reader_body, send = conn.read_head, conn.read_body, conn.send
        with Meter(ctx) as m:
            for _ in range(n):
                t0 = clock()
                send(raw)
                head = await reader_head()
                body = await reader_body(head)
                lat_ns.append(clock() - t0)
                ok += head.status == 200
        bodies.setdefault(side, body)
    finally:
        conn.close()
    lat = [x / 1e6 for x in lat_ns]
    return {"side": side, "round": rn, "n": n, "ok": ok, "p50_ms": r(pct(lat, 50)), "p99_ms": r(pct(lat, 99)),
            "mean_ms": r(sum(lat) / n), **m.as_dict()}


# -- streams ---------------------------------------------------------------------------------
async def one_stream(conn: Conn, raw: bytes, keep_raw: bool = False) -> tuple[int, SseCollector]:
    """Send one streaming request; returns (send time ns, collected events)."""
    col = SseCollector(keep_raw=keep_raw)
    t0 = time.perf_counter_ns()
    conn.send(raw)
    head = await conn.read_head()
    if head.status != 200:
        raise HttpError(f"stream answered {head.status}")
    await conn.read_body(head, sink=col)
    return t0, col


# -- (b) one fast stream ---------------------------------------------------------------------
async def stream_throughput(ctx: Ctx) -> dict[str, Any]:
    sz = ctx.sizes
    rounds: list[dict[str, Any]] = []
    raws: dict[str, bytes] = {}
    per_stream: dict[str, list[dict[str, float]]] = {DIRECT: [], LMGATE: []}
    single: dict[str, list[float]] = {DIRECT: [], LMGATE: []}
    complete = True
    for rn in range(sz.rounds):
        for side in ctx.sides(rn):
            port = ctx.port(side)
            raw = chat_request(port, stream=True, bench_chunks=sz.stream_chunks)
            conn = await Conn.open(port)
            try:
                _, warm = await one_stream(conn, raw, keep_raw=True)   # warm-up, and bytes to compare
                raws.setdefault(side, warm.body())
                results = []
                with Meter(ctx) as m:
                    for _ in range(sz.streams_per_round):
                        t0, col = await one_stream(conn, raw)
                        results.append((t0, col))
                # The same first-chunk figure without the burst of 999 more chunks behind it.
                one = chat_request(port, stream=True, bench_chunks=1)
                for _ in range(sz.streams_per_round):
                    t0, col = await one_stream(conn, one)
                    if col.first_ns is not None:
                        single[side].append((col.first_ns - t0) / 1e6)
            finally:
                conn.close()
            for t0, col in results:
                complete &= col.n_data == sz.stream_chunks and col.done_ns is not None
                if col.first_ns is None or col.done_ns is None:
                    continue
                e2e_s = (col.done_ns - t0) / 1e9
                relay_s = max(col.done_ns - col.first_ns, 1) / 1e9
                per_stream[side].append({"first_ms": (col.first_ns - t0) / 1e6,
                                         "e2e_chunks_per_s": col.n_data / e2e_s,
                                         "relay_chunks_per_s": max(col.n_data - 1, 1) / relay_s,
                                         "total_ms": e2e_s * 1000})
            rounds.append({"side": side, "round": rn, "streams": sz.streams_per_round,
                           "chunks": sz.streams_per_round * sz.stream_chunks, **m.as_dict()})
    summary: dict[str, Any] = {}
    for side in SIDES:
        ss = per_stream[side]
        mine = [x for x in rounds if x["side"] == side]
        summary[side] = {
            "first_chunk_ms": r(median(x["first_ms"] for x in ss)),
            "relay_chunks_per_s": r(median(x["relay_chunks_per_s"] for x in ss), 1),
            "e2e_chunks_per_s": r(median(x["e2e_chunks_per_s"] for x in ss), 1),
            "stream_ms": r(median(x["total_ms"] for x in ss)),
            "first_chunk_1_chunk_stream_ms": r(median(single[side])),
            "chunks": sum(x["chunks"] for x in mine),
            "lmgate_cpu_s": r(sum(x["lmgate_cpu_s"] for x in mine)),
        }
    lm, di = summary[LMGATE], summary[DIRECT]
    summary["relay_rate_ratio"] = ratio(lm["relay_chunks_per_s"], di["relay_chunks_per_s"])
    summary["e2e_rate_ratio"] = ratio(lm["e2e_chunks_per_s"], di["e2e_chunks_per_s"])
    summary["first_chunk_added_ms"] = diff(lm["first_chunk_ms"], di["first_chunk_ms"])
    summary["first_chunk_1_chunk_stream_added_ms"] = diff(lm["first_chunk_1_chunk_stream_ms"],
                                                          di["first_chunk_1_chunk_stream_ms"])
    summary["lmgate_cpu_ms_per_1000_chunks"] = r(lm["lmgate_cpu_s"] * 1e6 / max(1, lm["chunks"]))
    identical = same_stream(raws.get(DIRECT), raws.get(LMGATE))
    return {"rounds": rounds, "summary": summary,
            "checks": {"complete": complete, "bytes_identical": identical,
                       "stream_bytes": len(raws.get(DIRECT, b""))}}


def same_stream(direct: bytes | None, through: bytes | None) -> bool:
    """lmgate relays the upstream's bytes untouched after its two queue comments (a stream
    that did not wait starts with `: queue_entered=0` and `: queue_position=0`)."""
    return bool(direct) and through == STARTED_AT_ONCE + direct


# -- (c) paced stream ----------------------------------------------------------------------
async def paced_stream(ctx: Ctx) -> dict[str, Any]:
    sz = ctx.sizes
    gaps: dict[str, list[float]] = {DIRECT: [], LMGATE: []}
    rounds: list[dict[str, Any]] = []
    raws: dict[str, bytes] = {}
    complete = True
    for rn in range(sz.rounds):
        for side in ctx.sides(rn):
            port = ctx.port(side)
            raw = chat_request(port, stream=True, bench_chunks=sz.paced_chunks,
                               bench_delay_ms=sz.paced_delay_ms)
            conn = await Conn.open(port)
            try:
                mine: list[float] = []
                for _ in range(sz.paced_streams):
                    _, col = await one_stream(conn, raw, keep_raw=True)
                    raws.setdefault(side, col.body())
                    complete &= col.n_data == sz.paced_chunks and col.done_ns is not None
                    ts = col.data_times()
                    mine += [(b - a) / 1e6 for a, b in itertools.pairwise(ts)]
            finally:
                conn.close()
            gaps[side] += mine
            rounds.append({"side": side, "round": rn, "gap_p50_ms": r(pct(mine, 50)),
                           "gap_p99_ms": r(pct(mine, 99)), "gap_max_ms": r(max(mine) if mine else None)})
    summary: dict[str, Any] = {}
    for side in SIDES:
        its = [x for x in rounds if x["side"] == side]
        summary[side] = {"p50": r(median(x["gap_p50_ms"] for x in its)),
                         "p99": r(median(x["gap_p99_ms"] for x in its)), "pooled": summary_ms(gaps[side])}
    summary["gap_p99_added_ms"] = diff(summary[LMGATE]["p99"], summary[DIRECT]["p99"])
    summary["gap_p50_added_ms"] = diff(summary[LMGATE]["p50"], summary[DIRECT]["p50"])
    return {"rounds": rounds, "summary": summary,
            "checks": {"complete": complete,
                       "bytes_identical": same_stream(raws.get(DIRECT), raws.get(LMGATE))}}


# -- (d) handoff -----------------------------------------------------------------------------
def handoff_gaps(records: list[tuple[int, int, int]]) -> tuple[list[float], bool]:
    """Gaps (ms) between one response's end and the next arrival, in arrival order; and
    whether the upstream never had two requests at once."""
    recs = sorted(records, key=lambda x: x[1])
    gaps = [(b[1] - a[2]) / 1e6 for a, b in itertools.pairwise(recs)]
    return gaps, all(g >= 0 for g in gaps)


async def handoff(ctx: Ctx) -> dict[str, Any]:
    """lmgate: one request with a long upstream delay takes the gate, then N-1 are sent at once
    and queue behind it. Direct (no gate): the same N sent one after another on one
    connection, which shows what a client's own turnaround costs."""
    sz = ctx.sizes
    gaps: dict[str, list[float]] = {DIRECT: [], LMGATE: []}
    rounds: list[dict[str, Any]] = []
    checks = {"all_200": True, "queued": True, "serialised": True}
    for rn in range(sz.handoff_rounds):
        for side in ctx.sides(rn):
            await ctx.upstream_call("POST", "/reset")
            if side == LMGATE:
                statuses, queued = await _handoff_queued(ctx)
                checks["queued"] &= queued == sz.handoff_requests - 1
            else:
                statuses = await _handoff_sequential(ctx)
            checks["all_200"] &= all(s == 200 for s in statuses)
            records = await ctx.upstream_records()
            g, serial = handoff_gaps(records)
            if side == LMGATE:
                checks["serialised"] &= serial and len(records) == sz.handoff_requests
            gaps[side] += g
            rounds.append({"side": side, "round": rn, "requests": len(records), "gap_p50_ms": r(pct(g, 50)),
                           "gap_p99_ms": r(pct(g, 99)), "gap_max_ms": r(max(g) if g else None)})
    summary: dict[str, Any] = {side: summary_ms(gaps[side]) for side in SIDES}
    return {"rounds": rounds, "summary": summary, "checks": checks}


async def _handoff_queued(ctx: Ctx) -> tuple[list[int], int]:
    sz, port = ctx.sizes, ctx.lmgate.port
    n = sz.handoff_requests
    conns = [await Conn.open(port) for _ in range(n)]
    try:
        first_delay = max(200.0, 2 * n)  # long enough for the rest to be admitted behind it
        conns[0].send(chat_request(port, bench_delay_ms=first_delay, bench_index=0))
        await asyncio.sleep(0.03)
        for i, c in enumerate(conns[1:], 1):
            c.send(chat_request(port, bench_delay_ms=sz.handoff_delay_ms, bench_index=i))
        heads = await asyncio.wait_for(asyncio.gather(*(_read_all(c) for c in conns)), sz.cap_s / 2)
    finally:
        for c in conns:
            c.close()
    queued = sum(1 for h in heads if int(h.headers.get(b"x-queue-position", b"0")) >= 1)
    return [h.status for h in heads], queued


async def _handoff_sequential(ctx: Ctx) -> list[int]:
    sz, port = ctx.sizes, ctx.upstream.port
    conn = await Conn.open(port)
    statuses = []
    try:
        for i in range(sz.handoff_requests):
            raw = chat_request(port, bench_delay_ms=sz.handoff_delay_ms, bench_index=i)
            head, _ = await conn.request(raw)
            statuses.append(head.status)
    finally:
        conn.close()
    return statuses


async def _read_all(conn: Conn) -> Any:
    head = await conn.read_head()
    await conn.read_body(head)
    return head
