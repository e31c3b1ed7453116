"""``GET /queue/history`` and the wait estimates, through the real app."""

from __future__ import annotations

import asyncio

from tests.integration.harness import chat_body, run, serve


def test_history_has_samples_from_startup_and_counts_finished_requests() -> None:
    async def body() -> None:
        async with serve() as r:
            assert (await r.client.post("/v1/chat/completions", json=chat_body())).status_code == 200
            bad = await r.client.post("/v1/chat/completions", json=chat_body(act="status:500"))
            assert bad.status_code == 500
            r.state.history.tick()  # the background tick runs once a second
            res = await r.client.get("/queue/history")
            assert res.status_code == 200 and res.headers["cache-control"] == "no-store"
            doc = res.json()
            assert doc["object"] == "queue.history" and doc["window_s"] == 300
            samples = doc["samples"]
            assert len(samples) >= 2 and samples[0]["served"] == 0  # sampled from startup
            assert samples[-1]["served"] == 1 and samples[-1]["failed"] == 1
            assert samples[-1]["completion_tokens"] == 1
            assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
            assert all(s["t"] <= doc["now"] for s in samples)
    run(body)


def test_estimates_appear_once_a_request_has_finished() -> None:
    async def body() -> None:
        async with serve() as r:
            holder = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold")))
            await r.upstream.wait_for_requests(1)
            waiter = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body()))
            await r.wait_depth(1)
            (item,) = (await r.client.get("/queue")).json()["waiting"]
            assert item["eta_ms"] is None  # nothing learned: no invented number
            r.upstream.release(0)
            first, second = await holder, await waiter
            assert "x-queue-eta-ms" not in second.headers
            holder = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold")))
            await r.upstream.wait_for_requests(3)
            waiter = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body()))
            await r.wait_depth(1)
            (item,) = (await r.client.get("/queue")).json()["waiting"]
            assert isinstance(item["eta_ms"], int) and item["eta_ms"] >= 0
            r.upstream.release(2)
            await holder
            assert int((await waiter).headers["x-queue-eta-ms"]) >= 0
            await r.assert_gate_free()
    run(body)
