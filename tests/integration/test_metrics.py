"""Metrics accounting: a known workload must move every lmgate metric by an exact amount.

lmgate runs in-process as it runs in production (the harness: its uvicorn settings, client
protocol and upstream transport) in front of a scripted box that plays LM Studio with
canned OpenAI responses. Each test gets a fresh ``CollectorRegistry`` and reads it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.config import Settings

from .harness import (SSE, BoxServer, Receive, Running, Scope, Send, end_body, read_body, run, send_chunk,
                      send_json, serve, start_response)

CHAT = "/v1/chat/completions"
EMBED_ROUTE = "/v1/embeddings"
MODEL_A = "qwen2.5-7b-instruct"
MODEL_B = "llama-3.2-3b-instruct"
MODEL_C = "text-embedding-nomic-embed-text-v1.5"
PROMPT_TOKENS = 5
COMPLETION_TOKENS = 7
FAIL_TEXT = "please fail"  # a chat whose last message is this gets an upstream 500
HOLD_TEXT = "please hold"  # ... is answered only once the test sets ``FakeUpstream.release``
PIECES = ["Hello", " there", " friend"]


class FakeUpstream:
    """The scripted box (a plain ASGI app): LM Studio with canned answers, counting what it
    serves."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def usage() -> dict[str, int]:
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}

    def sse(self, model: str, include_usage: bool) -> list[bytes]:
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}

        def choice(delta: dict, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        events = [choice({"role": "assistant", "content": ""})]
        events += [choice({"content": p}) for p in PIECES]
        events.append(choice({}, "stop"))
        if include_usage:
            events.append({**base, "choices": [], "usage": self.usage()})
        return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        raw = await read_body(receive)
        if scope["method"] == "GET":
            self.calls.append(("GET", path))
            if path == "/v1/models":
                await send_json(send, 200, {"object": "list", "data": [
                    {"id": m, "object": "model"} for m in (MODEL_A, MODEL_B, MODEL_C)]})
            else:
                await send_json(send, 404, {"error": "not found"})  # no "loaded" info
            return
        body = json.loads(raw)
        model = body["model"]
        self.calls.append((path, model))
        text = ""
        if body.get("messages"):
            text = body["messages"][-1].get("content", "")
        if text == HOLD_TEXT:
            self.holding.set()
            await self.release.wait()
        if text == FAIL_TEXT:
            await send_json(send, 500, {"error": {"message": "boom", "type": "server_error"}})
        elif path == EMBED_ROUTE:
            await send_json(send, 200, {
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS}})
        elif body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            await start_response(send, 200, SSE)
            for event in self.sse(model, include):
                await send_chunk(send, event)
            await end_body(send)
        else:
            await send_json(send, 200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(PIECES)},
                             "finish_reason": "stop"}],
                "usage": self.usage()})


class Lmgate:
    """One in-process lmgate with its own registry."""

    def __init__(self, running: Running, upstream: FakeUpstream) -> None:
        self.state = running.state
        self.client = running.client
        self.registry: CollectorRegistry = running.registry
        self.upstream = upstream
        self.box = running.box_name  # the box's name in the ``upstream`` label

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples whose labels include ``labels`` (others, such as the box a
        request ran on, summed over)."""
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        out = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == name:
                    out[tuple(sorted(s.labels.items()))] = s.value
        return out

    async def chat(self, model: str | None, text: str = "hi", **extra: object) -> httpx.Response:
        body: dict[str, object] = {"messages": [{"role": "user", "content": text}], **extra}
        if model is not None:
            body["model"] = model
        return await self.client.post(CHAT, json=body)


@contextlib.asynccontextmanager
async def lmgate(**settings: Any) -> AsyncIterator[Lmgate]:
    upstream = FakeUpstream()
    async with BoxServer(upstream) as box, serve(Settings(**settings), box=box) as running:
        yield Lmgate(running, upstream)


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- static gauges


def test_config_and_build_gauges() -> None:
    async def body() -> None:
        async with lmgate(max_queue=7, parallel=3) as g:
            assert g.value("lmgate_max_queue") == 7
            assert g.value("lmgate_parallel") == 3
            assert g.value("lmgate_build_info", version=__version__) == 1
            assert g.value("lmgate_upstream_up") == 1  # the startup probe got an answer
            # idle gate: the collector still exports the gauges, with model="none"
            assert g.samples("lmgate_queue_depth") == {(("model", "none"),): 0.0}
            assert g.samples("lmgate_requests_active") == {(("model", "none"), ("upstream", g.box)): 0.0}
            assert g.value("lmgate_model_switches_total") == 0
            # what the /metrics route serves is the same registry
            text = (await g.client.get("/metrics")).text
            assert "lmgate_max_queue 7.0" in text
            assert f'lmgate_build_info{{version="{__version__}"}} 1.0' in text
    run(body)


def test_upstream_down_at_startup() -> None:
    async def body() -> None:
        box = BoxServer(FakeUpstream())  # never started: its port refuses every connect
        try:
            async with serve(box=box) as running:
                registry, client, box_name = running.registry, running.client, running.box_name
                assert registry.get_sample_value("lmgate_upstream_up", {"upstream": box_name}) == 0
                r = await client.post(CHAT, json={"model": MODEL_A, "messages": []})
                assert r.status_code == 502
                assert registry.get_sample_value("lmgate_upstream_up", {"upstream": box_name}) == 0
                assert registry.get_sample_value(
                    "lmgate_requests_total", {"route": CHAT, "model": MODEL_A, "outcome": "upstream_error",
                                              "upstream": box_name}) == 1
                # never reached the upstream: a queue wait but no first token
                assert registry.get_sample_value("lmgate_queue_wait_seconds_count", {"model": MODEL_A}) == 1
                assert registry.get_sample_value("lmgate_time_to_first_token_seconds_count",
                                                 {"model": MODEL_A}) is None
        finally:
            await box.close()
    run(body)


# --------------------------------------------------------------------------- the workload


def test_known_workload_moves_each_metric_exactly() -> None:
    async def body() -> None:
        async with lmgate() as g:
            v = g.value

            for _ in range(3):
                r = await g.chat(MODEL_A)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == COMPLETION_TOKENS
                assert r.headers["x-queue-position"] == "0"

            r = await g.chat(MODEL_A, stream=True, stream_options={"include_usage": True})
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.text.endswith("data: [DONE]\n\n") and '"usage"' in r.text

            for bad in (b"{not json", b'{"model": "x", '):
                r = await g.client.post(CHAT, content=bad, headers={"content-type": "application/json"})
                assert r.status_code == 400
                assert r.json()["error"]["code"] == "invalid_json"

            r = await g.chat(None)
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "missing_model"

            r = await g.chat(MODEL_A, FAIL_TEXT)
            assert r.status_code == 500
            assert r.json()["error"]["message"] == "boom"  # passed through unchanged

            assert [c for c in g.upstream.calls if c[0] == CHAT] == [(CHAT, MODEL_A)] * 5

            # requests by route, model, outcome
            assert v("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="ok") == 4
            assert v("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="upstream_error") == 1
            assert v("lmgate_requests_total", route=CHAT, model="none", outcome="rejected") == 3
            assert sum(g.samples("lmgate_requests_total").values()) == 8

            # rejections by reason (the error code); the upstream's 500 is not a rejection
            assert v("lmgate_rejections_total", reason="invalid_json") == 2
            assert v("lmgate_rejections_total", reason="missing_model") == 1
            assert sum(g.samples("lmgate_rejections_total").values()) == 3

            # tokens: 3 JSON usages + 1 stream usage chunk; the 500 has no usage
            assert v("lmgate_prompt_tokens_total", model=MODEL_A) == 4 * PROMPT_TOKENS
            assert v("lmgate_completion_tokens_total", model=MODEL_A) == 4 * COMPLETION_TOKENS
            assert v("lmgate_prompt_tokens_total", model="none") == 0

            # histograms: only requests that got through the gate wait / see a first byte,
            # every request (rejected ones too) has a duration
            assert v("lmgate_queue_wait_seconds_count", model=MODEL_A) == 5
            assert v("lmgate_time_to_first_token_seconds_count", model=MODEL_A) == 5
            assert v("lmgate_queue_wait_seconds_count", model="none") == 0
            assert v("lmgate_time_to_first_token_seconds_count", model="none") == 0
            assert v("lmgate_request_duration_seconds_count", route=CHAT, model=MODEL_A) == 5
            assert v("lmgate_request_duration_seconds_count", route=CHAT, model="none") == 3
            assert v("lmgate_request_duration_seconds_sum", route=CHAT, model=MODEL_A) > 0
            # nothing waited: each wait is only the hop from admission to the start (well under
            # a second even on a busy machine) and part of its request's duration
            assert v("lmgate_queue_wait_seconds_bucket", model=MODEL_A, le="1.0") == 5
            assert (v("lmgate_queue_wait_seconds_sum", model=MODEL_A)
                    <= v("lmgate_request_duration_seconds_sum", route=CHAT, model=MODEL_A))
            assert v("lmgate_queue_wait_seconds_bucket", model=MODEL_A, le="+Inf") == 5

            # gauges back to rest
            assert g.samples("lmgate_queue_depth") == {(("model", "none"),): 0.0}
            assert g.samples("lmgate_requests_active") == {(("model", "none"), ("upstream", g.box)): 0.0}
            assert v("lmgate_loaded_model", model=MODEL_A) == 1
            assert v("lmgate_model_switches_total") == 0  # one model only
            assert v("lmgate_upstream_up") == 1  # an HTTP 500 is still an answer
            assert v("lmgate_max_queue") == 100
            assert v("lmgate_parallel") == 1
    run(body)


def test_stream_without_usage() -> None:
    async def body() -> None:
        async with lmgate() as g:
            r = await g.chat(MODEL_B, stream=True)
            assert r.status_code == 200 and '"usage"' not in r.text
            assert g.value("lmgate_requests_total", route=CHAT, model=MODEL_B, outcome="ok") == 1
            assert g.value("lmgate_prompt_tokens_total", model=MODEL_B) == 0  # unknown, not guessed
            assert g.value("lmgate_time_to_first_token_seconds_count", model=MODEL_B) == 1
            assert g.value("lmgate_queue_wait_seconds_count", model=MODEL_B) == 1
            assert g.value("lmgate_completion_tokens_total", model=MODEL_B) > 0  # approximated
    run(body)


def test_stream_without_usage_approximates_one_token_per_content_event() -> None:
    async def body() -> None:
        async with lmgate() as g:
            assert (await g.chat(MODEL_B, stream=True)).status_code == 200
            # the stream carries a role chunk, len(PIECES) content chunks, a finish chunk and [DONE]
            assert g.value("lmgate_completion_tokens_total", model=MODEL_B) == len(PIECES)
    run(body)


def test_embeddings_route_and_model_switches() -> None:
    async def body() -> None:
        async with lmgate() as g:
            assert (await g.chat(MODEL_A)).status_code == 200
            r = await g.client.post(EMBED_ROUTE, json={"model": MODEL_C, "input": "hello"})
            assert r.status_code == 200 and r.json()["data"][0]["embedding"] == [0.1, 0.2]
            assert (await g.chat(MODEL_A)).status_code == 200
            v = g.value
            assert v("lmgate_requests_total", route=EMBED_ROUTE, model=MODEL_C, outcome="ok") == 1
            assert v("lmgate_request_duration_seconds_count", route=EMBED_ROUTE, model=MODEL_C) == 1
            assert v("lmgate_prompt_tokens_total", model=MODEL_C) == PROMPT_TOKENS
            assert v("lmgate_completion_tokens_total", model=MODEL_C) == 0
            # A (first load, not a switch) -> C (switch) -> A (switch)
            assert v("lmgate_model_switches_total") == 2
            assert v("lmgate_loaded_model", model=MODEL_A) == 1
            assert v("lmgate_loaded_model", model=MODEL_C) == 0
    run(body)


def test_queue_depth_active_and_wait_while_queued() -> None:
    async def body() -> None:
        async with lmgate() as g:
            v = g.value
            first = asyncio.create_task(g.chat(MODEL_A, HOLD_TEXT))
            await asyncio.wait_for(g.upstream.holding.wait(), 5)  # it reached the upstream
            second = asyncio.create_task(g.chat(MODEL_A))
            await until(lambda: g.value("lmgate_queue_depth", model=MODEL_A) == 1)  # arrival order
            third = asyncio.create_task(g.chat(MODEL_B, stream=True, stream_options={"include_usage": True}))
            await until(lambda: sum(g.samples("lmgate_queue_depth").values()) == 2)
            assert v("lmgate_requests_active", model=MODEL_A) == 1
            assert v("lmgate_queue_depth", model=MODEL_A) == 1
            assert v("lmgate_queue_depth", model=MODEL_B) == 1
            await asyncio.sleep(0.1)  # the waiting requests accumulate at least this much queue time
            g.upstream.release.set()
            responses = [await asyncio.wait_for(t, 10) for t in (first, second, third)]
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert responses[0].headers["x-queue-position"] == "0"
            assert responses[1].headers["x-queue-position"] == "1"
            assert responses[2].headers["x-queue-position"] == "2"
            assert "x-queue-eta-ms" not in responses[2].headers  # nothing learned yet: no estimate
            assert float(responses[1].headers["x-queue-wait-ms"]) >= 100
            # the waiting stream got its headers and queue comments first, then the relayed events
            assert responses[2].text.startswith(": queue_entered=2\n\n")
            assert responses[2].text.endswith("data: [DONE]\n\n")
            assert v("lmgate_completion_tokens_total", model=MODEL_B) == COMPLETION_TOKENS
            assert v("lmgate_prompt_tokens_total", model=MODEL_B) == PROMPT_TOKENS
            assert v("lmgate_time_to_first_token_seconds_count", model=MODEL_B) == 1
            assert v("lmgate_queue_wait_seconds_count", model=MODEL_A) == 2
            assert v("lmgate_queue_wait_seconds_count", model=MODEL_B) == 1
            assert v("lmgate_queue_wait_seconds_sum", model=MODEL_A) >= 0.1
            assert v("lmgate_queue_wait_seconds_sum", model=MODEL_B) >= 0.1
            assert v("lmgate_queue_wait_seconds_bucket", model=MODEL_B, le="0.025") == 0
            assert v("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="ok") == 2
            assert v("lmgate_requests_total", route=CHAT, model=MODEL_B, outcome="ok") == 1
            assert v("lmgate_model_switches_total") == 1
            assert g.samples("lmgate_queue_depth") == {(("model", "none"),): 0.0}
            assert g.samples("lmgate_requests_active") == {(("model", "none"), ("upstream", g.box)): 0.0}
    run(body)


def test_queue_full_is_a_rejection_with_its_model() -> None:
    async def body() -> None:
        async with lmgate(max_queue=0) as g:
            first = asyncio.create_task(g.chat(MODEL_A, HOLD_TEXT))
            await asyncio.wait_for(g.upstream.holding.wait(), 5)
            r = await g.chat(MODEL_A)
            g.upstream.release.set()
            assert (await asyncio.wait_for(first, 10)).status_code == 200
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert g.value("lmgate_rejections_total", reason="queue_full") == 1
            assert g.value("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="rejected") == 1
            assert g.value("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="ok") == 1
            # the rejected one never waited
            assert g.value("lmgate_queue_wait_seconds_count", model=MODEL_A) == 1
    run(body)


# --------------------------------------------------------------------------- label cap


def test_model_label_cap_folds_into_other() -> None:
    async def body() -> None:
        async with lmgate(max_models=2) as g:
            assert (await g.chat(None)).status_code == 400  # no model: labelled "none", uses no slot
            for model in (MODEL_A, MODEL_B, MODEL_C, "yet-another-model"):
                assert (await g.chat(model)).status_code == 200
            assert (await g.chat(MODEL_A)).status_code == 200  # a known model keeps its name
            v = g.value
            assert v("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="ok") == 2
            assert v("lmgate_requests_total", route=CHAT, model=MODEL_B, outcome="ok") == 1
            assert v("lmgate_requests_total", route=CHAT, model="other", outcome="ok") == 2
            assert v("lmgate_requests_total", route=CHAT, model=MODEL_C, outcome="ok") == 0
            assert v("lmgate_completion_tokens_total", model="other") == 2 * COMPLETION_TOKENS
            assert v("lmgate_prompt_tokens_total", model="other") == 2 * PROMPT_TOKENS
            assert v("lmgate_queue_wait_seconds_count", model="other") == 2
            assert v("lmgate_time_to_first_token_seconds_count", model="other") == 2
            assert v("lmgate_request_duration_seconds_count", route=CHAT, model="other") == 2
            models = {dict(labels)["model"] for labels in g.samples("lmgate_requests_total")}
            assert models == {MODEL_A, MODEL_B, "other", "none"}
            # the gate-side gauges use the same folding
            assert g.samples("lmgate_loaded_model") == {(("model", MODEL_A), ("upstream", g.box)): 1.0}
            assert v("lmgate_requests_total", route=CHAT, model="none", outcome="rejected") == 1
    run(body)


def test_label_slots_go_to_requested_models_not_to_scrapes() -> None:
    async def body() -> None:
        async with lmgate(max_models=2) as g:
            g.state.gate.set_loaded({"some-loaded-model"})
            assert (await g.client.get("/metrics")).status_code == 200  # a scrape sees the loaded model
            assert (await g.chat(MODEL_A)).status_code == 200
            assert (await g.chat(MODEL_B)).status_code == 200
            assert g.value("lmgate_requests_total", route=CHAT, model=MODEL_B, outcome="ok") == 1
    run(body)


# --------------------------------------------------------------------------- shutdown


def test_shutdown_refuses_waiting_requests() -> None:
    async def body() -> None:
        async with lmgate(shutdown_grace=5) as g:
            first = asyncio.create_task(g.chat(MODEL_A, HOLD_TEXT))
            await asyncio.wait_for(g.upstream.holding.wait(), 5)
            second = asyncio.create_task(g.chat(MODEL_A))
            await until(lambda: g.value("lmgate_queue_depth", model=MODEL_A) == 1)
            g.state.begin_shutdown()
            refused = await asyncio.wait_for(second, 5)
            g.upstream.release.set()
            assert (await asyncio.wait_for(first, 5)).status_code == 200  # the running one finishes
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert g.value("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="shutting_down") == 1
            assert g.value("lmgate_requests_total", route=CHAT, model=MODEL_A, outcome="ok") == 1
            assert g.samples("lmgate_queue_depth") == {(("model", "none"),): 0.0}
            # refused while it waited, it counts as a rejection like one refused on arrival
            assert g.value("lmgate_rejections_total", reason="shutting_down") == 1
    run(body)

