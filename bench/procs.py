"""The servers under test as subprocesses on 127.0.0.1: started, watched with psutil, and
stopped by their own PID (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from .client import wait_ready

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(want: int = 65536) -> int:
    """Raise this process's soft fd limit (children inherit it). Returns the new soft limit."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: the child gets SIGTERM if the bench dies (even by SIGKILL), so no server outlives it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


@dataclass
class Server:
    name: str
    args: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    program: str | None = None  # another program than this Python (redis-server)
    env: dict[str, str] | None = None  # the environment, when not this process's

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        env = self.env if self.env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"}
        # preexec_fn: the bench spawns its servers before it starts any thread of its own
        self.proc = subprocess.Popen(
            [self.program or sys.executable, *self.args], stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=ROOT, env=env, preexec_fn=_die_with_parent())  # noqa: PLW1509
        self.ps = psutil.Process(self.proc.pid)

    async def ready(self, path: str, timeout_s: float = 30.0) -> None:
        try:
            await wait_ready(self.port, path, timeout_s)
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not start:\n{self.tail()}") from None
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far."""
        assert self.ps is not None
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss_bytes(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode


def fake_upstream(log_dir: Path, name: str = "fake_upstream") -> Server:
    port = free_port()
    return Server(name.replace("_", " "), ["-m", "bench.fake_upstream", "--port", str(port)], port,
                  log_dir / f"{name}.log")


def lmgate(log_dir: Path, upstream_port: int | Sequence[int], extra: list[str] | None = None,
           name: str = "lmgate") -> Server:
    """lmgate in front of one fake upstream, or of several (one ``--upstream`` per port: boxes)."""
    port = free_port()
    ports = [upstream_port] if isinstance(upstream_port, int) else list(upstream_port)
    upstreams = [a for p in ports for a in ("--upstream", f"http://127.0.0.1:{p}")]
    args = ["-m", "proxy", *upstreams, "--port", str(port),
            "--max-queue", "10000", "--max-connections", "12000", "--queue-timeout", "600",
            "--log-level", "warning", "--state-dir", str(log_dir / f"{name}-state"), *(extra or [])]
    # a state dir of its own: never the user's (whose lock a running lmgate holds)
    return Server(name.replace("_", " "), args, port, log_dir / f"{name}.log")


def plain_hop(log_dir: Path, upstream_port: int, name: str = "plain_hop") -> Server:
    """The plain aiohttp reverse proxy (``bench.plain_hop``) in front of one fake upstream."""
    port = free_port()
    args = ["-m", "bench.plain_hop", "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}"]
    return Server(name.replace("_", " "), args, port, log_dir / f"{name}.log")
