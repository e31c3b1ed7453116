"""Integration tests for the LM Studio simulator, served by real uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
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


WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"location": {"type": "string"}}}}}]


def ask(oai: openai.OpenAI, body: dict, *, stream: bool) -> tuple[str | None, list[dict], str]:
    """One chat completion through the SDK: (content, tool calls, finish_reason); a stream's
    deltas are put together the way a chat UI does."""
    if not stream:
        choice = oai.chat.completions.create(**body).choices[0]
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content: list[str] = []
    calls = []
    finish = ""
    for chunk in oai.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for tc in delta.tool_calls or []:
            if tc.id:
                calls.append({"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": ""}})
            calls[-1]["function"]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return ("".join(content) if not calls else None), calls, finish


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tool_result_is_answered_with_text(oai: openai.OpenAI, stream: bool) -> None:
    """Regression: the simulator called a tool on every request that offered tools, even when
    the last message was the tool's result, so a chat UI with native function calling (Open
    WebUI's default) called the tool forever and never showed an answer. Now a turn that
    carries a tool result is answered with text (``finish_reason: stop``) that echoes the
    result. Reproduce: offer a tool, send its call back with a ``tool`` message, ask again."""
    body = chat_body(MODEL_A, "Paris, France", tools=WEATHER_TOOLS)
    content, calls, finish = ask(oai, body, stream=stream)
    assert (content, finish) == (None, "tool_calls") and len(calls) == 1
    assert calls[0]["function"] == expected_tool_call(body)

    result = json.dumps({"temperature_c": 21, "sky": "clear"})
    followup = {**body, "messages": [
        *body["messages"], {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": result}]}
    content, calls, finish = ask(oai, followup, stream=stream)
    assert (calls, finish) == ([], "stop")
    assert content == expected_reply(followup)
    assert content.startswith(f"[{MODEL_A}] {result}")

    # a new question after the answer: the model reaches for the tool again
    again = {**followup, "messages": [*followup["messages"],
                                      {"role": "assistant", "content": content},
                                      {"role": "user", "content": "and Oslo?"}]}
    content, calls, finish = ask(oai, again, stream=stream)
    assert (content, finish) == (None, "tool_calls")
    assert calls[0]["function"] == expected_tool_call(again)


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


# -- LM Studio 0.4 model management: /api/v1/models, load, unload, instances ---------------
GB = 10**9
BIG, MID, SMALL = "big-model-7b", "mid-model-3b", "small-model-1b"
SIZES = {BIG: 4 * GB, MID: int(1.5 * GB), SMALL: 1 * GB}


@contextlib.contextmanager
def sim(**kwargs: Any) -> Iterator[httpx.Client]:
    """A fresh simulator (its own state) and a client for it."""
    app = create_simulator_app(**{"tokens_per_s": 100.0, "load_s": 0.02, **kwargs})
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        yield c


def native(client: httpx.Client) -> dict[str, dict]:
    """``GET /api/v1/models`` by model key."""
    resp = client.get("/api/v1/models")
    assert resp.status_code == 200
    return {m["key"]: m for m in resp.json()["models"]}


def instance_ids(client: httpx.Client) -> dict[str, list[str]]:
    return {k: [i["id"] for i in m["loaded_instances"]] for k, m in native(client).items()}


def load(client: httpx.Client, model: str, **extra: Any) -> httpx.Response:
    return client.post("/api/v1/models/load", json={"model": model, **extra})


def test_native_models_listing_shape() -> None:
    with sim(max_concurrent=3, loaded=MODEL_A) as client:
        models = native(client)
        assert list(models) == list(DEFAULT_MODELS)
        qwen, embed = models[MODEL_A], models[EMBED]
        assert qwen == {
            "type": "llm", "publisher": "lmstudio-community", "key": MODEL_A,
            "display_name": "Qwen2.5 7B Instruct", "architecture": "qwen2",
            "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
            "size_bytes": qwen["size_bytes"], "params_string": "7B",
            "loaded_instances": [{"id": MODEL_A, "config": {
                "context_length": 4096, "eval_batch_size": 512, "flash_attention": True,
                "offload_kv_cache_to_gpu": True, "parallel": 3}}],
            "max_context_length": 32768, "format": "gguf",
            "capabilities": {"vision": False, "trained_for_tool_use": True},
            "description": None}
        assert 4 * GB < qwen["size_bytes"] < 5 * GB
        # embedding models: no architecture, capabilities nor description (as documented)
        assert set(embed) == {"type", "publisher", "key", "display_name", "quantization",
                              "size_bytes", "params_string", "loaded_instances",
                              "max_context_length", "format"}
        assert embed["type"] == "embedding" and embed["loaded_instances"] == []
        assert embed["size_bytes"] < qwen["size_bytes"] and embed["params_string"] is None


def test_load_is_listed_with_loaded_instances_and_parallel() -> None:
    with sim(max_concurrent=3, load_times={MODEL_B: 0.3}) as client:
        assert instance_ids(client)[MODEL_A] == []
        resp = load(client, MODEL_A, context_length=8192, echo_load_config=True)
        assert resp.status_code == 200
        body = resp.json()
        assert body == {"type": "llm", "instance_id": MODEL_A, "status": "loaded",
                        "load_time_seconds": body["load_time_seconds"],
                        "load_config": {"context_length": 8192, "eval_batch_size": 512,
                                        "flash_attention": True,
                                        "offload_kv_cache_to_gpu": True, "parallel": 3}}
        # 0.02 s for this model, 0.3 s for MODEL_B; asyncio may wake a timer up to a clock
        # tick early, and the figure is rounded to the millisecond
        assert 0.015 <= body["load_time_seconds"] < 0.3
        listed = native(client)[MODEL_A]["loaded_instances"]
        assert listed == [{"id": MODEL_A, "config": body["load_config"]}]
        # per-model load time; without echo_load_config no load_config
        slow = load(client, MODEL_B).json()
        assert "load_config" not in slow and slow["load_time_seconds"] >= 0.3
        embed = load(client, EMBED, echo_load_config=True).json()
        assert embed["type"] == "embedding" and embed["load_config"] == {"context_length": 2048}
        v0 = {m["id"]: m["state"] for m in client.get("/api/v0/models").json()["data"]}
        assert v0 == {MODEL_A: "loaded", MODEL_B: "loaded", EMBED: "loaded"}
        stats = client.get("/sim/stats").json()
        assert (stats["api_loads"], stats["jit_loads"], stats["loads"]) == (3, 0, 3)
        assert [(i["id"], i["origin"], i["state"], i["parallel"]) for i in stats["instances"]] == [
            (MODEL_A, "api", "loaded", 3), (MODEL_B, "api", "loaded", 3),
            (EMBED, "api", "loaded", 3)]
        assert stats["loaded_bytes"] == stats["max_loaded_bytes"] == sum(
            i["size_bytes"] for i in stats["instances"])
        # a request for an API-loaded model uses it: no JIT load, nothing evicted
        chat = client.post("/v1/chat/completions", json=chat_body(MODEL_B, "hi", max_tokens=3))
        assert chat.status_code == 200
        stats = client.get("/sim/stats").json()
        assert stats["jit_loads"] == 0 and stats["evictions"] == 0
        assert stats["log"][-1]["instance"] == MODEL_B


def test_second_load_of_a_model_is_a_second_instance() -> None:
    with sim(max_concurrent=2) as client:
        assert load(client, MODEL_A).json()["instance_id"] == MODEL_A
        assert load(client, MODEL_A).json()["instance_id"] == f"{MODEL_A}:2"
        assert instance_ids(client)[MODEL_A] == [MODEL_A, f"{MODEL_A}:2"]
        # a request naming the key goes to the first instance, one naming `key:2` to that one
        body = chat_body(MODEL_A, "first", max_tokens=2)
        client.post("/v1/chat/completions", json=body).raise_for_status()
        second = client.post("/v1/chat/completions",
                             json={**body, "model": f"{MODEL_A}:2"}).json()
        assert second["model"] == f"{MODEL_A}:2"
        log = client.get("/sim/stats").json()["log"]
        assert [e["instance"] for e in log] == [MODEL_A, f"{MODEL_A}:2"]
        # an unloaded id is free again for the next load; an unknown id is a 404 again
        client.post("/api/v1/models/unload", json={"instance_id": MODEL_A}).raise_for_status()
        assert client.post("/v1/chat/completions", json={**body, "model": f"{MODEL_A}:3"}
                           ).status_code == 404
        assert load(client, MODEL_A).json()["instance_id"] == MODEL_A
        assert instance_ids(client)[MODEL_A] == [f"{MODEL_A}:2", MODEL_A]


def test_load_body_is_validated_like_lm_studio() -> None:
    with sim() as client:
        unknown = load(client, MODEL_A, ttl=300)
        assert unknown.status_code == 400
        assert unknown.json() == {"error": {"type": "invalid_request", "code": "unrecognized_keys",
                                            "message": "Unrecognized key(s) in object: 'ttl'"}}
        two = load(client, MODEL_A, parallel=2, gpu="max").json()["error"]["message"]
        assert two == "Unrecognized key(s) in object: 'parallel', 'gpu'"
        missing = client.post("/api/v1/models/load", json={"context_length": 4096})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
        for bad in ({"context_length": "big"}, {"context_length": 0}, {"flash_attention": 1}):
            wrong = load(client, MODEL_A, **bad)
            assert wrong.status_code == 400, bad
            assert wrong.json()["error"]["type"] == "invalid_request"
        not_json = client.post("/api/v1/models/load", content=b"{nope",
                               headers={"content-type": "application/json"})
        assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
        nope = load(client, "nope-13b")
        assert nope.status_code == 404
        assert nope.json() == {"error": {"type": "model_not_found",
                                         "message": "Model nope-13b not found in downloaded models"}}
        assert all(ids == [] for ids in instance_ids(client).values())
        assert client.get("/sim/stats").json()["api_loads"] == 0
    # `parallel` as a load key only when the simulator is told LM Studio accepts it
    with sim(max_concurrent=4, accept_parallel=True) as client:
        body = load(client, MODEL_A, parallel=2, echo_load_config=True).json()
        assert body["load_config"]["parallel"] == 2
        assert native(client)[MODEL_A]["loaded_instances"][0]["config"]["parallel"] == 2


def test_unload_by_instance_id() -> None:
    with sim() as client:
        load(client, MODEL_A).raise_for_status()
        resp = client.post("/api/v1/models/unload", json={"instance_id": MODEL_A})
        assert resp.status_code == 200 and resp.json() == {"instance_id": MODEL_A}
        assert instance_ids(client)[MODEL_A] == []
        again = client.post("/api/v1/models/unload", json={"instance_id": MODEL_A})
        assert again.status_code == 404 and again.json()["error"]["type"] == "model_not_found"
        extra = client.post("/api/v1/models/unload", json={"instance_id": MODEL_A, "force": True})
        assert extra.status_code == 400 and extra.json()["error"]["code"] == "unrecognized_keys"
        assert client.post("/api/v1/models/unload", json={}).status_code == 400
        stats = client.get("/sim/stats").json()
        assert stats["unloads"] == 1 and stats["instances"] == [] and stats["loaded"] is None
        paths = [(r["path"], r.get("instance_id")) for r in
                 client.get("/sim/requests").json()["requests"]]
        assert ("/api/v1/models/unload", MODEL_A) in paths


def test_memory_budget_refuses_a_load_that_does_not_fit() -> None:
    with sim(models=[BIG, MID, SMALL], sizes=SIZES, memory_bytes=5 * GB) as client:
        assert native(client)[BIG]["size_bytes"] == 4 * GB
        load(client, BIG).raise_for_status()
        refused = load(client, MID)
        assert refused.status_code == 500
        error = refused.json()["error"]
        assert error["code"] == "insufficient_resources"
        assert error["message"].startswith("Model loading aborted due to insufficient system")
        assert load(client, SMALL).status_code == 200  # 4 + 1 GB fit exactly
        assert instance_ids(client) == {BIG: [BIG], MID: [], SMALL: [SMALL]}
        stats = client.get("/sim/stats").json()
        assert stats["refused_loads"] == 1 and stats["api_loads"] == 2
        assert stats["max_loaded_bytes"] == 5 * GB and stats["memory_bytes"] == 5 * GB


def test_jit_evicts_only_jit_instances() -> None:
    # no budget: at most one JIT model, as today; API-loaded models stay and keep serving
    with sim(max_concurrent=2, tokens_per_s=50.0) as client:
        load(client, MODEL_A).raise_for_status()
        long_a = chat_body(MODEL_A, "pinned", max_tokens=60)
        with ThreadPoolExecutor(2) as pool:
            fut_a = pool.submit(client.post, "/v1/chat/completions", json=long_a)
            wait_for(client, lambda s: s["active"] == 1)
            fut_b = pool.submit(client.post, "/v1/chat/completions",
                                json=chat_body(MODEL_B, "jit one", max_tokens=30))
            assert wait_for(client, lambda s: s["max_concurrent_models"] == 2, timeout=3
                            )["max_concurrent_models"] == 2
            assert fut_b.result(timeout=5).status_code == 200
            client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}).raise_for_status()
            resp_a = fut_a.result(timeout=5)
        assert resp_a.json()["choices"][0]["message"]["content"] == expected_reply(long_a)
        assert instance_ids(client) == {MODEL_A: [MODEL_A], MODEL_B: [], EMBED: [EMBED]}
        stats = client.get("/sim/stats").json()
        assert (stats["jit_loads"], stats["api_loads"], stats["evictions"]) == (2, 1, 1)
        assert stats["killed"] == 0 and stats["cut_generations"] == 0
        assert {i["id"]: i["origin"] for i in stats["instances"]} == {MODEL_A: "api", EMBED: "jit"}
    # with a budget: JIT instances (least recently used first) are evicted until it fits
    sizes = {**SIZES, MID: 4 * GB}
    models = [BIG, MID, SMALL, EMBED]
    with sim(models=models, sizes={**sizes, EMBED: GB // 2}, memory_bytes=6 * GB) as client:
        load(client, BIG).raise_for_status()
        for model in (SMALL, EMBED):  # 4 + 1 + 0.5 GB: both JIT loads fit beside BIG
            client.post("/v1/chat/completions", json=chat_body(model, "x", max_tokens=1)
                        ).raise_for_status()
        assert instance_ids(client) == {BIG: [BIG], MID: [], SMALL: [SMALL], EMBED: [EMBED]}
        stats = client.get("/sim/stats").json()
        assert stats["evictions"] == 0 and stats["max_loaded_bytes"] == int(5.5 * GB)
        # MID (4 GB) never fits beside the API-loaded BIG: refused, and nothing is evicted
        refused = client.post("/v1/chat/completions", json=chat_body(MID, "x", max_tokens=1))
        assert refused.status_code == 500
        assert refused.json()["error"]["message"].startswith("Model loading aborted")
        assert instance_ids(client) == {BIG: [BIG], MID: [], SMALL: [SMALL], EMBED: [EMBED]}
        client.post("/api/v1/models/unload", json={"instance_id": BIG}).raise_for_status()
        # without BIG, MID fits once SMALL (least recently used JIT instance) is evicted:
        # 1 (SMALL) + 0.5 (EMBED) + 1 (SMALL:2) + 4 > 6 GB, EMBED and SMALL:2 stay
        client.post("/v1/chat/completions", json=chat_body(EMBED, "x", max_tokens=1)
                    ).raise_for_status()
        load(client, SMALL).raise_for_status()  # a second SMALL instance, API-loaded: SMALL:2
        client.post("/v1/chat/completions", json=chat_body(MID, "x", max_tokens=1)
                    ).raise_for_status()
        stats = client.get("/sim/stats").json()
        assert [(i["id"], i["origin"]) for i in stats["instances"]] == [
            (EMBED, "jit"), (f"{SMALL}:2", "api"), (MID, "jit")]
        assert stats["evictions"] == 1 and stats["refused_loads"] == 1


def test_unload_during_a_generation_cuts_it_and_counts_it() -> None:
    with sim(tokens_per_s=100.0) as client:
        load(client, MODEL_A).raise_for_status()
        body = chat_body(MODEL_A, "cut me", max_tokens=400, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
            unloaded = client.post("/api/v1/models/unload", json={"instance_id": MODEL_A})
            assert unloaded.status_code == 200
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] != "data: [DONE]"
        assert json.loads(rest[-1][6:])["error"]["message"] == "Model unloaded."
        stats = client.get("/sim/stats").json()
        assert stats["cut_generations"] == 1 and stats["killed"] == 1 and stats["unloads"] == 1
        entry = stats["log"][-1]
        assert (entry["instance"], entry["outcome"], entry["cut_by"]) == (MODEL_A, "killed",
                                                                          "unload")
        # a JIT switch cuts the same way, counted as an eviction
        client.post("/v1/chat/completions", json=chat_body(MODEL_B, "w", max_tokens=1))
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(client.post, "/v1/chat/completions",
                              json=chat_body(MODEL_B, "long", max_tokens=300))
            wait_for(client, lambda s: s["active"] == 1)
            client.post("/v1/chat/completions", json=chat_body(MODEL_A, "x", max_tokens=1))
            assert fut.result(timeout=5).status_code == 500
        stats = client.get("/sim/stats").json()
        assert stats["cut_generations"] == 2 and stats["evictions"] == 1
        assert stats["log"][-2]["cut_by"] == "evict"


def test_fail_loads_knob() -> None:
    with sim(fail_loads=[MODEL_B]) as client:
        failed = load(client, MODEL_B)
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "model_load_failed"
        jit = client.post("/v1/chat/completions", json=chat_body(MODEL_B, "x", stream=True))
        assert jit.status_code == 500 and "Failed to load model" in jit.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", json=chat_body(MODEL_A, "x", max_tokens=2))
        assert ok.status_code == 200
        assert instance_ids(client)[MODEL_B] == []
        stats = client.get("/sim/stats").json()
        assert stats["failed_loads"] == 2 and stats["errors"] == 1 and stats["completed"] == 1


def test_jit_instances_unload_after_their_idle_ttl() -> None:
    with sim(jit_ttl_s=60) as client:
        load(client, MODEL_A).raise_for_status()
        client.post("/v1/chat/completions", json=chat_body(MODEL_B, "x", max_tokens=1, ttl=0.2)
                    ).raise_for_status()
        assert instance_ids(client)[MODEL_B] == [MODEL_B]
        time.sleep(0.35)
        assert instance_ids(client) == {MODEL_A: [MODEL_A], MODEL_B: [], EMBED: []}
        assert client.get("/sim/stats").json()["ttl_unloads"] == 1


def test_main_parses_model_management_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(state=app.state.sim))
    main(["--models", "a-7b,b-1b", "--model-sizes", "a-7b=4.5G,b-1b=800000000",
          "--memory-bytes", "6GiB", "--load-times", "a-7b=2", "--fail-loads", "b-1b",
          "--preload", "a-7b", "--max-concurrent", "3"])
    state = seen["state"]
    assert state.sizes == {"a-7b": 4_500_000_000, "b-1b": 800_000_000}
    assert state.memory_bytes == 6 * 2**30 and state.load_time("a-7b") == 2.0
    assert state.fail_loads == {"b-1b"}
    assert [(i.id, i.origin, i.parallel) for i in state.instances] == [("a-7b", "api", 3)]
    with pytest.raises(SystemExit):
        main(["--models", "a-7b", "--preload", "zzz"])
    with pytest.raises(SystemExit):
        main(["--models", "a-7b", "--model-sizes", "a-7b=lots"])
    with pytest.raises(SystemExit):  # preloads that do not fit in the budget
        main(["--models", "a-7b", "--preload", "a-7b", "--memory-bytes", "1G"])
