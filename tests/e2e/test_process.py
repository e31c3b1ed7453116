"""The lmgate process itself: --demo, and graceful shutdown on a real SIGTERM."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import MODEL, queue, sim_stats, wait_until
from tests.servers import Process, free_port, running_stack

posix_only = pytest.mark.skipif(os.name == "nt", reason="SIGTERM delivery differs on Windows")


def chat(stream: bool, tokens: int, text: str) -> dict:
    return {"model": MODEL, "stream": stream, "max_tokens": tokens, "messages": [{"role": "user", "content": text}]}


def post(proc: Process, body: dict) -> httpx.Response:
    return proc.http.post("/v1/chat/completions", json=body, timeout=30)


def wait_queue(gate: Process, depth: int, active: int) -> None:
    def reached() -> bool:
        q = queue(gate)
        return q["depth"] == depth and q["active"] == active
    wait_until(reached, 10, f"/queue to show depth={depth} active={active}", interval=0.01)


def test_demo_mode_runs_with_no_lm_studio(tmp_path: Path) -> None:
    port = free_port()
    with Process(["-m", "proxy", "--demo", "--port", str(port)], port, tmp_path / "demo.log", "/healthz") as proc:
        models = proc.http.get("/v1/models").json()
        assert MODEL in [m["id"] for m in models["data"]]
        resp = post(proc, chat(False, 3, "hello demo"))
        assert resp.status_code == 200 and "hello demo" in resp.json()["choices"][0]["message"]["content"]
        assert "demo mode" in proc.output()


def data_lines(resp: httpx.Response) -> list[str]:
    return [ln for ln in resp.text.split("\n") if ln.startswith("data: ")]


@posix_only
def test_sigterm_refuses_waiting_and_lets_running_finish(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    with running_stack(tmp_path, "--shutdown-grace", "10", tokens_per_s=20, load_s=0) as (sim, gate):
        running: Future[httpx.Response] = pool.submit(post, gate, chat(True, 30, "first"))
        wait_queue(gate, 0, 1)
        waiting_stream = pool.submit(post, gate, chat(True, 3, "second"))
        wait_queue(gate, 1, 1)
        waiting_plain = pool.submit(post, gate, chat(False, 3, "third"))
        wait_queue(gate, 2, 1)
        gate.signal(signal.SIGTERM)
        plain = waiting_plain.result(10)
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "shutting_down"
        last = data_lines(waiting_stream.result(10))[-1]
        assert json.loads(last[6:])["error"]["code"] == "shutting_down"
        first = running.result(20)
        assert first.status_code == 200 and first.text.rstrip().endswith("data: [DONE]")
        assert gate.proc.wait(15) is not None
        assert "Traceback" not in gate.output()
        log = sim_stats(sim)["log"]
        assert [e["user"] for e in log] == ["first"]  # the refused ones never reached LM Studio


@posix_only
def test_sigterm_cuts_off_a_stream_past_the_grace_period(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    with running_stack(tmp_path, "--shutdown-grace", "0.5", tokens_per_s=10, load_s=0) as (sim, gate):
        running = pool.submit(post, gate, chat(True, 200, "long"))
        wait_queue(gate, 0, 1)
        gate.signal(signal.SIGTERM)
        events = data_lines(running.result(15))
        assert json.loads(events[-1][6:])["error"]["code"] == "shutting_down"
        assert len(events) > 2  # it did stream before being cut off
        assert gate.proc.wait(15) is not None
        stats = sim_stats(sim)
        assert stats["cancelled"] == 1  # the upstream generation was stopped too
