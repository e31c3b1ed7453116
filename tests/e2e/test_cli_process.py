"""The lmgate process as a user runs it: Ctrl-C and SIGTERM end it cleanly, a busy port is one
line before anything else, ``--log-format json`` is JSON on every line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import MODEL, chat_body, queue, wait_until
from tests.servers import ROOT, Process, free_port, running_stack, start_lmgate

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


def stream_chat(gate: Process, tokens: int) -> httpx.Response:
    return gate.http.post("/v1/chat/completions", json=chat_body("drain me", tokens, stream=True),
                          timeout=60)


def wait_running(gate: Process) -> None:
    wait_until(lambda: queue(gate)["active"] == 1, 10, "the request to start")


def lmgate_args(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "--port", str(port), "--upstream",
            f"http://127.0.0.1:{free_port()}", *extra]


def clean_env(tmp: Path) -> dict[str, str]:
    """The environment without lmgate's settings, and a data directory of its own under
    ``tmp`` (lmgate keeps its state there by default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
    return {**env, "PYTHONUNBUFFERED": "1", "XDG_DATA_HOME": str(tmp / "data")}


# -- signals -----------------------------------------------------------------------------
@posix_only
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_when_idle_exits_0_without_traceback(tmp_path: Path, sig: int) -> None:
    gate = start_lmgate(tmp_path, f"http://127.0.0.1:{free_port()}")
    gate.signal(sig)
    assert gate.proc.wait(15) == 0, gate.output()
    gate.stop()
    output = gate.log_path.read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output


@posix_only
def test_ctrl_c_drains_the_running_request_then_exits_0(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    with running_stack(tmp_path, "--shutdown-grace", "20", tokens_per_s=20, load_s=0) as (_, gate):
        running = pool.submit(stream_chat, gate, 30)
        wait_running(gate)
        gate.signal(signal.SIGINT)
        reply = running.result(20)
        assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
        assert gate.proc.wait(15) == 0, gate.output()
        assert "Traceback" not in gate.output()


@posix_only
def test_a_second_ctrl_c_quits_at_once(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    with running_stack(tmp_path, "--shutdown-grace", "60", tokens_per_s=5, load_s=0) as (_, gate):
        pool.submit(stream_chat, gate, 500)  # 100 s of generation: the drain would wait
        wait_running(gate)
        gate.signal(signal.SIGINT)
        time.sleep(0.5)
        assert gate.proc.poll() is None  # still draining
        started = time.monotonic()
        gate.signal(signal.SIGINT)
        status = gate.proc.wait(10)
        assert time.monotonic() - started < 5
        assert status != 0
        assert "Traceback" not in gate.output()


# -- the port ------------------------------------------------------------------------------
def test_a_busy_port_is_one_line_before_anything_else(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = subprocess.run(lmgate_args(port), capture_output=True, text=True, timeout=30,
                                cwd=ROOT, env=clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"lmgate: port {port} on 127.0.0.1 is already in use; stop the other program or "
        "choose another with --port"]


def test_a_host_that_is_not_local_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(lmgate_args(free_port(), "--host", "192.0.2.1"), capture_output=True,
                            text=True, timeout=30, cwd=ROOT, env=clean_env(tmp_path))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "--host" in result.stderr


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_hosts_still_listen(tmp_path: Path, http: httpx.Client) -> None:
    port = free_port()
    proc = subprocess.Popen(lmgate_args(port, "--host", "::1"), cwd=ROOT, env=clean_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def answers() -> bool:
        try:
            return http.get(f"http://[::1]:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, 30, "lmgate on ::1 to answer", interval=0.05)
    finally:
        proc.send_signal(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        output = proc.communicate(timeout=15)[0]
    assert f"listening on http://[::1]:{port}" in output


# -- JSON logs -----------------------------------------------------------------------------
def test_json_log_format_is_json_on_every_line(tmp_path: Path) -> None:
    with running_stack(tmp_path, "--log-format", "json") as (_, gate):
        assert gate.http.post("/v1/chat/completions", json=chat_body("hi", 2), timeout=30).status_code == 200
        assert gate.stop() == 0
    lines = [json.loads(line) for line in gate.log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger"} <= set(doc) for doc in lines)
    loggers = {doc["logger"] for doc in lines}
    assert {"lmgate", "lmgate.access", "uvicorn.error"} <= loggers and "httpx" not in loggers
    (access,) = [doc for doc in lines if doc["logger"] == "lmgate.access"]
    assert access["status"] == 200 and access["model"] == MODEL and "message" not in access


def test_process_class_still_works_for_other_suites(tmp_path: Path) -> None:
    """tests.servers.Process starts lmgate the way every e2e suite does (a smoke check that the
    sockets lmgate binds itself are the ones uvicorn serves)."""
    port = free_port()
    proc = Process(["-m", "proxy", "--port", str(port), "--upstream", f"http://127.0.0.1:{free_port()}"],
                   port, tmp_path / "p.log", "/healthz", env={"LMGATE_LOG_LEVEL": "warning"})
    assert proc.http.get("/queue").status_code == 200
    assert proc.stop() == 0
