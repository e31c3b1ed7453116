"""What every scenario gets: the servers, the sizes of this run, and a few shared helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import Self

from . import profile
from .client import Conn
from .procs import Server

DIRECT, HOP, LMGATE = "direct", "hop", "lmgate"  # hop: the plain aiohttp proxy (bench.plain_hop)


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does. In every round each side runs once; the order of the
    sides rotates from round to round (``Ctx.sides``)."""

    rounds: int
    seq_requests: int          # (a) per round
    seq_warmup: int
    stream_chunks: int         # (b) chunks per stream
    streams_per_round: int     # (b)
    paced_chunks: int          # (c)
    paced_delay_ms: float      # (c)
    paced_streams: int         # (c) per round
    paced_first_streams: int   # (c) short paced streams per round, for the first token
    paced_first_chunks: int    # (c) chunks of each short stream
    handoff_requests: int      # (d)
    handoff_delay_ms: float    # (d) upstream delay of each queued request
    handoff_rounds: int        # (d)
    scale_clients: int         # (e)
    scale_chunks: int          # (e) chunks each waiting client receives once served
    cpu_window_s: float        # (e)
    queue_samples: int         # (e) GET /queue requests while they wait
    boxes_requests: int        # (g) requests per side and round, split over its connections
    boxes_warmup: int          # (g) warm-up requests per connection
    cap_s: float               # wall-clock cap of each scenario

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SIZES = {
    "full": Sizes(rounds=7, seq_requests=2000, seq_warmup=200, stream_chunks=1000, streams_per_round=20,
                  paced_chunks=200, paced_delay_ms=5, paced_streams=2, paced_first_streams=40,
                  paced_first_chunks=4, handoff_requests=50,
                  handoff_delay_ms=5, handoff_rounds=5, scale_clients=5000, scale_chunks=3,
                  cpu_window_s=5.0, queue_samples=30, boxes_requests=2000, boxes_warmup=200,
                  cap_s=150.0),
    "quick": Sizes(rounds=3, seq_requests=500, seq_warmup=100, stream_chunks=1000, streams_per_round=5,
                   paced_chunks=200, paced_delay_ms=5, paced_streams=1, paced_first_streams=30,
                   paced_first_chunks=4, handoff_requests=50,
                   handoff_delay_ms=5, handoff_rounds=2, scale_clients=500, scale_chunks=3,
                   cpu_window_s=2.0, queue_samples=10, boxes_requests=500, boxes_warmup=100,
                   cap_s=60.0),
    "smoke": Sizes(rounds=2, seq_requests=20, seq_warmup=5, stream_chunks=50, streams_per_round=2,
                   paced_chunks=20, paced_delay_ms=5, paced_streams=1, paced_first_streams=3,
                   paced_first_chunks=4, handoff_requests=10,
                   handoff_delay_ms=2, handoff_rounds=1, scale_clients=100, scale_chunks=3,
                   cpu_window_s=0.5, queue_samples=3, boxes_requests=40, boxes_warmup=5,
                   cap_s=60.0),
}


@dataclass
class Boxes:
    """The servers of (g): a second fake upstream ("box b"; box a is the main fake upstream),
    lmgate in front of both boxes, and, for the same load on one box, lmgate in front of box a
    alone with as many slots as the two boxes have together."""

    upstream_b: Server
    two_boxes: Server
    one_box: Server

    def servers(self) -> list[Server]:
        return [self.upstream_b, self.two_boxes, self.one_box]


@dataclass
class Ctx:
    upstream: Server
    lmgate: Server
    sizes: Sizes
    profile_dir: Path | None = None
    profile_mode: str = "nonblocking"
    profiles: dict[str, Any] = field(default_factory=dict)
    boxes: Boxes | None = None
    hop: Server | None = None  # the plain hop, started when (a), (b) or (c) runs

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """With --profile: py-spy on lmgate for the duration of this block (``profiles[name]``)."""
        if self.profile_dir is None:
            yield
            return
        rec = profile.Recorder(self.lmgate.pid, self.profile_dir / f"profile-{name}.txt", self.profile_mode)
        rec.start()
        time.sleep(0.3)  # let py-spy attach before the work starts
        try:
            yield
        finally:
            self.profiles[name] = rec.stop()

    def port(self, side: str) -> int:
        if side == DIRECT:
            return self.upstream.port
        if side == HOP:
            assert self.hop is not None
            return self.hop.port
        return self.lmgate.port

    def all_sides(self) -> tuple[str, ...]:
        return (DIRECT, HOP, LMGATE) if self.hop is not None else (DIRECT, LMGATE)

    def sides(self, round_no: int, among: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """Interleaving: the order rotates by one each round, so every side goes first (and
        last) in turn; with two sides, even rounds go direct first and odd rounds lmgate first."""
        order = among or self.all_sides()
        k = round_no % len(order)
        return order[k:] + order[:k]

    def servers(self) -> list[Server]:
        """Every server this context knows of (for the CPU the bench itself uses)."""
        extra = self.boxes.servers() if self.boxes is not None else []
        return [self.lmgate, self.upstream, *([self.hop] if self.hop is not None else []), *extra]

    async def upstream_call(self, method: str, path: str) -> Any:
        conn = await Conn.open(self.upstream.port)
        try:
            if method == "GET":
                return await conn.get_json(path)
            head, body = await conn.post(path)
            return json.loads(body) if head.status == 200 else None
        finally:
            conn.close()

    async def upstream_records(self) -> list[tuple[int, int, int]]:
        doc = await self.upstream_call("GET", "/stats")
        return [(int(i), int(a), int(e)) for i, a, e in doc["records"]]


class Meter:
    """CPU of lmgate, the plain hop (when running), the fake upstream and this client process
    across a block of work. ``lmgate`` and ``upstreams`` name other servers than the context's
    (scenario (g))."""

    def __init__(self, ctx: Ctx, lmgate: Server | None = None, upstreams: list[Server] | None = None) -> None:
        self.ctx = ctx
        self.lmgate = lmgate or ctx.lmgate
        self.upstreams = upstreams or [ctx.upstream]

    def _upstream_cpu(self) -> float:
        return sum(u.cpu_s() for u in self.upstreams)

    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.l0 = self.lmgate.cpu_s()
        self.h0 = self.ctx.hop.cpu_s() if self.ctx.hop is not None else 0.0
        self.u0 = self._upstream_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.t0
        self.client_cpu_s = time.process_time() - self.c0
        self.lmgate_cpu_s = self.lmgate.cpu_s() - self.l0
        self.hop_cpu_s = self.ctx.hop.cpu_s() - self.h0 if self.ctx.hop is not None else 0.0
        self.upstream_cpu_s = self._upstream_cpu() - self.u0

    def as_dict(self) -> dict[str, float]:
        out = {"wall_s": round(self.wall_s, 4), "client_cpu_s": round(self.client_cpu_s, 4),
               "lmgate_cpu_s": round(self.lmgate_cpu_s, 4), "upstream_cpu_s": round(self.upstream_cpu_s, 4)}
        if self.ctx.hop is not None:
            out["hop_cpu_s"] = round(self.hop_cpu_s, 4)
        return out


async def gather_capped(*aws: Any, timeout_s: float) -> list[Any]:
    return list(await asyncio.wait_for(asyncio.gather(*aws), timeout_s))
