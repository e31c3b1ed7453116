"""The embedded database under ``--state-dir``: one SQLite file for everything lmgate keeps
across restarts (token quotas, old-API jobs), written by one thread.

A SQLite connection may only be used by the thread that made it, and the event loop must never
wait for the disk, so one writer thread owns the connection. Writers hand it operations
(functions of the connection); operations that arrive while it is busy run together in one
transaction (group commit), so a burst costs a handful of commits. ``commit()`` waits until
everything handed over so far is committed: what must be on disk before an answer leaves
(an old-API job) awaits it. If a commit fails (disk full), its operations stay queued and run
again with the next batch; the failure is logged once, and again when saving works again.

Two lmgate processes sharing one file would each trust their own state, so the file is locked
(a sidecar lock file) for as long as it is open, and a second process is refused at start.

Schema versions (``PRAGMA user_version``): 1 the ``usage`` table of token quotas; 2 adds the
``jobs`` table of the old queue API. A file written by a newer lmgate is refused.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

log = logging.getLogger("lmgate")

DB_NAME = "lmgate.sqlite3"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 5.0  # how long a statement waits for a lock held by someone else
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage (
        key TEXT NOT NULL,
        period TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (key, period)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        doc TEXT NOT NULL
    )""",
)

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], None]


class StoreError(Exception):
    """The database cannot be used; the message is one line and names the file."""


class StateDB:
    """One SQLite file, its lock, and the thread that writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmgate-state")
        self._lock = threading.Lock()  # guards _ops and _scheduled, shared with the writer
        self._ops: list[Operation] = []
        self._scheduled = False
        self._opened = False
        self._closed = False
        # owned by the writer thread
        self._db: sqlite3.Connection | None = None
        self._lockfile: IO[bytes] | None = None
        self._failing = False

    # -- the event loop's side -------------------------------------------------------------
    async def open(self) -> None:
        """Open (and lock) the file, create or upgrade its tables. Once; StoreError for a file
        that is not a database, cannot be opened, is newer, or is in use by another lmgate."""
        if self._opened:
            return
        self._opened = True  # once, even if it fails: a second _open would close the first's file
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def write(self, op: Operation) -> None:
        """Run ``op`` in the next transaction, on the writer thread; never waits."""
        if self._closed:
            return
        with self._lock:
            self._ops.append(op)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the interpreter is shutting down; what is queued stays unsaved
            pass

    async def commit(self) -> bool:
        """Wait until everything handed over so far is committed: True, or False when saving
        failed (it stays queued and is tried again with the next batch). The writer runs
        jobs in order, so this one runs after every write already queued."""
        if self._closed:
            return False
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._drain)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer thread (it owns the connection) and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._read, fn)

    async def aclose(self) -> None:
        """Commit what is queued, close the file and release its lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            if self._opened:
                await loop.run_in_executor(self._executor, self._drain)
                await loop.run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)

    # -- the writer thread -----------------------------------------------------------------
    def _open(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lockfile = _lock(path.with_name(path.name + ".lock"))
            if self._lockfile is None:
                raise StoreError(f"{path} is used by another lmgate process "
                                 "(give each one its own --state-dir)")
            db = self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses ms
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path} was written by a newer lmgate (schema {version}, "
                                 f"this one knows {SCHEMA_VERSION})")
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except StoreError:
            self._close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._close()
            raise StoreError(f"cannot use the database {path}: {exc}") from None

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise StoreError(f"{self.path} is not open")
        try:
            return fn(self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from None

    def _drain(self) -> bool:
        """Run everything queued in one transaction; on failure keep it queued (in order,
        ahead of what came meanwhile). True when nothing is left unsaved."""
        with self._lock:
            self._scheduled = False
            if self._db is None or not self._ops:
                return not self._ops
            batch, self._ops = self._ops, []
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for op in batch:
                    op(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except Exception as exc:  # noqa: BLE001 - saving must never take the app down
            with self._lock:
                self._ops[:0] = batch
            if not self._failing:
                self._failing = True
                log.warning("could not save lmgate's state to %s: %s; it is kept in memory and "
                            "saving is tried again with the next change", self.path, exc)
            return False
        if self._failing:
            self._failing = False
            log.info("lmgate's state is saved to %s again", self.path)
        return True

    def _close(self) -> None:
        if self._db is not None:
            if self._ops:
                log.warning("%d changes could not be saved to %s", len(self._ops), self.path)
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
