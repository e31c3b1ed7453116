"""The proof: concurrent users on two models break each other at LM Studio (simulated),
and do not through lmgate. Real uvicorn processes, the real openai SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from proxy.simulator import expected_reply, expected_tool_call
from tests.servers import Process, running_stack, start_lmgate, start_simulator

MODELS = ("qwen2.5-7b-instruct", "llama-3.2-3b-instruct")
CLIENTS = 8


@dataclass
class Outcome:
    index: int
    text: str | None = None
    error: str | None = None
    position: int | None = None
    request: dict | None = None


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Process]:
    proc = start_simulator(tmp_path, tokens_per_s=60, load_s=0.2)
    yield proc
    proc.stop()


@pytest.fixture
def gate(tmp_path: Path, sim: Process) -> Iterator[Process]:
    proc = start_lmgate(tmp_path, sim.url, "--log-level", "warning")
    yield proc
    proc.stop()


def request_for(i: int) -> dict:
    # the first one generates longest, so everyone else arrives while it runs
    return {"model": MODELS[i % 2], "max_tokens": 60 if i == 0 else 12,
            "messages": [{"role": "user", "content": f"client {i} nonce {i * 7919}"}]}


def call(base_url: str, i: int, stream: bool, out: list[Outcome]) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    req = request_for(i)
    res = Outcome(i, request=req)
    try:
        raw = client.chat.completions.with_raw_response.create(stream=stream, **req)
        if "x-queue-position" in raw.headers:
            res.position = int(raw.headers["x-queue-position"])
        if stream:
            parts = []
            for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            res.text = "".join(parts)
        else:
            res.text = raw.parse().choices[0].message.content
    except openai.APIError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    out.append(res)


def arrivals(base_url: str, stream: bool, registered: Callable[[int], bool]) -> list[Outcome]:
    """Start CLIENTS calls in a known order: each starts once the previous one is registered
    at its destination (a few ms apart), then all run concurrently."""
    out: list[Outcome] = []
    threads = []
    for i in range(CLIENTS):
        t = threading.Thread(target=call, args=(base_url, i, stream, out), daemon=True)
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while not registered(i + 1) and time.monotonic() < deadline:
            time.sleep(0.002)
    for t in threads:
        t.join(60)
    return sorted(out, key=lambda o: o.index)


def sim_seen(sim: Process) -> Callable[[int], bool]:
    def check(n: int) -> bool:
        return len(httpx.get(sim.url + "/sim/stats").json()["log"]) >= n
    return check


def gate_seen(gate: Process) -> Callable[[int], bool]:
    def check(n: int) -> bool:
        q = httpx.get(gate.url + "/queue").json()
        return q["depth"] + q["active"] + q["totals"]["served"] + q["totals"]["failed"] >= n
    return check


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_direct_to_lm_studio_breaks_concurrent_users(sim: Process, stream: bool) -> None:
    results = arrivals(sim.url, stream, sim_seen(sim))
    failed = [r for r in results if r.error]
    assert failed, "expected the JIT model swap to kill some generations"
    stats = httpx.get(sim.url + "/sim/stats").json()
    assert stats["killed"] >= 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_through_lmgate_everyone_succeeds_in_order(sim: Process, gate: Process, stream: bool) -> None:
    results = arrivals(gate.url, stream, gate_seen(gate))
    assert [r.error for r in results] == [None] * CLIENTS
    for r in results:
        assert r.request is not None
        assert r.text == expected_reply(r.request), f"client {r.index} got someone else's text"
    assert [r.position for r in results] == list(range(CLIENTS))
    stats = httpx.get(sim.url + "/sim/stats").json()
    assert stats["killed"] == 0 and stats["max_active"] == 1
    served = [entry["user"] for entry in stats["log"]]
    assert served == [request_for(i)["messages"][0]["content"] for i in range(CLIENTS)]


def test_tool_call_round_trip_through_lmgate(gate: Process) -> None:
    """Agentic clients: the tool call reaches the SDK intact, streaming and not."""
    client = openai.OpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0, timeout=30)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]
    body = {"model": MODELS[0], "messages": [{"role": "user", "content": "Paris"}], "tools": tools}
    want = expected_tool_call(body)
    reply = client.chat.completions.create(**body)
    call_ = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert (call_.function.name, call_.function.arguments) == (want["name"], want["arguments"])
    name, args, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **body):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for tc in choice.delta.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    assert (name, args, finish) == (want["name"], want["arguments"], "tool_calls")
    client.close()


def test_sdk_sees_queue_comments_as_nothing_and_errors_as_api_error(sim: Process, gate: Process) -> None:
    """A waiting stream gets comments the SDK ignores; an upstream 404 after waiting is an
    error event the SDK raises as APIError."""
    client = openai.OpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0, timeout=30)
    holder = ThreadPoolExecutor(1).submit(
        lambda: client.chat.completions.create(model=MODELS[0], max_tokens=40,
                                               messages=[{"role": "user", "content": "hold"}]))
    deadline = time.monotonic() + 5
    while httpx.get(gate.url + "/queue").json()["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    stream = client.chat.completions.create(model="no-such-model", stream=True,
                                            messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "no-such-model" in str(info.value)
    assert holder.result(timeout=30).choices[0].message.content
    client.close()


def test_knows_the_loaded_model_at_start(tmp_path: Path) -> None:
    with running_stack(tmp_path, tokens_per_s=0, load_s=0, extra=["--loaded", MODELS[1]]) as (_, gate):
        q = httpx.get(gate.url + "/queue").json()
        assert q["loaded_models"] == [MODELS[1]]
        client = openai.OpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model=MODELS[1], messages=[{"role": "user", "content": "x"}])
        assert httpx.get(gate.url + "/queue").json()["model_switches"] == 0
        client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "x"}])
        assert httpx.get(gate.url + "/queue").json()["model_switches"] == 1
        metrics = httpx.get(gate.url + "/metrics").text
        box = httpx.get(gate.url + "/queue").json()["upstreams"][0]["name"]
        assert f'lmgate_model_switches_total{{upstream="{box}"}} 1.0' in metrics
        client.close()
