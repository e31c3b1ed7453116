"""What replica mode costs: one lmgate process against two replicas sharing one line in Redis.

    python -m bench.replicas [--quick | --smoke] [--out bench/results/replicas.json] [--strict]

On 127.0.0.1 it starts the fake upstream (``bench.fake_upstream``), a ``redis-server`` (or
``valkey-server``) on a free port with no persistence (``--save '' --appendonly no``), one
lmgate with no ``--state-url`` (*single*), and two lmgate replicas A and B with
``--state-url redis://127.0.0.1:<port>/0`` in front of the same upstream. Every lmgate gets the
same flags as in ``bench.run`` and a temporary directory of its own as ``XDG_DATA_HOME`` and
``LMGATE_STATE_DIR``; ``LMGATE_*`` variables of the caller's environment are not passed on.
The replicas count as started when both answer ``GET /readyz`` with 200.

The same work goes to four sides, each run once per round in an order that rotates by one
from round to round (direct-single-replica-A/B, single-replica-A/B-direct, ...), so slow drift
on the machine hits every side alike:

    direct       the fake upstream itself
    single       the lmgate without --state-url
    replica      replica A alone
    replicas_ab  A and B in turn: request i goes to A when i is even, to B when it is odd
                 (one keep-alive connection to each); a request on B may find A's previous
                 request still holding the slot in the shared line and wait for its release

Scenarios:

    sequential   non-streamed chat completions one after another (after a warm-up); latency
                 from writing the request to the last body byte; per round p50 and p99, the
                 figure is the median over rounds (as bench.run's (a))
    first_token  short streams (4 chunks, 5 ms apart upstream), one after another; first token
                 = request written to the first ``data:`` event; p50 and p99 pooled over rounds
    concurrent   N clients at once, half on A and half on B, each sending its requests one
                 after another (non-streamed and streamed in turn, 2 ms upstream delay): every
                 answer must be 200 and complete, the fake upstream must see every request
                 exactly once, and never two at once (--parallel 1: one slot for the group)
    redis        the floor under replica mode's cost, measured from this process with the
                 client library lmgate uses (redis.asyncio): PING, XADD, and XADD until a
                 reader blocked in XREAD wakes with the entry, which is the round trip a
                 submission makes before a replica may start a request; the last both right
                 after the previous one and after as much quiet as a stream of first_token
                 lasts (20 ms: processes that went idle take longer to wake)

*added* is side minus direct, *over single* is side minus single, both from the same run.
Target (the product's contract for ``--state-url`` with Redis on the same host): over single
<= 2 ms at p50, for the non-streamed latency and the first token, on both replica sides.

Correctness checks (any failure: exit status 1): every answer 200; non-streamed bodies and the
data events of streams identical on every side; every stream complete; the concurrent checks
above. ``--strict`` also exits 1 when the target is missed.

Every run is bounded: each scenario has a wall-clock cap and the whole run a budget; a scenario
that hits its cap is reported as an error. Every server is stopped by its PID at the end (SIGTERM,
then SIGKILL), also when the bench gets SIGTERM, and on Linux they die with it even if it is
killed. All traffic goes to 127.0.0.1. Server logs go to ``logs/replicas`` beside ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import psutil
from typing_extensions import Self

from . import procs
from .client import HOST, Conn, HttpError, SseCollector, chat_request
from .report import fmt
from .run import Noise, fast_loop
from .scenarios import handoff_gaps, one_stream
from .stats import diff, median, pct, r

DIRECT, SINGLE, REPLICA, REPLICAS_AB = "direct", "single", "replica", "replicas_ab"
SIDES = (DIRECT, SINGLE, REPLICA, REPLICAS_AB)
REPLICA_SIDES = (REPLICA, REPLICAS_AB)
TARGET_MS = 2.0  # replica over single, p50
DEFAULT_OUT = Path("bench/results/replicas.json")
START_S = 30.0
REDIS_PROGRAMS = ("redis-server", "valkey-server")


@dataclass(frozen=True)
class Sizes:
    rounds: int
    seq_requests: int      # sequential: measured requests per side and round
    seq_warmup: int        # sequential: warm-up requests per side and round
    streams: int           # first_token: streams per side and round (after one warm-up)
    stream_chunks: int
    stream_delay_ms: float
    clients: int           # concurrent: clients at once (half on A, half on B)
    client_requests: int   # concurrent: requests per client, one after another
    client_delay_ms: float
    probe_samples: int     # redis: round trips of each kind
    cap_s: float           # wall-clock cap of each scenario
    budget_s: float        # wall-clock budget of the whole run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SIZES = {
    "full": Sizes(rounds=7, seq_requests=1000, seq_warmup=100, streams=60, stream_chunks=4,
                  stream_delay_ms=5, clients=8, client_requests=10, client_delay_ms=2,
                  probe_samples=1000, cap_s=150.0, budget_s=330.0),
    "quick": Sizes(rounds=3, seq_requests=300, seq_warmup=50, streams=20, stream_chunks=4,
                   stream_delay_ms=5, clients=8, client_requests=5, client_delay_ms=2,
                   probe_samples=300, cap_s=60.0, budget_s=90.0),
    "smoke": Sizes(rounds=2, seq_requests=20, seq_warmup=5, streams=3, stream_chunks=4,
                   stream_delay_ms=5, clients=4, client_requests=2, client_delay_ms=2,
                   probe_samples=20, cap_s=30.0, budget_s=60.0),
}


# -- servers -----------------------------------------------------------------------------------
def redis_program() -> str | None:
    for name in REDIS_PROGRAMS:
        path = shutil.which(name)
        if path:
            return path
    return None


def redis_server(program: str, log_dir: Path, data_dir: Path) -> procs.Server:
    port = procs.free_port()
    args = ["--port", str(port), "--bind", HOST, "--dir", str(data_dir), "--daemonize", "no",
            "--save", "", "--appendonly", "no"]
    return procs.Server("redis", args, port, log_dir / "redis.log", program=program,
                   env={**os.environ, "LC_ALL": "C"})


async def redis_ready(server: procs.Server, timeout_s: float = START_S) -> None:
    """Until the server answers PING (a raw RESP inline command)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            break
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, server.port), 1.0)
            try:
                writer.write(b"PING\r\n")
                if (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG"):
                    return
            finally:
                writer.close()
        await asyncio.sleep(0.02)
    raise RuntimeError(f"redis-server did not answer PING in {timeout_s} s:\n{server.tail()}")


def lmgate_env(home: Path) -> dict[str, str]:
    """The caller's environment without ``LMGATE_*`` (only the flags configure the lmgates
    under test), with a data directory of this lmgate's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_") and k != "STATE_DIRECTORY"}
    (home / "state").mkdir(parents=True, exist_ok=True)
    return {**env, "PYTHONUNBUFFERED": "1", "XDG_DATA_HOME": str(home),
            "LMGATE_STATE_DIR": str(home / "state")}


def lmgate(log_dir: Path, upstream: int, home: Path, name: str, state_url: str | None) -> procs.Server:
    """An lmgate as ``bench.run`` starts it; with ``state_url`` one replica of the group."""
    extra = ["--state-url", state_url] if state_url else []
    base = procs.lmgate(log_dir, upstream, extra, name=name)
    return procs.Server(base.name, base.args, base.port, base.log_path, env=lmgate_env(home / name))


@dataclass
class Group:
    """The servers of this bench, by role."""

    upstream: procs.Server
    redis: procs.Server
    single: procs.Server
    a: procs.Server
    b: procs.Server
    sizes: Sizes

    def roles(self) -> dict[str, procs.Server]:
        return {"upstream": self.upstream, "redis": self.redis, "single": self.single,
                "replica_a": self.a, "replica_b": self.b}

    def servers(self) -> list[procs.Server]:
        return list(self.roles().values())

    def ports(self, side: str) -> list[int]:
        """Where a side's connections go: one connection per port."""
        return {DIRECT: [self.upstream.port], SINGLE: [self.single.port], REPLICA: [self.a.port],
                REPLICAS_AB: [self.a.port, self.b.port]}[side]

    @property
    def state_url(self) -> str:
        return f"redis://{HOST}:{self.redis.port}/0"


def rotated(round_no: int) -> tuple[str, ...]:
    k = round_no % len(SIDES)
    return SIDES[k:] + SIDES[:k]


class Cpu:
    """CPU seconds (user + system) of every server and of this client across a block of work."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def _now(self) -> dict[str, float]:
        return {"client": time.process_time(), **{role: s.cpu_s() for role, s in self.group.roles().items()}}

    def __enter__(self) -> Self:
        self.t0 = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = self._now()
        self.used = {role: round(t1[role] - self.t0[role], 4) for role in t1}


def cpu_ms_per(rounds: list[dict[str, Any]], n: int) -> dict[str, float]:
    """CPU ms of every process per unit of work (``n`` of them) across ``rounds``."""
    roles = rounds[0]["cpu_s"] if rounds else {}
    return {role: sum(x["cpu_s"][role] for x in rounds) * 1000 / max(1, n) for role in roles}


def lmgate_cpu(cpu: dict[str, float], side: str) -> float | None:
    """The CPU of the lmgate(s) of a side; for replicas both, since every replica applies
    every event of the shared log to its mirror, also for requests it does not serve."""
    if side == SINGLE:
        return r(cpu["single"])
    if side in REPLICA_SIDES:
        return r(cpu["replica_a"] + cpu["replica_b"])
    return None


def payload(col: SseCollector) -> bytes:
    """A stream's data events (queue comments left out: they depend on the wait)."""
    return b"\n".join(value for _, kind, value in col.events if kind in ("data", "done"))


def entered(col: SseCollector) -> int:
    """The position a stream entered the line at (``: queue_entered=N``), 0 if none."""
    for _, kind, value in col.events:
        if kind == "comment" and value.startswith(b"queue_entered="):
            return int(value.split(b"=", 1)[1])
    return 0


async def open_conns(ports: list[int]) -> list[Conn]:
    conns: list[Conn] = []
    try:
        for port in ports:
            conns.append(await Conn.open(port))
    except BaseException:
        for c in conns:
            c.close()
        raise
    return conns


# -- sequential, non-streamed --------------------------------------------------------------------
async def sequential(g: Group) -> dict[str, Any]:
    sz = g.sizes
    rounds: list[dict[str, Any]] = []
    bodies: dict[str, set[bytes]] = {side: set() for side in SIDES}
    for rn in range(sz.rounds):
        for side in rotated(rn):
            rounds.append(await _sequential_round(g, side, rn, bodies[side]))
    summary: dict[str, Any] = {}
    for side in SIDES:
        mine = [x for x in rounds if x["side"] == side]
        n = sum(x["n"] for x in mine)
        cpu = cpu_ms_per(mine, n)
        summary[side] = {
            "p50_ms": r(median(x["p50_ms"] for x in mine)), "p99_ms": r(median(x["p99_ms"] for x in mine)),
            "requests": n, "waited": sum(x["waited"] for x in mine),
            "lmgate_cpu_ms_per_request": lmgate_cpu(cpu, side),
            "replica_b_cpu_ms_per_request": r(cpu["replica_b"]), "redis_cpu_ms_per_request": r(cpu["redis"]),
        }
    _compare(summary, ("p50_ms", "p99_ms"))
    direct = bodies[DIRECT]
    checks = {"all_200": all(x["ok"] == x["n"] for x in rounds),
              "bodies_identical": len(direct) == 1 and all(bodies[s] == direct for s in SIDES)}
    return {"rounds": rounds, "summary": summary, "checks": checks}


async def _sequential_round(g: Group, side: str, rn: int, bodies: set[bytes]) -> dict[str, Any]:
    sz = g.sizes
    ports = g.ports(side)
    raws = [chat_request(p) for p in ports]
    k = len(ports)
    conns = await open_conns(ports)
    try:
        for i in range(sz.seq_warmup):
            await conns[i % k].request(raws[i % k])
        lat: list[float] = []
        ok = waited = 0
        clock = time.perf_counter_ns
        with Cpu(g) as cpu:
            for i in range(sz.seq_requests):
                conn = conns[i % k]
                t0 = clock()
                conn.send(raws[i % k])
                head = await conn.read_head()
                body = await conn.read_body(head)
                lat.append((clock() - t0) / 1e6)
                ok += head.status == 200
                waited += int(head.headers.get(b"x-queue-position", b"0")) >= 1
                bodies.add(body)
    finally:
        for c in conns:
            c.close()
    return {"side": side, "round": rn, "n": sz.seq_requests, "ok": ok, "waited": waited,
            "p50_ms": r(pct(lat, 50)), "p99_ms": r(pct(lat, 99)), "mean_ms": r(sum(lat) / len(lat)),
            "cpu_s": cpu.used}


def _compare(summary: dict[str, Any], keys: tuple[str, ...]) -> None:
    """``added_<key>`` (side minus direct) and ``over_single_<key>`` (side minus single)."""
    for side in SIDES[1:]:
        for key in keys:
            summary[side]["added_" + key] = diff(summary[side][key], summary[DIRECT][key])
            if side in REPLICA_SIDES:
                summary[side]["over_single_" + key] = diff(summary[side][key], summary[SINGLE][key])


# -- first token of short streams -----------------------------------------------------------------
async def first_token(g: Group) -> dict[str, Any]:
    sz = g.sizes
    rounds: list[dict[str, Any]] = []
    firsts: dict[str, list[float]] = {side: [] for side in SIDES}
    payloads: dict[str, set[bytes]] = {side: set() for side in SIDES}
    complete = True
    for rn in range(sz.rounds):
        for side in rotated(rn):
            ports = g.ports(side)
            raws = [chat_request(p, stream=True, bench_chunks=sz.stream_chunks,
                                 bench_delay_ms=sz.stream_delay_ms) for p in ports]
            k = len(ports)
            conns = await open_conns(ports)
            mine: list[float] = []
            waited = 0
            try:
                for i in range(k):  # warm-up: one stream per connection
                    await one_stream(conns[i], raws[i])
                with Cpu(g) as cpu:
                    for i in range(sz.streams):
                        t0, col = await one_stream(conns[i % k], raws[i % k])
                        complete &= col.n_data == sz.stream_chunks and col.done_ns is not None
                        payloads[side].add(payload(col))
                        waited += entered(col) >= 1
                        if col.first_ns is not None:
                            mine.append((col.first_ns - t0) / 1e6)
            finally:
                for c in conns:
                    c.close()
            firsts[side] += mine
            rounds.append({"side": side, "round": rn, "streams": sz.streams, "waited": waited,
                           "first_token_p50_ms": r(pct(mine, 50)), "first_token_p99_ms": r(pct(mine, 99)),
                           "cpu_s": cpu.used})
    summary: dict[str, Any] = {}
    for side in SIDES:
        mine_rounds = [x for x in rounds if x["side"] == side]
        n = sum(x["streams"] for x in mine_rounds)
        # pooled over the rounds: a round has tens of streams, too few for a p99 of its own
        summary[side] = {"p50_ms": r(pct(firsts[side], 50)), "p99_ms": r(pct(firsts[side], 99)),
                         "streams": len(firsts[side]), "waited": sum(x["waited"] for x in mine_rounds),
                         "lmgate_cpu_ms_per_stream": lmgate_cpu(cpu_ms_per(mine_rounds, n), side)}
    _compare(summary, ("p50_ms", "p99_ms"))
    direct = payloads[DIRECT]
    checks = {"complete": complete,
              "data_identical": len(direct) == 1 and all(payloads[s] == direct for s in SIDES)}
    return {"rounds": rounds, "summary": summary, "checks": checks}


# -- concurrent clients on both replicas ------------------------------------------------------------
async def concurrent(g: Group) -> dict[str, Any]:
    sz = g.sizes
    await _upstream_post(g, "/reset")
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(g, i, results) for i in range(sz.clients)))
    wall = time.perf_counter() - t0
    stats = await _upstream_stats(g)
    sent = sz.clients * sz.client_requests
    indices = [rec[0] for rec in stats]
    gaps, serialised = handoff_gaps(stats)
    good = [x for x in results if x["ok"]]
    summary = {
        "clients": sz.clients, "sent": sent, "answered_200": sum(x["status"] == 200 for x in results),
        "complete": len(good), "lost": sent - len(good), "served_upstream": len(stats),
        "duplicates": len(indices) - len(set(indices)),
        "by_replica": {name: sum(x["replica"] == name for x in good) for name in ("a", "b")},
        "waited": sum(x["waited"] for x in good), "wall_s": r(wall, 3),
        # end of one answer upstream to the arrival of the next: the hand-over through Redis
        "handoff_gap_p50_ms": r(pct(gaps, 50)), "handoff_gap_p99_ms": r(pct(gaps, 99)),
    }
    checks = {"all_200": summary["answered_200"] == sent, "none_lost": summary["lost"] == 0,
              "served_once_each": sorted(indices) == list(range(sent)), "serialised": serialised}
    return {"summary": summary, "checks": checks, "errors": [x["error"] for x in results if x["error"]][:10]}


async def _client(g: Group, i: int, out: list[dict[str, Any]]) -> None:
    """Client ``i``: on A when i is even, on B when odd; streamed and non-streamed in turn."""
    sz = g.sizes
    server = g.a if i % 2 == 0 else g.b
    conn = await Conn.open(server.port)
    try:
        for j in range(sz.client_requests):
            index = i * sz.client_requests + j
            stream = (i + j) % 2 == 1
            raw = chat_request(server.port, stream=stream, bench_index=index, bench_chunks=sz.stream_chunks,
                               bench_delay_ms=sz.client_delay_ms)
            res: dict[str, Any] = {"index": index, "replica": "a" if i % 2 == 0 else "b", "stream": stream,
                                   "status": 0, "ok": False, "waited": False, "error": None}
            out.append(res)
            try:
                if stream:
                    _, col = await one_stream(conn, raw)
                    res["status"] = 200  # one_stream raises on anything else
                    res["ok"] = col.n_data == sz.stream_chunks and col.done_ns is not None
                    res["waited"] = entered(col) >= 1
                else:
                    head, body = await conn.request(raw)
                    res["status"] = head.status
                    res["ok"] = head.status == 200 and b'"chat.completion"' in body
                    res["waited"] = int(head.headers.get(b"x-queue-position", b"0")) >= 1
            except (HttpError, OSError, asyncio.IncompleteReadError) as exc:
                res["error"] = f"request {index}: {type(exc).__name__}: {exc}"
                conn.close()
                conn = await Conn.open(server.port)
    finally:
        conn.close()


async def _upstream_post(g: Group, path: str) -> None:
    conn = await Conn.open(g.upstream.port)
    try:
        head, body = await conn.post(path)
        if head.status != 200:
            raise HttpError(f"POST {path}: {head.status} {body[:200]!r}")
    finally:
        conn.close()


async def _upstream_stats(g: Group) -> list[tuple[int, int, int]]:
    conn = await Conn.open(g.upstream.port)
    try:
        doc = await conn.get_json("/stats")
    finally:
        conn.close()
    return [(int(i), int(a), int(e)) for i, a, e in doc["records"]]


# -- the Redis floor ------------------------------------------------------------------------------
async def redis_round_trip(g: Group) -> dict[str, Any]:
    """PING, XADD, and XADD until a reader blocked in XREAD has the entry, from this process
    with redis.asyncio (two connections, as a replica has: a writer and a blocking reader).
    The wake-up is measured twice: with the reader blocked for 0.5 ms (back-to-back requests)
    and for as long as a stream of ``first_token`` lasts (each of its requests comes after
    that much quiet, and waking idle processes takes longer)."""
    import redis.asyncio as aioredis

    sz = g.sizes
    n = sz.probe_samples
    key, other = "bench:probe", "bench:probe:unread"  # the reader's stream; one nobody reads
    writer = aioredis.Redis.from_url(g.state_url, socket_timeout=5, socket_connect_timeout=2)
    reader = aioredis.Redis.from_url(g.state_url, socket_timeout=5, socket_connect_timeout=2)
    clock = time.perf_counter_ns
    last = "0-0"

    async def read_one(since: str) -> tuple[int, str]:
        found = await reader.xread({key: since}, count=1, block=2000)
        if not found:
            raise RuntimeError("XREAD timed out")
        entry_id = found[0][1][0][0]
        return clock(), entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def wake(quiet_s: float) -> float:
        nonlocal last
        read = asyncio.ensure_future(read_one(last))
        try:
            await asyncio.sleep(quiet_s)  # the XREAD reaches Redis and blocks
            t0 = clock()
            await writer.xadd(key, {"e": "x"}, maxlen=1000, approximate=True)
            woke, last = await read
        finally:
            read.cancel()  # if the XADD failed
        return (woke - t0) / 1e6

    async def timed(call: Callable[[], Awaitable[Any]]) -> float:
        t0 = clock()
        await call()
        return (clock() - t0) / 1e6

    quiet_s = sz.stream_chunks * sz.stream_delay_ms / 1000
    series: dict[str, list[float]] = {"ping": [], "xadd": [], "xadd_to_xread_wake": [],
                                      f"xadd_to_xread_wake_after_{quiet_s * 1000:g}ms_quiet": []}
    busy, idle = list(series.values())[2:]
    try:
        await writer.delete(key, other)
        for i in range(n + n // 10):  # the first tenth: warm-up
            ping = await timed(writer.ping)
            xadd = await timed(lambda: writer.xadd(other, {"e": "x"}, maxlen=1000, approximate=True))
            woke = await wake(0.0005)
            if i >= n // 10:
                series["ping"].append(ping)
                series["xadd"].append(xadd)
                busy.append(woke)
        for _ in range(max(5, n // 5)):
            idle.append(await wake(quiet_s))
        await writer.delete(key, other)
    finally:
        for client in (writer, reader):
            await client.aclose()
    summary = {name: {"p50_ms": r(pct(v, 50)), "p99_ms": r(pct(v, 99)), "n": len(v)}
               for name, v in series.items()}
    return {"summary": summary, "checks": {}}


# -- running ----------------------------------------------------------------------------------------
Scenario = Callable[[Group], Awaitable[dict[str, Any]]]
SCENARIOS: list[tuple[str, Scenario]] = [
    ("sequential", sequential),
    ("first_token", first_token),
    ("concurrent", concurrent),
    ("redis", redis_round_trip),
]


async def run_one(g: Group, name: str, fn: Scenario, budget_end: float) -> dict[str, Any]:
    cap = max(5.0, min(g.sizes.cap_s, budget_end - time.monotonic()))
    sys.stderr.write(f"[bench.replicas] {name} (cap {cap:.0f} s) ...\n")
    t0 = time.perf_counter()
    noise = Noise(cast(Any, g))  # Noise only asks for .servers()
    try:
        result = await asyncio.wait_for(fn(g), cap)
    except asyncio.TimeoutError:
        result = {"error": f"did not finish within its cap of {cap:.0f} s"}
    except Exception as exc:  # noqa: BLE001 - one scenario's failure must not stop the others
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["other_load"] = noise.stop()
    error = f" ERROR {result['error']}" if result.get("error") else ""
    sys.stderr.write(f"[bench.replicas] {name} done in {result['wall_s']} s{error}\n")
    return result


async def start(log_dir: Path, home: Path, program: str, sizes: Sizes,
                started: dict[str, procs.Server]) -> Group:
    """Every server, in start order into ``started`` (so that all of them are stopped)."""
    upstream = procs.fake_upstream(log_dir)
    started["upstream"] = upstream
    upstream.start()
    redis = redis_server(program, log_dir, home / "redis")
    (home / "redis").mkdir(parents=True, exist_ok=True)
    started["redis"] = redis
    redis.start()
    await asyncio.gather(upstream.ready("/v1/models", START_S), redis_ready(redis))
    url = f"redis://{HOST}:{redis.port}/0"
    single = lmgate(log_dir, upstream.port, home, "lmgate_single", None)
    a = lmgate(log_dir, upstream.port, home, "lmgate_replica_a", url)
    b = lmgate(log_dir, upstream.port, home, "lmgate_replica_b", url)
    for role, srv in (("single", single), ("replica_a", a), ("replica_b", b)):
        started[role] = srv
        srv.start()
    # /readyz answers 503 until a replica has caught up with the shared line (and its box is up)
    await asyncio.gather(*(s.ready("/readyz", START_S) for s in (single, a, b)))
    return Group(upstream=upstream, redis=redis, single=single, a=a, b=b, sizes=sizes)


async def run(args: argparse.Namespace, mode: str, program: str, command: str,
              loop_name: str) -> dict[str, Any]:
    sizes = SIZES[mode]
    budget_end = time.monotonic() + sizes.budget_s
    log_dir = args.out.parent / "logs" / "replicas"
    task = asyncio.current_task()
    if task is not None and hasattr(signal, "SIGTERM"):  # SIGTERM cancels: `finally` stops the servers
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    doc: dict[str, Any] = {
        "meta": {"mode": mode, "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "python": platform.python_version(), "platform": platform.platform(),
                 "cpus": os.cpu_count(), "client_loop": loop_name, "redis": redis_version(program),
                 "sizes": sizes.as_dict(), "target_ms": TARGET_MS},
        "scenarios": {},
    }
    started: dict[str, procs.Server] = {}
    with tempfile.TemporaryDirectory(prefix="lmgate-bench-replicas-") as tmp:
        try:
            g = await start(log_dir, Path(tmp), program, sizes, started)
            doc["meta"]["pids"] = {role: s.pid for role, s in started.items()}
            doc["meta"]["ports"] = {role: s.port for role, s in started.items()}
            doc["meta"]["args"] = {role: s.args for role, s in started.items()}
            for name, fn in SCENARIOS:
                if time.monotonic() >= budget_end:
                    doc["scenarios"][name] = {"error": f"not run: the run's {sizes.budget_s:g} s are spent"}
                    continue
                doc["scenarios"][name] = await run_one(g, name, fn, budget_end)
                dead = [role for role, s in started.items() if not s.alive()]
                if dead:
                    sc = doc["scenarios"][name]
                    sc["error"] = (sc.get("error") or "") + f" server died: {', '.join(dead)}"
                    break
        except RuntimeError as exc:  # a server did not start
            doc["error"] = str(exc)
        finally:
            doc["meta"]["log_tails"] = {role: s.tail(1500) for role, s in started.items()
                                        if role not in ("upstream", "redis")}
            for role, s in reversed(started.items()):
                doc["meta"][f"{role}_exit"] = s.stop()
    return doc


def redis_version(program: str) -> str:
    try:
        out = subprocess.run([program, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.decode(errors="replace").strip()


# -- the report ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    key: str
    scenario: str
    metric: str
    figure: str        # the key in each side's summary
    sides: tuple[str, ...] = SIDES
    target: bool = False  # compared with TARGET_MS (every replica side must meet it)
    unit: str = "ms"


ROWS = [
    Row("latency_p50", "sequential", "latency p50", "p50_ms"),
    Row("latency_p50_added", "sequential", "latency p50 added (vs direct)", "added_p50_ms", SIDES[1:]),
    Row("latency_p50_over_single", "sequential", "latency p50 over single", "over_single_p50_ms",
        REPLICA_SIDES, target=True),
    Row("latency_p99", "sequential", "latency p99", "p99_ms"),
    Row("latency_p99_added", "sequential", "latency p99 added (vs direct)", "added_p99_ms", SIDES[1:]),
    Row("latency_p99_over_single", "sequential", "latency p99 over single", "over_single_p99_ms",
        REPLICA_SIDES),
    Row("latency_waited", "sequential", "requests that waited in line", "waited", SIDES[1:], unit=""),
    Row("lmgate_cpu_per_request", "sequential", "lmgate CPU per request (replicas: A+B)",
        "lmgate_cpu_ms_per_request", SIDES[1:]),
    Row("replica_b_cpu_per_request", "sequential", "of which replica B", "replica_b_cpu_ms_per_request",
        REPLICA_SIDES),
    Row("redis_cpu_per_request", "sequential", "redis CPU per request", "redis_cpu_ms_per_request",
        REPLICA_SIDES),
    Row("first_token_p50", "first_token", "first token p50", "p50_ms"),
    Row("first_token_p50_added", "first_token", "first token p50 added (vs direct)", "added_p50_ms",
        SIDES[1:]),
    Row("first_token_p50_over_single", "first_token", "first token p50 over single", "over_single_p50_ms",
        REPLICA_SIDES, target=True),
    Row("first_token_p99", "first_token", "first token p99", "p99_ms"),
    Row("first_token_p99_over_single", "first_token", "first token p99 over single", "over_single_p99_ms",
        REPLICA_SIDES),
    Row("first_token_waited", "first_token", "streams that waited in line", "waited", SIDES[1:], unit=""),
]


def rows(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in ROWS:
        summary = (scenarios.get(row.scenario) or {}).get("summary") or {}
        values = {side: (summary.get(side) or {}).get(row.figure) if side in row.sides else None
                  for side in SIDES}
        result = "info"
        if row.target:
            got = [values[s] for s in row.sides]
            if not all(isinstance(v, (int, float)) for v in got):
                result = "n/a"
            else:
                result = "pass" if max(cast(list[float], got)) <= TARGET_MS else "FAIL"
        out.append({"key": row.key, "scenario": row.scenario, "metric": row.metric, "unit": row.unit,
                    **values, "target": f"<= {TARGET_MS:g}" if row.target else None, "result": result})
    return out


def table(found: list[dict[str, Any]]) -> str:
    head = ["scenario", "metric", "direct", "single", "replica", "A/B", "target", "result"]
    body = [[x["scenario"], x["metric"] + (f" [{x['unit']}]" if x["unit"] else ""),
             *(fmt(x[s]) for s in SIDES), x["target"] or "-", x["result"]] for x in found]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def checks(scenarios: dict[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for name, sc in scenarios.items():
        out[f"{name}.ran"] = not sc.get("error")
        for key, value in (sc.get("checks") or {}).items():
            if isinstance(value, bool):
                out[f"{name}.{key}"] = value
    return out


def extra_text(scenarios: dict[str, Any]) -> list[str]:
    lines = []
    c = (scenarios.get("concurrent") or {}).get("summary")
    if c:
        lines.append(f"concurrent: {c['clients']} clients at once on A and B, {c['sent']} requests: "
                     f"{c['answered_200']} answered 200, {c['complete']} complete, {c['lost']} lost, "
                     f"{c['served_upstream']} reached the upstream ({c['duplicates']} twice); served by A/B "
                     f"{c['by_replica']['a']}/{c['by_replica']['b']}; {c['waited']} waited in line; "
                     f"hand-over gap upstream p50 {fmt(c['handoff_gap_p50_ms'])} ms, "
                     f"p99 {fmt(c['handoff_gap_p99_ms'])} ms; {c['wall_s']} s")
    p = (scenarios.get("redis") or {}).get("summary")
    if p:
        lines.append("redis from this process (redis.asyncio), p50 / p99 ms: " + ", ".join(
            f"{name} {fmt(v['p50_ms'])} / {fmt(v['p99_ms'])}" for name, v in p.items()))
    busy = {n: sc["other_load"]["other_pct_of_machine"]
            for n, sc in scenarios.items() if sc.get("other_load")}
    if busy:
        lines.append("other load on this machine during each scenario (% of all cores): "
                     + ", ".join(f"{n} {v}" for n, v in busy.items())
                     + ("  <- tail latencies are not trustworthy above ~10"
                        if max(busy.values()) > 10 else ""))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replicas",
                                description="what replica mode (--state-url) costs over one lmgate process")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller run (under a minute)")
    size.add_argument("--smoke", action="store_true", help="tiny run for tests: correctness only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help=f"exit 1 when replica mode adds more than {TARGET_MS:g} ms p50 over one process")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    command = shlex.join(["python", "-m", "bench.replicas", *(sys.argv[1:] if argv is None else argv)])
    program = redis_program()
    if program is None:
        sys.stderr.write("[bench.replicas] needs redis-server (or valkey-server) on PATH, e.g. "
                         "apt-get install redis-server\n")
        return 2
    factory, loop_name = fast_loop()
    try:
        if hasattr(asyncio, "Runner"):
            with asyncio.Runner(loop_factory=factory) as runner:
                doc = runner.run(run(args, mode, program, command, loop_name))
        else:  # Python 3.10: the default loop
            doc = asyncio.run(run(args, mode, program, command, "asyncio"))
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.stderr.write("[bench.replicas] stopped; servers stopped\n")
        return 130
    scenarios = doc["scenarios"]
    doc["rows"] = rows(scenarios)
    doc["checks"] = checks(scenarios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"lmgate replica bench ({mode}): {command}")
    if doc.get("error"):
        print(f"ERROR {doc['error']}")
    print(table(doc["rows"]))
    for line in extra_text(scenarios):
        print(line)
    bad = [k for k, v in doc["checks"].items() if not v]
    print(f"correctness checks: all {len(doc['checks'])} passed" if not bad
          else f"correctness checks: {len(bad)} of {len(doc['checks'])} FAILED: " + ", ".join(bad))
    for name, sc in scenarios.items():
        if sc.get("error"):
            print(f"{name}: ERROR {sc['error']}")
    print(f"results: {args.out}")
    failed = bool(doc.get("error")) or not doc["checks"] or bool(bad)
    if args.strict and any(x["result"] == "FAIL" for x in doc["rows"]):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
