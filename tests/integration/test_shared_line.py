"""The shared line (``--state-url``) against a real redis-server: two replicas' mirrors, fed
one log, decide exactly as one in-process gate fed the same requests in the same order. Random
workloads (submissions on either replica, for three models, with priorities, under fifo
and fair, with swap batching), checked after every step: the same requests run, the same wait in the same
order, and each replica's own waiting handlers are woken exactly for its granted tickets."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import Settings
from proxy.gate import RUNNING, Gate, Ticket
from proxy.fleet import Fleet
from proxy.shared import SharedLine
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

MODELS = ("alpha", "beta", "gamma")
IDENTITIES = ("ann", "bob", "cyd")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


async def settled(lines: list[SharedLine], redis: RedisServer, timeout: float = 10.0) -> None:
    """Until every mirror has applied every entry of the log."""
    client = redis.client()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            last = await client.xrevrange(lines[0].key("log"), count=1)
            top = last[0][0].decode() if last else "0-0"
            if all(line.last_id == top for line in lines):
                return
            assert asyncio.get_running_loop().time() < deadline, "mirrors did not catch up"
            await asyncio.sleep(0.005)
    finally:
        await client.aclose()


def picture(gate: Gate) -> tuple[list[str], list[str], dict[str, str]]:
    """What the line decides: who waits (in order), who runs, on what model."""
    running = sorted(t.uid for t in gate.running)
    return [t.uid for t in gate.waiting()], running, {t.uid: t.model for t in gate.running}


@pytest.mark.parametrize("seed,policy,max_skips", [(1, "fifo", 0), (2, "fifo", 2), (3, "fair", 0),
                                                   (4, "fair", 3)])
def test_two_mirrors_decide_as_one_gate(redis: RedisServer, seed: int, policy: str, max_skips: int) -> None:
    asyncio.run(drive(redis, seed, policy, max_skips))


async def drive(redis: RedisServer, seed: int, policy: str, max_skips: int) -> None:
    settings = Settings(upstream="http://127.0.0.1:9", parallel=2, policy=policy, max_skips=max_skips,
                        max_priority_wait=3600.0)
    group = f"prop-{uuid.uuid4().hex[:8]}"
    lines = [SharedLine(settings, Fleet.boxes_for(settings), url=redis.url, lease_ttl=3.0, group=group)
             for _ in range(2)]
    reference = Gate(max_queue=100, max_skips=max_skips, policy=policy, max_priority_wait=3600.0,
                     boxes=Fleet.boxes_for(settings))
    ref_by_uid: dict[str, Ticket] = {}
    try:
        for line in lines:
            await line.start()
            assert line.ready and line.available
        rng = random.Random(seed)
        for step in range(80):
            running = [t for t in lines[0].gate.running]
            if running and rng.random() < 0.4:
                t = rng.choice(running)
                owner = next(line for line in lines if line.replica == t.meta["replica"])
                owner.release(owner._local[t.uid])  # noqa: SLF001 - the handler's own ticket
                reference.release(ref_by_uid[t.uid])
            else:
                at = rng.randrange(2)
                uid = f"{step}-{uuid.uuid4().hex[:6]}"
                model, who, priority = rng.choice(MODELS), rng.choice(IDENTITIES), rng.choice((0, 0, 1, 5))
                ticket = Ticket(request_id=uid, uid=uid, model=model, identity=who, priority=priority)
                await lines[at].submit(ticket)
                ref = Ticket(request_id=uid, uid=uid, model=model, identity=who, priority=priority)
                reference.submit(ref)
                ref_by_uid[uid] = ref
                assert ticket.position_at_arrival == ref.position_at_arrival, step
            await settled(lines, redis)
            want = picture(reference)
            for line in lines:
                assert picture(line.gate) == want, (step, line.replica)
                for t in line._local.values():  # noqa: SLF001
                    # a handler is woken exactly when its ticket runs
                    assert (t.state == RUNNING) == t.waiter.done(), (step, t.uid)
        assert reference.switches == lines[0].gate.switches == lines[1].gate.switches
    finally:
        for line in lines:
            await line.aclose()
