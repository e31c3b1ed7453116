"""Integration tests for the LM Studio simulator, served by real uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from proxy.simulator import (
    DEFAULT_MODELS,
    create_simulator_app,
    expected_reply,
    expected_tool_call,
    main,
)

MODEL_A, MODEL_B, EMBED = DEFAULT_MODELS


class ServerThread:
    """A uvicorn server running in a daemon thread on a pre-bound 127.0.0.1 socket."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    app = create_simulator_app(tokens_per_s=100.0, load_s=0.05, max_concurrent=2)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        c.post("/sim/reset").raise_for_status()
        yield c


@pytest.fixture
def oai(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def wait_for(client: httpx.Client, pred: Callable[[dict], bool], timeout: float = 1.0) -> dict:
    """Poll /sim/stats until ``pred`` holds; bounded in both attempts and time."""
    deadline = time.monotonic() + timeout
    stats: dict = {}
    for _ in range(200):
        stats = client.get("/sim/stats").json()
        if pred(stats) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return stats


def chat_body(model: str, text: str, **extra: Any) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": text}], **extra}


def test_v1_models_shape(client: httpx.Client) -> None:
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == list(DEFAULT_MODELS)
    assert all(m["object"] == "model" and m["owned_by"] == "organization_owner"
               for m in data["data"])
    assert client.get(f"/v1/models/{MODEL_A}").json()["id"] == MODEL_A
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_v0_models_shape(client: httpx.Client) -> None:
    data = client.get("/api/v0/models").json()["data"]
    keys = {"id", "object", "type", "publisher", "arch", "compatibility_type",
            "quantization", "state", "max_context_length"}
    assert all(set(m) == keys for m in data)
    types = {m["id"]: m["type"] for m in data}
    assert types == {MODEL_A: "llm", MODEL_B: "llm", EMBED: "embeddings"}
    one = client.get(f"/api/v0/models/{EMBED}").json()
    assert one["state"] in {"loaded", "not-loaded"} and one["compatibility_type"] == "gguf"
    assert client.get("/api/v0/models/nope").status_code == 404


def test_chat_non_stream(client: httpx.Client) -> None:
    body = chat_body(MODEL_A, "hello there world", max_tokens=7)
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": expected_reply(body)}
    assert len(expected_reply(body).split()) == 7
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    stats = client.get("/sim/stats").json()
    assert stats["loaded"] == MODEL_A and stats["completed"] == 1
    entry = stats["log"][-1]
    assert entry["user"] == "hello there world" and entry["outcome"] == "ok"
    assert entry["path"] == "/v1/chat/completions" and entry["stream"] is False


def test_completions_non_stream_and_stream(client: httpx.Client) -> None:
    body = {"model": MODEL_A, "prompt": "once upon a time"}
    data = client.post("/api/v0/completions", json=body).json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == expected_reply(body)
    assert data["usage"]["completion_tokens"] == 12
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_reply(body)


def test_chat_stream_with_openai_sdk(client: httpx.Client, oai: openai.OpenAI) -> None:
    body = chat_body(MODEL_A, "stream me please", max_tokens=20)
    stream = oai.chat.completions.create(**body, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_reply(body)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert wait_for(client, lambda s: s["completed"] == 1)["completed"] == 1


def test_tool_call_stream_and_non_stream(oai: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"location": {"type": "string"}}}}}]
    body = chat_body(MODEL_A, "Paris, France", tools=tools)
    expected = expected_tool_call(body)
    assert expected["name"] == "get_weather"
    assert json.loads(expected["arguments"]) == {"location": "Paris, France"}

    result = oai.chat.completions.create(**body)
    call = result.choices[0].message.tool_calls[0]
    assert result.choices[0].finish_reason == "tool_calls"
    assert result.choices[0].message.content is None
    assert (call.function.name, call.function.arguments) == (expected["name"],
                                                             expected["arguments"])

    chunks = list(oai.chat.completions.create(**body, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == call.id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2 and all(d.index == 0 for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == expected["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    plain = oai.chat.completions.create(**body, tool_choice="none")
    assert plain.choices[0].message.content == expected_reply(body)


def test_embeddings(client: httpx.Client, oai: openai.OpenAI) -> None:
    one = oai.embeddings.create(model=EMBED, input="hello world")
    many = oai.embeddings.create(model=EMBED, input=["hello world", "other text"])
    assert len(one.data[0].embedding) == 8
    assert one.data[0].embedding == many.data[0].embedding
    assert many.data[0].embedding != many.data[1].embedding
    assert [d.index for d in many.data] == [0, 1]
    assert many.usage.prompt_tokens == 4
    raw = client.post("/api/v0/embeddings", json={"model": EMBED, "input": "hello world"})
    assert raw.json()["data"][0]["embedding"] == one.data[0].embedding


def test_jit_switch_kills_running_stream(client: httpx.Client, oai: openai.OpenAI) -> None:
    client.post("/v1/chat/completions", json=chat_body(MODEL_A, "warm up", max_tokens=1))
    loads_before = client.get("/sim/stats").json()["loads"]
    stream = oai.chat.completions.create(**chat_body(MODEL_A, "slow one", max_tokens=400),
                                         stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    body_b = chat_body(MODEL_B, "model b wins", max_tokens=5)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.post, "/v1/chat/completions", json=body_b)
        with pytest.raises(openai.APIError, match="Model unloaded"):
            for _ in it:
                pass
        resp_b = fut.result(timeout=5)
    assert resp_b.json()["choices"][0]["message"]["content"] == expected_reply(body_b)
    stats = client.get("/sim/stats").json()
    assert stats["killed"] == 1 and stats["loaded"] == MODEL_B
    assert stats["loads"] == loads_before + 1
    outcomes = [(e["model"], e["outcome"]) for e in stats["log"]]
    assert outcomes[-2:] == [(MODEL_A, "killed"), (MODEL_B, "ok")]


def test_jit_switch_kills_non_stream_with_500(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json=chat_body(MODEL_A, "warm", max_tokens=1))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.post, "/v1/chat/completions",
                          json=chat_body(MODEL_A, "long", max_tokens=300))
        wait_for(client, lambda s: s["active"] == 1)
        client.post("/v1/embeddings", json={"model": EMBED, "input": "x"})
        killed = fut.result(timeout=5)
    assert killed.status_code == 500
    assert killed.json()["error"]["message"] == "Model unloaded."
    assert client.get("/sim/stats").json()["killed"] == 1


def test_disconnect_mid_stream_is_cancelled(client: httpx.Client, server: ServerThread) -> None:
    body = chat_body(MODEL_A, "abandon me", max_tokens=400, stream=True)
    with httpx.Client(base_url=server.url, timeout=10) as other:
        with other.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
    started = time.monotonic()
    stats = wait_for(client, lambda s: s["cancelled"] == 1)
    assert stats["cancelled"] == 1 and stats["active"] == 0
    assert time.monotonic() - started < 1.0
    assert stats["log"][-1]["outcome"] == "cancelled" and stats["log"][-1]["ended"] is not None


def test_concurrency_limit(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json=chat_body(MODEL_A, "warm", max_tokens=1))
    bodies = [chat_body(MODEL_A, f"req {i}", max_tokens=10) for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda b: client.post("/v1/chat/completions", json=b), bodies))
    for body, resp in zip(bodies, results):
        assert resp.json()["choices"][0]["message"]["content"] == expected_reply(body)
    stats = client.get("/sim/stats").json()
    assert stats["max_active"] == 2 and stats["completed"] == 6 and stats["active"] == 0


def test_errors(client: httpx.Client) -> None:
    unknown = client.post("/v1/chat/completions", json=chat_body("nope", "hi"))
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "Model 'nope' not found",
                                        "type": "invalid_request_error", "param": "model",
                                        "code": "model_not_found"}}
    bad = client.post("/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = client.post("/v1/completions", json={"prompt": "hi"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    assert client.get("/sim/stats").json()["log"] == []


def test_expected_reply_rules() -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "text", "text": "a b"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert expected_reply(body).split()[:3] == ["[m]", "a", "b"]
    assert len(expected_reply(body).split()) == 12
    assert expected_reply({**body, "max_tokens": 2}) == "[m] a"
    assert len(expected_reply({**body, "max_tokens": 10**6}).split()) == 4096


def test_main_parses_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs, state=app.state.sim)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    main(["--port", "4321", "--models", "a,b", "--tokens-per-s", "0", "--max-concurrent", "3"])
    assert seen["host"] == "127.0.0.1" and seen["port"] == 4321
    assert seen["state"].models == ["a", "b"] and seen["state"].delay == 0.0


def test_request_log_records_every_request_but_sim_ones(client: httpx.Client) -> None:
    t0 = time.monotonic()
    client.get("/v1/models", headers={"authorization": "Bearer x"})
    client.post("/v1/chat/completions", json=chat_body(MODEL_A, "hi", max_tokens=3, stream=False))
    client.post("/v1/responses", json={"model": MODEL_B, "input": "x", "max_output_tokens": 9})
    client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    client.get("/sim/stats")
    got = client.get("/sim/requests").json()
    reqs = got["requests"]
    assert [(r["method"], r["path"]) for r in reqs] == [
        ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"),
        ("POST", "/v1/completions")]
    assert got["total"] >= 4
    assert [r["auth"] for r in reqs] == [True, False, False, False]
    assert all(t0 <= r["t"] <= time.monotonic() for r in reqs)
    chat = reqs[1]
    assert chat["model"] == MODEL_A and chat["max_tokens"] == 3 and chat["stream"] is False
    assert "max_completion_tokens" not in chat and "max_output_tokens" not in chat
    assert reqs[2]["max_output_tokens"] == 9 and "model" not in reqs[3]
    # the body was replayed to the app: the chat request was served normally
    assert client.get("/sim/stats").json()["completed"] == 1
    client.post("/sim/reset")
    assert client.get("/sim/requests").json()["requests"] == []


def test_word_len_knob_makes_long_replies() -> None:
    body = chat_body(MODEL_A, "a", max_tokens=5, x_word_len=1000)
    words = expected_reply(body).split(" ")
    assert words[:2] == [f"[{MODEL_A}]", "a"] and [len(w) for w in words[2:]] == [1000] * 3
    assert expected_reply(chat_body(MODEL_A, "a", max_tokens=5)) == f"[{MODEL_A}] a the quick brown"
