"""Several LM Studio boxes behind one lmgate, end to end: real simulator processes (one per
box) and a real lmgate process, driven by the real ``openai`` SDK and by a raw HTTP client
for the bytes of a stream.

What must hold with several boxes (DESIGN.md, section 8): one waiting line, each box with its
own slots and loaded model; a request starts on the first box that can run it now and never
waits behind a request for another box; a model no box lists is refused at once; a box that
refuses connections is skipped (its request rerouted, invisibly) and checked again until it is
back; a box dying mid-stream ends that stream with an SSE error event; a reload adds and
removes boxes without dropping anything; the keys of boxes appear nowhere.

Whenever something must wait, it waits behind a "holder": a long stream that runs until the
test closes its connection, so the order of events is decided by the test, not by timing."""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.simulator import expected_reply
from tests.e2e.helpers import (
    HOLD_TOKENS,
    Raw,
    assert_complete_stream,
    bearer,
    chat_body,
    error_of,
    generations,
    hold,
    nonce,
    queue,
    samples,
    sdk,
    sim_requests,
    sim_reset,
    sim_stats,
    started,
    stream_open,
    wait_idle,
    wait_until,
)
from tests.e2e.helpers import box_name as name_of
from tests.e2e.plain_box import PlainBox
from tests.servers import Process, free_port, stop_all

M1, M2, M3, M4 = "m1-alpha-7b", "m2-shared-8b", "m3-gamma-3b", "m4-nowhere-1b"
TOKENS_PER_S = 100  # a holder (HOLD_TOKENS) generates for 30 s

pytestmark = pytest.mark.timeout(60)


# -- processes ---------------------------------------------------------------------------
def start_box(tmp: Path, models: list[str], *, port: int | None = None,
              loaded: str | None = None) -> Process:
    """One simulated LM Studio box (``port``: the same one again after a restart)."""
    port = port or free_port()
    args = ["-m", "proxy.simulator", "--port", str(port), "--models", ",".join(models),
            "--tokens-per-s", str(TOKENS_PER_S), "--load-time", "0.05", "--max-concurrent", "8"]
    if loaded:
        args += ["--loaded", loaded]
    log = tmp / f"box-{port}-{uuid.uuid4().hex[:6]}.log"
    return Process(args, port, log, "/v1/models")


def start_gate(tmp: Path, *args: str) -> Process:
    """lmgate with exactly ``args`` (no ``--upstream`` added: boxes may come from a file).
    The boxes load models just in time, as LM Studio does by itself (``--load-mode jit``:
    these tests are about the boxes, not about lmgate loading models)."""
    port = free_port()
    return Process(["-m", "proxy", "--port", str(port), *args], port,
                   tmp / f"lmgate-{port}.log", "/healthz", env={"LMGATE_LOAD_MODE": "jit"})


def kill(proc: Process) -> None:
    """SIGKILL, as if the machine behind the box went away; nothing is closed gracefully."""
    proc.proc.kill()
    proc.proc.wait(10)
    proc.stop()  # only closes the log file now


@dataclass
class Stack:
    gate: Process
    boxes: dict[str, Process]  # by box name, in lmgate's order


@contextlib.contextmanager
def stopping(*procs: Process) -> Iterator[list[Process]]:
    """Stop every process in the list at the end, whatever happened."""
    out = list(procs)
    try:
        yield out
    finally:
        stop_all(reversed(out))


# -- requests ----------------------------------------------------------------------------
def complete(client: openai.OpenAI, body: dict[str, Any]) -> tuple[str, str]:
    """One chat completion through the SDK: (box it ran on, assistant text)."""
    raw = client.chat.completions.with_raw_response.create(**body)
    reply = raw.parse()
    return raw.headers["x-upstream"], reply.choices[0].message.content or ""


def stream_via_sdk(client: openai.OpenAI, body: dict[str, Any]) -> tuple[str, str]:
    """One streamed chat completion through the SDK, read to the end: (box, text)."""
    raw = client.chat.completions.with_raw_response.create(**body, stream=True)
    text = []
    with raw.parse() as stream:
        for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
    return raw.headers["x-upstream"], "".join(text)


def comments(conn: Raw) -> list[str]:
    return [line for line in conn.lines() if line.startswith(":")]


# -- lmgate's views ----------------------------------------------------------------------
def boxes(gate: Process, headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in queue(gate, headers)["upstreams"]}


def wait_box_up(gate: Process, name: str, up: bool, headers: dict[str, str] | None = None,
                timeout: float = 20) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        view = boxes(gate, headers).get(name)
        return view if view is not None and view["up"] is up else None
    return wait_until(check, timeout, f"box {name} up={up}", interval=0.05)


def chat_posts(sim: Process) -> list[dict[str, Any]]:
    """Every chat completion request the simulator received."""
    return [r for r in sim_requests(sim) if r["path"].endswith("/chat/completions")]


# == 1-3, 6: two boxes with different catalogs ===========================================
# A lists m1 and m2, B lists m2 and m3: m2 can run on either, m1 only on A, m3 only on B.
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("two-boxes")
    with stopping() as procs:
        a = start_box(tmp, [M1, M2], loaded=M1)
        procs.append(a)
        b = start_box(tmp, [M2, M3], loaded=M3)
        procs.append(b)
        gate = start_gate(tmp, "--upstream", a.url, "--upstream", b.url, "--parallel", "1",
                          "--log-level", "warning")
        procs.append(gate)
        stack = Stack(gate, {name_of(a): a, name_of(b): b})
        # both boxes checked and their catalogs read (lmgate does that at start)
        wait_until(lambda: all(v["up"] and v["catalog"] == 2 for v in boxes(gate).values()),
                   10, "both boxes up with their catalogs")
        yield stack


@pytest.fixture()
def two(pair: Stack) -> Stack:
    wait_idle(pair.gate)
    return pair


def test_two_boxes_run_two_streams_at_once_and_a_third_waits_for_the_first_free(two: Stack) -> None:
    gate, tag = two.gate, nonce()
    a_name, b_name = list(two.boxes)
    first = hold(gate, M2, f"first {tag}")
    second = hold(gate, M2, f"second {tag}")
    third = None
    try:
        # one on each box, both running now
        assert {first.headers["x-upstream"], second.headers["x-upstream"]} == {a_name, b_name}
        for name, sim in two.boxes.items():
            gens = generations(sim, tag)
            assert len(gens) == 1 and gens[0]["ended"] is None, (name, gens)
            assert gens[0]["user"].startswith("first" if name == first.headers["x-upstream"]
                                               else "second")
        views = boxes(gate)
        assert {n: v["running"] for n, v in views.items()} == {a_name: 1, b_name: 1}
        assert all(v["parallel"] == 1 and v["up"] and not v["removed"] for v in views.values())
        assert all(v["loaded_models"] == [M2] for v in views.values()), views
        q = queue(gate)
        assert q["active"] == 2 and q["parallel"] == 2
        assert sorted(r["upstream"] for r in q["running"]) == sorted([a_name, b_name])

        # a third has to wait: both boxes are full
        body = chat_body(f"third {tag}", 5, model=M2)
        third = stream_open(gate, body)
        assert third.status == 200
        assert third.headers["x-queue-position"] == "1"
        assert "x-upstream" not in third.headers  # no box chosen yet
        wait_until(lambda: queue(gate)["depth"] == 1, 5, "the third to wait")

        # the box of the first frees up: the third runs there
        freed = first.headers["x-upstream"]
        first.close()
        third.read_all()
        assert third.complete, third.body
        notes = comments(third)
        at = notes.index(": queue_position=0")
        assert notes[at - 1] == f": upstream={freed}", notes
        assert_complete_stream(third, body)
        ran = [g for g in generations(two.boxes[freed], tag) if g["user"].startswith("third")]
        assert len(ran) == 1 and ran[0]["outcome"] == "ok"
        other = b_name if freed == a_name else a_name
        assert not [g for g in generations(two.boxes[other], tag) if g["user"].startswith("third")]
    finally:
        for conn in (first, second, third):
            if conn is not None:
                conn.close()


def test_a_burst_of_mixed_models_never_runs_two_models_on_one_box(two: Stack) -> None:
    gate, tag = two.gate, nonce()
    a_name, b_name = list(two.boxes)
    a, b = two.boxes[a_name], two.boxes[b_name]
    models = [M1, M2, M3, M2, M3, M1, M1, M3, M2, M2, M1, M3]
    bodies = [chat_body(f"burst {i} {tag}", 4 + i % 3, model=m) for i, m in enumerate(models)]
    with sdk(gate) as client, ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda body: complete(client, body), bodies))
    for body, (box, text) in zip(bodies, results):
        assert text == expected_reply(body)
        if body["model"] == M1:
            assert box == a_name
        if body["model"] == M3:
            assert box == b_name
    # the simulators: nothing killed by a model swap, and no two models ever overlapped
    for name, sim in two.boxes.items():
        stats = sim_stats(sim)
        assert stats["killed"] == 0 and stats["errors"] == 0, (name, stats)
        gens = sorted(generations(sim, tag), key=lambda g: g["started"])
        assert all(g["outcome"] == "ok" for g in gens), gens
        for i, g in enumerate(gens):
            for h in gens[i + 1:]:
                if h["model"] != g["model"]:
                    assert g["ended"] <= h["started"], (name, g, h)
    served_a = {g["model"] for g in generations(a, tag)}
    served_b = {g["model"] for g in generations(b, tag)}
    assert M1 in served_a and M3 not in served_a
    assert M3 in served_b and M1 not in served_b
    assert len(generations(a, tag)) + len(generations(b, tag)) == len(bodies)


def test_a_model_no_box_lists_is_refused_at_once_even_with_every_box_busy(two: Stack) -> None:
    gate, tag = two.gate, nonce()
    a_name, b_name = list(two.boxes)
    before = {n: len(chat_posts(s)) for n, s in two.boxes.items()}
    with contextlib.ExitStack() as held:
        on_a = held.enter_context(contextlib.closing(hold(gate, M1, f"busy a {tag}")))
        on_b = held.enter_context(contextlib.closing(hold(gate, M3, f"busy b {tag}")))
        assert (on_a.headers["x-upstream"], on_b.headers["x-upstream"]) == (a_name, b_name)
        with sdk(gate) as client, pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(**chat_body(f"nowhere {tag}", 3, model=M4))
        assert caught.value.code == "model_not_found"
        assert M4 in caught.value.message
        # and as plain HTTP: OpenAI-shaped, never queued
        resp = gate.http.post("/v1/chat/completions", json=chat_body("again", 3, model=M4),
                          timeout=10)
        assert resp.status_code == 404
        assert error_of(resp)["code"] == "model_not_found"
        q = queue(gate)
        assert q["depth"] == 0 and q["active"] == 2  # refused while both boxes were still busy
    after = {n: chat_posts(s) for n, s in two.boxes.items()}
    for name, posts in after.items():
        assert not [p for p in posts if p.get("model") == M4], name
        assert len(posts) == before[name] + 1  # only its holder


def test_a_request_for_another_box_does_not_wait_behind_a_busy_one(two: Stack) -> None:
    gate, tag = two.gate, nonce()
    a_name, b_name = list(two.boxes)
    held = hold(gate, M1, f"long on a {tag}")
    waiting = None
    try:
        assert held.headers["x-upstream"] == a_name
        m1_body = chat_body(f"waits for a {tag}", 4, model=M1)
        waiting = stream_open(gate, m1_body)
        assert waiting.headers["x-queue-position"] == "1"
        wait_until(lambda: queue(gate)["depth"] == 1, 5, "the m1 request to wait")

        # m3: only B lists it, B is idle: it starts at once, past the waiting m1
        m3_body = chat_body(f"straight to b {tag}", 4, model=M3)
        with sdk(gate) as client:
            raw = client.chat.completions.with_raw_response.create(**m3_body)
        assert raw.headers["x-queue-position"] == "0"
        assert raw.headers["x-upstream"] == b_name
        assert raw.parse().choices[0].message.content == expected_reply(m3_body)
        # the m1 request still waits for A: B does not list m1
        q = queue(gate)
        assert q["depth"] == 1 and q["waiting"][0]["model"] == M1
        assert not [g for g in generations(two.boxes[b_name], tag) if g["model"] == M1]

        held.close()
        waiting.read_all()
        assert f": upstream={a_name}" in comments(waiting)
        assert_complete_stream(waiting, m1_body)
    finally:
        held.close()
        if waiting is not None:
            waiting.close()


def test_metrics_show_every_box_and_the_boxes_requests_ran_on(two: Stack) -> None:
    gate, tag = two.gate, nonce()
    used = set()
    with sdk(gate) as client:
        for model in (M1, M3, M2):
            box, _ = complete(client, chat_body(f"metered {tag}", 3, model=model))
            used.add(box)
    assert used == set(two.boxes)
    up = {s.labels["upstream"]: s.value for s in samples(gate, "lmgate_upstream_up")}
    assert up == {name: 1.0 for name in two.boxes}
    parallel = {s.labels["upstream"]: s.value for s in samples(gate, "lmgate_parallel")}
    assert parallel == {name: 1.0 for name in two.boxes}
    totals = samples(gate, "lmgate_requests_total")
    labelled = {s.labels["upstream"] for s in totals if s.labels["outcome"] == "ok" and s.value > 0}
    assert labelled == used
    # refusals (the 404s above) ran on no box
    assert {s.labels["upstream"] for s in totals} <= used | {"none"}
    a_name, b_name = list(two.boxes)
    for model, box in ((M1, a_name), (M3, b_name)):
        ok = [s for s in totals if s.labels["model"] == model and s.labels["upstream"] == box
              and s.labels["outcome"] == "ok"]
        assert ok and ok[0].value >= 1, (model, box, totals)
    assert {s.labels["upstream"] for s in samples(gate, "lmgate_requests_active")} >= used
    assert {s.labels["upstream"] for s in samples(gate, "lmgate_model_switches_total")} == used


# == 4: a box killed =====================================================================
def test_a_killed_box_is_skipped_invisibly_and_comes_back_when_restarted(
        tmp_path: Path) -> None:
    with stopping() as procs:
        sims = [start_box(tmp_path, [M2], loaded=M2) for _ in range(3)]
        procs.extend(sims)
        args = [a for s in sims for a in ("--upstream", s.url)]
        # a long check interval: the first refused request is what tells lmgate
        gate = start_gate(tmp_path, *args, "--parallel", "1", "--probe-interval", "30",
                          "--log-level", "info")
        procs.append(gate)
        a, b, c = (name_of(s) for s in sims)
        wait_until(lambda: all(v["up"] for v in boxes(gate).values()), 10, "three boxes up")
        tag = nonce()
        with sdk(gate) as client:
            box, _ = complete(client, chat_body(f"warm {tag}", 3, model=M2))
            assert box == a  # the first box with the model loaded

            kill(sims[0])
            # the next request goes to A, is refused, and runs elsewhere: the client sees a
            # normal stream
            body = chat_body(f"rerouted stream {tag}", 6, model=M2)
            box, text = stream_via_sdk(client, body)
            assert box in (b, c) and text == expected_reply(body)
            view = boxes(gate)[a]
            assert view["up"] is False and view["running"] == 0
            assert {v["name"] for v in boxes(gate).values() if v["up"]} == {b, c}
            down = {s.labels["upstream"]: s.value for s in samples(gate, "lmgate_upstream_up")}
            assert down == {a: 0.0, b: 1.0, c: 1.0}
            ready = gate.http.get("/readyz").json()
            assert ready["upstreams"] == {a: False, b: True, c: True}

            # more requests, some at once: all served by the two others
            bodies = [chat_body(f"after the kill {i} {tag}", 3 + i, model=M2) for i in range(6)]
            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(lambda bd: complete(client, bd), bodies))
            for bd, (box, text) in zip(bodies, results):
                assert box in (b, c) and text == expected_reply(bd)

            # the box comes back on the same port: lmgate notices and uses it again
            revived = start_box(tmp_path, [M2], port=sims[0].port, loaded=M2)
            procs.append(revived)
            wait_box_up(gate, a, True, timeout=20)
            wait_idle(gate)
            box, text = complete(client, chat_body(f"back {tag}", 3, model=M2))
            assert box == a and text == expected_reply(chat_body(f"back {tag}", 3, model=M2))
            assert {s.labels["upstream"]: s.value
                    for s in samples(gate, "lmgate_upstream_up")} == {a: 1.0, b: 1.0, c: 1.0}
        log = gate.output()
        assert f"{a} is back up" in log, log[-3000:]
        assert "Traceback" not in log


def test_a_box_dying_mid_stream_ends_that_stream_with_an_error_event(tmp_path: Path) -> None:
    with stopping() as procs:
        sims = [start_box(tmp_path, [M2], loaded=M2) for _ in range(2)]
        procs.extend(sims)
        gate = start_gate(tmp_path, "--upstream", sims[0].url, "--upstream", sims[1].url,
                          "--parallel", "1", "--log-level", "warning")
        procs.append(gate)
        by_name = {name_of(s): s for s in sims}
        wait_until(lambda: all(v["up"] for v in boxes(gate).values()), 10, "both boxes up")
        tag = nonce()
        with sdk(gate) as client:
            raw = client.chat.completions.with_raw_response.create(
                **chat_body(f"doomed {tag}", HOLD_TOKENS, model=M2), stream=True)
            doomed_box = raw.headers["x-upstream"]
            with raw.parse() as doomed:
                chunks = iter(doomed)
                next(chunks)  # it runs
                survivor_body = chat_body(f"survivor {tag}", 150, model=M2)
                with contextlib.closing(stream_open(gate, survivor_body)) as survivor:
                    assert survivor.headers["x-queue-position"] == "0"
                    survivor_box = survivor.headers["x-upstream"]
                    assert {doomed_box, survivor_box} == set(by_name)
                    assert started(survivor)

                    kill(by_name[doomed_box])
                    with pytest.raises(openai.APIError) as caught:
                        for _ in range(HOLD_TOKENS + 10):
                            next(chunks)
                    assert "upstream" in caught.value.message.lower(), caught.value.message

                    survivor.read_all(timeout=20)
                    assert survivor.complete
                    assert_complete_stream(survivor, survivor_body)
        # the dead box is marked down; the other one still serves
        wait_box_up(gate, doomed_box, False, timeout=10)
        with sdk(gate) as client:
            box, _ = complete(client, chat_body(f"after {tag}", 3, model=M2))
        assert box == survivor_box


# == 5: reloading the configuration under load ===========================================
KEYS = {"admin": "sk-admin-boxes-0001", "user": "sk-user-boxes-0002"}
KEYS_TOML = f"""
[[keys]]
name = "admin"
key = "{KEYS['admin']}"
role = "admin"

[[keys]]
name = "user"
key = "{KEYS['user']}"
"""


def boxes_toml(*entries: tuple[str, Process, int]) -> str:
    """``[[upstreams]]`` tables: (name, simulator, parallel)."""
    return "".join(f'\n[[upstreams]]\nname = "{name}"\nurl = "{sim.url}"\nparallel = {parallel}\n'
                   for name, sim, parallel in entries)


def reload(gate: Process, who: str = "admin") -> httpx.Response:
    return gate.http.post("/admin/reload", headers=bearer(KEYS[who]))


def refusals_logged(gate: Process) -> int:
    return gate.output().count("reload refused")


def test_reload_adds_and_removes_boxes_under_load_and_refuses_a_broken_file(
        tmp_path: Path) -> None:
    config = tmp_path / "lmgate.toml"
    with stopping() as procs:
        alpha = start_box(tmp_path, [M2], loaded=M2)
        procs.append(alpha)
        beta = start_box(tmp_path, [M2], loaded=M2)
        procs.append(beta)
        config.write_text(KEYS_TOML + boxes_toml(("alpha", alpha, 2)))
        gate = start_gate(tmp_path, "--config", str(config), "--parallel", "1",
                          "--log-level", "info")
        procs.append(gate)
        admin, tag = bearer(KEYS["admin"]), nonce()
        wait_until(lambda: boxes(gate, admin).get("alpha", {}).get("up"), 10, "alpha up")
        assert list(boxes(gate, admin)) == ["alpha"]
        user = sdk(gate, KEYS["user"])
        with user, contextlib.ExitStack() as held, ThreadPoolExecutor(4) as pool:
            # alpha is full (two holders); two more wait: a stream and a plain request
            h1 = held.enter_context(contextlib.closing(hold(gate, M2, f"h1 {tag}", bearer(KEYS["user"]))))
            h2 = held.enter_context(contextlib.closing(hold(gate, M2, f"h2 {tag}", bearer(KEYS["user"]))))
            assert h1.headers["x-upstream"] == h2.headers["x-upstream"] == "alpha"
            w_stream_body = chat_body(f"waiting stream {tag}", 5, model=M2)
            w_stream = held.enter_context(contextlib.closing(
                stream_open(gate, w_stream_body, headers=bearer(KEYS["user"]))))
            assert w_stream.headers["x-queue-position"] == "1"
            w_plain_body = chat_body(f"waiting plain {tag}", 5, model=M2)
            w_plain = pool.submit(complete, user, w_plain_body)
            wait_until(lambda: queue(gate, admin)["depth"] == 2, 5, "two requests waiting")

            # a second box in the file; reloaded while alpha is busy and two wait
            config.write_text(KEYS_TOML + boxes_toml(("alpha", alpha, 2), ("beta", beta, 1)))
            assert reload(gate, "user").status_code == 403  # admins only
            resp = reload(gate)
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            assert answer["reloaded"] is True and answer["keys"] == 2
            assert answer["upstreams"] == ["alpha", "beta"]
            assert answer["added"] == ["beta"] and answer["removing"] == []
            assert answer["restart_needed"] == []

            # both waiting requests run on the new box, one after the other
            box, text = w_plain.result(timeout=20)
            assert (box, text) == ("beta", expected_reply(w_plain_body))
            w_stream.read_all(timeout=20)
            assert ": upstream=beta" in comments(w_stream)
            assert_complete_stream(w_stream, w_stream_body)
            ran = {g["user"] for g in generations(beta, tag)}
            assert ran == {f"waiting stream {tag}", f"waiting plain {tag}"}
            views = boxes(gate, admin)
            assert views["alpha"]["running"] == 2 and views["beta"]["up"] is True
            assert views["alpha"]["parallel"] == 2 and views["beta"]["parallel"] == 1
        wait_idle(gate, admin)

        # alpha leaves while a stream runs on it: that stream ends normally, new requests
        # go to beta (alpha still has a free slot, and would otherwise be the first choice)
        body = chat_body(f"last on alpha {tag}", 250, model=M2)  # 2.5 s of generation
        with contextlib.closing(stream_open(gate, body, headers=bearer(KEYS["user"]))) as last:
            assert last.headers["x-upstream"] == "alpha" and started(last)
            config.write_text(KEYS_TOML + boxes_toml(("beta", beta, 1)))
            gate.signal(signal.SIGHUP)
            wait_until(lambda: boxes(gate, admin)["alpha"]["removed"], 10, "alpha to be removed")
            with sdk(gate, KEYS["user"]) as client:
                box, text = complete(client, chat_body(f"new one {tag}", 3, model=M2))
            assert box == "beta"
            assert boxes(gate, admin)["alpha"]["running"] == 1  # still streaming from alpha
            last.read_all(timeout=20)
            assert_complete_stream(last, body)
        wait_until(lambda: list(boxes(gate, admin)) == ["beta"], 10, "alpha to leave /queue")
        assert [g["outcome"] for g in generations(alpha, f"last on alpha {tag}")] == ["ok"]

        # a broken file: refused, one log line, everything as it was
        config.write_text(KEYS_TOML + '\n[[upstreams]\nname = "broken"\n')
        before = boxes(gate, admin)
        logged = refusals_logged(gate)
        resp = reload(gate)
        assert resp.status_code == 400
        assert error_of(resp)["code"] == "invalid_config"
        assert boxes(gate, admin) == before
        wait_until(lambda: refusals_logged(gate) == logged + 1, 5, "the refusal logged")
        gate.signal(signal.SIGHUP)
        wait_until(lambda: refusals_logged(gate) == logged + 2, 5, "the SIGHUP refusal logged")
        assert gate.proc.poll() is None
        assert gate.http.get("/healthz").status_code == 200
        assert boxes(gate, admin) == before
        with sdk(gate, KEYS["user"]) as client:
            body = chat_body(f"still fine {tag}", 3, model=M2)
            assert complete(client, body) == ("beta", expected_reply(body))
        log = gate.output()
        refusals = [line for line in log.splitlines() if "reload refused" in line]
        assert len(refusals) == 2 and all("not valid TOML" in line for line in refusals), refusals
        assert "Traceback" not in log
        assert refusals_logged(gate) == logged + 2  # one line each, not more


# == 7: the keys of boxes never leak =====================================================
def test_the_keys_of_boxes_appear_nowhere(tmp_path: Path) -> None:
    vault_key = "box-secret-" + uuid.uuid4().hex
    rec_key = "box-secret-" + uuid.uuid4().hex
    url_secret = "url-secret-" + uuid.uuid4().hex
    secrets = (vault_key, rec_key, url_secret)
    with contextlib.ExitStack() as stack:
        keyed = PlainBox([M3])
        stack.callback(keyed.close)
        basic = PlainBox([M4])
        stack.callback(basic.close)
        procs = stack.enter_context(stopping())
        vault = start_box(tmp_path, [M1], loaded=M1)
        procs.append(vault)
        sim_reset(vault)  # the start-up polls
        config = tmp_path / "lmgate.toml"
        config.write_text(KEYS_TOML + f"""
[[upstreams]]
name = "vault"
url = "{vault.url}"
key = "{vault_key}"

[[upstreams]]
name = "keyed"
url = "http://127.0.0.1:{keyed.port}"
key = "{rec_key}"

[[upstreams]]
name = "basic"
url = "http://boxuser:{url_secret}@127.0.0.1:{basic.port}"
""")
        gate = start_gate(tmp_path, "--config", str(config), "--log-level", "debug")
        procs.append(gate)  # stopped before the recording boxes close
        admin = bearer(KEYS["admin"])
        wait_until(lambda: all(v["up"] and v["catalog"] == 1
                               for v in boxes(gate, admin).values()), 10, "three boxes up")
        tag = nonce()
        with sdk(gate, KEYS["user"]) as client:
            body = chat_body(f"to the vault {tag}", 3, model=M1)
            assert complete(client, body) == ("vault", expected_reply(body))
            assert complete(client, chat_body("to the keyed box", 3, model=M3)) == ("keyed", "recorded")
            assert complete(client, chat_body("to the basic box", 3, model=M4)) == ("basic", "recorded")
            with pytest.raises(openai.NotFoundError):  # a refusal names no box's secret
                client.chat.completions.create(**chat_body("x", 3, model="m9-none"))

        # each box got its own credentials, on every request (checks and listings included),
        # and never the client's key
        posts = sim_requests(vault)
        assert ("POST", "/v1/chat/completions") in {(r["method"], r["path"]) for r in posts}
        assert posts and all(r["auth"] for r in posts), [(r["method"], r["path"], r["auth"]) for r in posts]
        assert keyed.seen and {a for _, _, a in keyed.seen} == {f"Bearer {rec_key}"}, keyed.seen
        assert ("POST", "/v1/chat/completions", f"Bearer {rec_key}") in keyed.seen
        assert basic.seen and all(a and a.startswith("Basic ") for _, _, a in basic.seen)
        assert ("POST", "/v1/chat/completions") in {(m, p) for m, p, _ in basic.seen}

        # the secrets appear nowhere lmgate shows anything
        views = {
            "/queue (admin)": gate.http.get("/queue", headers=admin),
            "/queue (user)": gate.http.get("/queue", headers=bearer(KEYS["user"])),
            "/queue (anonymous)": gate.http.get("/queue"),
            "/queue/history": gate.http.get("/queue/history"),
            "/metrics": gate.http.get("/metrics"),
            "/readyz": gate.http.get("/readyz"),
            "/healthz": gate.http.get("/healthz"),
            "/usage (admin)": gate.http.get("/usage", headers=admin),
            "status page": gate.http.get("/", headers={"accept": "text/html"}),
            "root document": gate.http.get("/"),
        }
        reloaded = gate.http.post("/admin/reload", headers=admin)
        assert reloaded.status_code == 200
        views["/admin/reload"] = reloaded
        for where, resp in views.items():
            assert resp.status_code < 500, (where, resp.text)
            text = resp.text + "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
            for secret in secrets:
                assert secret not in text, (where, secret)
        shown = {v["name"]: v["url"] for v in boxes(gate, admin).values()}
        assert shown["basic"] == f"http://127.0.0.1:{basic.port}"  # without its credentials
        assert "boxuser" not in views["/queue (admin)"].text
        procs.remove(gate)
        gate.stop()  # everything it logs, until its last line
        log = gate.log_path.read_text(errors="replace")
        assert "vault" in log and "keyed" in log  # the log did speak about the boxes
        for secret in secrets:
            assert secret not in log, secret


# == a box whose catalog lmgate has not read yet ==========================================
# A box joins (added by a reload, or back after being down since lmgate started) before
# lmgate knows what it lists. Until then it must not be given a request for a model that
# another box serves: the request would fail there with LM Studio's 404.
def assert_waits_for_its_own_box(gate: Process, pending: Any, headers: dict[str, str] | None,
                                 newcomer: Process, newcomer_name: str) -> None:
    """``pending`` (a future of ``complete``) asks for M1, which only the busy box lists: it
    is still waiting now that ``newcomer`` (listing only M3) is up and has been checked."""
    wait_until(lambda: pending.done() or boxes(gate, headers)[newcomer_name]["catalog"] == 1,
               10, f"{newcomer_name}'s catalog to be read")
    got = [p.get("model") for p in chat_posts(newcomer)]
    assert M1 not in got, (f"the waiting {M1} request was sent to {newcomer_name}, which lists "
                           f"only {M3}, before its catalog was read", got)
    assert not pending.done(), pending.exception() if pending.done() else None
    assert queue(gate, headers)["depth"] == 1


def test_a_box_added_by_reload_gets_no_request_for_a_model_it_does_not_list(
        tmp_path: Path) -> None:
    config = tmp_path / "lmgate.toml"
    with stopping() as procs:
        alpha = start_box(tmp_path, [M1], loaded=M1)
        procs.append(alpha)
        beta = start_box(tmp_path, [M3], loaded=M3)
        procs.append(beta)
        config.write_text(KEYS_TOML + boxes_toml(("alpha", alpha, 1)))
        gate = start_gate(tmp_path, "--config", str(config), "--log-level", "warning")
        procs.append(gate)
        admin, tag = bearer(KEYS["admin"]), nonce()
        wait_until(lambda: boxes(gate, admin)["alpha"]["up"], 10, "alpha up")
        with sdk(gate, KEYS["user"]) as user, ThreadPoolExecutor(1) as pool, \
                contextlib.closing(hold(gate, M1, f"busy {tag}", bearer(KEYS["user"]))) as held:
            body = chat_body(f"waits for alpha {tag}", 3, model=M1)
            pending = pool.submit(complete, user, body)
            wait_until(lambda: queue(gate, admin)["depth"] == 1, 5, "the m1 request to wait")
            config.write_text(KEYS_TOML + boxes_toml(("alpha", alpha, 1), ("beta", beta, 1)))
            resp = reload(gate)
            assert resp.status_code == 200 and resp.json()["added"] == ["beta"], resp.text
            wait_box_up(gate, "beta", True, admin, timeout=10)
            try:
                assert_waits_for_its_own_box(gate, pending, admin, beta, "beta")
            finally:
                held.close()
            assert pending.result(timeout=20) == ("alpha", expected_reply(body))


def test_a_box_down_since_the_start_gets_no_request_for_a_model_it_does_not_list(
        tmp_path: Path) -> None:
    late_port = free_port()
    late_url = f"http://127.0.0.1:{late_port}"
    with stopping() as procs:
        alpha = start_box(tmp_path, [M1], loaded=M1)
        procs.append(alpha)
        gate = start_gate(tmp_path, "--upstream", alpha.url, "--upstream", late_url,
                          "--parallel", "1", "--probe-interval", "0.5", "--log-level", "warning")
        procs.append(gate)
        late_name, tag = f"127.0.0.1:{late_port}", nonce()
        wait_until(lambda: boxes(gate)[name_of(alpha)]["up"], 10, "alpha up")
        assert boxes(gate)[late_name]["up"] is False
        with sdk(gate) as client, ThreadPoolExecutor(1) as pool, \
                contextlib.closing(hold(gate, M1, f"busy {tag}")) as held:
            body = chat_body(f"waits for alpha {tag}", 3, model=M1)
            pending = pool.submit(complete, client, body)
            wait_until(lambda: queue(gate)["depth"] == 1, 5, "the m1 request to wait")
            late = start_box(tmp_path, [M3], port=late_port, loaded=M3)  # the box is switched on
            procs.append(late)
            wait_box_up(gate, late_name, True, timeout=15)
            try:
                assert_waits_for_its_own_box(gate, pending, None, late, late_name)
            finally:
                held.close()
            assert pending.result(timeout=20) == (name_of(alpha), expected_reply(body))


# == a box going down is logged ===========================================================
def test_a_box_that_stops_answering_is_logged(tmp_path: Path) -> None:
    """The operator reads in the log that a box went down (a refused request, a stream cut
    off), not only that it is "back up" later."""
    with stopping() as procs:
        sims = [start_box(tmp_path, [M2], loaded=M2) for _ in range(2)]
        procs.extend(sims)
        gate = start_gate(tmp_path, "--upstream", sims[0].url, "--upstream", sims[1].url,
                          "--parallel", "1", "--probe-interval", "30", "--log-level", "info")
        procs.append(gate)
        a = name_of(sims[0])
        wait_until(lambda: all(v["up"] for v in boxes(gate).values()), 10, "both boxes up")

        def down_lines() -> list[str]:
            return [line for line in gate.output().splitlines()
                    if a in line and "not answering" in line]

        missing = []
        with sdk(gate) as client:
            kill(sims[0])
            body = chat_body("rerouted", 3, model=M2)
            assert complete(client, body) == (name_of(sims[1]), expected_reply(body))
            assert boxes(gate)[a]["up"] is False
            with contextlib.suppress(AssertionError):
                wait_until(down_lines, 3, "a log line saying the box is down")
            if not down_lines():
                missing.append("refused request")

            revived = start_box(tmp_path, [M2], port=sims[0].port, loaded=M2)
            procs.append(revived)
            wait_box_up(gate, a, True, timeout=20)
            wait_until(lambda: f"{a} is back up" in gate.output(), 5, "'back up' logged")
            seen = len(down_lines())
            wait_idle(gate)
            with contextlib.closing(hold(gate, M2, "cut off")) as conn:
                assert conn.headers["x-upstream"] == a
                kill(revived)
                conn.read_all(timeout=10)
                assert b'data: {"error"' in conn.body
            wait_box_up(gate, a, False, timeout=10)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: len(down_lines()) > seen, 3, "a log line saying it is down")
            if len(down_lines()) <= seen:
                missing.append("stream cut off")
        assert not missing, (f"box {a} went down ({', '.join(missing)}) and lmgate logged "
                             f"nothing about it:\n" + gate.output()[-2000:])


def test_model_listings_show_every_boxs_models(two: Stack) -> None:
    """A chat UI asks /v1/models once: it must offer every model any box serves, once each."""
    with sdk(two.gate) as client:
        ids = [m.id for m in client.models.list()]
    assert sorted(ids) == sorted({M1, M2, M3}) and len(ids) == len(set(ids))
    v1 = two.gate.http.get("/api/v1/models").json()
    assert sorted(m["key"] for m in v1["models"]) == sorted({M1, M2, M3})
