"""Real processes for end-to-end tests: the simulator and lmgate, each a uvicorn server on
127.0.0.1 with a free port, started as a subprocess and stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def plain_client(timeout: float = 10.0, *, base_url: str = "", source: str | None = None) -> httpx.Client:
    """An httpx client for plain http on 127.0.0.1: no proxy settings from the environment,
    no CA bundle loaded (``verify=False``: loading it takes 40-350 ms per client, and nothing
    here speaks TLS) and no kept-alive connections, so that a request leaves no connection
    open on the server afterwards. ``source`` picks the local address (127.0.0.2 is another
    peer)."""
    transport = httpx.HTTPTransport(verify=False, trust_env=False, local_address=source,
                                    limits=httpx.Limits(max_keepalive_connections=0))
    return httpx.Client(base_url=base_url, timeout=timeout, trust_env=False, transport=transport)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A server subprocess; ``url`` is its base URL and ``http`` a client for it (paths
    relative to ``url``; closed by ``stop``). Output goes to a log file. As a context manager
    it is stopped on the way out."""

    def __init__(self, args: Sequence[str], port: int, log_path: Path, ready_path: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.http = plain_client(base_url=self.url)
        self._terminated = False
        self.log_path = log_path
        self._log = log_path.open("wb")
        # lmgate keeps its state (old-API jobs, quotas) in the user's data directory by
        # default: each process here gets its own, so no test sees another one's jobs
        private = {"XDG_DATA_HOME": str(log_path.parent / f"data-{port}")}
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **private, **(env or {})}
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
        self._wait_ready(ready_path)

    def _wait_ready(self, path: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.output()
                self.stop()
                raise RuntimeError(f"server exited early ({self.proc.returncode}):\n{text}")
            try:
                if self.http.get(path, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        text = self.output()
        self.stop()
        raise RuntimeError(f"server not ready in {timeout_s} s:\n{text}")

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM) without waiting; ``stop`` waits for it."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Stop the process (SIGTERM, SIGKILL after ``timeout_s``); its exit status."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        self.http.close()
        return self.proc.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all(procs: Iterable[Process]) -> None:
    """Stop processes side by side: each is asked to stop, then each is waited for (uvicorn
    takes about 0.2 s to shut down)."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop()


def start_simulator(tmp: Path, *, tokens_per_s: float = 100.0, load_s: float = 0.2,
                    max_concurrent: int = 4, extra: Sequence[str] = ()) -> Process:
    port = free_port()
    args = ["-m", "proxy.simulator", "--port", str(port), "--tokens-per-s", str(tokens_per_s),
            "--load-time", str(load_s), "--max-concurrent", str(max_concurrent), *extra]
    return Process(args, port, tmp / f"sim-{port}.log", "/v1/models")


def start_lmgate(tmp: Path, upstream: str, *args: str, env: dict[str, str] | None = None) -> Process:
    """lmgate in front of ``upstream``. The suites written for LM Studio's own just-in-time
    loading pin ``--load-mode jit`` through the environment (the simulator has the REST API
    v1, so ``auto`` would manage its models); a test passes ``--load-mode`` to choose."""
    port = free_port()
    return Process(["-m", "proxy", "--upstream", upstream, "--port", str(port), *args], port,
                   tmp / f"lmgate-{port}.log", "/healthz", env={"LMGATE_LOAD_MODE": "jit", **(env or {})})


@contextlib.contextmanager
def running_stack(tmp: Path, *lmgate_args: str, **sim_kwargs: Any) -> Iterator[tuple[Process, Process]]:
    """The simulator and lmgate in front of it; both stopped afterwards, whatever happens,
    including lmgate failing to start."""
    sim = start_simulator(tmp, **sim_kwargs)
    try:
        gate = start_lmgate(tmp, sim.url, *lmgate_args)
        try:
            yield sim, gate
        finally:
            stop_all([gate, sim])
    finally:
        sim.stop()


def require_program(*names: str, package: str) -> str:
    """Path of the first of ``names`` on PATH. Missing: skip, except under CI (``CI=true``),
    where it is a failure, since ``.ci/run`` installs the Debian ``package``."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{names[0]} is not installed (apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI must install it")
    pytest.skip(message)
