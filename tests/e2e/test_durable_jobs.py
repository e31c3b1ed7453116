"""Nothing lost on restart (DESIGN.md section 11, the embedded default): old-API jobs live in
the state database under ``--state-dir``. After a SIGKILL, or a SIGTERM, the waiting jobs are
back in line in their order with their owner, the one that was running runs again from the
start at the front, and finished ones answer ``/request/{id}`` and ``/stream/{id}`` as before.
HTTP requests that were waiting cannot outlive their connection: at SIGTERM they get 503 with
``Retry-After: 5``."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.simulator import expected_reply
from tests.e2e.hostile import wait_until
from tests.servers import Process, free_port, start_simulator

pytestmark = pytest.mark.timeout(120)

MODEL = "qwen2.5-7b-instruct"
KEYS = {"amy": "sk-durable-amy-01", "bob": "sk-durable-bob-02"}
CONFIG = "".join(f'[[keys]]\nname = "{n}"\nkey = "{k}"\n' for n, k in KEYS.items())


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


def body(text: str, tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": tokens, "messages": [{"role": "user", "content": text}]}


def lmgate(tmp: Path, sim: Process, state: Path) -> Process:
    config = tmp / "keys.toml"
    config.write_text(CONFIG)
    port = free_port()
    return Process(["-m", "proxy", "--upstream", sim.url, "--port", str(port), "--config", str(config),
                    "--state-dir", str(state), "--parallel", "1", "--load-mode", "jit",
                    "--shutdown-grace", "1"], port, tmp / f"lmgate-{port}.log", "/healthz")


def add(c: httpx.Client, gate: Process, who: str, doc: dict[str, Any]) -> str:
    resp = c.post(gate.url + "/queue/add", json={"client_id": f"page-{who}", **doc}, headers=bearer(who))
    assert resp.status_code == 200, resp.text
    return str(resp.json()["request_id"])


def record(c: httpx.Client, gate: Process, job: str, who: str) -> dict[str, Any]:
    return c.get(f"{gate.url}/request/{job}", headers=bearer(who)).json()


def finished(c: httpx.Client, gate: Process, job: str, who: str, timeout: float = 40) -> dict[str, Any]:
    return wait_until(lambda: (r := record(c, gate, job, who)).get("status") in ("complete", "error") and r,
                      timeout, f"job {job} to finish")


def stream_events(c: httpx.Client, gate: Process, job: str, who: str) -> list[dict[str, Any]]:
    with c.stream("GET", f"{gate.url}/stream/{job}", headers=bearer(who)) as resp:
        return [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_jobs_survive_a_restart_waiting_running_and_finished(tmp_path: Path, how: signal.Signals) -> None:
    state = tmp_path / "state"
    sim = start_simulator(tmp_path, tokens_per_s=40, load_s=0)
    gate = lmgate(tmp_path, sim, state)
    try:
        with httpx.Client(timeout=30) as c:
            done_body = body("finished before the restart", 3)
            done = add(c, gate, "amy", done_body)
            assert finished(c, gate, done, "amy")["status"] == "complete"
            running_body, first_body, second_body = (body("runs across the restart", 400),
                                                     body("waits first", 4), body("waits second", 5))
            running = add(c, gate, "amy", running_body)
            wait_until(lambda: record(c, gate, running, "amy")["status"] == "processing", 10, "it to run")
            first = add(c, gate, "bob", first_body)
            second = add(c, gate, "amy", second_body)
            assert record(c, gate, second, "amy")["queue_entered_position"] == 2
            gate.signal(how)
            gate.proc.wait(20)
            gate.stop()

            again = lmgate(tmp_path, sim, state)
            gate = again
            # the finished job answers as before, to its owner only
            kept = record(c, again, done, "amy")
            assert kept["status"] == "complete" and kept["result"] == expected_reply(done_body)
            assert record(c, again, done, "bob") == {"error": "Request ID not found"}
            events = stream_events(c, again, done, "amy")
            assert events[-1] == {"done": True}
            assert "".join(e.get("chunk", "") for e in events) == expected_reply(done_body)
            # the unfinished ones: back in line, the running one first, then in their order
            line = c.get(again.url + "/queue", headers=bearer("amy")).json()
            mine = [e["request_id"] for e in [*line["running"], *line["waiting"]] if e["request_id"]]
            assert mine[0] == running and second in mine
            assert record(c, again, first, "bob")["status"] in ("queued", "processing", "complete")
            results = {job: finished(c, again, job, who) for job, who in
                       ((running, "amy"), (first, "bob"), (second, "amy"))}
            assert all(r["status"] == "complete" for r in results.values()), results
            assert results[running]["result"] == expected_reply(running_body)  # run again from the start
            assert results[second]["result"] == expected_reply(second_body)
            starts = [results[j]["started_at"] for j in (running, first, second)]
            assert starts == sorted(starts)  # the running one first, then arrival order
            assert record(c, again, first, "amy") == {"error": "Request ID not found"}  # bob's
    finally:
        gate.stop()
        sim.stop()


def test_waiting_http_requests_at_sigterm_get_503_with_retry_after(tmp_path: Path) -> None:
    from tests.e2e.hostile import started, stream_open

    sim = start_simulator(tmp_path, tokens_per_s=40, load_s=0)
    gate = lmgate(tmp_path, sim, tmp_path / "state")
    try:
        holder = stream_open(gate, body("hold", 2000), headers=bearer("amy"))
        try:
            assert started(holder)
            with httpx.Client(timeout=30) as c:
                import threading

                answer: list[httpx.Response] = []
                waiter = threading.Thread(target=lambda: answer.append(c.post(
                    gate.url + "/v1/chat/completions", json=body("wait", 2), headers=bearer("bob"))))
                waiter.start()
                wait_until(lambda: c.get(gate.url + "/queue").json()["depth"] == 1, 10, "one waiting")
                gate.signal(signal.SIGTERM)
                waiter.join(20)
            (resp,) = answer
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
            assert resp.headers["retry-after"] == "5"
        finally:
            holder.close()
    finally:
        gate.stop()
        sim.stop()
