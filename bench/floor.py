"""Where lmgate's added latency goes: the server stack it runs on, and its own work.

Four sides in the same run, against one fake upstream, interleaved round by round with the
order rotating (so slow drift on the machine hits each alike):

    direct   the fake upstream itself
    hop      the plain aiohttp hop (bench.plain_hop): the bar lmgate is held to
    bare     uvicorn + lmgate's upstream transport, no logic at all (bench.bare_hop): the floor
    lmgate   lmgate

Two measures, each the *added* latency over direct at p50 and p99:

    plain    one non-streaming request after another on a keep-alive connection (as (a) of
             bench.run): request written to the last body byte; everything stays warm
    first    a short paced stream (4 chunks, 5 ms apart; as the first token of (c)): request
             written to the first ``data:`` event. Each stream starts after 20 ms in which
             every process mostly slept, so this is the cold path

``lmgate - bare`` is lmgate's own work on the path (admission, the line, the relay's
bookkeeping); ``bare`` is what uvicorn, the kernel's extra hop and the transport cost.

    python -m bench.floor            # about 40 s
    python -m bench.floor --quick    # about 10 s
    python -m bench.floor --smoke    # a few seconds: what the test suite runs

The exit status is 1 when a side's answer differs from the direct one (the plain body, or a
stream's bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import procs
from .client import Conn, chat_request
from .run import available, fast_loop
from .scenarios import one_stream, same_stream
from .stats import diff, pct, r

SIDES = ("direct", "hop", "bare", "lmgate")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "floor.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds and requests (about 10 s)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for tests: correctness only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    return p.parse_args(argv)


async def plain(conn: Conn, raw: bytes, n: int, warm: int) -> list[float]:
    out = []
    for i in range(warm + n):
        t0 = time.perf_counter_ns()
        head, _ = await conn.request(raw)
        if head.status != 200:
            raise RuntimeError(f"answered {head.status}")
        if i >= warm:
            out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


async def first(conn: Conn, raw: bytes, n: int, warm: int) -> list[float]:
    out = []
    for i in range(warm + n):
        t0, col = await one_stream(conn, raw)
        if col.first_ns is None or col.done_ns is None:
            raise RuntimeError("a stream ended early")
        if i >= warm:
            out.append((col.first_ns - t0) / 1e6)
    return out


async def same_answers(ports: dict[str, int]) -> dict[str, bool]:
    """Each side's plain body and stream bytes equal the direct ones (lmgate's stream starts
    with its two queue comments, as a stream that did not wait does: ``same_stream``)."""
    got: dict[str, tuple[bytes, bytes]] = {}
    for side, port in ports.items():
        conn = await Conn.open(port)
        try:
            _, body = await conn.request(chat_request(port))
            _, col = await one_stream(conn, chat_request(port, stream=True, bench_chunks=4), keep_raw=True)
            got[side] = (body, col.body())
        finally:
            conn.close()
    direct = got["direct"]
    out = {}
    for side in SIDES[1:]:
        body, stream = got[side]
        out[f"{side}_plain_identical"] = bool(direct[0]) and body == direct[0]
        out[f"{side}_stream_identical"] = (same_stream(direct[1], stream) if side == "lmgate"
                                           else bool(direct[1]) and stream == direct[1])
    return out


async def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    rounds, n_plain, n_first = (1, 20, 3) if args.smoke else (3, 300, 20) if args.quick else (7, 1500, 40)
    log_dir = args.out.parent / "logs-floor"
    upstream = procs.fake_upstream(log_dir)
    servers = [upstream]
    try:
        upstream.start()
        await upstream.ready("/stats")
        hop = procs.plain_hop(log_dir, upstream.port)
        bare_port = procs.free_port()
        bare = procs.Server("bare hop", ["-m", "bench.bare_hop", "--port", str(bare_port), "--upstream",
                                         f"http://127.0.0.1:{upstream.port}"], bare_port, log_dir / "bare_hop.log")
        gate = procs.lmgate(log_dir, upstream.port)
        servers += [hop, bare, gate]
        for s in (hop, bare, gate):
            s.start()
        for s, path in ((hop, "/v1/models"), (bare, "/v1/models"), (gate, "/healthz")):
            await s.ready(path)
        ports = {"direct": upstream.port, "hop": hop.port, "bare": bare.port, "lmgate": gate.port}
        checks = await same_answers(ports)
        samples: dict[str, dict[str, list[float]]] = {m: {s: [] for s in SIDES} for m in ("plain", "first")}
        measures: dict[str, tuple[Callable[[Conn, bytes, int, int], Awaitable[list[float]]], int, int,
                                  Callable[[int], bytes]]] = {
            "plain": (plain, n_plain, 100, lambda port: chat_request(port)),
            "first": (first, n_first, 2, lambda port: chat_request(port, stream=True, bench_chunks=4,
                                                                     bench_delay_ms=5)),
        }
        for rn in range(rounds):
            order = SIDES[rn % len(SIDES):] + SIDES[:rn % len(SIDES)]
            for name, (fn, n, warm, build) in measures.items():
                for side in order:
                    conn = await Conn.open(ports[side])
                    try:
                        samples[name][side] += await asyncio.wait_for(fn(conn, build(ports[side]), n, warm), 60)
                    finally:
                        conn.close()
        result: dict[str, Any] = {}
        for name, per in samples.items():
            base50, base99 = pct(per["direct"], 50), pct(per["direct"], 99)
            row: dict[str, Any] = {"direct_p50_ms": r(base50), "direct_p99_ms": r(base99), "n": len(per["direct"])}
            for side in SIDES[1:]:
                row[f"{side}_added_p50_ms"] = r(diff(pct(per[side], 50), base50))
                row[f"{side}_added_p99_ms"] = r(diff(pct(per[side], 99), base99))
            row["lmgate_own_p50_ms"] = r(diff(row["lmgate_added_p50_ms"], row["bare_added_p50_ms"]))
            result[name] = row
        return {"command": command, "rounds": rounds, "results": result, "checks": checks}
    finally:
        for s in reversed(servers):
            s.stop()


def table(doc: dict[str, Any]) -> str:
    lines = [f"{'':8} {'direct':>8} {'hop':>8} {'bare':>8} {'lmgate':>8} {'lmgate-bare':>12}   (ms; added over direct)"]
    for name, row in doc["results"].items():
        for q in ("p50", "p99"):
            own = row["lmgate_own_p50_ms"] if q == "p50" else diff(row["lmgate_added_p99_ms"], row["bare_added_p99_ms"])
            cells = [row[f"direct_{q}_ms"]] + [row[f"{s}_added_{q}_ms"] for s in SIDES[1:]] + [own]
            lines.append(f"{name + ' ' + q:8} " + " ".join(
                f"{'n/a' if c is None else f'{c:.3f}':>{w}}" for c, w in zip(cells, (8, 8, 8, 8, 12))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not available("aiohttp"):
        sys.stderr.write("[bench.floor] needs aiohttp for the plain hop: pip install -e '.[bench]'\n")
        return 2
    command = shlex.join(["python", "-m", "bench.floor", *(sys.argv[1:] if argv is None else argv)])
    factory, _ = fast_loop()
    if factory is not None and hasattr(asyncio, "Runner"):
        with asyncio.Runner(loop_factory=factory) as runner:
            doc = runner.run(run(args, command))
    else:
        doc = asyncio.run(run(args, command))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"lmgate floor: {command}")
    print(table(doc))
    bad = [k for k, ok in doc["checks"].items() if not ok]
    print(f"correctness checks: all {len(doc['checks'])} passed" if not bad
          else f"correctness checks FAILED: {', '.join(bad)}")
    print(f"results: {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
