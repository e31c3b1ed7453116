"""Token quotas: UTC periods and their resets, refusals at the limit, the SQLite file (kept
across restarts, locked against a second process) and a writer that never holds up ``add``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest

from proxy.quota import (
    DB_NAME,
    KEEP_DAYS,
    QuotaStore,
    Refusal,
    day_reset,
    default_state_dir,
    iso_z,
    month_reset,
)
from proxy.store import StoreError

T = TypeVar("T")
DAY = 86400.0


def ts(iso: str) -> float:
    """Unix time of a UTC ``YYYY-MM-DDTHH:MM:SS[.fff]``."""
    return datetime.fromisoformat(iso).replace(tzinfo=timezone.utc).timestamp()


def utc(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=timezone.utc)


NOW = ts("2026-11-22T10:00:00")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def rows(path: Path) -> dict[tuple[str, str], int]:
    """What is committed to the file, read through a connection of the test's own."""
    with closing(sqlite3.connect(path)) as db:
        return {(k, p): n for k, p, n in db.execute("SELECT key, period, tokens FROM usage")}


async def opened(path: Path | None, clock: Clock | None = None) -> QuotaStore:
    store = QuotaStore(path, clock=clock or Clock())
    await store.start()
    return store


async def run_and_close(path: Path) -> None:
    await (await opened(path)).aclose()


# -- periods ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("now", "day", "month"), [
    ("2026-11-22T10:00:00", utc(2026, 11, 23), utc(2026, 12, 1)),
    ("2026-11-22T00:00:00", utc(2026, 11, 23), utc(2026, 12, 1)),  # at midnight: the next one
    ("2026-11-30T23:59:59.999", utc(2026, 12, 1), utc(2026, 12, 1)),
    ("2026-12-31T23:59:59", utc(2027, 1, 1), utc(2027, 1, 1)),
    ("2026-12-01T00:00:00", utc(2026, 12, 2), utc(2027, 1, 1)),
    ("2028-02-28T12:00:00", utc(2028, 2, 29), utc(2028, 3, 1)),  # a leap year
    ("2027-02-28T12:00:00", utc(2027, 3, 1), utc(2027, 3, 1)),
])
def test_resets_are_the_next_utc_midnight_and_month_start(now: str, day: datetime, month: datetime) -> None:
    assert day_reset(ts(now)) == day
    assert month_reset(ts(now)) == month
    assert day_reset(ts(now)).utcoffset() == timedelta(0)


def test_iso_z_is_utc_whole_seconds() -> None:
    assert iso_z(utc(2026, 11, 23)) == "2026-11-23T00:00:00Z"
    plus_two = timezone(timedelta(hours=2))
    assert iso_z(datetime(2026, 11, 23, 2, 0, 0, 500, tzinfo=plus_two)) == "2026-11-23T00:00:00Z"
    assert iso_z(datetime(2027, 1, 1)) == "2027-01-01T00:00:00Z"  # naive: taken as UTC


# -- limits ----------------------------------------------------------------------------------
def test_a_key_at_its_limit_is_refused_and_one_below_is_not() -> None:
    store = QuotaStore(None, clock=Clock(NOW + 0.5))
    store.add("alice", 999)
    assert store.refusal("alice", 1000, None) is None
    store.add("alice", 1)
    refusal = store.refusal("alice", 1000, None)
    assert refusal == Refusal("alice", "day", 1000, 1000, utc(2026, 11, 23), 50400.0)  # 13:59:59.5, up
    assert refusal.message == ("key 'alice' has used 1000 of its 1000 tokens per day; "
                               "resets at 2026-11-23T00:00:00Z")
    assert store.refusal("bob", 1000, None) is None  # per key
    assert store.refusal("alice", 1001, 1001) is None


def test_the_request_that_crosses_the_limit_is_counted_in_full() -> None:
    store = QuotaStore(None, clock=Clock())
    store.add("alice", 900)
    assert store.refusal("alice", 1000, None) is None
    store.add("alice", 500)  # served: it was under the limit when it was checked
    assert store.used("alice") == (1400, 1400)
    refusal = store.refusal("alice", 1000, None)
    assert refusal is not None and refusal.used == 1400 and refusal.limit == 1000


def test_nothing_and_negative_counts_are_ignored() -> None:
    store = QuotaStore(None, clock=Clock())
    store.add("alice", 0)
    store.add("alice", -50)
    assert store.used("alice") == (0, 0)
    assert store.refusal("alice", 1, 1) is None


def test_the_limit_that_resets_later_is_the_one_reported() -> None:
    clock = Clock()
    store = QuotaStore(None, clock=clock)
    store.add("alice", 150)
    both = store.refusal("alice", 100, 100)
    assert both is not None and both.period == "month" and both.resets_at == utc(2026, 12, 1)
    assert both.retry_after_s == 8 * DAY + 14 * 3600  # not capped
    day_only = store.refusal("alice", 100, 1000)
    assert day_only is not None and day_only.period == "day" and day_only.retry_after_s == 14 * 3600
    month_only = store.refusal("alice", 1000, 100)
    assert month_only is not None and month_only.period == "month"
    clock.now = ts("2026-11-30T12:00:00")  # the month's last day: both reset at midnight
    store.add("alice", 150)
    tie = store.refusal("alice", 100, 200)
    assert tie is not None and tie.period == "month" and tie.resets_at == utc(2026, 12, 1)
    assert tie.message.endswith("300 of its 200 tokens per month; resets at 2026-12-01T00:00:00Z")


def test_retry_after_is_at_least_one_second() -> None:
    store = QuotaStore(None, clock=Clock(ts("2026-11-22T23:59:59.900")))
    store.add("alice", 10)
    refusal = store.refusal("alice", 10, None)
    assert refusal is not None and refusal.retry_after_s == 1.0


def test_days_roll_over_at_utc_midnight_and_months_at_the_month_start() -> None:
    clock = Clock(ts("2026-11-30T23:59:59"))
    store = QuotaStore(None, clock=clock)
    store.add("alice", 100)
    clock.now = ts("2026-11-30T23:59:59.999")
    assert store.used("alice") == (100, 100)
    assert store.refusal("alice", 100, None) is not None
    clock.now = ts("2026-12-01T00:00:00")
    assert store.used("alice") == (0, 0)  # a new month: both start over
    assert store.refusal("alice", 100, 100) is None
    store.add("alice", 30)
    clock.now = ts("2026-12-02T00:00:00")
    assert store.used("alice") == (0, 30)  # a new day: the month keeps counting
    store.add("alice", 5)
    assert store.used("alice") == (5, 35)


def test_a_clock_stepped_past_midnight_and_back_keeps_the_days_usage(tmp_path: Path) -> None:
    """Regression: stepping the clock forward past midnight dropped the day's counters from
    memory (they were "in the file"); stepping it back found the day empty, and a key over
    its daily quota could use it again. Memory now keeps recent periods, and a restart
    reads them back from the file."""
    path = tmp_path / DB_NAME
    clock = Clock(ts("2026-11-22T23:00:00"))

    async def body() -> None:
        store = await opened(path, clock)
        store.add("alice", 100)
        clock.now = ts("2026-11-23T00:30:00")  # NTP steps the clock forward...
        assert store.used("alice") == (0, 100)
        store.add("alice", 5)
        clock.now = ts("2026-11-22T23:10:00")  # ...and back
        assert store.used("alice") == (100, 105)
        assert store.refusal("alice", 100, None) is not None
        await store.aclose()
        again = await opened(path, clock)  # the same, after a restart at the stepped-back time
        assert again.used("alice") == (100, 105)
        clock.now = ts("2026-11-23T00:40:00")
        assert again.used("alice") == (5, 105)
        await again.aclose()

    run(body())


def test_memory_keeps_only_recent_periods() -> None:
    clock = Clock(ts("2026-01-01T12:00:00"))
    store = QuotaStore(None, clock=clock)
    for day in range(120):
        clock.now += DAY
        store.add("alice", 1)
    assert len(store._counts) <= 41 + 3  # the last 40 days and the months they touch


def test_report_shape() -> None:
    store = QuotaStore(None, clock=Clock())
    store.add("alice", 1200)
    report = store.report("alice", 1000, None)
    assert report == {
        "key": "alice",
        "day": {"used": 1200, "limit": 1000, "resets_at": "2026-11-23T00:00:00Z"},
        "month": {"used": 1200, "limit": None, "resets_at": "2026-12-01T00:00:00Z"},
    }
    assert json.loads(json.dumps(report)) == report
    unknown = store.report("bob", None, 5)
    assert unknown["day"] == {"used": 0, "limit": None, "resets_at": "2026-11-23T00:00:00Z"}
    assert unknown["month"] == {"used": 0, "limit": 5, "resets_at": "2026-12-01T00:00:00Z"}


def test_a_store_in_memory_needs_no_file() -> None:
    async def body() -> None:
        store = await opened(None)
        store.add("alice", 7)
        await store.flush()
        await store.aclose()
        await store.aclose()
        assert store.used("alice") == (7, 7)

    run(body())


# -- the file --------------------------------------------------------------------------------
def test_counts_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / DB_NAME
    clock = Clock()

    async def body() -> None:
        store = await opened(path, clock)
        store.add("alice", 100)
        store.add("bob", 7)
        store.add("alice", 20)
        await store.aclose()
        assert (path.parent.stat().st_mode & 0o777) & 0o077 == 0  # made private
        assert rows(path) == {("alice", "d:2026-11-22"): 120, ("alice", "m:2026-11"): 120,
                              ("bob", "d:2026-11-22"): 7, ("bob", "m:2026-11"): 7}

        again = await opened(path, clock)
        assert again.used("alice") == (120, 120) and again.used("bob") == (7, 7)
        assert again.refusal("alice", 120, None) is not None
        await again.aclose()

        clock.now += DAY  # restarted the next day: the day is new, the month is not
        later = await opened(path, clock)
        assert later.used("alice") == (0, 120)
        later.add("alice", 1)
        await later.aclose()
        assert rows(path)[("alice", "d:2026-11-23")] == 1
        assert rows(path)[("alice", "m:2026-11")] == 121

    run(body())


def test_counts_made_before_start_are_saved_once(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME

    async def body() -> None:
        first = await opened(path)
        first.add("alice", 10)
        await first.aclose()
        store = QuotaStore(path, clock=Clock())
        store.add("alice", 4)
        await store.start()
        assert store.used("alice") == (14, 14)
        await store.aclose()
        assert rows(path)[("alice", "m:2026-11")] == 14

    run(body())


def test_old_periods_are_deleted_at_start(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    clock = Clock()

    async def body() -> None:
        store = await opened(path, clock)
        for key, days_ago in (("ancient", KEEP_DAYS + 100), ("recent", KEEP_DAYS - 10)):
            clock.now = NOW - days_ago * DAY
            store.add(key, 5)
        await store.aclose()
        assert {k for k, _ in rows(path)} == {"ancient", "recent"}
        clock.now = NOW
        await (await opened(path, clock)).aclose()  # a restart, today
        assert rows(path) == {("recent", "d:2025-10-28"): 5, ("recent", "m:2025-10"): 5}

    run(body())


def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME

    async def body() -> None:
        first = await opened(path)
        second = QuotaStore(path)
        with pytest.raises(StoreError, match="is used by another lmgate process") as info:
            await second.start()
        assert str(path) in str(info.value)
        await second.aclose()
        await first.aclose()
        third = await opened(path)  # released on close
        await third.aclose()

    run(body())


def test_a_second_process_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    holder = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from proxy.quota import QuotaStore\n"
        "async def main():\n"
        "    store = QuotaStore(Path(sys.argv[1]))\n"
        "    await store.start()\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    await store.aclose()\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen([sys.executable, "-c", holder, str(path)], cwd=root, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            assert proc.stdout.readline().strip() == "ready"

            async def body() -> None:
                store = QuotaStore(path)
                with pytest.raises(StoreError, match="used by another lmgate process"):
                    await store.start()
                await store.aclose()

            run(body())
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    run(run_and_close(path))  # free once that process has closed it


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    path.write_bytes(b"this is not SQLite\n" * 300)

    async def body() -> None:
        store = QuotaStore(path)
        with pytest.raises(StoreError) as info:
            await store.start()
        await store.aclose()
        message = str(info.value)
        assert str(path) in message and "not a database" in message and "\n" not in message

    run(body())
    assert path.read_bytes() == b"this is not SQLite\n" * 300  # left as it was


def test_a_database_from_a_newer_lmgate_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")

    async def body() -> None:
        store = QuotaStore(path)
        with pytest.raises(StoreError, match="newer lmgate"):
            await store.start()
        await store.aclose()

    run(body())


def test_a_directory_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path = blocker / "state" / DB_NAME

    async def body() -> None:
        store = QuotaStore(path)
        with pytest.raises(StoreError, match="cannot use the database") as info:
            await store.start()
        await store.aclose()
        assert str(path) in str(info.value)

    run(body())


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions")
def test_a_file_without_permission_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    run(run_and_close(path))
    path.chmod(0)
    try:
        async def body() -> None:
            store = QuotaStore(path)
            with pytest.raises(StoreError, match=str(path)):
                await store.start()
            await store.aclose()

        run(body())
    finally:
        path.chmod(0o600)


# -- the writer ------------------------------------------------------------------------------
def test_add_does_not_wait_for_a_slow_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / DB_NAME
    entered, release = threading.Event(), threading.Event()
    batches: list[dict[tuple[str, str], int]] = []

    async def body() -> None:
        store = await opened(path)
        real = store._write

        def slow(batch: dict[tuple[str, str], int]) -> None:
            batches.append(dict(batch))
            entered.set()
            release.wait(10)  # had add waited for the writer, it would take these 10 s
            real(batch)

        monkeypatch.setattr(store, "_write", slow)
        store.add("alice", 10)
        assert entered.wait(10)  # the writer is inside its first batch and stays there
        started = time.perf_counter()
        store.add("alice", 5)
        store.add("bob", 7)
        assert time.perf_counter() - started < 1.0
        assert store.used("alice") == (15, 15) and store.used("bob") == (7, 7)
        flush = asyncio.ensure_future(store.flush())
        done, _ = await asyncio.wait({flush}, timeout=0.1)
        assert not done  # the first batch is not committed yet
        release.set()
        await flush
        assert rows(path) == {("alice", "d:2026-11-22"): 15, ("alice", "m:2026-11"): 15,
                              ("bob", "d:2026-11-22"): 7, ("bob", "m:2026-11"): 7}
        # what arrived while the writer was busy went in one batch, merged per key and period
        assert batches[1] == {("alice", "d:2026-11-22"): 5, ("alice", "m:2026-11"): 5,
                              ("bob", "d:2026-11-22"): 7, ("bob", "m:2026-11"): 7}
        assert len(batches) == 2
        await store.aclose()

    run(body())


def test_a_database_locked_by_someone_else_delays_only_the_writer(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME

    async def body() -> None:
        store = await opened(path)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            started = time.perf_counter()
            store.add("alice", 3)
            assert time.perf_counter() - started < 0.5
            assert store.refusal("alice", 3, None) is not None  # seen at once
            flush = asyncio.ensure_future(store.flush())
            done, _ = await asyncio.wait({flush}, timeout=0.2)
            assert not done
            other.execute("COMMIT")
        await flush
        assert rows(path) == {("alice", "d:2026-11-22"): 3, ("alice", "m:2026-11"): 3}
        await store.aclose()

    run(body())


def test_a_failing_writer_warns_once_keeps_counting_and_saves_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / DB_NAME
    caplog.set_level(logging.INFO, logger="lmgate")

    async def body() -> None:
        store = await opened(path)

        def full(batch: dict[tuple[str, str], int]) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store, "_write", full)
        store.add("alice", 10)
        await store.flush()
        store.add("alice", 5)
        await store.flush()
        assert store.used("alice") == (15, 15)
        assert store.refusal("alice", 15, None) is not None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "disk is full" in warnings[0].getMessage() and str(path) in warnings[0].getMessage()
        monkeypatch.undo()  # the disk has room again
        store.add("alice", 1)
        await store.flush()
        assert rows(path) == {("alice", "d:2026-11-22"): 16, ("alice", "m:2026-11"): 16}
        await store.aclose()
        await store.aclose()
        store.add("alice", 1)  # after close: counted in memory, nothing breaks
        assert store.used("alice") == (17, 17)

    run(body())
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]


# -- where the file lives --------------------------------------------------------------------
@pytest.mark.parametrize("platform", ["linux", "freebsd14"])
def test_default_state_dir_follows_xdg(platform: str, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_state_dir() == tmp_path / ".local" / "share" / "lmgate"
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    assert default_state_dir() == Path("/srv/data/lmgate")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")  # invalid per the spec: ignored
    assert default_state_dir() == tmp_path / ".local" / "share" / "lmgate"


def test_default_state_dir_on_macos(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    assert default_state_dir() == tmp_path / "Library" / "Application Support" / "lmgate"


def test_default_state_dir_on_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert default_state_dir() == tmp_path / "Local" / "lmgate"
    monkeypatch.delenv("LOCALAPPDATA")
    assert default_state_dir() == tmp_path / "AppData" / "Local" / "lmgate"
