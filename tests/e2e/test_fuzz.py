"""Hostile input does no harm: hypothesis throws malformed, huge and deeply nested bodies,
wrong types, odd headers and abrupt disconnects at a real lmgate in front of the simulator.

After each example: no 500 from lmgate itself, every rejection OpenAI-shaped, a rejected
request never reached the upstream; at the end the gate is free and a normal request works."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.helpers import MODEL, queue, sim_stats, wait_until
from tests.servers import Process, running_stack

MAX_BODY = 50_000
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/v0/chat/completions"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with running_stack(tmp, "--log-level", "error", "--max-body", str(MAX_BODY), "--queue-timeout", "20",
                       tokens_per_s=0, load_s=0) as pair:
        yield pair


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
wrong = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                  st.text(max_size=10), st.lists(st.integers(), max_size=3), st.just({"a": 1}))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "typed", "nested", "huge", "valid"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "nested":
        depth = draw(st.integers(100, 200_000))
        return b'{"model": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "huge":
        return json.dumps({"model": MODEL, "pad": "x" * draw(st.integers(MAX_BODY, MAX_BODY * 3))}).encode()
    doc: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    if kind == "typed":
        field = draw(st.sampled_from(["model", "stream", "max_tokens", "messages"]))
        doc[field] = draw(wrong)
    else:
        doc["stream"] = draw(st.booleans())
    return json.dumps(doc).encode()


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip)
headers = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "multipart/form-data", "", "x/y"]),
    "x-request-id": header_text,
    "authorization": header_text,
    "accept": header_text,
    "x-api-key": header_text,
})


def sim_count(sim: Process) -> int:
    return len(sim_stats(sim)["log"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=bodies(), hdrs=headers, path=st.sampled_from(PATHS))
def test_hostile_requests(stack: tuple[Process, Process], body: bytes, hdrs: dict[str, str], path: str) -> None:
    sim, gate = stack
    before = sim_count(sim)
    resp = gate.http.post(path, content=body, headers=hdrs, timeout=20)
    reached = sim_count(sim) > before
    if not reached:
        assert resp.status_code in (400, 401, 403, 404, 413, 429), (resp.status_code, resp.text[:200])
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    else:
        assert resp.status_code != 500 or "unloaded" in resp.text.lower()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 400), stream=st.booleans(), declared_extra=st.integers(0, 1000))
def test_abrupt_disconnects(stack: tuple[Process, Process], cut: int, stream: bool, declared_extra: int) -> None:
    """Send part of a request (or all of it) and hang up without reading the answer."""
    _, gate = stack
    body = json.dumps({"model": MODEL, "stream": stream, "max_tokens": 50,
                       "messages": [{"role": "user", "content": "bye"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body) + declared_extra}\r\n\r\n").encode()
    raw = head + body
    with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as s:
        s.sendall(raw[: len(head) + min(cut, len(body))])
    # nothing to assert per example beyond "the server survives": checked below and at the end
    assert gate.http.get("/healthz").status_code == 200


def test_afterwards_gate_is_free_and_normal_request_works(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    def free() -> dict | None:  # hung-up requests finish on their own
        q = queue(gate)
        return q if q["active"] == 0 and q["depth"] == 0 else None
    q = wait_until(free, 15, "the hung-up requests to finish", interval=0.05)
    assert q["active"] == 0 and q["depth"] == 0
    resp = gate.http.post("/v1/chat/completions", timeout=20,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "still there?"}]})
    assert resp.status_code == 200 and "still there?" in resp.json()["choices"][0]["message"]["content"]
    assert "Traceback" not in gate.output()
