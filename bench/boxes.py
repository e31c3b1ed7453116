"""Scenario (g): lmgate in front of two upstream boxes, one waiting line.

Servers (started by run.py): box a is the main fake upstream, box b a second one on its own
port. ``two_boxes`` is lmgate with ``--upstream a --upstream b --parallel 1``: one slot per box,
so two requests at once run one on each box without waiting. ``one_box`` is lmgate with
``--upstream a --parallel 2``: the same two slots on one box, the same load, for comparison.

The work is scenario (a)'s: non-streaming requests one after another on keep-alive
connections, latency from writing the request to the response head (*first byte*) and to the
last body byte (*total*). A request starts on the first box that can run it, so one request at
a time would never reach box b: the two-box load is two connections, each sending its next
request as soon as its previous answer is complete. Sides, each run once per round in an
order that rotates from round to round:

    direct         the 2 connections straight to box a (a direct connection to one upstream)
    direct_both    one connection straight to each box (for information: two upstream
                   processes instead of one, without lmgate)
    one_box        the 2 connections through lmgate, one box with 2 slots
    two_boxes      the 2 connections through lmgate, two boxes with 1 slot each
    direct_seq     1 connection straight to box a                 (the load of (a))
    one_box_seq    1 connection through the one-box lmgate
    two_boxes_seq  1 connection through the two-box lmgate         (all of it on box a)

Added latency is side minus direct (2 connections) or minus direct_seq (1 connection), from
the same rounds; figures are medians over rounds of each round's percentile, as in (a). The
box that served each request comes from its ``X-Upstream`` header. The two extra lmgates start
together and see the same requests, so one box and two boxes are compared between processes
with the same history (the main lmgate has been through (a)-(e) by then).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .client import Conn, chat_request
from .context import DIRECT, Ctx, Meter, gather_capped
from .procs import Server
from .stats import diff, median, pct, r

PAIR = 2  # connections of the two-box load: one per box
MIN_SHARE_PCT = 10.0  # each box serves at least this share of the two-box load (a check)


@dataclass(frozen=True)
class Side:
    name: str
    servers: tuple[Server, ...]   # where each connection goes (one per connection)
    lmgate: Server | None         # the lmgate under test (None: direct)
    baseline: str                 # the direct side it is compared with

    @property
    def conns(self) -> int:
        return len(self.servers)


def sides(ctx: Ctx) -> list[Side]:
    assert ctx.boxes is not None
    b = ctx.boxes
    return [
        Side(DIRECT, (ctx.upstream,) * PAIR, None, DIRECT),
        Side("direct_both", (ctx.upstream, b.upstream_b), None, DIRECT),
        Side("one_box", (b.one_box,) * PAIR, b.one_box, DIRECT),
        Side("two_boxes", (b.two_boxes,) * PAIR, b.two_boxes, DIRECT),
        Side("direct_seq", (ctx.upstream,), None, "direct_seq"),
        Side("one_box_seq", (b.one_box,), b.one_box, "direct_seq"),
        Side("two_boxes_seq", (b.two_boxes,), b.two_boxes, "direct_seq"),
    ]


def box_names(ctx: Ctx) -> dict[bytes, str]:
    """``X-Upstream`` value -> a or b (lmgate names a box given as a URL ``host:port``)."""
    assert ctx.boxes is not None
    return {f"127.0.0.1:{ctx.upstream.port}".encode(): "a",
            f"127.0.0.1:{ctx.boxes.upstream_b.port}".encode(): "b"}


class Tally:
    """What one connection saw: per-request latencies, statuses, boxes, waits."""

    __slots__ = ("body", "boxes", "n", "ok", "total_ns", "ttfb_ns", "waited")

    def __init__(self) -> None:
        self.ttfb_ns: list[int] = []
        self.total_ns: list[int] = []
        self.n = 0
        self.ok = 0
        self.waited = 0  # answered with x-queue-position >= 1: it waited in line
        self.boxes: Counter[bytes] = Counter()
        self.body = b""


async def _run_conn(conn: Conn, raw: bytes, n: int, tally: Tally) -> None:
    clock = time.perf_counter_ns
    send, read_head, read_body = conn.send, conn.read_head, conn.read_body
    ttfb, total, boxes = tally.ttfb_ns, tally.total_ns, tally.boxes
    body = b""
    for _ in range(n):
        t0 = clock()
        send(raw)
        head = await read_head()
        t1 = clock()
        body = await read_body(head)
        t2 = clock()
        ttfb.append(t1 - t0)
        total.append(t2 - t0)
        tally.ok += head.status == 200
        h = head.headers
        boxes[h.get(b"x-upstream", b"")] += 1
        if h.get(b"x-queue-position", b"0") != b"0":
            tally.waited += 1
    tally.n += n
    tally.body = body


async def _side_round(ctx: Ctx, side: Side, rn: int, names: dict[bytes, str],
                      bodies: dict[str, bytes]) -> dict[str, Any]:
    sz = ctx.sizes
    per_conn = max(1, sz.boxes_requests // side.conns)
    raws = [chat_request(srv.port) for srv in side.servers]
    upstreams = [ctx.upstream] + ([ctx.boxes.upstream_b] if ctx.boxes is not None else [])
    conns = [await Conn.open(srv.port) for srv in side.servers]
    try:
        warm = [Tally() for _ in conns]
        warmups = [_run_conn(c, raw, sz.boxes_warmup, t) for c, raw, t in zip(conns, raws, warm, strict=True)]
        await gather_capped(*warmups, timeout_s=sz.cap_s / 4)
        tallies = [Tally() for _ in conns]
        loops = [_run_conn(c, raw, per_conn, t) for c, raw, t in zip(conns, raws, tallies, strict=True)]
        with Meter(ctx, lmgate=side.lmgate or ctx.lmgate, upstreams=upstreams) as m:
            await gather_capped(*loops, timeout_s=sz.cap_s / 4)
    finally:
        for c in conns:
            c.close()
    bodies.setdefault(side.name, tallies[0].body)
    ttfb = [x / 1e6 for t in tallies for x in t.ttfb_ns]
    total = [x / 1e6 for t in tallies for x in t.total_ns]
    boxes: Counter[str] = Counter()
    for t in tallies:
        for value, count in t.boxes.items():
            boxes[names.get(value, value.decode(errors="replace") or "none")] += count
    out: dict[str, Any] = {
        "side": side.name, "round": rn, "conns": side.conns, "n": sum(t.n for t in tallies),
        "ok": sum(t.ok for t in tallies), "waited": sum(t.waited for t in tallies),
        "p50_ms": r(pct(total, 50)), "p99_ms": r(pct(total, 99)),
        "ttfb_p50_ms": r(pct(ttfb, 50)), "ttfb_p99_ms": r(pct(ttfb, 99)),
        "mean_ms": r(sum(total) / len(total)) if total else None,
        **m.as_dict(),
    }
    if side.lmgate is not None:
        out["boxes"] = dict(sorted(boxes.items()))
    else:
        out["lmgate_cpu_s"] = 0.0  # the lmgate processes are idle in a direct round
    return out


async def two_boxes(ctx: Ctx) -> dict[str, Any]:
    if ctx.boxes is None:
        raise RuntimeError("the two-box servers were not started")
    sz = ctx.sizes
    plan = sides(ctx)
    names = box_names(ctx)
    rounds: list[dict[str, Any]] = []
    bodies: dict[str, bytes] = {}
    for rn in range(sz.rounds):
        k = rn % len(plan)  # rotate: every side goes first, and last, in turn
        for side in plan[k:] + plan[:k]:
            rounds.append(await _side_round(ctx, side, rn, names, bodies))
    summary: dict[str, Any] = {}
    for side in plan:
        mine = [x for x in rounds if x["side"] == side.name]
        n = sum(x["n"] for x in mine)
        s: dict[str, Any] = {
            "conns": side.conns,
            "p50_ms": r(median(x["p50_ms"] for x in mine)),
            "p99_ms": r(median(x["p99_ms"] for x in mine)),
            "ttfb_p50_ms": r(median(x["ttfb_p50_ms"] for x in mine)),
            "ttfb_p99_ms": r(median(x["ttfb_p99_ms"] for x in mine)),
            "requests": n,
            "waited": sum(x["waited"] for x in mine),
            "upstream_cpu_s": r(sum(x["upstream_cpu_s"] for x in mine)),
            "client_cpu_s": r(sum(x["client_cpu_s"] for x in mine)),
            "client_cpu_ms_per_request": r(sum(x["client_cpu_s"] for x in mine) * 1000 / max(1, n)),
            "upstream_cpu_ms_per_request": r(sum(x["upstream_cpu_s"] for x in mine) * 1000 / max(1, n)),
        }
        if side.lmgate is not None:
            cpu = sum(x["lmgate_cpu_s"] for x in mine)
            boxes: Counter[str] = Counter()
            for x in mine:
                boxes.update(x.get("boxes", {}))
            s["lmgate_cpu_s"] = r(cpu)
            s["lmgate_cpu_ms_per_request"] = r(cpu * 1000 / max(1, n))
            # lmgate's one core, busy this share of the measured time: near 100 % the closed
            # loop is limited by lmgate, and a request also waits for the other one's turn
            s["lmgate_busy_pct"] = r(100 * cpu / max(1e-9, sum(x["wall_s"] for x in mine)), 1)
            s["boxes"] = dict(sorted(boxes.items()))
            s["box_share_pct"] = {b: r(100 * c / max(1, n), 1) for b, c in sorted(boxes.items())}
        summary[side.name] = s
    for side in plan:
        if side.baseline == side.name:
            continue
        s, base = summary[side.name], summary[side.baseline]
        for key in ("p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms"):
            s["added_" + key] = diff(s[key], base[key])
    summary["split"] = " / ".join(f"{b} {v:.1f} %" for b, v in summary["two_boxes"]["box_share_pct"].items())
    shares = summary["two_boxes"]["box_share_pct"]
    lm_sides = [p.name for p in plan if p.lmgate is not None]
    checks = {
        "all_200": all(x["ok"] == x["n"] for x in rounds),
        "bodies_identical": bool(bodies.get(DIRECT)) and all(bodies.get(n) == bodies[DIRECT] for n in bodies),
        "x_upstream_on_every_answer": all(set(summary[n]["boxes"]) <= {"a", "b"} for n in lm_sides),
        "both_boxes_served": all(shares.get(b, 0) >= MIN_SHARE_PCT for b in ("a", "b")),
        "one_box_only_on_a": all(set(summary[n]["boxes"]) == {"a"} for n in ("one_box", "one_box_seq")),
    }
    return {"rounds": rounds, "summary": summary, "checks": checks,
            "servers": {"box_a": ctx.upstream.port, "box_b": ctx.boxes.upstream_b.port,
                        "two_boxes": ctx.boxes.two_boxes.args, "one_box": ctx.boxes.one_box.args}}
