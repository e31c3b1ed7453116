"""The old queue server's API, driven the way its Streamlit pages drive it: httpx posts to
/queue/add, then reads /stream/{id} line by line and parses position/chunk/done/error."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest

from proxy.simulator import expected_reply, expected_tool_call
from tests.e2e.helpers import MODEL, OTHER, wait_idle, wait_until
from tests.servers import Process

TOKENS_PER_S = 80


@pytest.fixture
def stack(shared_stack: Callable[..., tuple[Process, Process]]) -> tuple[Process, Process]:
    """One pair for the module; each test starts on an idle gate."""
    pair = shared_stack("--log-level", "warning", "--result-ttl", "2", "--stream-open-timeout", "1.5",
                        tokens_per_s=TOKENS_PER_S, load_s=0.1)
    wait_idle(pair[1])
    return pair


def submit(gate: Process, content: str, model: str = MODEL, **extra: object) -> dict:
    payload = {"client_id": "tlc_playground_side_by_side", "model": model,
               "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
               "temperature": 0.7, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
               "max_tokens": 10, **extra}
    resp = gate.http.post("/queue/add", json=payload)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["status"] == "queued" and isinstance(out["request_id"], str)
    out["payload"] = payload
    return out


def read_stream(gate: Process, request_id: str) -> dict:
    """Parse like the pages do: `data: ` lines, json.loads, keys tested by presence."""
    seen: dict = {"positions": [], "text": "", "done": False, "error": None, "deltas": [], "raw": []}
    with gate.http.stream("GET", f"/stream/{request_id}", timeout=30) as resp:
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
    """The first job holds the line for 1 s, so the other two still wait behind it when
    their streams open (~0.03 s later): a /stream sends the position as it is when the stream
    is read. Regression: the first job was 10 tokens (0.15 s) and every call made a new client
    (with its CA bundle load), so on a busy machine the first job had ended before the third
    stream opened, which was then told 1 instead of 2; reproduce by running this file beside
    two CPU-bound processes."""
    sim, gate = stack
    lengths = (TOKENS_PER_S, 10, 10)
    jobs = [submit(gate, f"question {i}", model=(MODEL, OTHER)[i % 2], max_tokens=lengths[i])
            for i in range(3)]
    # old semantics kept: 1 + the number waiting before it (the running one not counted)
    assert [j["queue_position"] for j in jobs] == [1, 1, 2]
    results: dict[int, dict] = {}

    def reader(i: int) -> None:
        results[i] = read_stream(gate, jobs[i]["request_id"])

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [0, 1, 2], f"streams still open after 30 s: {sorted(results)} done"
    for i, job in enumerate(jobs):
        got = results[i]
        assert got["done"] and got["error"] is None
        want = expected_reply(job["payload"])
        assert got["text"] == want
    # the last one waited behind two others and was told so; positions only while waiting,
    # as the old server sent them (its pages would print "position 0")
    assert results[2]["positions"][0] == 2 and 0 not in results[2]["positions"]
    assert not any(line.startswith("id:") for line in results[2]["raw"])
    status = gate.http.get(f"/request/{jobs[0]['request_id']}").json()
    assert set(status) == {"status", "client_id", "created_at", "started_at", "completed_at", "result",
                           "tool_calls", "error", "queue_entered_position"}
    assert status["status"] == "complete" and status["result"] == expected_reply(jobs[0]["payload"])
    assert status["client_id"] == "tlc_playground_side_by_side"
    q = gate.http.get("/queue/status").json()
    assert set(q) == {"queue_size", "stats", "tracked_requests"}
    assert set(q["stats"]) == {"total_received", "total_processed", "total_errors", "current_request_id"}
    assert q["stats"]["total_processed"] >= 3
    assert gate.http.get("/health").json()["status"] == "healthy"
    assert sim.http.get("/sim/stats").json()["killed"] == 0


def test_late_stream_replays_from_the_start_and_results_expire(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    job = submit(gate, "replay me")
    rid = job["request_id"]
    # open a first stream to keep the job alive, then read it again after completion
    first = read_stream(gate, rid)
    second = read_stream(gate, rid)
    assert first["text"] == second["text"] == expected_reply(job["payload"])
    assert second["done"]
    wait_until(lambda: "status" not in gate.http.get(f"/request/{rid}").json(), 15,
               "the result to be dropped after --result-ttl", interval=0.2)
    gone = gate.http.get(f"/request/{rid}")  # dropped after --result-ttl: the old answer
    assert gone.status_code == 200 and gone.json() == {"error": "Request ID not found"}


def test_tool_call_deltas_are_kept(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    job = submit(gate, "Oslo", tools=tools)
    got = read_stream(gate, job["request_id"])
    assert got["done"] and got["deltas"]
    want = expected_tool_call(job["payload"])
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in got["deltas"])
    assert args == want["arguments"]
    record = gate.http.get(f"/request/{job['request_id']}").json()
    assert record["tool_calls"][0]["function"] == {"name": want["name"], "arguments": want["arguments"]}


def test_error_from_upstream_becomes_error_event(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    job = submit(gate, "x", model="no-such-model")
    got = read_stream(gate, job["request_id"])
    assert got["error"] and "no-such-model" in got["error"]
    record = gate.http.get(f"/request/{job['request_id']}").json()
    assert record["status"] == "error" and record["error"]


def wait_done(gate: Process, request_id: str, timeout_s: float = 20) -> dict:
    """Poll lmgate's own /queue/{id} (which is no sign of interest, unlike /request/{id})."""
    def done() -> dict | None:
        item = gate.http.get(f"/queue/{request_id}")
        return item.json() if item.status_code == 200 and item.json()["state"] == "done" else None
    return wait_until(done, timeout_s, f"{request_id} to finish", interval=0.1)


def test_abandoned_job_is_cancelled_only_after_it_generated_unwatched(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    holder = submit(gate, "long one", max_tokens=150)  # ~2 s at 80 tokens/s
    orphan = submit(gate, "nobody reads me", max_tokens=600)  # ~7.5 s
    got = read_stream(gate, holder["request_id"])  # longer than --stream-open-timeout 1.5 s
    assert got["done"]  # the orphan waited all that time and was not cancelled for it
    wait_done(gate, orphan["request_id"])
    record = gate.http.get(f"/request/{orphan['request_id']}").json()
    assert record["status"] == "error" and "stream" in record["error"]
    assert record["started_at"] is not None  # it did start: cancelled while generating unwatched


def test_submit_all_then_stream_one_after_another_gets_every_column(stack: tuple[Process, Process]) -> None:
    """The side-by-side page: submit every column, then stream them in turn. Each column
    takes ~1 s, so the last is opened ~2 s after submission: longer than the 1.5 s
    --stream-open-timeout, which counts from when a job starts generating."""
    _, gate = stack
    columns = [submit(gate, f"column {i}", model=(MODEL, OTHER)[i % 2], max_tokens=80) for i in range(3)]
    for job in columns:
        got = read_stream(gate, job["request_id"])
        assert got["done"] and got["error"] is None
        assert got["text"] == expected_reply(job["payload"])


def test_old_server_leniency_and_errors(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    job = submit(gate, "string booleans", stream="True", max_tokens="6", temperature="0.5")
    got = read_stream(gate, job["request_id"])
    assert got["done"] and got["text"] == expected_reply({**job["payload"], "max_tokens": 6})
    for bad, field in (({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "client_id"),
                       ({"client_id": "c", "messages": [{"role": "user", "content": "x"}]}, "model"),
                       ({"client_id": "c", "model": MODEL}, "messages"),
                       ({"client_id": "c", "model": MODEL, "messages": [], "stream": "maybe"}, "stream")):
        resp = gate.http.post("/queue/add", json=bad)
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert any(d["loc"] == ["body", field] and d["msg"] for d in detail)
    assert gate.http.post("/queue/add", content=b"{nope").status_code == 422
    for path in ("/stream/unknown-id", "/request/unknown-id"):
        resp = gate.http.get(path)
        assert resp.status_code == 200 and resp.json() == {"error": "Request ID not found"}
    q = gate.http.get("/queue").json()
    assert q["depth"] == 0


def test_root_is_json_for_scripts_and_the_page_for_browsers(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    root = gate.http.get("/")
    assert root.status_code == 200 and root.json()["status"] == "running" and root.json()["version"]
    page = gate.http.get("/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.headers["content-type"].startswith("text/html") and "<html" in page.text.lower()
