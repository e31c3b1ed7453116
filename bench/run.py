"""Run the benchmark: start the fake upstream, lmgate and a plain aiohttp hop, run every
scenario directly and through them (interleaved), print the table, write the JSON.

    python -m bench.run [--quick | --smoke] [--out bench/results/latest.json] [--only a,b,e]
                        [--profile [--profile-mode nonblocking|blocking|native]]

Exit status: 0 when every scenario ran and every correctness check passed (timing targets are
reported, not enforced, unless --strict), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import procs, profile, report
from .boxes import PAIR, two_boxes
from .context import SIZES, Boxes, Ctx
from .scale import scale
from .scenarios import handoff, paced_stream, sequential, stream_throughput

Scenario = Callable[[Ctx], Awaitable[dict[str, Any]]]
SCENARIOS: list[tuple[str, str, Scenario]] = [
    ("a", "a_sequential", sequential),
    ("b", "b_stream", stream_throughput),
    ("c", "c_paced", paced_stream),
    ("d", "d_handoff", handoff),
    ("e", "e_scale", scale),
    ("g", "g_two_boxes", two_boxes),
]
HOP_SCENARIOS = {"a", "b", "c"}  # run through the plain hop as well (and so (f))
PHASED = {"e_scale"}  # profiled phase by phase (ctx.phase), not as a whole
BUDGET_S = {"full": 330.0, "quick": 90.0, "smoke": 90.0}
DEFAULT_OUT = Path("bench/results/latest.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run",
                                description="lmgate benchmark: direct vs a plain hop vs lmgate")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller run (under a minute; 500 waiting clients)")
    size.add_argument("--smoke", action="store_true", help="tiny run for tests: correctness only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default %(default)s)")
    p.add_argument("--only", default="", help="comma-separated scenario letters to run (a,b,c,d,e,g); "
                   "f is derived from a and b")
    p.add_argument("--clients", type=int, default=None, help="override the number of waiting clients in (e)")
    p.add_argument("--profile", action="store_true",
                   help="record lmgate with py-spy during each scenario; collapsed stacks and top "
                   "functions go next to --out")
    p.add_argument("--profile-mode", choices=list(profile.MODES), default=None,
                   help="py-spy sampling (implies --profile): nonblocking (default; right self time, "
                   "torn stacks), blocking (whole stacks, syscalls overstated), native (blocking + C "
                   "frames such as the garbage collector)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a timing target is missed")
    return p.parse_args(argv)


def fast_loop() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


async def run(args: argparse.Namespace, mode: str, loop_name: str) -> dict[str, Any]:
    sizes = SIZES[mode]
    if args.clients:
        from dataclasses import replace
        sizes = replace(sizes, scale_clients=args.clients)
    wanted = {x.strip() for x in args.only.split(",") if x.strip()} or {k for k, _, _ in SCENARIOS}
    if "f" in wanted:
        wanted |= {"a", "b"}
    out_dir = args.out.parent
    log_dir = out_dir / "logs"
    budget_end = time.monotonic() + BUDGET_S[mode]
    fd_limit = procs.raise_fd_limit()
    # SIGTERM (a test's timeout, a CI cancel) cancels the run, so `finally` stops the servers.
    task = asyncio.current_task()
    if task is not None and hasattr(signal, "SIGTERM"):
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        except (NotImplementedError, RuntimeError):
            pass
    doc: dict[str, Any] = {
        "meta": {"mode": mode, "command": " ".join(["python", "-m", "bench.run", *sys.argv[1:]]),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
                 "platform": platform.platform(), "cpus": os.cpu_count(), "client_loop": loop_name,
                 "uvloop": available("uvloop"), "httptools": available("httptools"),
                 "aiohttp": available("aiohttp"), "fd_limit": fd_limit,
                 "sizes": sizes.as_dict()},
        "scenarios": {},
    }
    upstream = procs.fake_upstream(log_dir)
    lmgate: procs.Server | None = None
    started: dict[str, procs.Server] = {}  # role -> server, in start order; stopped in reverse
    try:
        started["upstream"] = upstream
        upstream.start()
        await upstream.ready("/v1/models")
        lmgate = procs.lmgate(log_dir, upstream.port)
        started["lmgate"] = lmgate
        lmgate.start()
        use_hop = bool(wanted & HOP_SCENARIOS) and doc["meta"]["aiohttp"]
        hop = procs.plain_hop(log_dir, upstream.port) if use_hop else None
        if hop is not None:
            started["plain_hop"] = hop
            hop.start()
        await lmgate.ready("/healthz")
        if hop is not None:
            await hop.ready("/v1/models")  # answered by the fake upstream through the hop
        boxes = await start_boxes(log_dir, upstream, started) if "g" in wanted else None
        doc["meta"]["pids"] = {role: srv.pid for role, srv in started.items()}
        doc["meta"]["ports"] = {role: srv.port for role, srv in started.items()}
        doc["meta"]["rss_start_mb"] = round(lmgate.rss_bytes() / 2**20, 1)
        ctx = Ctx(upstream=upstream, lmgate=lmgate, sizes=sizes,
                  profile_dir=out_dir if args.profile else None, profile_mode=args.profile_mode,
                  boxes=boxes, hop=hop)
        for letter, name, fn in SCENARIOS:
            if letter not in wanted:
                continue
            doc["scenarios"][name] = await run_one(ctx, name, fn, budget_end, args, out_dir)
            dead = [role for role, srv in started.items() if not srv.alive()]
            if dead:
                doc["scenarios"][name]["error"] = (doc["scenarios"][name].get("error") or "") + \
                    f" server died: {', '.join(dead)}"
                break
        doc["meta"]["lmgate_log_tail"] = lmgate.tail(2000)
        if boxes is not None:
            doc["meta"]["lmgate_two_boxes_log_tail"] = boxes.two_boxes.tail(2000)
    finally:
        for role, srv in reversed(started.items()):
            doc["meta"][f"{role}_exit"] = srv.stop()
    return doc


async def start_boxes(log_dir: Path, box_a: procs.Server, started: dict[str, procs.Server]) -> Boxes:
    """(g)'s servers: a second fake upstream (box b) and two more lmgates, one in front of both
    boxes with a slot each, one in front of box a alone with the same number of slots."""
    box_b = procs.fake_upstream(log_dir, "fake_upstream_b")
    started["upstream_b"] = box_b
    box_b.start()
    await box_b.ready("/v1/models")
    two = procs.lmgate(log_dir, [box_a.port, box_b.port], ["--parallel", "1"], name="lmgate_two_boxes")
    one = procs.lmgate(log_dir, box_a.port, ["--parallel", str(PAIR)], name="lmgate_one_box")
    for role, srv in (("lmgate_two_boxes", two), ("lmgate_one_box", one)):
        started[role] = srv
        srv.start()
    for srv in (two, one):
        await srv.ready("/healthz")
    return Boxes(upstream_b=box_b, two_boxes=two, one_box=one)


def profile_targets(ctx: Ctx, name: str) -> dict[str, int]:
    """Which processes py-spy records during a scenario (file label -> PID)."""
    if name == "g_two_boxes" and ctx.boxes is not None:
        return {"g_two_boxes": ctx.boxes.two_boxes.pid, "g_one_box": ctx.boxes.one_box.pid}
    return {name: ctx.lmgate.pid}


async def run_one(ctx: Ctx, name: str, fn: Scenario, budget_end: float, args: argparse.Namespace,
                  out_dir: Path) -> dict[str, Any]:
    cap = max(5.0, min(ctx.sizes.cap_s, budget_end - time.monotonic()))
    recorders: dict[str, profile.Recorder] = {}
    if args.profile and name not in PHASED:
        recorders = {label: profile.Recorder(pid, out_dir / f"profile-{label}.txt", args.profile_mode)
                     for label, pid in profile_targets(ctx, name).items()}
    t0 = time.perf_counter()
    noise = Noise(ctx)
    sys.stderr.write(f"[bench] {name} (cap {cap:.0f} s) ...\n")
    profs: dict[str, Any] = {}
    try:
        for rec in recorders.values():
            rec.start()
        result = await asyncio.wait_for(fn(ctx), cap)
    except asyncio.TimeoutError:
        result = {"error": f"did not finish within its cap of {cap:.0f} s"}
    except Exception as exc:  # noqa: BLE001 - one scenario's failure must not stop the others
        result = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for label, rec in recorders.items():
            profs[label] = rec.stop()
    if recorders:
        result["profiles"] = profs
    if ctx.profiles:
        result["profiles"] = dict(ctx.profiles)
        ctx.profiles.clear()
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["other_load"] = noise.stop()
    error = f" ERROR {result['error']}" if result.get("error") else ""
    sys.stderr.write(f"[bench] {name} done in {result['wall_s']} s{error}\n")
    return result


class Noise:
    """CPU used on this machine by processes other than the bench and its servers while a
    scenario runs: other work on a shared machine makes the tail latencies noisy."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.t0 = time.perf_counter()
        self.sys0 = _busy()
        self.ours0 = self._ours()

    def _ours(self) -> float:
        return time.process_time() + sum(s.cpu_s() for s in self.ctx.servers())

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        other = max(0.0, (_busy() - self.sys0) - (self._ours() - self.ours0))
        cores = os.cpu_count() or 1
        return {"other_cpu_s": round(other, 2),
                "other_pct_of_machine": round(100 * other / (wall * cores), 1),
                "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else -1.0}


def _busy() -> float:
    import psutil

    t = psutil.cpu_times()  # process time only: interrupts and steal are not "other processes"
    return float(t.user + t.system + getattr(t, "nice", 0.0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_mode is not None:
        args.profile = True
    else:
        args.profile_mode = "nonblocking"
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    factory, loop_name = fast_loop()
    try:
        if hasattr(asyncio, "Runner"):
            with asyncio.Runner(loop_factory=factory) as runner:
                doc = runner.run(run(args, mode, loop_name))
        else:  # Python 3.10: the default loop
            doc = asyncio.run(run(args, mode, "asyncio"))
    except asyncio.CancelledError:
        sys.stderr.write("[bench] stopped by SIGTERM; servers stopped\n")
        return 130
    scenarios = doc["scenarios"]
    doc["targets"] = report.evaluate(scenarios)
    doc["checks"] = report.checks(scenarios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"lmgate bench ({mode}): {doc['meta']['command']}")
    print(report.table(doc["targets"]))
    print(report.checks_text(doc["checks"]))
    if not doc["meta"]["aiohttp"] and any(n in scenarios for n in ("a_sequential", "b_stream", "c_paced")):
        print("plain hop: not run (aiohttp is not installed: pip install -e '.[bench]')")
    busy = {n: sc["other_load"]["other_pct_of_machine"]
            for n, sc in scenarios.items() if sc.get("other_load")}
    if busy:
        print("other load on this machine during each scenario (% of all cores): "
              + ", ".join(f"{n} {v}" for n, v in busy.items())
              + ("  <- tail latencies are not trustworthy above ~10" if max(busy.values()) > 10 else ""))
    for name, sc in scenarios.items():
        if sc.get("error"):
            print(f"{name}: ERROR {sc['error']}")
        for part, prof in (sc.get("profiles") or {}).items():
            print(profile.text(part, prof))
    print(f"results: {args.out}")
    failed = any(sc.get("error") for sc in scenarios.values()) or not all(doc["checks"].values())
    if args.strict and any(t["result"] == "FAIL" for t in doc["targets"]):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
