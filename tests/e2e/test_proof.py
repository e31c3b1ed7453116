"""The proof: concurrent users on two models break each other at LM Studio (simulated),
and do not through lmgate. Real uvicorn processes, the real openai SDK."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from proxy.simulator import expected_reply, expected_tool_call
from tests.e2e.helpers import queue, sdk, sim_reset, sim_stats, wait_idle, wait_until
from tests.servers import Process, running_stack

MODELS = ("qwen2.5-7b-instruct", "llama-3.2-3b-instruct")
CLIENTS = 8
TOKENS_PER_S = 120
HOLD_S = 1  # the first request's length: the others all arrive while it runs (in ~0.1 s)


@dataclass
class Outcome:
    index: int
    text: str | None = None
    error: str | None = None
    position: int | None = None
    request: dict | None = None


@pytest.fixture
def stack(shared_stack: Callable[..., tuple[Process, Process]]) -> tuple[Process, Process]:
    """One simulator and lmgate for the module; each test starts on an idle gate and a
    simulator whose records are empty."""
    sim, gate = shared_stack("--log-level", "warning", tokens_per_s=TOKENS_PER_S, load_s=0.1)
    wait_idle(gate)
    sim_reset(sim)
    return sim, gate


@pytest.fixture
def sim(stack: tuple[Process, Process]) -> Process:
    return stack[0]


@pytest.fixture
def gate(stack: tuple[Process, Process]) -> Process:
    return stack[1]


def request_for(i: int) -> dict:
    # the first one generates longest, so everyone else arrives while it runs
    return {"model": MODELS[i % 2], "max_tokens": HOLD_S * TOKENS_PER_S if i == 0 else 12,
            "messages": [{"role": "user", "content": f"client {i} nonce {i * 7919}"}]}


def call(client: openai.OpenAI, i: int, stream: bool, out: list[Outcome]) -> None:
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
    out.append(res)


def arrivals(target: Process, stream: bool, registered: Callable[[int], bool],
             all_in: Callable[[], None] = lambda: None) -> list[Outcome]:
    """Start CLIENTS calls in a known order: each starts once the previous one is registered
    at its destination (a few ms apart), then all run concurrently. ``all_in`` runs once the
    last one is registered, before waiting for the answers."""
    out: list[Outcome] = []
    threads = []
    with sdk(target, "x", timeout=60) as client:
        for i in range(CLIENTS):
            t = threading.Thread(target=call, args=(client, i, stream, out), daemon=True)
            t.start()
            threads.append(t)
            wait_until(lambda: registered(i + 1), 10, f"client {i} to be registered", interval=0.002)
        all_in()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a client got no answer in 60 s"
    return sorted(out, key=lambda o: o.index)


def sim_seen(sim: Process) -> Callable[[int], bool]:
    def check(n: int) -> bool:
        return len(sim_stats(sim)["log"]) >= n
    return check


def gate_seen(gate: Process) -> Callable[[int], bool]:
    """Requests lmgate has seen since this was called (waiting, running or finished)."""
    def seen() -> int:
        q = queue(gate)
        return q["depth"] + q["active"] + q["totals"]["served"] + q["totals"]["failed"]
    before = seen()

    def check(n: int) -> bool:
        return seen() - before >= n
    return check


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_direct_to_lm_studio_breaks_concurrent_users(sim: Process, stream: bool) -> None:
    results = arrivals(sim, stream, sim_seen(sim))
    failed = [r for r in results if r.error]
    assert failed, "expected the JIT model swap to kill some generations"
    stats = sim_stats(sim)
    assert stats["killed"] >= 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_through_lmgate_everyone_succeeds_in_order(sim: Process, gate: Process, stream: bool) -> None:
    """Each client arrives once the one before it is in line, and the first generates for
    HOLD_S seconds, so nothing ends while the others arrive (if it did, two clients would be
    told the same position). Regression: on a busy machine the arrivals took longer than the
    first request (a new client, with its CA bundle load, per call and per poll), and a wait
    that gave up silently after 5 s let the next client go anyway; reproduce by running this
    file beside two CPU-bound processes. Now the arrivals take ~0.1 s, every wait fails when
    it times out, and the line is checked once everyone is in."""
    def line_held() -> None:
        q = queue(gate)
        assert (q["active"], q["depth"]) == (1, CLIENTS - 1), (
            f"the first request ended before every client had arrived: {q['active']} running, "
            f"{q['depth']} waiting")

    results = arrivals(gate, stream, gate_seen(gate), line_held)
    assert [r.error for r in results] == [None] * CLIENTS
    for r in results:
        assert r.request is not None
        assert r.text == expected_reply(r.request), f"client {r.index} got someone else's text"
    assert [r.position for r in results] == list(range(CLIENTS))
    stats = sim_stats(sim)
    assert stats["killed"] == 0 and stats["max_active"] == 1
    served = [entry["user"] for entry in stats["log"]]
    assert served == [request_for(i)["messages"][0]["content"] for i in range(CLIENTS)]


def test_tool_call_round_trip_through_lmgate(gate: Process) -> None:
    """Agentic clients: the tool call reaches the SDK intact, streaming and not."""
    client = sdk(gate, "x")
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


def test_sdk_sees_queue_comments_as_nothing_and_errors_as_api_error(gate: Process,
                                                                     pool: ThreadPoolExecutor) -> None:
    """A waiting stream gets comments the SDK ignores; an upstream 404 after waiting is an
    error event the SDK raises as APIError."""
    client = sdk(gate, "x")
    holder = pool.submit(
        lambda: client.chat.completions.create(model=MODELS[0], max_tokens=40,
                                               messages=[{"role": "user", "content": "hold"}]))
    wait_until(lambda: queue(gate)["active"] == 1, 10, "the holder to run", interval=0.005)
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
        q = queue(gate)
        assert q["loaded_models"] == [MODELS[1]]
        client = sdk(gate, "x")
        client.chat.completions.create(model=MODELS[1], messages=[{"role": "user", "content": "x"}])
        assert queue(gate)["model_switches"] == 0
        client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "x"}])
        assert queue(gate)["model_switches"] == 1
        metrics = gate.http.get("/metrics").text
        box = queue(gate)["upstreams"][0]["name"]
        assert f'lmgate_model_switches_total{{upstream="{box}"}} 1.0' in metrics
        client.close()
