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
    # the last one waited behind two others and was told so; positions only while waiting,
    # as the old server sent them (its pages would print "position 0")
    assert results[2]["positions"][0] == 2 and 0 not in results[2]["positions"]
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
    while "status" in httpx.get(f"{gate.url}/request/{rid}").json() and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = httpx.get(f"{gate.url}/request/{rid}")  # dropped after --result-ttl: the old answer
    assert gone.status_code == 200 and gone.json() == {"error": "Request ID not found"}


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


def wait_done(base: str, request_id: str, timeout_s: float = 20) -> dict:
    """Poll lmgate's own /queue/{id} (which is no sign of interest, unlike /request/{id})."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        item = httpx.get(f"{base}/queue/{request_id}")
        if item.status_code == 200 and item.json()["state"] == "done":
            return item.json()
        time.sleep(0.1)
    raise AssertionError(f"{request_id} did not finish in {timeout_s} s")


def test_abandoned_job_is_cancelled_only_after_it_generated_unwatched(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    holder = submit(gate.url, "long one", max_tokens=150)  # ~2 s at 80 tokens/s
    orphan = submit(gate.url, "nobody reads me", max_tokens=600)  # ~7.5 s
    got = read_stream(gate.url, holder["request_id"])  # longer than --stream-open-timeout 1.5 s
    assert got["done"]  # the orphan waited all that time and was not cancelled for it
    wait_done(gate.url, orphan["request_id"])
    record = httpx.get(f"{gate.url}/request/{orphan['request_id']}").json()
    assert record["status"] == "error" and "stream" in record["error"]
    assert record["started_at"] is not None  # it did start: cancelled while generating unwatched


def test_submit_all_then_stream_one_after_another_gets_every_column(stack: tuple[Process, Process]) -> None:
    """The side-by-side page: submit every column, then stream them in turn. Each column
    takes ~1 s, so the last is opened ~2 s after submission: longer than the 1.5 s
    --stream-open-timeout, which counts from when a job starts generating."""
    _, gate = stack
    columns = [submit(gate.url, f"column {i}", model=(MODEL, OTHER)[i % 2], max_tokens=80) for i in range(3)]
    for job in columns:
        got = read_stream(gate.url, job["request_id"])
        assert got["done"] and got["error"] is None
        assert got["text"] == expected_reply(job["payload"])


def test_old_server_leniency_and_errors(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    job = submit(gate.url, "string booleans", stream="True", max_tokens="6", temperature="0.5")
    got = read_stream(gate.url, job["request_id"])
    assert got["done"] and got["text"] == expected_reply({**job["payload"], "max_tokens": 6})
    for bad, field in (({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "client_id"),
                       ({"client_id": "c", "messages": [{"role": "user", "content": "x"}]}, "model"),
                       ({"client_id": "c", "model": MODEL}, "messages"),
                       ({"client_id": "c", "model": MODEL, "messages": [], "stream": "maybe"}, "stream")):
        resp = httpx.post(f"{gate.url}/queue/add", json=bad)
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert any(d["loc"] == ["body", field] and d["msg"] for d in detail)
    assert httpx.post(f"{gate.url}/queue/add", content=b"{nope").status_code == 422
    for path in ("/stream/unknown-id", "/request/unknown-id"):
        resp = httpx.get(gate.url + path)
        assert resp.status_code == 200 and resp.json() == {"error": "Request ID not found"}
    q = httpx.get(f"{gate.url}/queue").json()
    assert q["depth"] == 0


def test_root_is_json_for_scripts_and_the_page_for_browsers(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    root = httpx.get(gate.url + "/")
    assert root.status_code == 200 and root.json()["status"] == "running" and root.json()["version"]
    page = httpx.get(gate.url + "/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.headers["content-type"].startswith("text/html") and "<html" in page.text.lower()
