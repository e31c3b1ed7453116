"""Managed models against a scripted LM Studio REST API v1: the mode found, one load per
burst, room made by unloading the least recently used idle model, never a running one, the
memory budget, failed loads, and slots per model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from proxy.config import ModelSpec, Settings, UpstreamSpec
from proxy.errors import ModelLoadFailed, NotFound
from proxy.gate import Box
from proxy.models import ERROR, JIT, MANAGED, BoxModels
from proxy.upstream import Upstream

SIZES = {"a": 4_000, "b": 3_000, "c": 2_000}


class FakeStudio:
    """LM Studio's /api/v1/models, load and unload, in memory."""

    def __init__(self, *, v1: bool = True, status: int = 200, fail: set[str] | None = None) -> None:
        self.v1, self.status, self.fail = v1, status, fail or set()
        self.sizes = dict(SIZES)  # what the listing names (downloaded models)
        self.loaded: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.url.path, body))
        path = request.url.path
        if path == "/api/v1/models":
            if not self.v1:
                return httpx.Response(404, json={"error": "Unexpected endpoint"})
            if self.status != 200:
                return httpx.Response(self.status, json={"error": "unauthorized"})
            return httpx.Response(200, json={"models": [
                {"type": "llm", "key": k, "size_bytes": size,
                 "loaded_instances": [{"id": k, "config": self.loaded[k]}] if k in self.loaded else []}
                for k, size in self.sizes.items()]})
        if path == "/api/v1/models/load":
            await self.release.wait()
            assert body is not None
            if body["model"] in self.fail:
                return httpx.Response(500, json={"error": {"message": f"Failed to load {body['model']}"}})
            self.loaded[body["model"]] = {"context_length": body.get("context_length", 4096), "parallel": 4}
            return httpx.Response(200, json={"type": "llm", "instance_id": body["model"],
                                             "load_time_seconds": 0.1, "status": "loaded"})
        if path == "/api/v1/models/unload":
            assert body is not None
            self.loaded.pop(body["instance_id"], None)
            return httpx.Response(200, json={"instance_id": body["instance_id"]})
        return httpx.Response(200, json={"data": []})

    def loads(self) -> list[str]:
        return [b["model"] for p, b in self.calls if p == "/api/v1/models/load" and b]

    def unloads(self) -> list[str]:
        return [b["instance_id"] for p, b in self.calls if p == "/api/v1/models/unload" and b]


def manager(studio: FakeStudio, **settings: Any) -> BoxModels:
    s = Settings(upstream="http://box.test:1234", **settings)
    spec = s.boxes()[0]
    up = Upstream(s, httpx.MockTransport(studio), spec)
    return BoxModels(up, spec, s)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("studio, mode, wanted", [
    (FakeStudio(), MANAGED, "auto"), (FakeStudio(v1=False), JIT, "auto"),
    (FakeStudio(), JIT, "jit"), (FakeStudio(v1=False), ERROR, "managed"),
    (FakeStudio(status=401), ERROR, "auto"),
])
def test_mode(studio: FakeStudio, mode: str, wanted: str) -> None:
    m = manager(studio, load_mode=wanted)
    run(m.detect())
    assert m.mode == mode
    assert (m.error is not None) == (mode == ERROR)


def test_a_burst_loads_once_with_the_configured_fields_only() -> None:
    studio = FakeStudio()
    m = manager(studio, models=(ModelSpec("a", parallel=2, load=(("context_length", 8192),
                                                                  ("flash_attention", True))),))

    async def body() -> None:
        await m.detect()
        studio.release.clear()
        burst = [asyncio.create_task(m.ensure("a", set)) for _ in range(10)]
        await asyncio.sleep(0)
        studio.release.set()
        took = await asyncio.gather(*burst)
        assert sum(t is not None for t in took) == 1
    run(body())
    assert studio.loads() == ["a"]
    load_body = next(b for p, b in studio.calls if p == "/api/v1/models/load")
    assert load_body == {"model": "a", "context_length": 8192, "flash_attention": True}
    assert m.instances == {"a": ["a"]} and m.reported_parallel["a"] == 4


def test_room_is_made_from_the_least_recently_used_idle_model() -> None:
    studio = FakeStudio()
    clock = [0.0]
    m = manager(studio, max_loaded=2)
    m.clock = lambda: clock[0]

    async def body() -> None:
        await m.detect()
        await m.ensure("a", set)
        clock[0] = 1
        await m.ensure("b", set)
        clock[0] = 2
        await m.ensure("a", set)  # used again: b is now the least recently used
        clock[0] = 3
        await m.ensure("c", set)
    run(body())
    assert studio.unloads() == ["b"] and set(studio.loaded) == {"a", "c"}


def test_a_model_with_running_requests_is_never_unloaded() -> None:
    studio = FakeStudio()
    m = manager(studio, max_loaded=1)

    async def body() -> None:
        await m.detect()
        await m.ensure("a", set)
        await m.ensure("b", lambda: {"a"})  # a still runs: over the limit rather than cut it
    run(body())
    assert studio.unloads() == [] and set(studio.loaded) == {"a", "b"}


def test_memory_budget_counts_size_bytes() -> None:
    studio = FakeStudio()
    m = manager(studio, max_loaded=3, max_loaded_bytes=7_000)

    async def body() -> None:
        await m.detect()
        await m.ensure("a", set)   # 4000
        await m.ensure("b", set)   # 7000: fits
        await m.ensure("c", set)   # 9000: a (oldest) goes
    run(body())
    assert studio.unloads() == ["a"] and set(studio.loaded) == {"b", "c"}


def test_a_failed_load_fails_everyone_waiting_and_is_tried_again_later() -> None:
    studio = FakeStudio(fail={"a"})
    m = manager(studio)
    clock = [0.0]
    m.clock = lambda: clock[0]

    async def body() -> None:
        await m.detect()
        studio.release.clear()
        burst = [asyncio.create_task(m.ensure("a", set)) for _ in range(3)]
        await asyncio.sleep(0)
        studio.release.set()
        results = await asyncio.gather(*burst, return_exceptions=True)
        assert all(isinstance(r, ModelLoadFailed) for r in results)
        assert "Failed to load a" in str(results[0])
        assert not m.loading
        studio.fail.clear()
        with pytest.raises(ModelLoadFailed):  # the next in line gets the same answer at once
            await m.ensure("a", set)
        assert studio.loads() == ["a"]
        clock[0] = 11.0  # a while later the load is tried again
        assert await m.ensure("a", set) is not None
    run(body())
    assert studio.loads() == ["a", "a"]


def test_slots_precedence() -> None:
    studio = FakeStudio()
    m = manager(studio, models=(ModelSpec("b", parallel=3),))
    box = Box("box.test:1234")

    async def body() -> None:
        await m.detect()
        await m.ensure("a", set)
    run(body())
    box.parallel, box.slots = m.slots()
    assert box.slots_for("a") == 4 and box.slots_for("b") == 3 and box.slots_for("c") == 1
    given = manager(studio, parallel=2, models=(ModelSpec("b", parallel=3),))
    given.mode, given.reported_parallel = MANAGED, {"a": 4}
    box.parallel, box.slots = given.slots()
    assert box.slots_for("a") == 2 and box.slots_for("b") == 3
    pinned = BoxModels(m.upstream, UpstreamSpec("x", "http://box.test:1234", parallel=5), m.settings)
    box.parallel, box.slots = pinned.slots()
    assert box.slots_for("a") == box.slots_for("b") == 5


def test_junk_model_names_cannot_fill_memory() -> None:
    """Any name a client sends may fail to load: what is remembered about failures is only
    what is still held back, and nothing is kept for models that are not loaded."""
    studio = FakeStudio(fail={f"junk-{i}" for i in range(300)})
    studio.sizes.update({f"junk-{i}": 1 for i in range(300)})  # listed, and every load fails
    m = manager(studio)
    clock = [0.0]
    m.clock = lambda: clock[0]

    async def body() -> None:
        await m.detect()
        for i in range(300):
            clock[0] = i * 1.0
            with pytest.raises(ModelLoadFailed):
                await m.ensure(f"junk-{i}", set)
    run(body())
    assert len(m.failed) <= 11  # the last 10 s of failures, one a second
    assert not any(name.startswith("junk-") for name in m.last_used)


def test_a_model_the_listing_does_not_name_unloads_nothing() -> None:
    """Regression: a made-up name made room (unloading the model in use), then its load
    failed. Only a model the box lists may be loaded, and so evict another."""
    studio = FakeStudio()
    studio.loaded["a"] = {"parallel": 1}
    m = manager(studio)

    async def body() -> None:
        await m.detect()
        assert m.lists("b") and not m.lists("made-up")
        with pytest.raises(NotFound):
            await m.ensure("made-up", set)
    run(body())
    assert studio.loads() == [] and studio.unloads() == []
    assert m.resident == {"a"}
