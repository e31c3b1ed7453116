"""Token quotas per API key, per UTC calendar day and month, kept across restarts.

What counts is ``total_tokens`` from a response's ``usage``. A request is refused when its
key is already at or over a limit; the request that crosses the limit is served in full and
counted in full (how many tokens it will use is not known before it runs).

Memory is the truth while lmgate runs: ``add`` updates the counters at once, so the next
check sees them, and hands the increment to the state database's writer thread (store.py).
Increments that arrive while the writer is busy are merged per key and period and committed
together, so the event loop never waits for the disk and a burst of requests costs a handful
of commits. If saving fails (disk full), counting goes on in memory and the unsaved
increments are tried again with the next batch.

One table, ``usage(key, period, tokens)``; a period is ``d:2026-11-22`` or ``m:2026-11``.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from .store import DB_NAME, StateDB, StoreError

log = logging.getLogger("lmgate")

KEEP_DAYS = 400  # older periods are deleted at start; a year's months stay for reference
MEMORY_DAYS = 40  # periods kept in memory behind the latest day seen (clock steps, month)

_DAY_S = 86400  # Unix time has no leap seconds: every UTC day is exactly this long
_UPSERT = """
INSERT INTO usage (key, period, tokens) VALUES (?, ?, ?)
ON CONFLICT (key, period) DO UPDATE SET tokens = tokens + excluded.tokens
"""
_PRUNE = "DELETE FROM usage WHERE (period >= 'd:' AND period < ?) OR (period >= 'm:' AND period < ?)"


__all__ = ["DB_NAME", "QuotaStore", "Quotas", "StoreError"]


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


class Quotas(Protocol):
    """Token quotas as the app uses them: one process's (``QuotaStore``) or shared by replicas
    (kept in Redis). ``add`` never waits; the checks may (a network round trip)."""

    async def start(self) -> None: ...
    def add(self, key: str, tokens: int) -> None: ...
    async def settle(self, key: str, tokens: int) -> None: ...
    async def check(self, key: str, per_day: int | None, per_month: int | None) -> Refusal | None: ...
    async def usage(self, key: str, per_day: int | None, per_month: int | None) -> dict[str, Any]: ...
    async def aclose(self) -> None: ...


def refusal_at(key: str, now: float, day: int, month: int, per_day: int | None,
               per_month: int | None) -> Refusal | None:
    """The decision on a key's totals (``day``, ``month``) at ``now``: a Refusal when it is at
    or over a limit, else None. With both over, the one that resets later: the other's reset
    would not let the key through."""
    found: list[Refusal] = []
    # month first: on a month's last day both reset at once, and the month is what ran out
    for period, used, limit, resets_at in (("month", month, per_month, month_reset(now)),
                                           ("day", day, per_day, day_reset(now))):
        if limit is not None and used >= limit:
            wait = max(1.0, float(math.ceil(resets_at.timestamp() - now)))
            found.append(Refusal(key, period, used, limit, resets_at, wait))
    return max(found, key=lambda r: r.resets_at) if found else None


def report_at(key: str, now: float, day: int, month: int, per_day: int | None,
              per_month: int | None) -> dict[str, Any]:
    """What ``GET /usage`` returns for a key with these totals at ``now``."""
    return {
        "key": key,
        "day": {"used": day, "limit": per_day, "resets_at": iso_z(day_reset(now))},
        "month": {"used": month, "limit": per_month, "resets_at": iso_z(month_reset(now))},
    }


class QuotaStore:
    """Tokens used per key this UTC day and month: counted in memory, saved by the state
    database's writer thread."""

    def __init__(self, db: StateDB | Path | None, *, clock: Callable[[], float] = time.time) -> None:
        """db: the state database (or the path of its file, which this store then opens and
        closes itself); None keeps everything in memory only (no persistence)."""
        self._owns_db = isinstance(db, Path)
        self.db: StateDB | None = StateDB(db) if isinstance(db, Path) else db
        self.path = self.db.path if self.db is not None else None
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
        self._started = False
        self._closed = False
        self._conn: sqlite3.Connection  # the writer's, while it saves

    # -- the event loop's side -------------------------------------------------------------
    async def start(self) -> None:
        """Open the database (on the writer thread), delete old periods and load the recent
        periods' totals for every key.

        Raises StoreError for a file that is not a database, cannot be opened or is in use by
        another lmgate process."""
        if self._started or self.db is None:
            return
        self._started = True
        now = self.clock()
        self._current(now)
        window = _periods(now - MEMORY_DAYS * _DAY_S)
        cutoff = _periods(now - KEEP_DAYS * _DAY_S)
        await self.db.open()
        rows = await self.db.read(lambda db: _load(db, window, cutoff))
        for key, period, tokens in rows:
            # added to what is already counted: increments made before start are not in the file
            counts = self._counts.setdefault(period, {})
            counts[key] = counts.get(key, 0) + tokens
        if self._pending:  # increments made before start, now that the file is open
            self._schedule()

    async def settle(self, key: str, tokens: int) -> None:
        """``add``: what this process counts is in force at once."""
        self.add(key, tokens)

    def add(self, key: str, tokens: int) -> None:
        """Count ``tokens`` for ``key`` now. Memory is updated at once; the write is queued to
        the writer thread, so this never waits for the disk. tokens <= 0 are ignored."""
        if tokens <= 0:
            return
        periods = self._current(self.clock())
        for period in periods:
            counts = self._counts[period]
            counts[key] = counts.get(key, 0) + tokens
        if self.db is None or self._closed:
            return
        with self._lock:
            for period in periods:
                self._pending[(key, period)] = self._pending.get((key, period), 0) + tokens
        self._schedule()

    def _schedule(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        assert self.db is not None
        self.db.write(self._save)

    def used(self, key: str) -> tuple[int, int]:
        """(tokens this UTC day, tokens this UTC month) at ``clock()``."""
        return self._used(key, self.clock())

    def refusal(self, key: str, per_day: int | None, per_month: int | None) -> Refusal | None:
        """A Refusal when ``key`` is already at or over a limit, else None."""
        now = self.clock()
        day, month = self._used(key, now)
        return refusal_at(key, now, day, month, per_day, per_month)

    async def check(self, key: str, per_day: int | None, per_month: int | None) -> Refusal | None:
        return self.refusal(key, per_day, per_month)

    async def usage(self, key: str, per_day: int | None, per_month: int | None) -> dict[str, Any]:
        return self.report(key, per_day, per_month)

    def report(self, key: str, per_day: int | None, per_month: int | None) -> dict[str, Any]:
        """What ``GET /usage`` returns for a key."""
        now = self.clock()
        day, month = self._used(key, now)
        return report_at(key, now, day, month, per_day, per_month)

    async def flush(self) -> None:
        """Wait until everything counted so far has been committed (or has failed to be: it
        stays queued)."""
        if self.db is not None and not self._closed:
            await self.db.commit()

    async def aclose(self) -> None:
        """Flush, and close the file (when this store opened it). Idempotent; counting goes on
        in memory."""
        if self._closed:
            return
        if self.db is not None:
            await self.db.commit()
        self._closed = True
        if self.db is not None and self._owns_db:
            await self.db.aclose()

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
    def _save(self, db: sqlite3.Connection) -> None:
        """Inside the writer's transaction: every pending increment, merged. If the
        transaction fails, they go back to pending (the writer runs this again)."""
        with self._lock:
            self._scheduled = False
            batch, self._pending = self._pending, {}
        if not batch:
            return
        self._conn = db
        try:
            self._write(batch)
        except BaseException:
            with self._lock:
                for item, tokens in batch.items():
                    self._pending[item] = self._pending.get(item, 0) + tokens
            raise

    def _write(self, batch: dict[tuple[str, str], int]) -> None:
        self._conn.executemany(_UPSERT, [(key, period, tokens) for (key, period), tokens in batch.items()])


def _load(db: sqlite3.Connection, window: tuple[str, str], cutoff: tuple[str, str]) -> list[tuple[str, str, int]]:
    """Delete periods older than ``cutoff``; the counts of the periods since ``window``."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_PRUNE, cutoff)
        rows = db.execute("SELECT key, period, tokens FROM usage WHERE (period >= 'd:' AND "
                          "period < 'd;' AND period >= ?) OR (period >= 'm:' AND period >= ?)",
                          window).fetchall()
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return [(str(k), str(p), int(n)) for k, p, n in rows]


