"""The lean upstream transport against httpx's own connection layer, in one run.

    python -m bench.transport [--requests 1000] [--chunks 5000] [--streams 5] [--rounds 3]
                              [--loop uvloop|asyncio] [--out bench/results/transport.json]

lmgate keeps its own transport (``proxy/transport.py``) only while it beats httpx's default
one (httpcore over anyio and h11) by a margin this bench shows. One fake upstream
(``bench/fake_upstream.py``, uvicorn) runs on 127.0.0.1; this process is the client and runs
the same work through four clients, interleaved round by round (the order rotates each round,
so drift on the machine hits all alike):

    httpx + httpcore         httpx.AsyncClient() with its default transport; client.send(stream=True)
    httpx + lean             httpx.AsyncClient(transport=LeanTransport()); client.send(stream=True)
    httpcore transport only  httpx.AsyncHTTPTransport().handle_async_request(request)
    lean transport only      LeanTransport().handle_async_request(request): how lmgate calls it

Per client and round:

- sequential: ``--requests`` small non-streaming POSTs one after another (after a warm-up of a
  tenth as many), each from building the request to its last body byte; p50 and p99.
- CPU: ``time.process_time()`` of this process over those requests, per 1,000 requests (the
  upstream is another process, so this is the client's cost alone).
- stream: ``--streams`` streaming responses of ``--chunks`` small SSE events each, sent by the
  upstream as fast as it can (one write per event); the time from building the request to
  ``[DONE]``, events per second, how many chunks the client got per stream (the lean transport
  hands over what one socket read brought, httpcore one chunk per read of its own size), and
  the client's CPU per 1,000 events.

Figures are medians over rounds. Every response is checked (status, body, every event there
and ``[DONE]`` last); exit status 1 if one check fails or a loop hit its time bound. Every
loop is bounded in count and in time (``--budget`` for the whole run); the upstream is
stopped by its PID at the end, also on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from proxy.transport import LeanTransport

from . import procs
from .fake_upstream import COMPLETION, DONE
from .stats import median, pct, r

HOST = "127.0.0.1"
CHAT = "/v1/chat/completions"
TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=None)
DEFAULT_OUT = Path("bench/results/transport.json")

def chat_body(**fields: Any) -> bytes:
    doc = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(doc, separators=(",", ":")).encode()


class Side:
    """One way of sending a request: through httpx.AsyncClient, or straight to a transport as
    lmgate's Upstream.send does with the lean one."""

    def __init__(self, name: str, port: int, *, lean: bool, via_client: bool) -> None:
        self.name = name
        self.url = f"http://{HOST}:{port}{CHAT}"
        self.transport: httpx.AsyncBaseTransport = LeanTransport() if lean else httpx.AsyncHTTPTransport()
        self.client = httpx.AsyncClient(transport=self.transport, timeout=TIMEOUT, trust_env=False,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.via_client = via_client
        self.timeouts = TIMEOUT.as_dict()

    async def fetch(self, body: bytes) -> tuple[int, httpx.Response]:
        if self.via_client:
            req = self.client.build_request("POST", self.url, content=body,
                                            headers={"content-type": "application/json"})
            resp = await self.client.send(req, stream=True)
        else:
            req = httpx.Request("POST", self.url, content=body, headers={"content-type": "application/json"})
            req.extensions["timeout"] = self.timeouts
            resp = await self.transport.handle_async_request(req)
        return resp.status_code, resp

    async def aclose(self) -> None:
        await self.client.aclose()  # closes the transport too


async def raw_chunks(resp: httpx.Response, via_client: bool) -> AsyncIterator[bytes]:
    if via_client:
        async for chunk in resp.aiter_raw():
            yield chunk
        await resp.aclose()
    else:
        stream = resp.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()


@dataclass
class Round:
    """One client's figures in one round."""

    lat_ms: list[float] = field(default_factory=list)
    seq_cpu_s: float = 0.0
    stream_ms: list[float] = field(default_factory=list)
    stream_chunks: list[int] = field(default_factory=list)
    stream_events: int = 0
    stream_cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


async def sequential(side: Side, n: int, deadline: float, out: Round | None) -> None:
    """``n`` small POSTs one after another; ``out`` None is the warm-up."""
    body = chat_body(stream=False)
    cpu0 = time.process_time()
    for _ in range(n):
        if time.monotonic() > deadline:
            if out is not None:
                out.errors.append(f"sequential stopped at its time bound after {len(out.lat_ms)} requests")
            break
        t0 = time.perf_counter()
        status, resp = await side.fetch(body)
        data = b"".join([c async for c in raw_chunks(resp, side.via_client)])
        elapsed = time.perf_counter() - t0
        if out is None:
            continue
        out.lat_ms.append(elapsed * 1000)
        if status != 200 or data != COMPLETION:
            out.errors.append(f"sequential: status {status}, {len(data)} bytes")
    if out is not None:
        out.seq_cpu_s = time.process_time() - cpu0


async def streams(side: Side, count: int, chunks: int, deadline: float, out: Round) -> None:
    body = chat_body(stream=True, bench_chunks=chunks)
    cpu0 = time.process_time()
    for _ in range(count):
        if time.monotonic() > deadline:
            out.errors.append(f"stream stopped at its time bound after {len(out.stream_ms)} streams")
            break
        t0 = time.perf_counter()
        status, resp = await side.fetch(body)
        events = got = 0
        split = False  # the previous chunk ended inside an event's "\n\n"
        last = b""
        async for chunk in raw_chunks(resp, side.via_client):
            got += 1
            # events end with a blank line and hold none: count terminators without copying
            events += chunk.count(b"\n\n") + (split and chunk[:1] == b"\n")
            split = chunk[-1:] == b"\n" and chunk[-2:] != b"\n\n"
            last = chunk[-len(DONE):] if len(chunk) >= len(DONE) else (last + chunk)[-len(DONE):]
        out.stream_ms.append((time.perf_counter() - t0) * 1000)
        out.stream_chunks.append(got)
        out.stream_events += events
        if status != 200 or events != chunks + 1 or last != DONE:
            out.errors.append(f"stream: status {status}, {events} events of {chunks + 1}, ends {last!r}")
    out.stream_cpu_s = time.process_time() - cpu0


async def one_round(side: Side, args: argparse.Namespace, deadline: float) -> Round:
    out = Round()
    await sequential(side, max(1, args.requests // 10), deadline, None)
    gc.collect()
    await sequential(side, args.requests, deadline, out)
    gc.collect()
    await streams(side, args.streams, args.chunks, deadline, out)
    return out


def summarize(rounds: list[Round]) -> dict[str, Any]:
    done = [x for x in rounds if x.lat_ms]
    streamed = [x for x in rounds if x.stream_ms]
    return {
        "rounds": len(rounds),
        "p50_ms": r(median(pct(x.lat_ms, 50) for x in done)),
        "p99_ms": r(median(pct(x.lat_ms, 99) for x in done)),
        "cpu_ms_per_1000_req": r(median(1e6 * x.seq_cpu_s / len(x.lat_ms) for x in done), 1),
        "stream_ms": r(median(pct(x.stream_ms, 50) for x in streamed), 2),
        "events_per_s": r(median(x.stream_events / (sum(x.stream_ms) / 1000) for x in streamed), 0),
        "chunks_per_stream": r(median(pct([float(c) for c in x.stream_chunks], 50) for x in streamed), 0),
        "cpu_ms_per_1000_events": r(median(1e6 * x.stream_cpu_s / x.stream_events
                                           for x in streamed if x.stream_events), 2),
        "errors": [e for x in rounds for e in x.errors][:20],
    }


COLUMNS = [("client", "name", "{}"), ("seq p50 ms", "p50_ms", "{:.3f}"), ("seq p99 ms", "p99_ms", "{:.3f}"),
           ("CPU ms / 1,000 req", "cpu_ms_per_1000_req", "{:.0f}"), ("stream ms", "stream_ms", "{:.1f}"),
           ("events/s", "events_per_s", "{:,.0f}"), ("chunks / stream", "chunks_per_stream", "{:,.0f}"),
           ("CPU ms / 1,000 events", "cpu_ms_per_1000_events", "{:.2f}")]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margins(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Lean relative to httpcore, for each pair: below 1 is less time or CPU."""
    out = []
    for lean, base in (("httpx + lean", "httpx + httpcore"), ("lean transport only", "httpcore transport only")):
        a, b = rows[lean], rows[base]
        parts = []
        for label, key in (("p50", "p50_ms"), ("p99", "p99_ms"), ("CPU/req", "cpu_ms_per_1000_req"),
                           ("stream time", "stream_ms"), ("CPU/event", "cpu_ms_per_1000_events")):
            if a.get(key) and b.get(key):
                parts.append(f"{label} x{a[key] / b[key]:.2f}")
        out.append(f"{lean} / {base}: " + ", ".join(parts))
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    if task is not None and hasattr(signal, "SIGTERM"):
        try:  # SIGTERM cancels the run, so `finally` stops the upstream
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        except (NotImplementedError, RuntimeError):
            pass
    end = time.monotonic() + args.budget
    upstream = procs.fake_upstream(args.out.parent / "logs", "fake_upstream_transport")
    sides: list[Side] = []
    try:
        upstream.start()
        await upstream.ready("/v1/models")
        sides = [Side("httpx + httpcore", upstream.port, lean=False, via_client=True),
                 Side("httpx + lean", upstream.port, lean=True, via_client=True),
                 Side("httpcore transport only", upstream.port, lean=False, via_client=False),
                 Side("lean transport only", upstream.port, lean=True, via_client=False)]
        rounds: dict[str, list[Round]] = {s.name: [] for s in sides}
        for i in range(args.rounds):
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            for side in order:
                left = end - time.monotonic()
                if left <= 0:
                    break
                # each client's turn gets an equal share of what is left of the budget
                share = left / (len(order) * (args.rounds - i))
                sys.stderr.write(f"[bench.transport] round {i + 1}: {side.name}\n")
                rounds[side.name].append(await one_round(side, args, time.monotonic() + max(share, 5.0)))
        rows = {name: {"name": name, **summarize(rs)} for name, rs in rounds.items()}
    finally:
        for side in sides:
            await side.aclose()
        upstream_exit = upstream.stop()
    return {"rows": rows, "upstream_exit": upstream_exit}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="sequential requests per client and round")
    p.add_argument("--chunks", type=int, default=5000, help="SSE events per stream")
    p.add_argument("--streams", type=int, default=5, help="streams per client and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                   help="the client's event loop (lmgate runs on uvloop where it is installed)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.transport", *(sys.argv[1:] if argv is None else argv)])
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    loop_name = "asyncio"
    if args.loop == "uvloop":
        try:
            import uvloop
            factory, loop_name = uvloop.new_event_loop, "uvloop"
        except ImportError:
            sys.stderr.write("[bench.transport] uvloop is not installed; asyncio's loop is used\n")
    loop = factory()
    try:
        doc = loop.run_until_complete(run(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.stderr.write("[bench.transport] interrupted; upstream stopped\n")
        return 130
    finally:
        loop.close()
    rows = list(doc["rows"].values())
    doc["meta"] = {"command": command, "python": platform.python_version(), "loop": loop_name,
                   "httpx": httpx.__version__, "requests": args.requests, "chunks": args.chunks,
                   "streams": args.streams, "rounds": args.rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"`{command}` (Python {doc['meta']['python']}, {loop_name}, httpx {httpx.__version__})\n")
    print(table(rows))
    print()
    for line in margins(doc["rows"]):
        print(line)
    errors = [f"{row['name']}: {e}" for row in rows for e in row["errors"]]
    for line in errors:
        print(f"ERROR {line}")
    print(f"results: {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
