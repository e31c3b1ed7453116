"""Quotas and rpm windows shared by replicas, against a real redis-server: the same answers
as one process's QuotaStore, one limit for the whole group, a Redis that goes away and comes
back, and moving a single lmgate's counts over."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.counters import (
    EXPIRE_AFTER_S,
    RedisQuotas,
    RedisRates,
    counter_key,
    import_quotas,
    key_prefix,
)
from proxy.quota import DB_NAME, QuotaStore, day_reset, month_reset
from proxy.store import StoreError
from tests.redis_server import RedisServer, redis_server

T = TypeVar("T")
DAY = 86400.0
PREFIX = key_prefix("test")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)

# Injected clocks run in the future, so that every counter's expiry (its period's end plus a
# day) is after the Redis server's real time: the 22nd of next month, 10:00 UTC.
NEXT_MONTH = month_reset(time.time()).timestamp()
T0 = NEXT_MONTH + 21 * DAY + 10 * 3600


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def poll(probe: Callable[[], Awaitable[bool]], timeout_s: float = 15.0, what: str = "") -> None:
    """Wait until ``probe()`` is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as srv:
        yield srv


async def stored(client: Redis, key: str, period: str) -> int:
    return int(await client.get(counter_key(PREFIX, key, period)) or 0)


# -- quotas ----------------------------------------------------------------------------------
def test_answers_are_quota_stores_for_the_same_sequence(server: RedisServer) -> None:
    clock = Clock()
    steps: list[tuple[float, str, int]] = [
        (0, "alice", 400), (60, "bob", 90), (60, "alice", 599), (1, "alice", 1), (3600, "bob", 2000),
        (12 * 3600, "alice", 50),  # the next day
        (9 * DAY, "carol", 7), (DAY, "alice", 10_000),  # next month
    ]
    limits = [(None, None), (1000, None), (None, 2000), (1000, 2000), (100, 100), (0, None)]

    async def body() -> None:
        client = server.client()
        quotas = RedisQuotas(client, PREFIX, clock=clock)
        local = QuotaStore(None, clock=clock)
        await quotas.start()
        try:
            for advance, key, tokens in steps:
                clock.now += advance
                quotas.add(key, tokens)
                local.add(key, tokens)
                for name in ("alice", "bob", "carol", "nobody"):
                    for per_day, per_month in limits:
                        limit = (per_day, per_month)
                        assert await quotas.check(name, *limit) == local.refusal(name, *limit)
                        assert await quotas.usage(name, *limit) == local.report(name, *limit)
            await quotas.flush()
            # what is in Redis alone, read by another replica with nothing of its own pending
            other = RedisQuotas(client, PREFIX, clock=clock)
            for name in ("alice", "bob", "carol"):
                assert await other.usage(name, 1000, 2000) == local.report(name, 1000, 2000)
                assert await other.check(name, 1000, 2000) == local.refusal(name, 1000, 2000)
            quotas.add("alice", 0)
            quotas.add("alice", -5)
            assert not quotas._pending
        finally:
            await quotas.aclose()
            await client.aclose()

    run(body())


def test_two_replicas_reach_one_limit_together(server: RedisServer) -> None:
    clock = Clock()

    async def body() -> None:
        one, two = server.client(), server.client()
        a, b = RedisQuotas(one, PREFIX, clock=clock), RedisQuotas(two, PREFIX, clock=clock)
        local = QuotaStore(None, clock=clock)
        await a.start()
        await b.start()
        try:
            a.add("alice", 60)
            local.add("alice", 60)
            await a.flush()
            assert await b.check("alice", 100, None) is None  # 60 of 100, counted by a
            b.add("alice", 40)
            local.add("alice", 40)
            # b counts its own increment at once; a sees it once it is in Redis
            assert await b.check("alice", 100, None) == local.refusal("alice", 100, None)
            await b.flush()
            refusal = await a.check("alice", 100, None)
            assert refusal is not None and refusal == local.refusal("alice", 100, None)
            assert (refusal.used, refusal.limit, refusal.period) == (100, 100, "day")
            assert refusal.retry_after_s == 14 * 3600  # 10:00 to midnight, like QuotaStore's
            assert await a.usage("alice", 100, 1000) == await b.usage("alice", 100, 1000)

            # many increments from both sides, sent by their own tasks: none lost, none twice
            for i in range(200):
                (a if i % 2 else b).add("bob", i)
                if i % 17 == 0:
                    await asyncio.sleep(0)  # let the senders run between adds
            await a.aclose()
            await b.aclose()
            assert await stored(one, "bob", "m:" + time.strftime("%Y-%m", time.gmtime(T0))) == sum(range(200))
        finally:
            await a.aclose()
            await b.aclose()
            await one.aclose()
            await two.aclose()

    run(body())


def test_settle_returns_once_the_other_replica_sees_the_count(server: RedisServer) -> None:
    """What a response's end waits for: after ``settle`` every replica's check sees the
    tokens (``add`` alone only schedules them); a Redis that is away delays it a bounded time."""
    clock = Clock()

    async def body() -> None:
        one, two = server.client(), server.client()
        a, b = RedisQuotas(one, PREFIX, clock=clock), RedisQuotas(two, PREFIX, clock=clock)
        await a.start()
        try:
            for round_ in range(20):  # each time, straight away: no sleeping, no polling
                await a.settle("carol", 5)
                refusal = await b.check("carol", 5 * (round_ + 1), None)
                assert refusal is not None and refusal.used == 5 * (round_ + 1), (round_, refusal)
            server.stop()
            started = time.monotonic()
            await a.settle("carol", 5)  # kept pending, not lost, and not waited on for long
            assert time.monotonic() - started < 5
        finally:
            await a.aclose()
            await one.aclose()
            await two.aclose()

    run(body())


def test_refusals_and_retry_after_near_the_resets(server: RedisServer) -> None:
    month_end = month_reset(T0).timestamp()
    clock = Clock(month_end - 12 * 3600)  # noon on the month's last day

    async def body() -> None:
        client = server.client()
        quotas = RedisQuotas(client, PREFIX, clock=clock)
        local = QuotaStore(None, clock=clock)
        await quotas.start()
        try:
            for store in (quotas, local):
                store.add("alice", 150)
            await quotas.flush()
            for per_day, per_month in [(100, 100), (100, 1000), (1000, 100), (150, 151), (151, 150)]:
                limit = (per_day, per_month)
                assert await quotas.check("alice", *limit) == local.refusal("alice", *limit)
            tie = await quotas.check("alice", 100, 100)
            assert tie is not None and tie.period == "month" and tie.retry_after_s == 12 * 3600
            clock.now = month_end - 0.1  # a tenth of a second before the reset: at least 1 s
            refusal = await quotas.check("alice", 100, None)
            assert refusal is not None and refusal.retry_after_s == 1.0
            assert refusal == local.refusal("alice", 100, None)
            reset = time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(month_end))
            assert refusal.message.endswith(f"resets at {reset}")
        finally:
            await quotas.aclose()
            await client.aclose()

    run(body())


def test_periods_roll_over_and_counters_expire_after_their_period(server: RedisServer) -> None:
    month_end = month_reset(T0).timestamp()
    clock = Clock(month_end - DAY - 1)  # 23:59:59 on the second last day of the month

    async def body() -> None:
        client = server.client()
        quotas = RedisQuotas(client, PREFIX, clock=clock)
        local = QuotaStore(None, clock=clock)
        await quotas.start()
        try:
            async def same() -> tuple[int, int]:
                report = await quotas.usage("alice", None, None)
                assert report == local.report("alice", None, None)
                return report["day"]["used"], report["month"]["used"]

            for store in (quotas, local):
                store.add("alice", 100)
            assert await same() == (100, 100)
            clock.now += 1  # midnight: a new day, the same month
            assert await same() == (0, 100)
            for store in (quotas, local):
                store.add("alice", 5)
            assert await same() == (5, 105)
            clock.now = month_end  # a new month: both start over
            assert await same() == (0, 0)
            await quotas.flush()

            day = "d:" + time.strftime("%Y-%m-%d", time.gmtime(month_end - DAY - 1))
            month = "m:" + time.strftime("%Y-%m", time.gmtime(month_end - DAY))
            expiry = client.expiretime
            assert await expiry(counter_key(PREFIX, "alice", day)) == month_end - DAY + EXPIRE_AFTER_S
            assert await expiry(counter_key(PREFIX, "alice", month)) == month_end + EXPIRE_AFTER_S

            # a period that ended longer ago than that is not kept at all
            clock.now = time.time() - 70 * DAY
            quotas.add("old", 1)
            await quotas.flush()
            assert await client.keys(counter_key(PREFIX, "old", "*")) == []
        finally:
            await quotas.aclose()
            await client.aclose()

    run(body())


def test_a_batch_whose_answer_was_lost_is_sent_again_and_counted_once(server: RedisServer) -> None:
    clock = Clock()
    period = "d:" + time.strftime("%Y-%m-%d", time.gmtime(T0))

    async def body() -> None:
        client = server.client()
        quotas = RedisQuotas(client, PREFIX, clock=clock)
        real = quotas._apply
        lost: list[bool] = []

        async def answer_lost(**kwargs: Any) -> Any:
            result = await real(**kwargs)  # Redis ran it...
            if not lost:
                lost.append(True)
                raise RedisConnectionError("connection reset")  # ...and the answer never came
            return result

        quotas._apply = answer_lost  # type: ignore[assignment]
        try:
            quotas.add("alice", 70)  # not started: nothing is sent by itself
            with pytest.raises(RedisConnectionError):
                await quotas.flush()
            assert await stored(client, "alice", period) == 70
            quotas.add("alice", 5)
            await quotas.flush()  # the lost batch again (skipped), then the new one
            assert await stored(client, "alice", period) == 75
            assert (await quotas.usage("alice", None, None))["day"]["used"] == 75
        finally:
            await quotas.aclose()
            await client.aclose()

    run(body())


# -- rpm windows -----------------------------------------------------------------------------
def test_two_replicas_share_one_window(server: RedisServer) -> None:
    async def body() -> None:
        one, two = server.client(), server.client()
        a, b = RedisRates(one, PREFIX), RedisRates(two, PREFIX)
        try:
            answers = [await (a if i % 2 else b).hit("alice", 5, 1.0) for i in range(5)]
            assert answers == [None] * 5
            waits = [await a.hit("alice", 5, 1.0), await b.hit("alice", 5, 1.0)]
            assert all(w is not None and 0 < w <= 1.0 for w in waits), waits
            assert await a.hit("bob", 5, 1.0) is None  # per key

            # as the hits leave the window (on the server's clock), five count again
            await asyncio.sleep(min(w for w in waits if w is not None))
            for i in range(5):
                await poll(lambda: _allowed(a if i % 2 else b, "alice", 5, 1.0),
                           what=f"hit {i + 1} allowed again after the window")

            # at once from both replicas: exactly the limit is let through
            results = await asyncio.gather(*((a if i % 2 else b).hit("carol", 5, 60.0) for i in range(40)))
            assert results.count(None) == 5
            assert all(w is not None and 0 < w <= 60.0 for w in results if w is not None)
            assert 0 < await one.pttl(PREFIX + "rate:carol") <= 60_000  # goes away with its newest hit
        finally:
            await one.aclose()
            await two.aclose()

    run(body())


async def _allowed(rates: RedisRates, key: str, limit: int, window_s: float) -> bool:
    return await rates.hit(key, limit, window_s) is None


# -- Redis away ------------------------------------------------------------------------------
def test_redis_stopped_fails_fast_and_adds_are_sent_when_it_is_back(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmgate")
    clock = Clock()
    period = "m:" + time.strftime("%Y-%m", time.gmtime(T0))

    async def body() -> None:
        client = server.client(timeout_s=1.0)
        quotas = RedisQuotas(client, PREFIX, clock=clock)
        rates = RedisRates(client, PREFIX)
        await quotas.start()
        try:
            assert await quotas.check("alice", 100, None) is None
            await asyncio.to_thread(server.kill)

            started = time.monotonic()
            with pytest.raises(REDIS_DOWN):
                await quotas.check("alice", 100, None)
            with pytest.raises(REDIS_DOWN):
                await quotas.usage("alice", 100, None)
            with pytest.raises(REDIS_DOWN):
                await rates.hit("alice", 5, 60.0)
            assert time.monotonic() - started < 6.0  # three calls, each well within 2 s

            for tokens in (10, 20, 30):
                quotas.add("alice", tokens)  # never waits, Redis or not
            with pytest.raises(REDIS_DOWN):
                await quotas.flush()
            await poll(lambda: _warned(caplog, "cannot save token counts"), what="a warning")

            await asyncio.to_thread(server.restart)  # same port, empty (no AOF)
            fresh = server.client()
            try:
                async def arrived() -> bool:
                    return await stored(fresh, "alice", period) == 60

                await poll(arrived, what="the adds made while Redis was down")
                await quotas.flush()
                assert await stored(fresh, "alice", period) == 60
                assert await quotas.check("alice", 60, None) is not None
            finally:
                await fresh.aclose()
        finally:
            await quotas.aclose()
            await client.aclose()
        messages = [r.getMessage() for r in caplog.records if r.name == "lmgate"]
        assert sum("cannot save token counts" in m for m in messages) == 1  # logged once
        assert any("saved to Redis again" in m for m in messages)

    run(body())


async def _warned(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


def test_counts_survive_a_redis_crash_with_aof(tmp_path: Path) -> None:
    clock = Clock()
    period = "d:" + time.strftime("%Y-%m-%d", time.gmtime(T0))

    async def body(server: RedisServer) -> None:
        client = server.client()
        quotas = RedisQuotas(client, PREFIX, clock=clock)
        try:
            quotas.add("alice", 42)
            await quotas.flush()
            await asyncio.to_thread(server.restart)  # SIGKILL, then start on the same files
            assert await stored(client, "alice", period) == 42
        finally:
            await quotas.aclose()
            await client.aclose()

    with redis_server(tmp_path / "redis", appendonly=True) as server:
        run(body(server))


# -- moving a single lmgate's counts over ----------------------------------------------------
def test_import_copies_a_single_lmgates_current_counts(server: RedisServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    clock = Clock()

    async def body() -> None:
        single = QuotaStore(state / DB_NAME, clock=clock)
        await single.start()
        clock.now = T0 - 70 * DAY  # two months back: over, not copied
        single.add("alice", 1000)
        clock.now = T0
        single.add("alice", 300)
        single.add("bob", 25)

        client = server.client()
        try:
            with pytest.raises(StoreError, match="another lmgate"):  # still running: refused
                await import_quotas(client, PREFIX, state, clock=clock)
            await single.aclose()

            replica = RedisQuotas(client, PREFIX, clock=clock)
            replica.add("alice", 5)  # already counted in Redis: the import adds to it
            await replica.flush()
            assert await import_quotas(client, PREFIX, state / DB_NAME, clock=clock) == 4
            local = QuotaStore(None, clock=clock)
            local.add("alice", 305)
            local.add("bob", 25)
            for key in ("alice", "bob"):
                assert await replica.usage(key, 100, None) == local.report(key, 100, None)
            assert await client.keys(counter_key(PREFIX, "alice", "*")) != []
            assert len(await client.keys(counter_key(PREFIX, "*", "*"))) == 4
            await replica.aclose()
            with pytest.raises(StoreError, match="no such file"):
                await import_quotas(client, PREFIX, tmp_path / "missing", clock=clock)
        finally:
            await client.aclose()

    run(body())


def test_group_names_are_hash_tags() -> None:
    assert key_prefix("team") == "lmgate:{team}:"
    assert counter_key("lmgate:{team}:", "alice", "d:2026-11-22") == "lmgate:{team}:usage:d:2026-11-22:alice"
    for bad in ("", "a{b", "a}b"):
        with pytest.raises(ValueError):
            key_prefix(bad)
    assert day_reset(T0).timestamp() - T0 == 14 * 3600  # the tests' clock is at 10:00 UTC
