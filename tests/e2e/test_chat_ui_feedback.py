"""Chat UIs show neither headers nor SSE comments, only ``delta.reasoning_content``: with the
opt-in (``X-Queue-Feedback: reasoning``, a key's ``feedback``, ``--feedback``) a waiting
stream tells its place in line that way. Real processes: the simulator and lmgate, driven by
the real ``openai`` SDK and by httpx for the raw bytes.

Every waiting request here waits behind a "holder": a long stream of another key that runs
until the test closes its connection, so when the line moves is decided by the test, not by
timing."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.simulator import expected_reply
from tests.e2e.helpers import (
    MODEL,
    Raw,
    bearer,
    chat_body,
    error_of,
    queue,
    read_stream,
    sdk,
    stream_open,
    text_of,
    wait_idle,
    wait_until,
)
from tests.servers import Process, start_lmgate, start_simulator

HOLD_TOKENS = 3000  # 30 s at 100 tokens/s: far longer than any test keeps a holder open
WAITING = re.compile(r"^Waiting in line: #(\d+)(, about (\d+) (s|min))?\n$")
QUEUE_COMMENT = re.compile(r"^: queue_(entered|position|eta_ms)=\d+$")
KEYS = {
    "holder": "sk-holder-fb-0001",
    "alice": "sk-alice-fb-0002",
    "chatui": "sk-chatui-fb-0003",
    "quiet": "sk-quiet-fb-0004",
}
KEYS_TOML = """
[[keys]]
name = "holder"
key = "sk-holder-fb-0001"

[[keys]]
name = "alice"
key = "sk-alice-fb-0002"

[[keys]]
name = "chatui"
key = "sk-chatui-fb-0003"
feedback = "reasoning"

[[keys]]
name = "quiet"
key = "sk-quiet-fb-0004"
feedback = "comments"
"""

pytestmark = pytest.mark.timeout(60)


# -- the stack ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("feedback")
    (tmp / "keys.toml").write_text(KEYS_TOML)
    return tmp


@pytest.fixture(scope="module")
def sim(base: Path) -> Iterator[Process]:
    proc = start_simulator(base, tokens_per_s=100, load_s=0, extra=["--loaded", MODEL])
    yield proc
    proc.stop()


def lmgate(base: Path, sim: Process, name: str, *extra: str) -> Process:
    return start_lmgate(base, sim.url, "--config", str(base / "keys.toml"), "--parallel", "1",
                        "--state-dir", str(base / f"state-{name}"), "--log-level", "warning", *extra)


@pytest.fixture(scope="module")
def gate(base: Path, sim: Process) -> Iterator[Process]:
    proc = lmgate(base, sim, "default")
    try:
        # one request served, so that lmgate has a service time to estimate waits from
        warm = proc.http.post("/v1/chat/completions", json=chat_body("warm up", 3),
                              headers=bearer(KEYS["alice"]), timeout=20)
        assert warm.status_code == 200, warm.text
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def idle_before(request: pytest.FixtureRequest) -> None:
    """Each test starts on a free gate (the previous test's holders are gone)."""
    for name in ("gate", "reasoning_gate"):
        if name in request.fixturenames:
            wait_idle(request.getfixturevalue(name))


# -- helpers -----------------------------------------------------------------------------
@contextlib.contextmanager
def holding(gate: Process, *, position: int = 0, text: str = "hold the gate") -> Iterator[Raw]:
    """A long stream of the holder key, open until the block ends or ``close()``. With
    ``position=0`` it runs (the gate is busy); otherwise it waits at that position."""
    conn = stream_open(gate, chat_body(text, HOLD_TOKENS), headers=bearer(KEYS["holder"]))
    try:
        assert conn.status == 200
        assert conn.headers["x-queue-position"] == str(position)
        yield conn
    finally:
        conn.close()


def reasoning_of(chunk: Any) -> str | None:
    if not chunk.choices:
        return None
    return (chunk.choices[0].delta.model_extra or {}).get("reasoning_content")


def waiting_stream(gate: Process, who: str, body: dict[str, Any], *, feedback: str | None = None,
                   path: str = "/v1/chat/completions") -> tuple[httpx.Headers, list[str]]:
    """A stream that has to wait behind a holder, which leaves once this one's head is in."""
    headers = bearer(KEYS[who])
    if feedback is not None:
        headers["X-Queue-Feedback"] = feedback
    with holding(gate) as holder:
        head, lines = read_stream(gate, body, headers, path=path, on_head=lambda _: holder.close())
    assert head["x-queue-position"] == "1"
    return head, lines


def data_docs(lines: list[str]) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in lines if line.startswith("data: ")]


def waiting_texts(lines: list[str]) -> list[str]:
    """The reasoning_content of lmgate's waiting chunks, in order."""
    out = []
    for doc in data_docs(lines):
        if isinstance(doc, dict) and doc.get("choices"):
            text = doc["choices"][0].get("delta", {}).get("reasoning_content")
            if text is not None:
                out.append(text)
    return out


def upstream_payloads(lines: list[str]) -> list[Any]:
    """The data payloads that are not lmgate's waiting chunks, without the per-generation id
    and timestamp (the simulator numbers its generations and stamps the time)."""
    out: list[Any] = []
    for doc in data_docs(lines):
        if isinstance(doc, dict):
            if str(doc.get("id", "")).startswith("lmgate-queue-"):
                continue
            doc = {k: v for k, v in doc.items() if k not in ("id", "created")}
        out.append(doc)
    return out


def direct_lines(sim: Process, body: dict[str, Any], path: str = "/v1/chat/completions") -> list[str]:
    return read_stream(sim, body, path=path)[1]


def assert_only_queue_comments_and_data(lines: list[str]) -> None:
    for line in lines:
        assert line == "" or line.startswith("data: ") or QUEUE_COMMENT.match(line), line


# -- the SDK, as a chat UI's backend uses it ---------------------------------------------
def test_the_sdk_reads_the_line_as_reasoning_then_the_untouched_answer(sim: Process, gate: Process) -> None:
    """Two requests ahead (one running, one waiting): the SDK yields "#2" on entering, "#1"
    when the line moves, then the upstream's chunks, whose text is the direct answer's."""
    body = chat_body("what does the queue look like from here", 9)
    direct_client = sdk(sim, "not-needed", timeout=20)
    direct = list(direct_client.chat.completions.create(stream=True, **body))
    direct_client.close()
    want_text = "".join(c.choices[0].delta.content or "" for c in direct if c.choices)
    assert want_text == expected_reply(body)

    client = sdk(gate, KEYS["alice"], timeout=20)
    try:
        with holding(gate, text="first holder") as first, \
                holding(gate, position=1, text="second holder") as second:
            raw = client.chat.completions.with_raw_response.create(
                stream=True, extra_headers={"X-Queue-Feedback": "reasoning"}, **body)
            position = int(raw.headers["x-queue-position"])
            assert position == 2
            eta_header = raw.headers.get("x-queue-eta-ms")
            stream = raw.parse()
            chunks = iter(stream)
            entered = next(chunks)  # sent on entering the line
            first.close()  # the second holder starts: this one moves up to #1
            moved = next(chunks)
            second.close()  # now this one runs
            rest = list(chunks)
            stream.close()
    finally:
        client.close()

    entered_text, moved_text = reasoning_of(entered), reasoning_of(moved)
    assert entered_text is not None and moved_text is not None
    first_match, moved_match = WAITING.match(entered_text), WAITING.match(moved_text)
    assert first_match, entered_text
    assert moved_match, moved_text
    assert int(first_match.group(1)) == position  # the number the header gave
    assert int(moved_match.group(1)) == 1
    # the estimate is told exactly when lmgate has one (the header carries the same)
    assert (first_match.group(2) is not None) == (eta_header is not None)
    if eta_header is not None and first_match.group(4) == "s":
        assert int(first_match.group(3)) == max(1, round(int(eta_header) / 1000))
    for chunk in (entered, moved):
        assert chunk.id.startswith("lmgate-queue-")
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL
        choice = chunk.choices[0]
        assert choice.delta.content is None and choice.finish_reason is None
        assert choice.delta.role == "assistant"
    # after the line: only the upstream's chunks, none of lmgate's, and the same answer
    assert [reasoning_of(c) for c in rest] == [None] * len(rest)
    assert all(not c.id.startswith("lmgate-queue-") for c in rest)
    assert "".join(c.choices[0].delta.content or "" for c in rest if c.choices) == want_text
    assert len(rest) == len(direct)
    assert [c.choices[0].finish_reason for c in rest] == [c.choices[0].finish_reason for c in direct]


# -- without the opt-in, nothing changes -------------------------------------------------
def test_without_the_opt_in_a_waiting_stream_is_comments_and_the_upstream_events(
        sim: Process, gate: Process) -> None:
    body = chat_body("no feedback asked for", 7, stream=True)
    _, lines = waiting_stream(gate, "alice", body)
    assert not any("reasoning_content" in line for line in lines)
    assert_only_queue_comments_and_data(lines)
    comments = [line for line in lines if line.startswith(":")]
    assert comments[:2] == [": queue_entered=1", ": queue_position=1"]
    assert comments[-1] == ": queue_position=0"
    assert upstream_payloads(lines) == upstream_payloads(direct_lines(sim, body))
    assert text_of(lines) == expected_reply(body)


def test_a_stream_that_starts_at_once_gets_no_waiting_chunk(sim: Process, gate: Process) -> None:
    body = chat_body("straight through", 6, stream=True)
    head, lines = read_stream(gate, body, {**bearer(KEYS["alice"]), "X-Queue-Feedback": "reasoning"})
    assert head["x-queue-position"] == "0"
    assert not any("reasoning_content" in line for line in lines)
    assert lines[:4] == [": queue_entered=0", "", ": queue_position=0", ""]
    assert upstream_payloads(lines) == upstream_payloads(direct_lines(sim, body))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v0/chat/completions"])
def test_a_keys_feedback_setting_applies_without_the_header(sim: Process, gate: Process, path: str) -> None:
    body = chat_body(f"chat ui on {path}", 6, stream=True)
    _, lines = waiting_stream(gate, "chatui", body, path=path)
    texts = waiting_texts(lines)
    assert texts and WAITING.match(texts[0]) and texts[0].startswith("Waiting in line: #1")
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert "lmgate-queue-" in lines[first_data]  # the waiting chunk comes before the answer
    # the waiting chunk is one data line: its own id, the request's model, no content
    chunk = json.loads(lines[first_data][6:])
    assert chunk["model"] == MODEL and chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": texts[0]}
    assert chunk["choices"][0]["finish_reason"] is None
    assert lines[first_data + 1] == ""
    assert upstream_payloads(lines) == upstream_payloads(direct_lines(sim, body, path))


def test_the_header_comments_overrides_the_keys_reasoning(sim: Process, gate: Process) -> None:
    body = chat_body("header says comments", 6, stream=True)
    _, lines = waiting_stream(gate, "chatui", body, feedback="comments")
    assert not any("reasoning_content" in line for line in lines)
    assert_only_queue_comments_and_data(lines)
    assert upstream_payloads(lines) == upstream_payloads(direct_lines(sim, body))


def test_a_bad_header_value_is_a_400_and_takes_no_place_in_line(gate: Process) -> None:
    body = chat_body("loud please", 5, stream=True)
    with holding(gate):
        resp = gate.http.post("/v1/chat/completions", json=body,
                              headers={**bearer(KEYS["alice"]), "X-Queue-Feedback": "loud"})
        assert resp.status_code == 400, resp.text
        err = error_of(resp)
        assert err["type"] == "invalid_request_error"
        assert err["param"] == "X-Queue-Feedback"
        assert "loud" in err["message"]
        line = queue(gate)
        assert line["depth"] == 0 and line["active"] == 1  # the holder only
    wait_idle(gate)
    client = sdk(gate, KEYS["alice"], timeout=20)
    try:
        reply = client.chat.completions.create(**chat_body("after the bad header", 5))
    finally:
        client.close()
    assert reply.choices[0].message.content == expected_reply(chat_body("after the bad header", 5))


# -- --feedback reasoning for everyone ---------------------------------------------------
@pytest.fixture(scope="module")
def reasoning_gate(base: Path, sim: Process) -> Iterator[Process]:
    proc = lmgate(base, sim, "reasoning", "--feedback", "reasoning")
    yield proc
    proc.stop()


def test_the_global_setting_under_the_keys_and_the_header(reasoning_gate: Process) -> None:
    """--feedback reasoning applies to a key without a setting; a key's "comments" overrides
    it; the header overrides the key again."""
    plain = waiting_texts(waiting_stream(reasoning_gate, "alice", chat_body("global", 5, stream=True))[1])
    assert plain and all(WAITING.match(t) for t in plain)
    quiet = waiting_stream(reasoning_gate, "quiet", chat_body("key says comments", 5, stream=True))[1]
    assert waiting_texts(quiet) == []
    assert_only_queue_comments_and_data(quiet)
    asked = waiting_texts(waiting_stream(reasoning_gate, "quiet", chat_body("header again", 5, stream=True),
                                         feedback="reasoning")[1])
    assert asked and asked[0].startswith("Waiting in line: #1")
    wait_until(lambda: queue(reasoning_gate)["active"] == 0, 10, "the gate to be free")
