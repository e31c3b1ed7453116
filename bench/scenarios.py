"""Scenarios (a)-(d): each runs the same work against the fake upstream directly, through the
plain hop ((a)-(c)) and through lmgate, interleaved round by round, and returns per-round
figures, a summary and checks."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from proxy.gated import STARTED_AT_ONCE

from .client import Conn, HttpError, SseCollector, chat_request
from .context import DIRECT, HOP, LMGATE, Ctx, Meter
from .stats import diff, median, pct, r, ratio, summary_ms

SIDES = (DIRECT, LMGATE)  # (d): the plain hop has no gate to hand over


# -- (a) sequential non-streaming ----------------------------------------------------------
async def sequential(ctx: Ctx) -> dict[str, Any]:
    sz = ctx.sizes
    rounds: list[dict[str, Any]] = []
    bodies: dict[str, bytes] = {}
    for rn in range(sz.rounds):
        for side in ctx.sides(rn):
            rounds.append(await _sequential_round(ctx, side, rn, bodies))
    out: dict[str, Any] = {"rounds": rounds, "summary": {}, "checks": {}}
    s = out["summary"]
    for side in ctx.all_sides():
        mine = [x for x in rounds if x["side"] == side]
        s[side] = {
            "p50_ms": r(median(x["p50_ms"] for x in mine)),
            "p99_ms": r(median(x["p99_ms"] for x in mine)),
            "requests": sum(x["n"] for x in mine),
            "lmgate_cpu_s": r(sum(x["lmgate_cpu_s"] for x in mine)),
            "upstream_cpu_s": r(sum(x["upstream_cpu_s"] for x in mine)),
            "client_cpu_s": r(sum(x["client_cpu_s"] for x in mine)),
        }
        if side == HOP:
            s[side]["hop_cpu_s"] = r(sum(x["hop_cpu_s"] for x in mine))
    n_lm, n_di = s[LMGATE]["requests"], s[DIRECT]["requests"]
    s["added_p50_ms"] = diff(s[LMGATE]["p50_ms"], s[DIRECT]["p50_ms"])
    s["added_p99_ms"] = diff(s[LMGATE]["p99_ms"], s[DIRECT]["p99_ms"])
    s["lmgate_cpu_ms_per_request"] = r(s[LMGATE]["lmgate_cpu_s"] * 1000 / max(1, n_lm))
    s["client_cpu_ms_per_request"] = r(s[DIRECT]["client_cpu_s"] * 1000 / max(1, n_di))
    s["upstream_cpu_ms_per_request"] = r(s[DIRECT]["upstream_cpu_s"] * 1000 / max(1, n_di))
    out["checks"]["all_200"] = all(x["ok"] == x["n"] for x in rounds)
    out["checks"]["bodies_identical"] = bool(bodies.get(DIRECT)) and bodies.get(DIRECT) == bodies.get(LMGATE)
    if HOP in s:
        s["hop_added_p50_ms"] = diff(s[HOP]["p50_ms"], s[DIRECT]["p50_ms"])
        s["hop_added_p99_ms"] = diff(s[HOP]["p99_ms"], s[DIRECT]["p99_ms"])
        s["vs_hop_added_p50_ms"] = diff(s["added_p50_ms"], s["hop_added_p50_ms"])
        s["vs_hop_added_p99_ms"] = diff(s["added_p99_ms"], s["hop_added_p99_ms"])
        s["hop_cpu_ms_per_request"] = r(s[HOP]["hop_cpu_s"] * 1000 / max(1, s[HOP]["requests"]))
        s["vs_hop_cpu_ms_per_request"] = diff(s["lmgate_cpu_ms_per_request"], s["hop_cpu_ms_per_request"])
        out["checks"]["hop_bodies_identical"] = bodies.get(HOP) == bodies.get(DIRECT)
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
    per_stream: dict[str, list[dict[str, float]]] = {side: [] for side in ctx.all_sides()}
    single: dict[str, list[float]] = {side: [] for side in ctx.all_sides()}
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
    for side in ctx.all_sides():
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
        if side == HOP:
            summary[side]["hop_cpu_s"] = r(sum(x["hop_cpu_s"] for x in mine))
    di = summary[DIRECT]
    for side, prefix in ((LMGATE, ""), (HOP, "hop_")):
        if side not in summary:
            continue
        s = summary[side]
        summary[prefix + "relay_rate_ratio"] = ratio(s["relay_chunks_per_s"], di["relay_chunks_per_s"])
        summary[prefix + "e2e_rate_ratio"] = ratio(s["e2e_chunks_per_s"], di["e2e_chunks_per_s"])
        summary[prefix + "first_chunk_added_ms"] = diff(s["first_chunk_ms"], di["first_chunk_ms"])
        summary[prefix + "first_chunk_1_chunk_stream_added_ms"] = diff(s["first_chunk_1_chunk_stream_ms"],
                                                                       di["first_chunk_1_chunk_stream_ms"])
        proxy = "lmgate" if side == LMGATE else "hop"  # whose CPU: the process in the middle
        summary[f"{proxy}_cpu_ms_per_1000_chunks"] = r(s[f"{proxy}_cpu_s"] * 1e6 / max(1, s["chunks"]))
    checks: dict[str, Any] = {"complete": complete,
                              "bytes_identical": same_stream(raws.get(DIRECT), raws.get(LMGATE)),
                              "stream_bytes": len(raws.get(DIRECT, b""))}
    if HOP in summary:
        summary["vs_hop_relay_rate_ratio"] = ratio(summary["relay_rate_ratio"],
                                                   summary["hop_relay_rate_ratio"])
        summary["vs_hop_first_chunk_added_ms"] = diff(summary["first_chunk_added_ms"],
                                                      summary["hop_first_chunk_added_ms"])
        summary["vs_hop_cpu_ms_per_1000_chunks"] = diff(summary["lmgate_cpu_ms_per_1000_chunks"],
                                                        summary["hop_cpu_ms_per_1000_chunks"])
        checks["hop_bytes_identical"] = bool(raws.get(DIRECT)) and raws.get(HOP) == raws.get(DIRECT)
    return {"rounds": rounds, "summary": summary, "checks": checks}


def same_stream(direct: bytes | None, through: bytes | None) -> bool:
    """lmgate relays the upstream's bytes untouched after its two queue comments (a stream
    that did not wait starts with `: queue_entered=0` and `: queue_position=0`)."""
    return bool(direct) and through == STARTED_AT_ONCE + direct


# -- (c) paced stream ----------------------------------------------------------------------
async def paced_stream(ctx: Ctx) -> dict[str, Any]:
    """Long paced streams for the gaps between chunks, then short paced streams (the same
    pacing) for the first token: request written to the first ``data:`` event."""
    sz = ctx.sizes
    sides = ctx.all_sides()
    gaps: dict[str, list[float]] = {side: [] for side in sides}
    firsts: dict[str, list[float]] = {side: [] for side in sides}
    rounds: list[dict[str, Any]] = []
    raws: dict[str, bytes] = {}
    complete = True
    for rn in range(sz.rounds):
        for side in ctx.sides(rn):
            port = ctx.port(side)
            raw = chat_request(port, stream=True, bench_chunks=sz.paced_chunks,
                               bench_delay_ms=sz.paced_delay_ms)
            short = chat_request(port, stream=True, bench_chunks=sz.paced_first_chunks,
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
                first: list[float] = []
                for _ in range(sz.paced_first_streams):
                    t0, col = await one_stream(conn, short)
                    complete &= col.n_data == sz.paced_first_chunks and col.done_ns is not None
                    if col.first_ns is not None:
                        first.append((col.first_ns - t0) / 1e6)
            finally:
                conn.close()
            gaps[side] += mine
            firsts[side] += first
            rounds.append({"side": side, "round": rn, "gap_p50_ms": r(pct(mine, 50)),
                           "gap_p99_ms": r(pct(mine, 99)), "gap_max_ms": r(max(mine) if mine else None),
                           "first_token_p50_ms": r(pct(first, 50)), "first_token_p99_ms": r(pct(first, 99))})
    summary: dict[str, Any] = {}
    for side in sides:
        its = [x for x in rounds if x["side"] == side]
        # first token: pooled over the rounds (a round has tens of samples, too few for a p99)
        summary[side] = {"p50": r(median(x["gap_p50_ms"] for x in its)),
                         "p99": r(median(x["gap_p99_ms"] for x in its)), "pooled": summary_ms(gaps[side]),
                         "first_token_p50": r(pct(firsts[side], 50)),
                         "first_token_p99": r(pct(firsts[side], 99)),
                         "first_token": summary_ms(firsts[side])}
    di = summary[DIRECT]
    for side, prefix in ((LMGATE, ""), (HOP, "hop_")):
        if side not in summary:
            continue
        s = summary[side]
        summary[prefix + "gap_p99_added_ms"] = diff(s["p99"], di["p99"])
        summary[prefix + "gap_p50_added_ms"] = diff(s["p50"], di["p50"])
        summary[prefix + "first_token_p50_added_ms"] = diff(s["first_token_p50"], di["first_token_p50"])
        summary[prefix + "first_token_p99_added_ms"] = diff(s["first_token_p99"], di["first_token_p99"])
    checks = {"complete": complete, "bytes_identical": same_stream(raws.get(DIRECT), raws.get(LMGATE))}
    if HOP in summary:
        for key in ("gap_p99_added_ms", "first_token_p50_added_ms", "first_token_p99_added_ms"):
            summary["vs_hop_" + key] = diff(summary[key], summary["hop_" + key])
        checks["hop_bytes_identical"] = bool(raws.get(DIRECT)) and raws.get(HOP) == raws.get(DIRECT)
    return {"rounds": rounds, "summary": summary, "checks": checks}


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
        for side in ctx.sides(rn, SIDES):
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
