"""Managed models (DESIGN.md, section 9), end to end: a real simulator process speaking LM
Studio's REST API v1 and a real lmgate process in front of it, driven by the real ``openai``
SDK and by a raw HTTP client where the bytes of a stream matter.

In managed mode lmgate, not LM Studio's just-in-time loader, decides what is in memory: it
loads a model through ``POST /api/v1/models/load`` when a request's turn comes, keeps at most
``--max-loaded`` models (and ``--max-loaded-bytes`` of them) per box, unloads the least
recently used idle one for another, never cuts a running generation, and tells waiting
streams and ``/queue`` that a load is under way.

The simulator records what it was asked (``/sim/requests``: path, arrival time, ``model`` and
``instance_id`` of each body) and what happened (``/sim/stats``: ``jit_loads``, ``api_loads``,
``unloads``, ``cut_generations``, ``max_loaded_bytes``, the instances with their config, and
every generation with its start and end). Both processes run on one machine, so the
``time.monotonic()`` stamps in those records are comparable.

Whenever something must wait, it waits behind a "holder": a long stream that runs until the
test closes its connection or reads it to the end, so the order of events is decided by the
test, not by timing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.simulator import expected_reply
from tests.e2e.helpers import (
    Raw,
    assert_complete_stream,
    box_name,
    chat_body,
    error_of,
    generations,
    hold,
    nonce,
    queue,
    samples,
    sdk,
    sim_requests,
    sim_stats,
    sse_data,
    started,
    stream_open,
    stream_text,
    wait_idle,
    wait_until,
)
from tests.e2e.plain_box import PlainBox
from tests.servers import Process, running_stack, start_lmgate

M1, M2, M3 = "m1-alpha-7b", "m2-beta-3b", "m3-gamma-1b"
MODELS = f"{M1},{M2},{M3}"
TOKENS_PER_S = 100  # a holder (HOLD_TOKENS) generates for 30 s
LOAD = "/api/v1/models/load"
UNLOAD = "/api/v1/models/unload"
GB = 1_000_000_000

pytestmark = pytest.mark.timeout(60)


# -- processes ---------------------------------------------------------------------------
@contextlib.contextmanager
def managed(tmp: Path, *gate_args: str, sim: tuple[str, ...] = (), load_s: float = 0.2,
            max_concurrent: int = 4, mode: str = "managed") -> Iterator[tuple[Process, Process]]:
    """A simulator serving M1-M3 (nothing loaded unless ``sim`` says so) and lmgate in front
    of it with ``--load-mode mode`` (the flag beats the environment ``start_lmgate`` sets)."""
    with running_stack(tmp, "--load-mode", mode, "--log-level", "warning", *gate_args,
                       tokens_per_s=TOKENS_PER_S, load_s=load_s, max_concurrent=max_concurrent,
                       extra=["--models", MODELS, *sim]) as (simulator, gate):
        yield simulator, gate


# -- requests ----------------------------------------------------------------------------
def complete(client: openai.OpenAI, body: dict[str, Any]) -> tuple[str, str]:
    """One chat completion through the SDK: (X-Queue-Position, assistant text)."""
    raw = client.chat.completions.with_raw_response.create(**body)
    return raw.headers["x-queue-position"], raw.parse().choices[0].message.content or ""


def stream_via_sdk(client: openai.OpenAI, body: dict[str, Any]) -> tuple[str, str]:
    """One streamed chat completion through the SDK, read to the end: (position, text)."""
    raw = client.chat.completions.with_raw_response.create(**body, stream=True)
    text = []
    with raw.parse() as stream:
        for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
    return raw.headers["x-queue-position"], "".join(text)


# -- lmgate's and the simulator's views ----------------------------------------------------
def box_view(gate: Process) -> dict[str, Any]:
    return queue(gate)["upstreams"][0]


def wait_depth(gate: Process, depth: int, timeout: float = 10) -> None:
    wait_until(lambda: queue(gate)["depth"] == depth, timeout, f"{depth} requests waiting",
               interval=0.02)


def calls(sim: Process, path: str) -> list[dict[str, Any]]:
    """The simulator's record of every request to ``path``, in arrival order."""
    return [r for r in sim_requests(sim) if r["path"] == path]


def loaded_instances(sim: Process) -> dict[str, dict[str, Any]]:
    """The simulator's loaded instances by id."""
    return {i["id"]: i for i in sim_stats(sim)["instances"] if i["state"] == "loaded"}


def overlap(gens: list[dict[str, Any]]) -> int:
    """The largest number of these generations that ran at the same moment."""
    edges = sorted([(g["started"], 1) for g in gens] + [(g["ended"], -1) for g in gens],
                   key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


# == 1: alternating models are loaded explicitly, never just in time ======================
@pytest.mark.parametrize(("max_loaded", "loads", "unloads"), [(1, 6, 5), (2, 2, 0)])
def test_alternating_models_are_loaded_through_the_api_never_just_in_time(
        tmp_path: Path, max_loaded: int, loads: int, unloads: int) -> None:
    tag = nonce()
    with managed(tmp_path, "--max-loaded", str(max_loaded), mode="auto") as (sim, gate):
        view = box_view(gate)
        assert view["load_mode"] == "managed", view  # auto, and the box has the REST API v1
        assert view["error"] is None
        bodies = [chat_body(f"turn {i} {tag}", 4, model=M1 if i % 2 == 0 else M2) for i in range(6)]
        with sdk(gate) as client:
            for body in bodies:
                position, text = complete(client, body)
                assert position == "0"
                assert text == expected_reply(body)
        stats = sim_stats(sim)
        assert stats["jit_loads"] == 0, stats
        assert stats["evictions"] == 0
        assert stats["api_loads"] == loads
        assert stats["unloads"] == unloads
        assert stats["cut_generations"] == 0 and stats["killed"] == 0
        # each load was for the model whose turn came, in that order
        expected_loads = [b["model"] for b in bodies][:loads]
        assert [c["model"] for c in calls(sim, LOAD)] == expected_loads
        if max_loaded == 1:  # every switch: the other model out, then this one in
            assert [c["instance_id"] for c in calls(sim, UNLOAD)] == expected_loads[:-1]
            assert set(loaded_instances(sim)) == {M2}
        else:  # both stay resident, side by side
            assert calls(sim, UNLOAD) == []
            assert {i["model"]: i["origin"] for i in loaded_instances(sim).values()} == {
                M1: "api", M2: "api"}
        view = box_view(gate)
        assert view["load_mode"] == "managed"
        assert sorted(view["loaded_models"]) == sorted({M1, M2} if max_loaded == 2 else {M2})


# == 2: a running generation is never cut by a load ========================================
def test_a_running_stream_is_never_cut_the_other_model_loads_after_it_ends(
        tmp_path: Path) -> None:
    tag = nonce()
    with managed(tmp_path, "--max-loaded", "1", sim=("--preload", M1)) as (sim, gate):
        a_body = chat_body(f"long a {tag}", 250, model=M1)  # 2.5 s of generation
        a = stream_open(gate, a_body)
        try:
            assert a.headers["x-queue-position"] == "0"
            assert started(a)
            b_bodies = [chat_body(f"b{i} {tag}", 5, model=M2) for i in range(2)]
            with sdk(gate) as client, ThreadPoolExecutor(2) as pool:
                waiting = [pool.submit(complete, client, b) for b in b_bodies]
                wait_depth(gate, 2)
                # while A runs: nothing unloaded, nothing loaded, B not started
                assert calls(sim, UNLOAD) == [] and calls(sim, LOAD) == []
                assert set(loaded_instances(sim)) == {M1}
                assert [w["model"] for w in queue(gate)["waiting"]] == [M2, M2]
                a.read_all(timeout=20)
                results = [f.result(timeout=30) for f in waiting]
        finally:
            a.close()
        assert_complete_stream(a, a_body)
        for body, (position, text) in zip(b_bodies, results):
            assert position in ("1", "2")
            assert text == expected_reply(body)
        stats = sim_stats(sim)
        assert stats["cut_generations"] == 0 and stats["killed"] == 0, stats
        assert stats["max_concurrent_models"] <= 1
        assert stats["jit_loads"] == 0 and stats["api_loads"] == 1 and stats["unloads"] == 1
        # order on the simulator's clock: A ended, then A unloaded, then B loaded, then B ran
        gens = generations(sim, tag)
        a_gen = [g for g in gens if g["model"] == M1]
        b_gens = [g for g in gens if g["model"] == M2]
        assert len(a_gen) == 1 and a_gen[0]["outcome"] == "ok"
        assert len(b_gens) == 2 and all(g["outcome"] == "ok" for g in b_gens)
        (unload,), (load,) = calls(sim, UNLOAD), calls(sim, LOAD)
        assert unload["instance_id"] == M1 and load["model"] == M2
        assert a_gen[0]["ended"] <= unload["t"] <= load["t"]
        assert all(load["t"] <= g["started"] for g in b_gens)


# == 3: the memory budget holds, and the least recently used model goes first =============
def test_the_memory_budget_holds_and_the_least_recently_used_model_is_unloaded(
        tmp_path: Path) -> None:
    tag = nonce()
    budget = 7 * GB  # any two of the three 3 GB models fit, never all three
    with managed(tmp_path, "--max-loaded", "3", "--max-loaded-bytes", str(budget),
                 sim=("--model-sizes", f"{M1}=3G,{M2}=3G,{M3}=3G")) as (sim, gate):
        # M1 is used again after M2 was loaded: when M3 needs room, M2 (not M1, the first
        # loaded) is the least recently used
        order = [M1, M2, M1, M3, M2, M3, M1]
        bodies = [chat_body(f"rot {i} {tag}", 3, model=m) for i, m in enumerate(order)]
        with sdk(gate) as client:
            for body in bodies:
                position, text = complete(client, body)
                assert text == expected_reply(body)
                stats = sim_stats(sim)
                assert stats["loaded_bytes"] <= budget, stats["instances"]
        stats = sim_stats(sim)
        assert stats["max_loaded_bytes"] <= budget, stats
        assert stats["jit_loads"] == 0 and stats["cut_generations"] == 0
        assert [c["model"] for c in calls(sim, LOAD)] == [M1, M2, M3, M2, M1]
        assert [c["instance_id"] for c in calls(sim, UNLOAD)] == [M2, M1, M2]
        assert set(loaded_instances(sim)) == {M3, M1}
        assert sorted(box_view(gate)["loaded_models"]) == sorted([M1, M3])


# == 4: LM Studio's own parallel is lmgate's slot count unless --parallel is given ========
def test_without_parallel_the_reported_slots_let_same_model_streams_overlap(
        tmp_path: Path) -> None:
    tag = nonce()
    with managed(tmp_path, sim=("--preload", M1), max_concurrent=3) as (sim, gate):
        view = box_view(gate)
        assert view["slots"] == {M1: 3}, view
        bodies = [chat_body(f"par {i} {tag}", 150, model=M1) for i in range(3)]  # 1.5 s each
        conns = [stream_open(gate, b) for b in bodies]
        try:
            assert [c.headers["x-queue-position"] for c in conns] == ["0", "0", "0"]
            assert queue(gate)["active"] == 3
            for conn in conns:
                conn.read_all(timeout=20)
        finally:
            for conn in conns:
                conn.close()
        for conn, body in zip(conns, bodies):
            assert_complete_stream(conn, body)
        assert overlap(generations(sim, tag)) == 3
        assert sim_stats(sim)["max_active"] >= 3


def test_after_its_own_load_lmgate_uses_the_parallel_lm_studio_reports(tmp_path: Path) -> None:
    """The model is not loaded yet: the first request loads it; the slots LM Studio reports
    for the new instance are read before forwarding, so the two requests that arrived with it
    run beside it instead of after it."""
    tag = nonce()
    with managed(tmp_path, sim=("--preload", M1), max_concurrent=3) as (sim, gate):
        assert box_view(gate)["slots"] == {M1: 3}
        bodies = [chat_body(f"fresh {i} {tag}", 200, model=M2) for i in range(3)]  # 2 s each
        conns: list[Raw] = []
        try:
            for body in bodies:
                conns.append(stream_open(gate, body))
            wait_until(lambda: sim_stats(sim)["api_loads"] == 1, 10, "M2 to be loaded")
            # the first stream runs 2 s after the load: time enough for the other two to join
            def joined() -> bool:
                view = box_view(gate)
                return view["running"] == 3 and view["slots"].get(M2) == 3

            wait_until(joined, 1.5, "the three M2 streams to run at once with the 3 slots its "
                       "new instance reports")
            for conn in conns:
                conn.read_all(timeout=20)
        finally:
            for conn in conns:
                conn.close()
        for conn, body in zip(conns, bodies):
            assert_complete_stream(conn, body)
        assert overlap(generations(sim, tag)) == 3
        assert sim_stats(sim)["api_loads"] == 1


def test_with_parallel_1_given_same_model_streams_run_one_at_a_time(tmp_path: Path) -> None:
    tag = nonce()
    with managed(tmp_path, "--parallel", "1", sim=("--preload", M1), max_concurrent=3) as (sim, gate):
        view = box_view(gate)
        assert view["parallel"] == 1 and view["slots"].get(M1, view["parallel"]) == 1, view
        # a holder that ends by itself (2 s), so that the simulator's count of running
        # generations is exact (a holder cut by closing ends there a moment later)
        holder_body = chat_body(f"holder {tag}", 200, model=M1)
        holder = stream_open(gate, holder_body)
        try:
            assert holder.headers["x-queue-position"] == "0" and started(holder)
            bodies = [chat_body(f"one {i} {tag}", 30, model=M1) for i in range(3)]
            with sdk(gate) as client, ThreadPoolExecutor(3) as pool:
                futures = []
                for i, body in enumerate(bodies):  # each behind the holder, in this order
                    futures.append(pool.submit(stream_via_sdk, client, body))
                    wait_depth(gate, i + 1)
                holder.read_all(timeout=20)
                results = [f.result(timeout=30) for f in futures]
        finally:
            holder.close()
        assert_complete_stream(holder, holder_body)
        assert [p for p, _ in results] == ["1", "2", "3"]
        for body, (_, text) in zip(bodies, results):
            assert text == expected_reply(body)
        gens = [g for g in generations(sim, tag) if "holder" not in g["user"]]
        assert len(gens) == 3 and overlap(gens) == 1
        assert sim_stats(sim)["max_active"] == 1


# == 5: a failed load answers everyone who waited for it, and the box stays usable ========
@pytest.mark.parametrize("slots", [("--parallel", "3"), ()], ids=["parallel-3", "default-slots"])
def test_a_failed_load_fails_every_request_that_waited_for_it_and_frees_the_gate(
        tmp_path: Path, slots: tuple[str, ...]) -> None:
    """Three requests wait for M2, whose load fails. With ``--parallel 3`` all three are
    granted together and share one load; with the default slots (M2 was never loaded, so
    LM Studio has not reported its parallel yet) the burst must still cost one load."""
    tag = nonce()
    with managed(tmp_path, *slots, sim=("--preload", M1, "--fail-loads", M2),
                 load_s=0.5) as (sim, gate):
        holder = hold(gate, M1, f"holder {tag}")
        stream = None
        try:
            stream = stream_open(gate, chat_body(f"s {tag}", 5, model=M2))
            assert stream.status == 200 and stream.headers["x-queue-position"] == "1"
            with sdk(gate) as client, ThreadPoolExecutor(2) as pool:
                def plain(i: int) -> tuple[float, openai.APIStatusError | None]:
                    try:
                        client.chat.completions.create(**chat_body(f"p{i} {tag}", 5, model=M2))
                    except openai.APIStatusError as exc:
                        return time.monotonic(), exc
                    return time.monotonic(), None
                futures = [pool.submit(plain, i) for i in range(2)]
                wait_depth(gate, 3)
                released = time.monotonic()
                holder.close()
                assert stream.read_all(timeout=20) is not None
                outcomes = [f.result(timeout=20) for f in futures]
            took = max(t for t, _ in outcomes) - released
        finally:
            holder.close()
            if stream is not None:
                stream.close()
        # the stream answered 200 long ago: the failure comes as its last event
        assert stream.complete, stream.body
        events = [e for e in sse_data(stream.lines()) if isinstance(e, dict)]
        assert len(events) == 1 and "error" in events[0], stream.body
        err = events[0]["error"]
        assert err["code"] == "model_load_failed", err
        assert f'Failed to load model "{M2}"' in err["message"]
        assert stream_text(stream) == ""
        # the plain ones: 502 model_load_failed with LM Studio's message
        for _, exc in outcomes:
            assert exc is not None and exc.status_code == 502
            assert exc.code == "model_load_failed"
            assert f'Failed to load model "{M2}"' in exc.message
        assert took < 10, took
        # one load for the burst, nothing generated for M2
        assert [c["model"] for c in calls(sim, LOAD)] == [M2]
        stats = sim_stats(sim)
        assert stats["failed_loads"] == 1
        assert not [g for g in generations(sim, tag) if g["model"] == M2]
        # the gate is free and the box usable
        wait_idle(gate, timeout=5)
        assert box_view(gate)["loading"] == []
        body = chat_body(f"after {tag}", 4, model=M1)
        with sdk(gate) as client:
            assert complete(client, body)[1] == expected_reply(body)
        assert gate.http.get("/readyz").status_code == 200


# == 6: a load is visible: to the stream waiting for it, on /queue, in the metrics ========
def test_a_load_is_announced_to_the_waiting_stream_shown_on_queue_and_timed(
        tmp_path: Path) -> None:
    tag = nonce()
    with managed(tmp_path, sim=("--preload", M1), load_s=2.0) as (sim, gate):
        holder = hold(gate, M1, f"holder {tag}")
        body = chat_body(f"after load {tag}", 5, model=M2)
        conn = None
        try:
            conn = stream_open(gate, body)
            assert conn.headers["x-queue-position"] == "1"
            wait_depth(gate, 1)
            holder.close()

            def loading() -> dict[str, Any] | None:
                q = queue(gate)
                return next((r for r in q["running"] if r["state"] == "loading"), None)
            shown = wait_until(loading, 5, "a request in state loading on /queue")
            assert shown["model"] == M2 and shown["position"] == 0
            assert box_view(gate)["loading"] == [M2]
            # the stream is told before any content
            assert conn.read_until(lambda b: f": model_loading={M2}".encode() in b, 5), conn.body
            assert b"data:" not in conn.body
            conn.read_all(timeout=20)
        finally:
            holder.close()
            if conn is not None:
                conn.close()
        assert_complete_stream(conn, body)
        lines = conn.lines()
        notice = lines.index(f": model_loading={M2}")
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
        assert notice < first_data
        wait_idle(gate)
        assert not [r for r in queue(gate)["running"] if r["state"] == "loading"]
        counts = {(s.labels["upstream"], s.labels["model"]): s.value
                  for s in samples(gate, "lmgate_model_load_seconds_count")}
        assert counts == {(box_name(sim), M2): 1.0}, counts
        sums = {(s.labels["upstream"], s.labels["model"]): s.value
                for s in samples(gate, "lmgate_model_load_seconds_sum")}
        assert 1.5 <= sums[(box_name(sim), M2)] < 30


# == 7: [[models]]: load fields go to LM Studio, parallel and ttl stay with lmgate ========
def test_models_table_fields_reach_the_load_call_and_parallel_and_ttl_stay_with_lmgate(
        tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f"""
[[models]]
name = "{M1}"
context_length = 8192
flash_attention = false
eval_batch_size = 256
parallel = 2
ttl = 30
""")
    tag = nonce()
    with managed(tmp_path, "--config", str(config), max_concurrent=4) as (sim, gate):
        assert box_view(gate)["slots"] == {M1: 2}
        bodies = [chat_body(f"cfg {i} {tag}", 100, model=M1) for i in range(3)]  # 1 s each
        with sdk(gate) as client, ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda b: complete(client, b), bodies))
        for body, (_, text) in zip(bodies, results):
            assert text == expected_reply(body)
        # the simulator validates the load body against LM Studio's closed schema: a
        # 'parallel' or 'ttl' there would have been refused (400) and the requests failed
        assert [c["model"] for c in calls(sim, LOAD)] == [M1]  # one load for the burst
        (inst,) = loaded_instances(sim).values()
        assert inst["origin"] == "api"
        assert inst["config"]["context_length"] == 8192
        assert inst["config"]["flash_attention"] is False
        assert inst["config"]["eval_batch_size"] == 256
        assert inst["parallel"] == 4  # LM Studio's own, not lmgate's 2
        listed = sim.http.get("/api/v1/models").json()["models"]
        (entry,) = [m for m in listed if m["key"] == M1]
        assert [i["config"]["context_length"] for i in entry["loaded_instances"]] == [8192]
        # lmgate's 2 slots held, though the instance takes 4
        assert overlap(generations(sim, tag)) == 2
        assert sorted(p for p, _ in results) == ["0", "0", "1"]
        assert box_view(gate)["slots"] == {M1: 2}


def test_a_model_with_a_ttl_is_unloaded_after_that_many_idle_seconds(tmp_path: Path) -> None:
    ttl = 1.0
    config = tmp_path / "ttl.toml"
    config.write_text(f'[[models]]\nname = "{M1}"\nttl = {ttl}\n')
    tag = nonce()
    with managed(tmp_path, "--config", str(config), "--probe-interval", "0.2") as (sim, gate):
        # a request that runs longer than the ttl: the idle time starts when it ends
        body = chat_body(f"ttl {tag}", 200, model=M1)  # 2 s of generation
        with sdk(gate) as client:
            assert complete(client, body)[1] == expected_reply(body)
        wait_until(lambda: sim_stats(sim)["unloads"] == 1, 10, "lmgate to unload the idle model")
        (gen,) = generations(sim, tag)
        (unload,) = calls(sim, UNLOAD)
        assert unload["instance_id"] == M1
        assert loaded_instances(sim) == {}
        wait_until(lambda: box_view(gate)["loaded_models"] == [], 5, "/queue to show it unloaded")
        idle = unload["t"] - gen["ended"]
        assert idle >= ttl - 0.1, (
            f"unloaded {idle:.2f} s after its last request ended; the ttl is {ttl} idle seconds")


# == 8: jit mode and plain OpenAI-compatible upstreams ======================================
def test_jit_mode_leaves_loading_to_lm_studio(tmp_path: Path) -> None:
    tag = nonce()
    with managed(tmp_path, mode="jit") as (sim, gate):
        assert box_view(gate)["load_mode"] == "jit"
        with sdk(gate) as client:
            for i, model in enumerate([M1, M2, M1]):
                body = chat_body(f"jit {i} {tag}", 3, model=model)
                assert complete(client, body)[1] == expected_reply(body)
        stats = sim_stats(sim)
        assert stats["jit_loads"] == 3 and stats["api_loads"] == 0, stats
        assert calls(sim, LOAD) == [] and calls(sim, UNLOAD) == []
        assert box_view(gate)["slots"] == {}


def test_managed_mode_in_front_of_a_box_without_the_rest_api_says_why_and_fails_fast(
        tmp_path: Path) -> None:
    plain = PlainBox([M1], content="plain")
    try:
        gate = start_lmgate(tmp_path, plain.url, "--load-mode", "managed", "--log-level", "warning")
        try:
            name = f"127.0.0.1:{plain.port}"
            ready = gate.http.get("/readyz")
            assert ready.status_code == 503, ready.text
            errors = ready.json()["errors"]
            assert list(errors) == [name], errors
            assert "/api/v1/models" in errors[name] and "managed" in errors[name]
            view = box_view(gate)
            assert view["load_mode"] == "error" and view["error"] == errors[name]
            t0 = time.monotonic()
            with sdk(gate) as client, pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(**chat_body("anyone there?", 3, model=M1))
            assert time.monotonic() - t0 < 5
            assert caught.value.status_code == 502
            assert name in caught.value.message and errors[name] in caught.value.message
            resp = gate.http.post("/v1/chat/completions", json=chat_body("again", 3, model=M1))
            assert resp.status_code == 502 and error_of(resp)["type"] == "upstream_error"
            # nothing was forwarded, and no load or unload was tried on the plain box
            assert ("POST", "/v1/chat/completions") not in plain.paths
            assert not [p for _, p in plain.paths if p.startswith(("/api/v1/models/"))]
            wait_idle(gate)
        finally:
            gate.stop()
    finally:
        plain.close()
