"""Token quotas and requests-per-minute windows shared by lmgate replicas, kept in Redis (or
Valkey 7+).

Every count lives in Redis and nowhere else: a check reads the group's totals (the sum of
every replica's increments), so N replicas together allow a key its quota once, not N times.

Keys, under a prefix that holds the group's hash tag (``key_prefix("team")`` is
``lmgate:{team}:``, so one group's keys share one cluster slot and its scripts may touch
several of them):

- ``<prefix>usage:<period>:<key>``: tokens used by an API key in a UTC period, the period
  named as in quota.py (``d:2026-11-22``, ``m:2026-11``); a string counter, expiring
  ``EXPIRE_AFTER_S`` after the period's end, so old periods go away by themselves.
- ``<prefix>usage-batch:<writer>``: the number of the last batch of increments a
  ``RedisQuotas`` (one per process start) applied; makes a batch safe to send again.
- ``<prefix>rate:<key>``: a key's recent requests, a sorted set scored by the Redis server's
  time in microseconds; expires with its newest hit.

Periods follow this process's clock, like QuotaStore's, not the Redis server's: replicas are
expected to keep time with NTP. A replica whose clock is off by some seconds counts into the
neighbouring day for those seconds around midnight; nothing else depends on it. The rpm
windows use the server's ``TIME`` instead, so clock skew between machines does not matter
there.

Failure is explicit. ``check``, ``usage`` and ``hit`` raise the client's
``redis.exceptions.ConnectionError`` / ``TimeoutError`` when Redis cannot be reached (the app
answers 503 ``state_unavailable``); nothing falls back to counting per process. ``add`` never
waits: increments are merged per key and period and sent by one task at a time, each batch
one script call; while Redis is away they stay pending (at most one total per key and period
beside the batch being sent) and are retried with growing pauses, logged once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from .quota import DB_NAME, Refusal, _periods, day_reset, month_reset, refusal_at, report_at
from .store import StateDB, StoreError

log = logging.getLogger("lmgate")

__all__ = ["RedisQuotas", "RedisRates", "counter_key", "import_quotas", "key_prefix"]

EXPIRE_AFTER_S = 86400  # a period's counters outlive its end by this (clocks that differ, a look back)
BATCH_MARK_TTL_S = 86400  # how long a writer's last batch number is kept after its last batch
RETRY_FIRST_S = 0.25  # pause after a failed send, doubling up to RETRY_MAX_S
RETRY_MAX_S = 5.0
SETTLE_WAIT_S = 1.0  # how long a response's end waits for its count to reach Redis
IMPORT_CHUNK = 500  # rows per script call when importing

# Adds a batch of increments once. A batch whose answer was lost (the connection broke after
# Redis ran it) is sent again with the same number and skipped here, so no increment counts
# twice and none is lost.
_APPLY = """
-- KEYS[1]: the writer's mark, the number of the last batch it applied; KEYS[2..]: counters
-- ARGV[1]: this batch's number; ARGV[2]: seconds the mark is kept;
-- then, per counter: tokens to add, the Unix time it expires at
local batch = tonumber(ARGV[1])
if batch <= tonumber(redis.call('GET', KEYS[1]) or '0') then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
for i = 2, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
end
return 1
"""

# One hit of a sliding window, on the server's clock. Returns -1 when the hit is counted,
# else the microseconds until the oldest hit leaves the window. Sent again (the client retries
# after a lost answer), a counted hit is found by its name and not counted twice.
_HIT = """
-- KEYS[1]: the key's hits, a sorted set scored by server time in microseconds
-- ARGV[1]: limit; ARGV[2]: window in microseconds; ARGV[3]: this hit's unique name
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  return -1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  return -1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] == nil then
  return window
end
return tonumber(oldest[2]) + window - now
"""

Batch = dict[tuple[str, str], int]  # (key, period) -> tokens


def key_prefix(group: str) -> str:
    """The prefix of a replica group's keys, its name a Redis hash tag: ``lmgate:{group}:``."""
    if not group or "{" in group or "}" in group:
        raise ValueError(f"invalid group name {group!r}: non-empty, without braces")
    return f"lmgate:{{{group}}}:"


def counter_key(prefix: str, key: str, period: str) -> str:
    """The Redis key counting ``key``'s tokens in ``period`` (``d:2026-11-22``, ``m:2026-11``)."""
    return f"{prefix}usage:{period}:{key}"


class RedisQuotas:
    """Token quotas per API key and UTC day and month, shared by the replicas of a group
    (the ``Quotas`` protocol of quota.py). The client is the caller's: ``aclose`` leaves it
    open. Call ``add`` from the event loop."""

    def __init__(self, client: Redis, prefix: str, *, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self._apply = client.register_script(_APPLY)
        self._mark = f"{prefix}usage-batch:{uuid.uuid4().hex}"
        self._numbers = itertools.count(1)
        self._pending: Batch = {}
        self._sending: tuple[int, Batch] | None = None  # until Redis confirms it
        self._send_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._failing = False

    async def start(self) -> None:
        """Begin sending; increments made before are sent now. Does not contact Redis (a
        replica starts while Redis is away and fails closed until it is back)."""
        if self._started:
            return
        self._started = True
        self._schedule()

    def add(self, key: str, tokens: int) -> None:
        """Count ``tokens`` for ``key`` in the current day and month; never waits (the send is
        scheduled). tokens <= 0 are ignored."""
        if tokens <= 0:
            return
        for period in _periods(self.clock()):
            self._pending[(key, period)] = self._pending.get((key, period), 0) + tokens
        self._schedule()

    async def settle(self, key: str, tokens: int) -> None:
        """``add``, then wait (``SETTLE_WAIT_S`` at most; never raises) until Redis has the
        count: a response whose end waits for this is counted for the whole group before its
        client can send the next request, to whichever replica."""
        self.add(key, tokens)
        task = self._task
        if tokens > 0 and task is not None and not task.done():
            await asyncio.wait({task}, timeout=SETTLE_WAIT_S)

    async def check(self, key: str, per_day: int | None, per_month: int | None) -> Refusal | None:
        """The same Refusal as QuotaStore's for the group's totals; one round trip (none for
        a key without limits). Raises the client's connection error when Redis is away."""
        if per_day is None and per_month is None:
            return None
        now = self.clock()
        day, month = await self._used(key, now)
        return refusal_at(key, now, day, month, per_day, per_month)

    async def usage(self, key: str, per_day: int | None, per_month: int | None) -> dict[str, Any]:
        """What ``GET /usage`` returns for a key, the shape of ``QuotaStore.report``."""
        now = self.clock()
        day, month = await self._used(key, now)
        return report_at(key, now, day, month, per_day, per_month)

    async def flush(self) -> None:
        """Send everything added so far now. Raises the client's error when that fails (the
        increments stay pending)."""
        async with self._send_lock:
            while self._sending is not None or self._pending:
                if self._sending is None:
                    self._sending, self._pending = (next(self._numbers), self._pending), {}
                number, batch = self._sending
                keys, args = self._batch_call(number, batch)
                await self._apply(keys=keys, args=args)
                self._sending = None

    async def aclose(self) -> None:
        """Send what is pending (one last try), stop the sending task. Idempotent; the
        client stays open."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._started and (self._pending or self._sending) and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._task is not None:
            await self._task
        unsent = len(self._pending) + (len(self._sending[1]) if self._sending else 0)
        if unsent:
            log.warning("closing with %d token count(s) not saved to Redis", unsent)

    # -- internals ---------------------------------------------------------------------------
    async def _used(self, key: str, now: float) -> tuple[int, int]:
        """The group's totals for ``key`` this day and month, plus this process's increments
        not yet in Redis. Read while no batch of this process is on its way (a batch applied
        during the read, or confirmed just after it, would be missed or counted twice); a
        batch whose answer was lost is counted as unsent (twice at worst, erring towards a
        refusal)."""
        day, month = _periods(now)
        async with self._send_lock:
            values = await self.client.mget([counter_key(self.prefix, key, day),
                                             counter_key(self.prefix, key, month)])
            return int(values[0] or 0) + self._unsent(key, day), int(values[1] or 0) + self._unsent(key, month)

    def _unsent(self, key: str, period: str) -> int:
        tokens = self._pending.get((key, period), 0)
        if self._sending is not None:
            tokens += self._sending[1].get((key, period), 0)
        return tokens

    def _batch_call(self, number: int, batch: Batch) -> tuple[list[str], list[int]]:
        keys = [self._mark]
        args = [number, BATCH_MARK_TTL_S]
        for (key, period), tokens in batch.items():
            keys.append(counter_key(self.prefix, key, period))
            args += [tokens, _expire_at(period)]
        return keys, args

    def _schedule(self) -> None:
        if not self._started or self._closing or not self._pending:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Send until nothing is pending; after a failure, pause (cut short by ``aclose``) and
        try again. Closing, a failure ends it."""
        pause = RETRY_FIRST_S
        while True:
            try:
                await self.flush()
            except Exception as exc:  # a connection error mostly; anything else is retried too
                if not self._failing:
                    self._failing = True
                    log.warning("cannot save token counts to Redis (%s: %s); retrying, counts are kept "
                                "until then", type(exc).__name__, exc)
                if self._closing:
                    return
                try:
                    await asyncio.wait_for(self._wake.wait(), pause)
                except asyncio.TimeoutError:
                    pass
                pause = min(pause * 2, RETRY_MAX_S)
                continue
            if self._failing:
                self._failing = False
                log.warning("token counts are saved to Redis again")
            return


class RedisRates:
    """Sliding windows of requests per key in Redis (the ``RateWindows`` protocol of
    auth.py), exact for the group: N replicas together allow ``limit`` per window."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._hit = client.register_script(_HIT)
        self._names = itertools.count()
        self._writer = uuid.uuid4().hex

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        """Count a request for ``key`` if fewer than ``limit`` were counted in the last
        ``window_s`` seconds of the server's clock (None); else the seconds until the oldest
        one leaves the window (> 0). Raises the client's connection error when Redis is away."""
        window_us = max(1, round(window_s * 1_000_000))
        result = int(await self._hit(keys=[f"{self.prefix}rate:{key}"],
                                     args=[limit, window_us, f"{self._writer}:{next(self._names)}"]))
        return None if result < 0 else result / 1_000_000


async def import_quotas(client: Redis, prefix: str, sqlite_path: Path | str, *,
                        clock: Callable[[], float] = time.time) -> int:
    """Copy a single lmgate's token counts (the ``usage`` table of its state database, the
    file or its ``--state-dir``) into the group's counters under ``prefix``, added to what is
    there. Only periods not yet over are copied (older ones no longer limit anyone and stay
    in the file); returns the number of rows copied.

    Run it once, with that lmgate stopped (its file is locked while it runs: StoreError):
    running it twice adds the counts twice. The file is opened as lmgate opens it (locked,
    its schema brought up to date); each chunk of rows is applied once even if the client
    sends it again after a lost answer."""
    path = Path(sqlite_path)
    if path.is_dir():
        path = path / DB_NAME
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    db = StateDB(path)
    try:
        await db.open()
        rows = await db.read(lambda conn: conn.execute("SELECT key, period, tokens FROM usage").fetchall())
    finally:
        await db.aclose()
    now = clock()
    live = [(str(key), str(period), int(tokens)) for key, period, tokens in rows
            if int(tokens) > 0 and _period_end(str(period)) > now]
    apply = client.register_script(_APPLY)
    mark = f"{prefix}usage-batch:import-{uuid.uuid4().hex}"
    for number, start in enumerate(range(0, len(live), IMPORT_CHUNK), 1):
        keys, args = [mark], [number, BATCH_MARK_TTL_S]
        for key, period, tokens in live[start:start + IMPORT_CHUNK]:
            keys.append(counter_key(prefix, key, period))
            args += [tokens, _expire_at(period)]
        await apply(keys=keys, args=args)
    return len(live)


@functools.lru_cache(maxsize=256)
def _period_end(period: str) -> float:
    """The Unix time a period ends: ``d:2026-11-22`` at the next UTC midnight, ``m:2026-11``
    at the next month's start; -inf for a name that is neither (never current)."""
    kind, _, date = period.partition(":")
    if kind not in ("d", "m"):
        return -math.inf
    try:
        start = datetime.strptime(date, "%Y-%m-%d" if kind == "d" else "%Y-%m").replace(tzinfo=timezone.utc)
    except ValueError:
        return -math.inf
    return (day_reset if kind == "d" else month_reset)(start.timestamp()).timestamp()


def _expire_at(period: str) -> int:
    return int(_period_end(period)) + EXPIRE_AFTER_S
