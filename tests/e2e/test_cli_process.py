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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, Process, free_port, running_stack, start_lmgate

MODEL = "qwen2.5-7b-instruct"
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(2)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def stream_chat(url: str, tokens: int) -> httpx.Response:
    body = {"model": MODEL, "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "drain me"}]}
    with httpx.Client(timeout=60) as client:
        return client.post(url + "/v1/chat/completions", json=body)


def wait_running(url: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(url + "/queue", timeout=2).json()["active"] == 1:
            return
        time.sleep(0.02)
    raise AssertionError("the request never started")


def lmgate_args(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "--port", str(port), "--upstream",
            f"http://127.0.0.1:{free_port()}", *extra]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


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
        running = pool.submit(stream_chat, gate.url, 30)
        wait_running(gate.url)
        gate.signal(signal.SIGINT)
        reply = running.result(20)
        assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
        assert gate.proc.wait(15) == 0, gate.output()
        assert "Traceback" not in gate.output()


@posix_only
def test_a_second_ctrl_c_quits_at_once(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    with running_stack(tmp_path, "--shutdown-grace", "60", tokens_per_s=5, load_s=0) as (_, gate):
        pool.submit(stream_chat, gate.url, 500)  # 100 s of generation: the drain would wait
        wait_running(gate.url)
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
def test_a_busy_port_is_one_line_before_anything_else() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = subprocess.run(lmgate_args(port), capture_output=True, text=True, timeout=30,
                                cwd=ROOT, env=clean_env())
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"lmgate: port {port} on 127.0.0.1 is already in use; stop the other program or "
        "choose another with --port"]


def test_a_host_that_is_not_local_is_one_line() -> None:
    result = subprocess.run(lmgate_args(free_port(), "--host", "192.0.2.1"), capture_output=True,
                            text=True, timeout=30, cwd=ROOT, env=clean_env())
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
def test_ipv6_hosts_still_listen(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(lmgate_args(port, "--host", "::1"), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://[::1]:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise AssertionError("lmgate on ::1 never answered")
    finally:
        proc.send_signal(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        output = proc.communicate(timeout=15)[0]
    assert f"listening on http://[::1]:{port}" in output


# -- JSON logs -----------------------------------------------------------------------------
def test_json_log_format_is_json_on_every_line(tmp_path: Path) -> None:
    with running_stack(tmp_path, "--log-format", "json") as (_, gate):
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(gate.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
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
    assert httpx.get(proc.url + "/queue", timeout=5).status_code == 200
    assert proc.stop() == 0
