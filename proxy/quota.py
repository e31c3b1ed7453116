"""Token quotas per API key, per UTC calendar day and month, kept across restarts.

What counts is ``total_tokens`` from a response's ``usage``. A request is refused when its
key is already at or over a limit; the request that crosses the limit is served in full and
counted in full (how many tokens it will use is not known before it runs).

Memory is the truth while lmgate runs: ``add`` updates the counters at once, so the next
check sees them, and hands the increment to one writer thread that owns the SQLite
connection (a connection may only be used by the thread that made it). Increments that
arrive while the writer is busy are merged per key and period and committed together, one
transaction per batch, so the event loop never waits for the disk and a burst of requests
costs a handful of commits. If saving fails (disk full), counting goes on in memory and the
unsaved increments are tried again with the next batch.

Two lmgate processes sharing one file would each trust their own counters and let a key use
its quota twice, so the file is locked (a sidecar lock file) for as long as a store has it
open, and a second process is refused at start.

One table, ``usage(key, period, tokens)``; a period is ``d:2026-11-22`` or ``m:2026-11``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("lmgate")

DB_NAME = "lmgate.sqlite3"
SCHEMA_VERSION = 1
KEEP_DAYS = 400  # older periods are deleted at start; a year's months stay for reference
MEMORY_DAYS = 40  # periods kept in memory behind the latest day seen (clock steps, month)
BUSY_TIMEOUT_S = 5.0  # how long a statement waits for a lock held by someone else

_DAY_S = 86400  # Unix time has no leap seconds: every UTC day is exactly this long
_CREATE = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL,
    period TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (key, period)
) WITHOUT ROWID
"""
_UPSERT = """
INSERT INTO usage (key, period, tokens) VALUES (?, ?, ?)
ON CONFLICT (key, period) DO UPDATE SET tokens = tokens + excluded.tokens
"""
_PRUNE = "DELETE FROM usage WHERE (period >= 'd:' AND period < ?) OR (period >= 'm:' AND period < ?)"


class QuotaStoreError(Exception):
    """The quota database cannot be used; the message is one line and names the file."""


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY`` (set by ``StateDirectory=``, e.g. /var/lib/lmgate) when
    present; otherwise the per-user data directory of the OS + 'lmgate': Linux/BSD $XDG_DATA_HOME/lmgate or
    ~/.local/share/lmgate; macOS ~/Library/Application Support/lmgate; Windows
    %LOCALAPPDATA%\\lmgate (fallback ~/AppData/Local/lmgate).

    Not the working directory: lmgate started from another directory (or by a service
    manager) must find the same counts."""
    state = os.environ.get("STATE_DIRECTORY", "")  # systemd's StateDirectory= (may list several)
    if state and sys.platform != "win32" and os.path.isabs(state.split(":")[0]):
        return Path(state.split(":")[0])
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else Path.home() / "AppData" / "Local") / "lmgate"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "lmgate"
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # the XDG spec says a relative path is invalid and is to be ignored
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "lmgate"


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, timezone.utc)


def day_reset(now: float) -> datetime:
    """The next UTC midnight after ``now`` (Unix seconds)."""
    t = _utc(now)
    return datetime(t.year, t.month, t.day, tzinfo=timezone.utc) + timedelta(days=1)


def month_reset(now: float) -> datetime:
    """The first instant of the UTC month after the one ``now`` is in."""
    t = _utc(now)
    if t.month == 12:
        return datetime(t.year + 1, 1, 1, tzinfo=timezone.utc)
    return datetime(t.year, t.month + 1, 1, tzinfo=timezone.utc)


def iso_z(dt: datetime) -> str:
    """``2026-11-23T00:00:00Z``: UTC, whole seconds (a naive datetime is taken as UTC)."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def _periods(now: float) -> tuple[str, str]:
    t = _utc(now)
    return f"d:{t:%Y-%m-%d}", f"m:{t:%Y-%m}"


@dataclass(frozen=True)
class Refusal:
    """Why a key may not make another request until ``resets_at``."""

    key: str
    period: str  # "day" or "month"
    used: int
    limit: int
    resets_at: datetime
    retry_after_s: float  # whole seconds until resets_at, >= 1 (a client retrying earlier is refused)

    @property
    def message(self) -> str:
        return (f"key '{self.key}' has used {self.used} of its {self.limit} tokens per {self.period}; "
                f"resets at {iso_z(self.resets_at)}")


class QuotaStore:
    """Tokens used per key this UTC day and month: counted in memory, saved by one thread."""

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        """path: the SQLite file (its directory is created, mode 0o700, if missing); None keeps
        everything in memory only (no persistence)."""
        self.path = path
        self.clock = clock
        # period name -> key -> tokens, for the periods of the last MEMORY_DAYS (see _current)
        self._counts: dict[str, dict[str, int]] = {}
        self._day_index: int | None = None
        self._latest_day: int | None = None
        self._names = ("", "")
        # shared with the writer thread, under _lock: increments not yet handed to SQLite
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], int] = {}
        self._scheduled = False
        self._executor = (None if path is None else
                          ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmgate-quota"))
        self._started = False
        self._closed = False
        # owned by the writer thread
        self._db: sqlite3.Connection | None = None
        self._lockfile: IO[bytes] | None = None
        self._failing = False

    # -- the event loop's side -------------------------------------------------------------
    async def start(self) -> None:
        """Open the file (on the writer thread), create the table if missing, delete old
        periods and load this day's and this month's totals for every key.

        Raises QuotaStoreError for a file that is not a database, cannot be opened or is in
        use by another lmgate process."""
        if self._started or self._executor is None:
            return
        self._started = True  # once, even if it fails: a second _open would close the first's file
        now = self.clock()
        self._current(now)
        window = _periods(now - MEMORY_DAYS * _DAY_S)
        cutoff = _periods(now - KEEP_DAYS * _DAY_S)
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, self._open, window, cutoff)
        for key, period, tokens in rows:
            # added to what is already counted: increments made before start are not in the file
            counts = self._counts.setdefault(period, {})
            counts[key] = counts.get(key, 0) + tokens

    def add(self, key: str, tokens: int) -> None:
        """Count ``tokens`` for ``key`` now. Memory is updated at once; the write is queued to
        the writer thread, so this never waits for the disk. tokens <= 0 are ignored."""
        if tokens <= 0:
            return
        periods = self._current(self.clock())
        for period in periods:
            counts = self._counts[period]
            counts[key] = counts.get(key, 0) + tokens
        if self._executor is None or self._closed:
            return
        with self._lock:
            for period in periods:
                self._pending[(key, period)] = self._pending.get((key, period), 0) + tokens
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the interpreter is shutting down; what is counted stays in memory
            pass

    def used(self, key: str) -> tuple[int, int]:
        """(tokens this UTC day, tokens this UTC month) at ``clock()``."""
        return self._used(key, self.clock())

    def refusal(self, key: str, per_day: int | None, per_month: int | None) -> Refusal | None:
        """A Refusal when ``key`` is already at or over a limit, else None. With both over,
        the one that resets later: the other's reset would not let the key through."""
        now = self.clock()
        day, month = self._used(key, now)
        found: list[Refusal] = []
        # month first: on a month's last day both reset at once, and the month is what ran out
        for period, used, limit, resets_at in (("month", month, per_month, month_reset(now)),
                                               ("day", day, per_day, day_reset(now))):
            if limit is not None and used >= limit:
                wait = max(1.0, float(math.ceil(resets_at.timestamp() - now)))
                found.append(Refusal(key, period, used, limit, resets_at, wait))
        return max(found, key=lambda r: r.resets_at) if found else None

    def report(self, key: str, per_day: int | None, per_month: int | None) -> dict[str, Any]:
        """What ``GET /usage`` returns for a key."""
        now = self.clock()
        day, month = self._used(key, now)
        return {
            "key": key,
            "day": {"used": day, "limit": per_day, "resets_at": iso_z(day_reset(now))},
            "month": {"used": month, "limit": per_month, "resets_at": iso_z(month_reset(now))},
        }

    async def flush(self) -> None:
        """Wait until everything counted so far has been committed (or has failed to be: it
        stays queued). The writer runs jobs in order, so this job runs after every write
        already queued and then commits whatever is still pending."""
        if self._executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self._drain)

    async def aclose(self) -> None:
        """Flush, close the file and release its lock. Idempotent; counting goes on in memory."""
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._drain)
            await loop.run_in_executor(executor, self._close)
        finally:
            executor.shutdown(wait=False)

    def _used(self, key: str, now: float) -> tuple[int, int]:
        day, month = self._current(now)
        return self._counts[day].get(key, 0), self._counts[month].get(key, 0)

    def _current(self, now: float) -> tuple[str, str]:
        """The period names at ``now``. A day or a month rolls over without a restart. The
        counters of the last ``MEMORY_DAYS`` stay in memory, counted from the latest day seen,
        so a clock stepped forward past midnight and back again finds its day's usage; older
        ones are dropped (they are in the file)."""
        index = math.floor(now / _DAY_S)
        if index != self._day_index:
            self._day_index = index
            self._names = _periods(now)
            for name in self._names:
                self._counts.setdefault(name, {})
            if self._latest_day is None or index > self._latest_day:
                self._latest_day = index
                day, month = _periods((index - MEMORY_DAYS) * _DAY_S)
                for name in [n for n in self._counts if n < (day if n.startswith("d:") else month)]:
                    if name not in self._names:
                        del self._counts[name]
        return self._names

    # -- the writer thread -----------------------------------------------------------------
    def _open(self, window: tuple[str, str], cutoff: tuple[str, str]) -> list[tuple[str, str, int]]:
        assert self.path is not None
        path = self.path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lockfile = _lock(path.with_name(path.name + ".lock"))
            if self._lockfile is None:
                raise QuotaStoreError(f"{path} is used by another lmgate process "
                                      "(give each one its own --state-dir)")
            db = self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses ms
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QuotaStoreError(f"{path} was written by a newer lmgate (schema {version}, "
                                      f"this one knows {SCHEMA_VERSION})")
            db.execute("BEGIN IMMEDIATE")
            db.execute(_CREATE)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute(_PRUNE, cutoff)
            rows = db.execute("SELECT key, period, tokens FROM usage WHERE (period >= 'd:' AND "
                              "period < 'd;' AND period >= ?) OR (period >= 'm:' AND period >= ?)",
                              window).fetchall()
            db.execute("COMMIT")
        except QuotaStoreError:
            self._close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._close()
            raise QuotaStoreError(f"cannot use the quota database {path}: {exc}") from None
        self._drain()  # increments made before start, now that the file is open
        return [(str(k), str(p), int(n)) for k, p, n in rows]

    def _drain(self) -> None:
        """Commit everything pending in one transaction; on failure keep it pending."""
        with self._lock:
            self._scheduled = False
            if self._db is None or not self._pending:
                return
            batch, self._pending = self._pending, {}
        try:
            self._write(batch)
        except Exception as exc:  # noqa: BLE001 - saving must never take the app down
            with self._lock:
                for item, tokens in batch.items():
                    self._pending[item] = self._pending.get(item, 0) + tokens
            if not self._failing:
                self._failing = True
                log.warning("could not save token usage to %s: %s; counting goes on in memory and "
                            "saving is retried with the next request", self.path, exc)
            return
        if self._failing:
            self._failing = False
            log.info("token usage is saved to %s again", self.path)

    def _write(self, batch: dict[tuple[str, str], int]) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_UPSERT, [(key, period, tokens) for (key, period), tokens in batch.items()])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _close(self) -> None:
        if self._db is not None:
            if self._pending:
                log.warning("%d token counts could not be saved to %s", len(self._pending), self.path)
            self._db.close()
            self._db = None
        if self._lockfile is not None:
            _unlock(self._lockfile)
            self._lockfile = None


if sys.platform == "win32":
    import msvcrt

    def _lock(path: Path) -> IO[bytes] | None:
        """The lock file, opened and locked; None if another process holds it."""
        f = open(path, "a+b")  # noqa: SIM115 - held open until _unlock
        f.seek(0)
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            f.close()
            return None
        return f

    def _unlock(f: IO[bytes]) -> None:
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        finally:
            f.close()

else:
    import fcntl

    def _lock(path: Path) -> IO[bytes] | None:
        """The lock file, opened and locked; None if another process holds it. The lock goes
        with the open file, so a process that dies releases it."""
        f = open(path, "a+b")  # noqa: SIM115 - held open until _unlock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        except BaseException:
            f.close()
            raise
        return f

    def _unlock(f: IO[bytes]) -> None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            f.close()
