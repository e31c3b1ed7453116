"""What every scenario gets: the two servers, the sizes of this run, and a few shared helpers."""

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

DIRECT, LMGATE = "direct", "lmgate"


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does. ``rounds`` alternate direct/lmgate (first side swaps)."""

    rounds: int
    seq_requests: int          # (a) per round
    seq_warmup: int
    stream_chunks: int         # (b) chunks per stream
    streams_per_round: int     # (b)
    paced_chunks: int          # (c)
    paced_delay_ms: float      # (c)
    paced_streams: int         # (c) per round
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
                  paced_chunks=200, paced_delay_ms=5, paced_streams=2, handoff_requests=50,
                  handoff_delay_ms=5, handoff_rounds=5, scale_clients=5000, scale_chunks=3,
                  cpu_window_s=5.0, queue_samples=30, boxes_requests=2000, boxes_warmup=200,
                  cap_s=150.0),
    "quick": Sizes(rounds=3, seq_requests=500, seq_warmup=100, stream_chunks=1000, streams_per_round=5,
                   paced_chunks=200, paced_delay_ms=5, paced_streams=1, handoff_requests=50,
                   handoff_delay_ms=5, handoff_rounds=2, scale_clients=500, scale_chunks=3,
                   cpu_window_s=2.0, queue_samples=10, boxes_requests=500, boxes_warmup=100,
                   cap_s=60.0),
    "smoke": Sizes(rounds=2, seq_requests=20, seq_warmup=5, stream_chunks=50, streams_per_round=2,
                   paced_chunks=20, paced_delay_ms=5, paced_streams=1, handoff_requests=10,
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
        return self.upstream.port if side == DIRECT else self.lmgate.port

    def sides(self, round_no: int) -> tuple[str, str]:
        """Interleaving: even rounds go direct first, odd rounds lmgate first."""
        return (DIRECT, LMGATE) if round_no % 2 == 0 else (LMGATE, DIRECT)

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
    """CPU of lmgate, the fake upstream and this client process across a block of work.
    ``lmgate`` and ``upstreams`` name other servers than the context's (scenario (g))."""

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
        self.u0 = self._upstream_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.t0
        self.client_cpu_s = time.process_time() - self.c0
        self.lmgate_cpu_s = self.lmgate.cpu_s() - self.l0
        self.upstream_cpu_s = self._upstream_cpu() - self.u0

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 4), "client_cpu_s": round(self.client_cpu_s, 4),
                "lmgate_cpu_s": round(self.lmgate_cpu_s, 4), "upstream_cpu_s": round(self.upstream_cpu_s, 4)}


async def gather_capped(*aws: Any, timeout_s: float) -> list[Any]:
    return list(await asyncio.wait_for(asyncio.gather(*aws), timeout_s))
