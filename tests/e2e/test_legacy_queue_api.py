"""The old queue server's API, driven the way its Streamlit pages drive it: httpx posts to
/queue/add, then reads /stream/{id} line by line and parses position/chunk/done/error."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from proxy.simulator import expected_reply, expected_tool_call
from tests.servers import Process, running_stack

MODEL = "qwen2.5-7b-instruct"
OTHER = "llama-3.2-3b-instruct"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("legacy")
    with running_stack(tmp, "--log-level", "warning", "--result-ttl", "2", "--stream-open-timeout", "1.5",
                       tokens_per_s=80, load_s=0.1) as pair:
        yield pair


def submit(base: str, content: str, model: str = MODEL, **extra: object) -> dict:
    payload = {"client_id": "tlc_playground_side_by_side", "model": model,
               "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
               "temperature": 0.7, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
               "max_tokens": 10, **extra}
    with httpx.Client() as client:
        resp = client.post(f"{base}/queue/add", json=payload, timeout=10)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["status"] == "queued" and isinstance(out["request_id"], str)
    out["payload"] = payload
    return out


def read_stream(base: str, request_id: str) -> dict:
    """Parse like the pages do: `data: ` lines, json.loads, keys tested by presence."""
    seen: dict = {"positions": [], "text": "", "done": False, "error": None, "deltas": [], "raw": []}
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", f"{base}/stream/{request_id}") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                seen["raw"].append(line)
                if not line.startswith("data: "):
                    continue
                try:
                    event = json.loads(line[6:])
                except json.JSONDecodeError:
                    continue
                if "position" in event:
                    seen["positions"].append(event["position"])
                elif "chunk" in event:
                    seen["text"] += event["chunk"]
                elif "done" in event:
                    seen["done"] = True
                    break
                elif "error" in event:
                    seen["error"] = event["error"]
                    break
                elif "delta" in event:
                    seen["deltas"].append(event["delta"])
    return seen


def test_add_then_stream_gets_real_positions_and_own_text(stack: tuple[Process, Process]) -> None:
    sim, gate = stack
    jobs = [submit(gate.url, f"question {i}", model=(MODEL, OTHER)[i % 2]) for i in range(3)]
    # old semantics kept: 1 + the number waiting before it (the running one not counted)
    assert [j["queue_position"] for j in jobs] == [1, 1, 2]
    results: dict[int, dict] = {}

    def reader(i: int) -> None:
        results[i] = read_stream(gate.url, jobs[i]["request_id"])

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, job in enumerate(jobs):
        got = results[i]
        assert got["done"] and got["error"] is None
        want = expected_reply(job["payload"])
        assert got["text"] == want
    # the last one waited behind two others and was told so
    assert results[2]["positions"][0] == 2 and 0 in results[2]["positions"]
    assert not any(line.startswith("id:") for line in results[2]["raw"])
    status = httpx.get(f"{gate.url}/request/{jobs[0]['request_id']}").json()
    assert set(status) == {"status", "client_id", "created_at", "started_at", "completed_at", "result",
                           "tool_calls", "error", "queue_entered_position"}
    assert status["status"] == "complete" and status["result"] == expected_reply(jobs[0]["payload"])
    assert status["client_id"] == "tlc_playground_side_by_side"
    q = httpx.get(f"{gate.url}/queue/status").json()
    assert set(q) == {"queue_size", "stats", "tracked_requests"}
    assert set(q["stats"]) == {"total_received", "total_processed", "total_errors", "current_request_id"}
    assert q["stats"]["total_processed"] >= 3
    assert httpx.get(f"{gate.url}/health").json()["status"] == "healthy"
    assert httpx.get(sim.url + "/sim/stats").json()["killed"] == 0


def test_late_stream_replays_from_the_start_and_results_expire(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    job = submit(gate.url, "replay me")
    rid = job["request_id"]
    # open a first stream to keep the job alive, then read it again after completion
    first = read_stream(gate.url, rid)
    second = read_stream(gate.url, rid)
    assert first["text"] == second["text"] == expected_reply(job["payload"])
    assert second["done"]
    deadline = time.monotonic() + 15
    while httpx.get(f"{gate.url}/request/{rid}").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{gate.url}/request/{rid}").status_code == 404  # dropped after --result-ttl


def test_tool_call_deltas_are_kept(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    job = submit(gate.url, "Oslo", tools=tools)
    got = read_stream(gate.url, job["request_id"])
    assert got["done"] and got["deltas"]
    want = expected_tool_call(job["payload"])
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in got["deltas"])
    assert args == want["arguments"]
    record = httpx.get(f"{gate.url}/request/{job['request_id']}").json()
    assert record["tool_calls"][0]["function"] == {"name": want["name"], "arguments": want["arguments"]}


def test_error_from_upstream_becomes_error_event(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    job = submit(gate.url, "x", model="no-such-model")
    got = read_stream(gate.url, job["request_id"])
    assert got["error"] and "no-such-model" in got["error"]
    record = httpx.get(f"{gate.url}/request/{job['request_id']}").json()
    assert record["status"] == "error" and record["error"]


def test_unopened_stream_is_cancelled_and_bad_input_rejected(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    holder = submit(gate.url, "long one", max_tokens=150)  # ~2 s at 80 tokens/s
    stream_holder = threading.Thread(target=read_stream, args=(gate.url, holder["request_id"]))
    stream_holder.start()
    orphan = submit(gate.url, "nobody reads me")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = httpx.get(f"{gate.url}/request/{orphan['request_id']}").json()
        if record["status"] == "error":
            break
        time.sleep(0.1)
    assert record["status"] == "error" and "stream" in record["error"]
    stream_holder.join(30)
    for bad in ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]},  # no client_id
                {"client_id": "c", "messages": [{"role": "user", "content": "x"}]},  # no model
                {"client_id": "c", "model": MODEL}):  # no messages
        resp = httpx.post(f"{gate.url}/queue/add", json=bad)
        assert resp.status_code == 400 and set(resp.json()["error"]) >= {"message", "type", "code"}
    assert httpx.get(f"{gate.url}/stream/unknown-id").status_code == 404
    assert httpx.get(f"{gate.url}/request/unknown-id").status_code == 404
    q = httpx.get(f"{gate.url}/queue").json()
    assert q["depth"] == 0
