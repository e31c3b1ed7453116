"""A real ``redis-server`` (or ``valkey-server``) for tests: on 127.0.0.1 with a free port, in
a directory of its own, stopped by PID afterwards whatever happens.

    with redis_server(tmp_path / "redis") as server:
        client = server.client()          # redis.asyncio, short timeouts
        ...
        server.kill()                     # SIGKILL: "Redis down"
        server.restart()                  # same port, same directory (and AOF, if on)

No RDB snapshots (``--save ""``) and no AOF unless asked (``appendonly=True``, fsync on every
write by default, so that a SIGKILL loses nothing that was acknowledged).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.servers import free_port, require_program

if TYPE_CHECKING:
    from redis.asyncio import Redis

READY_TIMEOUT_S = 15.0


class RedisServer:
    """One redis-server process; ``start`` again after ``kill`` reuses its port and directory."""

    def __init__(self, directory: Path, *, appendonly: bool = False, appendfsync: str = "always",
                 save: str = "") -> None:
        self.program = require_program("redis-server", "valkey-server", package="redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.save = save
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout_s: float = 1.0, **options: Any) -> Redis:
        """A ``redis.asyncio`` client for this server whose calls fail within about
        ``timeout_s`` when the server is away (one retry, no backoff). Close it with
        ``await client.aclose()``."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        settings: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                                    "retry": Retry(NoBackoff(), 1), **options}
        return Redis.from_url(self.url, **settings)

    def start(self) -> None:
        """Start the server and wait until it answers PING. The first start picks a free
        port (another, if that one is taken meanwhile); later ones reuse it."""
        assert not self.running, "already running"
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            if attempts > 1:
                self.port = free_port()
            self._spawn()
            if self._wait_ready() or attempt == attempts - 1 or "Address already in use" not in self.output():
                break
        if not self.running or not self.ping():
            assert self.proc is not None
            why = (f"exited ({self.proc.returncode})" if self.proc.poll() is not None
                   else f"did not answer PING within {READY_TIMEOUT_S} s")
            self.stop()
            raise RuntimeError(f"{self.program} on port {self.port} {why}:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits until the process is gone."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Kill the server if it runs, start it again on the same port and directory."""
        self.kill()
        self.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def ping(self) -> bool:
        """True when the server answers PING (not while it is still loading its data)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _spawn(self) -> None:
        args = [self.program, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--daemonize", "no", "--save", self.save,
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.directory,
                                         env={**os.environ, "LC_ALL": "C"})

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running:
                return False
            if self.ping():
                return True
            time.sleep(0.01)
        return False


@contextlib.contextmanager
def redis_server(directory: Path, **options: Any) -> Iterator[RedisServer]:
    """A started RedisServer (options: ``appendonly``, ``appendfsync``, ``save``), stopped on
    the way out whatever happens."""
    server = RedisServer(directory, **options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
