"""Managed model loading against LM Studio's just-in-time loading, on a mixed two-model workload.

    python -m bench.managed [--quick] [--requests 60] [--clients 6] [--mix 0.7] [--load-time 3]
                            [--parallel 2] [--max-skips 4] [--only a,b,c,d,e] [--serial]

The LM Studio simulator (``proxy.simulator``) serves two chat models with a load time of
``--load-time`` seconds each (JIT loads and ``POST /api/v1/models/load`` alike) and generates
at ``--tokens-per-s``. One seeded workload (arrival times, model, reply length of every
request) is sent by ``--clients`` concurrent clients, each taking every C-th request and
sending it at its arrival time or as soon as its previous answer is complete, whichever is
later; arrivals are much faster than service, so a line forms in lmgate. The same workload
goes through one simulator + lmgate pair per configuration:

    (a) --load-mode jit                                 LM Studio loads on first use and evicts
    (b) --load-mode managed --max-loaded 1              lmgate loads, one model per box
    (c) --load-mode managed --max-loaded 2              both models stay loaded
    (d) --load-mode jit --max-skips 4                   (a) with swap batching
    (e) --load-mode managed --max-loaded 1 --max-skips 4
    (f) --load-mode jit, simulator with a memory budget (opt-in: --only ...,f)

For (a) and (d) the simulator runs as LM Studio does by default ("Only Keep Last JIT Loaded
Model": a JIT load evicts the other JIT model); (b), (c), (e) and (f) get ``--memory-bytes``
(default 8G, which both models' sizes fit in). Every lmgate gets the same ``--parallel`` and
the simulator the same ``--max-concurrent``. The configurations run side by side (each pair on
its own ports; the work is sleeps, not CPU), or one after another with ``--serial``.

Per configuration: requests per minute (answered requests over the time from the first send
to the last answer), model loads (simulator ``jit_loads + api_loads``), unloads (lmgate's
``/api/v1/models/unload`` calls) and evictions (the simulator's JIT auto-evictions), cut
generations, queue wait p50/p95 as lmgate reports it (``X-Queue-Wait-Ms``: time in line until
the request's turn; a load that lmgate makes after that is not in it, nor is a JIT load inside
LM Studio) and as the client sees it (send to complete answer minus the request's own
generation time, so every load it waited for is in it), and errors.

Checks (exit status 1 if one fails): every request answered 200; no cut generations in the
managed rows, and no JIT load there; at most one model generating at a time.

Results (summary per configuration, the workload) go to ``--out`` (default
bench/results/managed.json), server logs to ``logs/managed`` beside it. ``LMGATE_*`` variables
are dropped from the environment, so only the flags shown configure the lmgates.

Every loop is bounded in count and time (``--timeout`` per request, ``--cap`` per
configuration, 30 s to start). Only 127.0.0.1. Every server is stopped by its PID at the end,
also on Ctrl-C, SIGTERM or an error (and on Linux they die with the bench if it is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import procs
from .client import CHAT_PATH, Conn, HttpError, build_request
from .stats import pct, r

MODELS = ("qwen2.5-7b-instruct", "llama-3.2-3b-instruct")
DEFAULT_OUT = Path("bench/results/managed.json")
START_S = 30.0  # servers up and lmgate's first check of its box done


@dataclass(frozen=True)
class Row:
    key: str
    flags: tuple[str, ...]  # lmgate flags beyond --upstream/--port/--parallel
    managed: bool
    budget: bool  # the simulator gets --memory-bytes

    @property
    def label(self) -> str:
        return " ".join(self.flags)


ROWS: dict[str, Row] = {r.key: r for r in (
    Row("a", ("--load-mode", "jit"), managed=False, budget=False),
    Row("b", ("--load-mode", "managed", "--max-loaded", "1"), managed=True, budget=True),
    Row("c", ("--load-mode", "managed", "--max-loaded", "2"), managed=True, budget=True),
    Row("d", ("--load-mode", "jit", "--max-skips", "{skips}"), managed=False, budget=False),
    Row("e", ("--load-mode", "managed", "--max-loaded", "1", "--max-skips", "{skips}"),
        managed=True, budget=True),
    Row("f", ("--load-mode", "jit"), managed=False, budget=True),
)}
DEFAULT_ROWS = "a,b,c,d,e"


@dataclass(frozen=True)
class Config:
    requests: int
    clients: int
    mix: float  # share of requests for MODELS[0]
    load_s: float
    gen_min_s: float
    gen_max_s: float
    tokens_per_s: float
    interarrival_s: float
    parallel: int
    skips: int
    memory: str
    seed: int
    timeout_s: float
    cap_s: float


@dataclass(frozen=True)
class Req:
    index: int
    at: float  # seconds after the start
    model: str
    tokens: int

    def gen_s(self, tokens_per_s: float) -> float:
        return self.tokens / tokens_per_s


@dataclass
class Result:
    index: int
    model: str
    sent: float
    done: float = 0.0
    status: int | None = None
    wait_ms: float | None = None  # X-Queue-Wait-Ms
    error: str | None = None


@dataclass
class Outcome:
    key: str
    label: str
    results: list[Result] = field(default_factory=list)
    sim: dict[str, Any] = field(default_factory=dict)
    queue: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# -- the workload ------------------------------------------------------------------------------
def schedule(cfg: Config) -> list[Req]:
    """The seeded workload: Poisson arrivals, model by ``mix``, generation time uniform in
    [gen_min_s, gen_max_s] (as a number of tokens at ``tokens_per_s``)."""
    rng = random.Random(cfg.seed)
    out, t = [], 0.0
    for i in range(cfg.requests):
        t += rng.expovariate(1.0 / cfg.interarrival_s) if cfg.interarrival_s > 0 else 0.0
        model = MODELS[0] if rng.random() < cfg.mix else MODELS[1]
        tokens = max(3, round(rng.uniform(cfg.gen_min_s, cfg.gen_max_s) * cfg.tokens_per_s))
        out.append(Req(i, t, model, tokens))
    return out


def request_bytes(port: int, req: Req) -> bytes:
    doc = {"model": req.model, "messages": [{"role": "user", "content": f"q{req.index}"}],
           "max_tokens": req.tokens, "stream": False}
    return build_request("POST", CHAT_PATH, port, json.dumps(doc, separators=(",", ":")).encode())


async def client(port: int, reqs: list[Req], t0: float, timeout_s: float, out: list[Result]) -> None:
    """Send ``reqs`` one after another on one keep-alive connection (a new one after an error),
    each at its arrival time or when the previous answer is complete."""
    conn: Conn | None = None
    try:
        for req in reqs:
            delay = t0 + req.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            res = Result(req.index, req.model, time.monotonic())
            try:
                if conn is None:
                    conn = await Conn.open(port)
                head, body = await asyncio.wait_for(conn.request(request_bytes(port, req)), timeout_s)
                res.status = head.status
                wait = head.headers.get(b"x-queue-wait-ms")
                res.wait_ms = float(wait) if wait is not None else None
                if head.status != 200:
                    res.error = f"HTTP {head.status}: {body[:160].decode(errors='replace')}"
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HttpError,
                    ValueError) as exc:
                res.error = f"{type(exc).__name__}: {exc}"[:200]
                if conn is not None:
                    conn.close()
                conn = None
            res.done = time.monotonic()
            out.append(res)
    finally:
        if conn is not None:
            conn.close()


# -- servers -----------------------------------------------------------------------------------
def simulator(log_dir: Path, cfg: Config, row: Row) -> procs.Server:
    port = procs.free_port()
    args = ["-m", "proxy.simulator", "--port", str(port), "--models", ",".join(MODELS),
            "--tokens-per-s", str(cfg.tokens_per_s), "--load-time", str(cfg.load_s),
            "--max-concurrent", str(cfg.parallel)]
    if row.budget:
        args += ["--memory-bytes", cfg.memory]
    return procs.Server(f"simulator {row.key}", args, port, log_dir / f"sim-{row.key}.log")


def lmgate_flags(row: Row, cfg: Config) -> list[str]:
    return [f.format(skips=cfg.skips) for f in row.flags] + ["--parallel", str(cfg.parallel)]


async def get_json(port: int, path: str) -> Any:
    conn = await Conn.open(port)
    try:
        return await asyncio.wait_for(conn.get_json(path), 10.0)
    finally:
        conn.close()


async def post(port: int, path: str) -> None:
    conn = await Conn.open(port)
    try:
        head, body = await asyncio.wait_for(conn.post(path), 10.0)
        if head.status >= 300:
            raise HttpError(f"POST {path}: {head.status} {body[:200]!r}")
    finally:
        conn.close()


async def box_checked(gate: procs.Server, mode: str, timeout_s: float = START_S) -> None:
    """Wait until lmgate has checked its box and found ``mode`` (managed/jit)."""
    deadline = time.monotonic() + timeout_s
    seen: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncio.TimeoutError, HttpError, ValueError):
            boxes = (await get_json(gate.port, "/queue")).get("upstreams") or []
            seen = [(b.get("up"), b.get("load_mode"), b.get("error")) for b in boxes]
            if boxes and all(b.get("up") and b.get("load_mode") == mode for b in boxes):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{gate.name}: box not checked as {mode} in {timeout_s} s (seen {seen})")


# -- one configuration -------------------------------------------------------------------------
async def run_row(row: Row, sim: procs.Server, gate: procs.Server, reqs: list[Req],
                  cfg: Config) -> Outcome:
    label = " ".join(lmgate_flags(row, cfg))
    if row.budget and not row.managed:
        label += f"` + simulator `--memory-bytes {cfg.memory}"
    out = Outcome(row.key, label)
    try:
        await box_checked(gate, "managed" if row.managed else "jit")
        await post(sim.port, "/sim/reset")
        t0 = time.monotonic()
        lanes = [reqs[k::cfg.clients] for k in range(cfg.clients)]
        tasks = [asyncio.create_task(client(gate.port, lane, t0, cfg.timeout_s, out.results))
                 for lane in lanes if lane]
        try:
            _, late = await asyncio.wait(tasks, timeout=cfg.cap_s)
            if late:
                out.error = f"did not finish within --cap {cfg.cap_s:g} s"
        finally:
            for t in tasks:
                t.cancel()
            ended = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [e for e in ended if isinstance(e, Exception)]
        if crashed and out.error is None:
            out.error = f"a client failed: {type(crashed[0]).__name__}: {crashed[0]}"[:300]
        out.sim = await get_json(sim.port, "/sim/stats")
        out.sim.pop("log", None)
        out.queue = await get_json(gate.port, "/queue")
    except (OSError, asyncio.TimeoutError, HttpError, RuntimeError, ValueError) as exc:
        out.error = out.error or f"{type(exc).__name__}: {exc}"[:300]
    return out


def summarize(o: Outcome, reqs: list[Req], cfg: Config) -> dict[str, Any]:
    by_index = {q.index: q for q in reqs}
    ok = [x for x in o.results if x.error is None and x.status == 200]
    span = (max(x.done for x in o.results) - min(x.sent for x in o.results)) if o.results else 0.0
    gate_wait = [x.wait_ms / 1000 for x in ok if x.wait_ms is not None]
    client_wait = [max(0.0, x.done - x.sent - by_index[x.index].gen_s(cfg.tokens_per_s)) for x in ok]
    sim = o.sim
    boxes = o.queue.get("upstreams") or [{}]
    return {
        "key": o.key, "lmgate": o.label, "requests": len(reqs), "answered": len(o.results),
        "ok": len(ok), "errors": len(reqs) - len(ok), "error": o.error,
        "error_samples": sorted({x.error for x in o.results if x.error})[:3],
        "span_s": r(span, 2), "per_min": r(len(ok) / span * 60, 1) if span > 0 else None,
        "loads": (sim.get("jit_loads", 0) + sim.get("api_loads", 0)) if sim else None,
        "jit_loads": sim.get("jit_loads"), "api_loads": sim.get("api_loads"),
        "unloads": sim.get("unloads"), "evictions": sim.get("evictions"),
        "ttl_unloads": sim.get("ttl_unloads"), "cut": sim.get("cut_generations"),
        "failed_loads": sim.get("failed_loads"), "refused_loads": sim.get("refused_loads"),
        "max_concurrent_models": sim.get("max_concurrent_models"),
        "max_loaded_bytes": sim.get("max_loaded_bytes"),
        "switches": sum(int(b.get("switches") or 0) for b in boxes),
        "gate_wait_s": {"p50": r(pct(gate_wait, 50), 2), "p95": r(pct(gate_wait, 95), 2),
                        "max": r(max(gate_wait), 2) if gate_wait else None},
        "client_wait_s": {"p50": r(pct(client_wait, 50), 2), "p95": r(pct(client_wait, 95), 2),
                          "max": r(max(client_wait), 2) if client_wait else None},
    }


def checks(rows: list[dict[str, Any]], managed: dict[str, bool]) -> list[str]:
    """Failed checks, as text (empty: all passed)."""
    bad = []
    for s in rows:
        k = s["key"]
        if s["error"]:
            bad.append(f"({k}) {s['error']}")
        if s["errors"]:
            bad.append(f"({k}) {s['errors']} request(s) not answered 200: {s['error_samples']}")
        if managed[k] and s["cut"]:
            bad.append(f"({k}) managed, yet {s['cut']} generation(s) cut")
        if managed[k] and s["jit_loads"]:
            bad.append(f"({k}) managed, yet {s['jit_loads']} JIT load(s)")
        if (s["max_concurrent_models"] or 0) > 1:
            bad.append(f"({k}) {s['max_concurrent_models']} models generated at once")
    return bad


# -- output ------------------------------------------------------------------------------------
def _pair(d: dict[str, Any]) -> str:
    return "-" if d["p50"] is None else f"{d['p50']:.1f} / {d['p95']:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| | lmgate | req/min | loads | unloads / evictions | cut | wait p50 / p95 s (lmgate) "
            "| wait p50 / p95 s (client, incl. loads) | errors | time s |")
    lines = [head, "|" + " --- |" * 10]
    for s in rows:
        def v(x: Any) -> str:
            return "-" if x is None else str(x)
        lines.append(f"| ({s['key']}) | `{s['lmgate']}` | {v(s['per_min'])} | {v(s['loads'])} | "
                     f"{v(s['unloads'])} / {v(s['evictions'])} | {v(s['cut'])} | "
                     f"{_pair(s['gate_wait_s'])} | {_pair(s['client_wait_s'])} | {s['errors']} | "
                     f"{v(s['span_s'])} |")
    return "\n".join(lines)


def describe(cfg: Config, reqs: list[Req], rows: list[Row]) -> str:
    first = sum(1 for q in reqs if q.model == MODELS[0])
    alternations = sum(1 for a, b in zip(reqs, reqs[1:]) if a.model != b.model)
    budgeted = ",".join(f"({x.key})" for x in rows if x.budget)
    keep_last = ",".join(f"({x.key})" for x in rows if not x.budget)
    sim = [f"--memory-bytes {cfg.memory} for {budgeted}"] if budgeted else []
    sim += [f"no memory budget for {keep_last}, i.e. only the last JIT model is kept "
            "(LM Studio's default)"] if keep_last else []
    return (f"{len(reqs)} requests from {cfg.clients} clients, {first} for {MODELS[0]} and "
            f"{len(reqs) - first} for {MODELS[1]} (model changes {alternations} times in arrival "
            f"order); arrivals every {cfg.interarrival_s:g} s on average (the last at "
            f"{reqs[-1].at:.1f} s); generation {cfg.gen_min_s:g}-{cfg.gen_max_s:g} s "
            f"({cfg.tokens_per_s:g} tokens/s); load {cfg.load_s:g} s per model; --parallel "
            f"{cfg.parallel} (simulator --max-concurrent {cfg.parallel}); simulator: {'; '.join(sim)}")


# -- the command -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.managed",
                                description="managed vs JIT model loading on a mixed two-model "
                                "workload (simulator + lmgate per configuration, on 127.0.0.1)")
    p.add_argument("--quick", action="store_true",
                   help="a handful of requests, tiny load and generation times: a few seconds")
    p.add_argument("--requests", type=int, help="requests in the workload (default 60; quick 8)")
    p.add_argument("--clients", type=int, help="concurrent clients (default 6; quick 3)")
    p.add_argument("--mix", type=float, default=0.7,
                   help=f"share of requests for {MODELS[0]}, the rest for {MODELS[1]} (default %(default)s)")
    p.add_argument("--load-time", type=float, help="seconds a model takes to load (default 3; quick 0.2)")
    p.add_argument("--gen", help="generation seconds per request, min,max (default 1,2; quick 0.1,0.2)")
    p.add_argument("--tokens-per-s", type=float, help="simulator speed (default 20; quick 100)")
    p.add_argument("--interarrival", type=float,
                   help="mean seconds between arrivals (default 0.25; quick 0.05)")
    p.add_argument("--parallel", type=int, default=2,
                   help="lmgate --parallel and simulator --max-concurrent (default %(default)s)")
    p.add_argument("--max-skips", type=int, default=4, help="K for (d) and (e) (default %(default)s)")
    p.add_argument("--memory-bytes", default="8G",
                   help="simulator memory budget for the managed rows and (f) (default %(default)s; "
                   "the two models take about 6.7 GB)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (default %(default)s)")
    p.add_argument("--only", default=DEFAULT_ROWS,
                   help="configurations to run, from a,b,c,d,e,f (default %(default)s)")
    p.add_argument("--serial", action="store_true",
                   help="run the configurations one after another instead of side by side")
    p.add_argument("--timeout", type=float, help="seconds one request may take (default 120; quick 20)")
    p.add_argument("--cap", type=float,
                   help="seconds one configuration may take (default: every request alone with a load, "
                   "plus 30)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown or not keys:
        p.error(f"--only: unknown configuration(s) {unknown or args.only!r}; choose from {','.join(ROWS)}")
    args.rows = [ROWS[k] for k in dict.fromkeys(keys)]
    if not 0.0 <= args.mix <= 1.0:
        p.error("--mix must be between 0 and 1")
    return args


def config(args: argparse.Namespace) -> Config:
    quick = args.quick
    gen = args.gen or ("0.1,0.2" if quick else "1,2")
    try:
        lo, hi = (float(x) for x in gen.split(","))
    except ValueError:
        raise SystemExit(f"--gen: expected min,max seconds, got {gen!r}") from None
    requests = args.requests or (8 if quick else 60)
    load_s = args.load_time if args.load_time is not None else (0.2 if quick else 3.0)
    cfg = Config(
        requests=max(1, min(requests, 10_000)), clients=max(1, args.clients or (3 if quick else 6)),
        mix=args.mix, load_s=max(0.0, load_s), gen_min_s=max(0.0, min(lo, hi)), gen_max_s=max(lo, hi),
        tokens_per_s=args.tokens_per_s or (100.0 if quick else 20.0),
        interarrival_s=args.interarrival if args.interarrival is not None else (0.05 if quick else 0.25),
        parallel=max(1, args.parallel), skips=max(0, args.max_skips), memory=args.memory_bytes,
        seed=args.seed, timeout_s=args.timeout or (20.0 if quick else 120.0), cap_s=0.0)
    worst = cfg.requests * (cfg.gen_max_s + cfg.load_s + 0.2) + 30.0
    return replace(cfg, cap_s=args.cap or worst)


async def run(cfg: Config, rows: list[Row], serial: bool, log_dir: Path) -> list[Outcome]:
    task = asyncio.current_task()
    if task is not None and hasattr(signal, "SIGTERM"):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    reqs = schedule(cfg)
    started: list[procs.Server] = []
    try:
        sims: dict[str, procs.Server] = {}
        for row in rows:  # every process before any connection: no thread exists yet
            sims[row.key] = simulator(log_dir, cfg, row)
            started.append(sims[row.key])
            sims[row.key].start()
        gates: dict[str, procs.Server] = {}
        for row in rows:
            gates[row.key] = procs.lmgate(log_dir, sims[row.key].port, lmgate_flags(row, cfg),
                                          name=f"lmgate_{row.key}")
            started.append(gates[row.key])
            gates[row.key].start()
        await asyncio.gather(*(s.ready("/v1/models", START_S) for s in sims.values()))
        await asyncio.gather(*(g.ready("/healthz", START_S) for g in gates.values()))
        jobs = [run_row(row, sims[row.key], gates[row.key], reqs, cfg) for row in rows]
        if serial:
            return [await job for job in jobs]
        return list(await asyncio.gather(*jobs))
    finally:
        for srv in reversed(started):
            srv.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config(args)
    for name in [k for k in os.environ if k.startswith("LMGATE_")]:
        del os.environ[name]  # only the flags given here configure the lmgates under test
    command = shlex.join(["python", "-m", "bench.managed", *(sys.argv[1:] if argv is None else argv)])
    reqs = schedule(cfg)
    log_dir = args.out.parent / "logs" / "managed"
    t_start = time.monotonic()
    try:
        outcomes = asyncio.run(run(cfg, args.rows, args.serial, log_dir))
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.stderr.write("[bench.managed] interrupted; servers stopped\n")
        return 130
    except RuntimeError as exc:
        sys.stderr.write(f"[bench.managed] {exc}\n(logs in {log_dir})\n")
        return 1
    rows = [summarize(o, reqs, cfg) for o in outcomes]
    failed = checks(rows, {x.key: x.managed for x in args.rows})
    doc = {"command": command, "config": asdict(cfg), "wall_s": r(time.monotonic() - t_start, 1),
           "workload": describe(cfg, reqs, args.rows), "rows": rows, "failed_checks": failed,
           "schedule": [asdict(q) for q in reqs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"`{command}`\n")
    print(doc["workload"] + "\n")
    print(table(rows))
    print(f"\nchecks: {'all passed' if not failed else 'FAILED'}")
    for line in failed:
        print(f"  {line}")
    print(f"wall {doc['wall_s']} s; results {args.out}; server logs {log_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
