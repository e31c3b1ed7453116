"""Key priorities (with aging) and token quotas (kept in SQLite across restarts), end to end:
real lmgate processes in front of the real simulator, SIGTERM and restart included.

The simulator's usage is exact and known in advance: prompt tokens are the words of the
messages, completion tokens are ``max_tokens`` (the reply is padded up to it), so
``total_tokens = words + max_tokens``.

When something must wait, it waits behind a "holder": a long stream of another key that
runs until the test closes its connection, so the order of events is decided by the test,
not by timing."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
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
    generations,
    nonce,
    read_stream,
    samples,
    sdk,
    stream_open,
    stream_text,
    wait_idle,
    wait_until,
)
from tests.servers import ROOT, Process, free_port, start_lmgate, start_simulator

TOKENS_PER_S = 200
HOLD_TOKENS = 4000  # 20 s of generation: far longer than any test keeps a holder open
KEYS = {
    "holder": "sk-holder-pq-0001",
    "low": "sk-low-pq-0002",
    "vip": "sk-vip-pq-0003",
    "admin": "sk-admin-pq-0004",
    "metered": "sk-metered-pq-0005",
    "monthly": "sk-monthly-pq-0006",
    "spare": "sk-spare-pq-0007",
    "racer": "sk-racer-pq-0008",
    "streamer": "sk-streamer-pq-0009",
}
METERED_PER_DAY = 60
MONTHLY_LIMIT = 20
RACER_PER_DAY = 100
KEYS_TOML = f"""
[[keys]]
name = "holder"
key = "{KEYS['holder']}"

[[keys]]
name = "low"
key = "{KEYS['low']}"

[[keys]]
name = "vip"
key = "{KEYS['vip']}"
priority = 5

[[keys]]
name = "admin"
key = "{KEYS['admin']}"
role = "admin"

[[keys]]
name = "metered"
key = "{KEYS['metered']}"
tokens_per_day = {METERED_PER_DAY}
tokens_per_month = 100000

[[keys]]
name = "monthly"
key = "{KEYS['monthly']}"
tokens_per_day = {MONTHLY_LIMIT}
tokens_per_month = {MONTHLY_LIMIT}

[[keys]]
name = "spare"
key = "{KEYS['spare']}"
tokens_per_day = {METERED_PER_DAY}

[[keys]]
name = "racer"
key = "{KEYS['racer']}"
tokens_per_day = {RACER_PER_DAY}

[[keys]]
name = "streamer"
key = "{KEYS['streamer']}"
tokens_per_day = 100000
"""

pytestmark = pytest.mark.timeout(60)


# -- processes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("prio-quota")
    (tmp / "keys.toml").write_text(KEYS_TOML)
    return tmp


@pytest.fixture(scope="module")
def sim(base: Path) -> Iterator[Process]:
    proc = start_simulator(base, tokens_per_s=TOKENS_PER_S, load_s=0, max_concurrent=8,
                           extra=["--loaded", MODEL])
    yield proc
    proc.stop()


def lmgate(base: Path, sim: Process, state_dir: Path, *extra: str) -> Process:
    return start_lmgate(base, sim.url, "--config", str(base / "keys.toml"), "--parallel", "1",
                        "--state-dir", str(state_dir), "--log-level", "warning", *extra)


@contextlib.contextmanager
def running(base: Path, sim: Process, state_dir: Path, *extra: str) -> Iterator[Process]:
    proc = lmgate(base, sim, state_dir, *extra)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def qgate(base: Path, sim: Process) -> Iterator[Process]:
    """One lmgate for the tests that need neither a restart nor flags of their own."""
    with running(base, sim, base / "state-shared") as proc:
        yield proc


# -- helpers -----------------------------------------------------------------------------
def tokens_of(body: dict[str, Any]) -> int:
    """total_tokens the simulator reports for a chat body: words in, max_tokens out."""
    return sum(len(m["content"].split()) for m in body["messages"]) + body["max_tokens"]


@contextlib.contextmanager
def holding(gate: Process, *, text: str = "hold the gate") -> Iterator[Raw]:
    """A long running stream of the holder key: the gate (--parallel 1) is busy until the
    block ends or the connection is closed."""
    wait_idle(gate)
    conn = stream_open(gate, chat_body(text, HOLD_TOKENS), headers=bearer(KEYS["holder"]))
    try:
        assert conn.status == 200 and conn.headers["x-queue-position"] == "0"
        yield conn
    finally:
        conn.close()


def post_chat(gate: Process, who: str, body: dict[str, Any]) -> httpx.Response:
    return gate.http.post("/v1/chat/completions", json=body, headers=bearer(KEYS[who]), timeout=30)


def assert_served_in_full(resp: httpx.Response, body: dict[str, Any]) -> None:
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["choices"][0]["message"]["content"] == expected_reply(body)
    assert doc["usage"]["completion_tokens"] == body["max_tokens"]
    assert doc["usage"]["total_tokens"] == tokens_of(body)


def usage(gate: Process, who: str | None) -> dict[str, Any]:
    resp = gate.http.get("/usage", headers=bearer(KEYS[who]) if who else {})
    assert resp.status_code == 200, resp.text
    return resp.json()


def used(gate: Process, who: str) -> int:
    return int(usage(gate, who)["day"]["used"])


def admin_queue(gate: Process) -> dict[str, Any]:
    resp = gate.http.get("/queue", headers=bearer(KEYS["admin"]))
    assert resp.status_code == 200, resp.text
    return resp.json()


def metric(gate: Process, sample: str, **labels: str) -> float | None:
    for s in samples(gate, sample, bearer(KEYS["admin"])):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


def utc_iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def next_midnight(now: float) -> datetime:
    t = datetime.fromtimestamp(now, timezone.utc)
    return datetime(t.year, t.month, t.day, tzinfo=timezone.utc) + timedelta(days=1)


def next_month(now: float) -> datetime:
    t = datetime.fromtimestamp(now, timezone.utc)
    return datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=timezone.utc)


def assert_quota_refusal(resp: httpx.Response, resets_at: datetime, t0: float, t1: float) -> None:
    """429 insufficient_quota; Retry-After: the seconds from the request to ``resets_at``
    (uncapped), within 2 s; the message names the reset."""
    assert resp.status_code == 429, resp.text
    err = error_of(resp)
    assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota"
    assert f"resets at {utc_iso(resets_at)}" in err["message"], err["message"]
    assert resp.headers["x-should-retry"] == "false"  # the openai SDKs would retry a 429 twice
    retry = int(resp.headers["retry-after"])
    reset = resets_at.timestamp()
    assert math.floor(reset - t1) - 2 <= retry <= math.ceil(reset - t0) + 2, (retry, reset - t0)


def refused_now(gate: Process, who: str, body: dict[str, Any]) -> tuple[httpx.Response, float, float]:
    t0 = time.time()
    resp = post_chat(gate, who, body)
    return resp, t0, time.time()


# -- priorities --------------------------------------------------------------------------
def test_a_higher_priority_goes_ahead_of_earlier_low_ones(sim: Process, qgate: Process) -> None:
    tag, gate = nonce(), qgate
    with holding(gate) as holder, \
            stream_open(gate, chat_body(f"low-one {tag}", 5), headers=bearer(KEYS["low"])) as low1, \
            stream_open(gate, chat_body(f"low-two {tag}", 5), headers=bearer(KEYS["low"])) as low2, \
            stream_open(gate, chat_body(f"vip {tag}", 5), headers=bearer(KEYS["vip"])) as vip:
        assert [c.headers["x-queue-position"] for c in (low1, low2, vip)] == ["1", "2", "1"]
        waiting = admin_queue(gate)["waiting"]
        assert [(w["request_id"], w["priority"], w["position"]) for w in waiting] == [
            (vip.headers["x-request-id"], 5, 1),
            (low1.headers["x-request-id"], 0, 2),
            (low2.headers["x-request-id"], 0, 3)]
        # the low ones are told they moved back
        assert low1.read_until(lambda b: b": queue_position=2\n" in b, timeout=5)
        assert low2.read_until(lambda b: b": queue_position=3\n" in b, timeout=5)
        holder.close()
        texts = {}
        for name, conn in (("vip", vip), ("low-one", low1), ("low-two", low2)):
            conn.read_all(timeout=15)
            assert conn.complete, name
            texts[name] = stream_text(conn)
        started = [g["user"] for g in generations(sim, tag)]
    assert started == [f"vip {tag}", f"low-one {tag}", f"low-two {tag}"]
    assert texts == {name: expected_reply(chat_body(f"{name} {tag}", 5)) for name in texts}


def test_after_max_priority_wait_a_low_request_is_not_overtaken(base: Path, sim: Process) -> None:
    tag = nonce()
    with running(base, sim, base / "state-aging", "--max-priority-wait", "1") as gate, \
            holding(gate) as holder, \
            stream_open(gate, chat_body(f"patient {tag}", 5), headers=bearer(KEYS["low"])) as low:
        assert low.headers["x-queue-position"] == "1"

        def aged() -> bool:
            waiting = admin_queue(gate)["waiting"]
            return bool(waiting) and waiting[0]["waited_s"] >= 1.5
        wait_until(aged, 10, "the low request to wait past --max-priority-wait", interval=0.1)
        with stream_open(gate, chat_body(f"late vip {tag}", 5), headers=bearer(KEYS["vip"])) as vip:
            assert vip.headers["x-queue-position"] == "2"
            waiting = admin_queue(gate)["waiting"]
            assert [(w["request_id"], w["priority"]) for w in waiting] == [
                (low.headers["x-request-id"], 0), (vip.headers["x-request-id"], 5)]
            holder.close()
            low.read_all(timeout=15)
            vip.read_all(timeout=15)
            assert low.complete and vip.complete
            assert stream_text(low) == expected_reply(chat_body(f"patient {tag}", 5))
        started = [g["user"] for g in generations(sim, tag)]
    assert started == [f"patient {tag}", f"late vip {tag}"]


# -- quotas across a restart -------------------------------------------------------------
def test_a_quota_is_used_up_refused_until_the_reset_and_survives_a_restart(base: Path, sim: Process) -> None:
    state = base / "state-restart"
    tag = nonce()
    body = chat_body(f"count {tag}", 20)  # 22 tokens
    per_request = tokens_of(body)
    assert per_request == 22
    with running(base, sim, state) as gate:
        for n in (1, 2):
            assert_served_in_full(post_chat(gate, "metered", body), body)
            assert used(gate, "metered") == n * per_request  # 22, 44: still under 60
        # 44 < 60: admitted, and it crosses the limit: served in full all the same
        crossing = chat_body(f"crossing {tag}", 20)
        assert_served_in_full(post_chat(gate, "metered", crossing), crossing)
        total = 2 * per_request + tokens_of(crossing)
        report = usage(gate, "metered")
        assert report["key"] == "metered"
        assert report["day"]["used"] == report["month"]["used"] == total > METERED_PER_DAY
        assert report["day"]["limit"] == METERED_PER_DAY

        resp, t0, t1 = refused_now(gate, "metered", chat_body(f"refused {tag}", 5))
        assert_quota_refusal(resp, next_midnight(t0), t0, t1)
        assert f"{total} of its {METERED_PER_DAY}" in error_of(resp)["message"]
        # both limits of "monthly" are over: the later reset (the month's) is the one that counts
        monthly = chat_body(f"monthly {tag}", 20)
        assert_served_in_full(post_chat(gate, "monthly", monthly), monthly)
        resp, t0, t1 = refused_now(gate, "monthly", chat_body(f"monthly again {tag}", 5))
        assert_quota_refusal(resp, max(next_month(t0), next_midnight(t0)), t0, t1)
        assert "per month" in error_of(resp)["message"]
        assert [g["user"] for g in generations(sim, tag)] == [
            f"count {tag}", f"count {tag}", f"crossing {tag}", f"monthly {tag}"]  # no refused one
        assert metric(gate, "lmgate_tokens_total", key="metered") == total
        assert (metric(gate, "lmgate_rejections_total", reason="insufficient_quota") or 0) >= 2
        spare_before = chat_body(f"spare {tag}", 10)
        assert_served_in_full(post_chat(gate, "spare", spare_before), spare_before)
    assert gate.proc.returncode == 0, gate.output()

    with running(base, sim, state) as again:
        report = usage(again, "metered")
        assert (report["day"]["used"], report["month"]["used"]) == (total, total)
        resp, t0, t1 = refused_now(again, "metered", chat_body(f"after restart {tag}", 5))
        assert_quota_refusal(resp, next_midnight(t0), t0, t1)
        resp, t0, t1 = refused_now(again, "monthly", chat_body(f"monthly restart {tag}", 5))
        assert_quota_refusal(resp, max(next_month(t0), next_midnight(t0)), t0, t1)
        # another key is not affected by "metered" being over
        spare = chat_body(f"spare after {tag}", 10)
        assert_served_in_full(post_chat(again, "spare", spare), spare)
        everyone = {r["key"]: r for r in usage(again, "admin")["keys"]}
        assert set(everyone) == {"holder", "low", "vip", "admin", "metered", "monthly", "spare",
                                 "racer", "streamer"}
        assert everyone["metered"]["day"]["used"] == total
        assert everyone["monthly"]["month"] == {"used": tokens_of(monthly), "limit": MONTHLY_LIMIT,
                                                "resets_at": utc_iso(next_month(time.time()))}
        assert everyone["spare"]["day"]["used"] == tokens_of(spare_before) + tokens_of(spare)
        anonymous = again.http.get("/usage")
        assert anonymous.status_code == 401
        error_of(anonymous)
        assert metric(again, "lmgate_rejections_total", reason="insufficient_quota") == 2


# -- racing the last tokens --------------------------------------------------------------
RACERS = 6
RACE_TOKENS = 40


def test_concurrent_requests_racing_the_last_tokens_are_served_in_full(sim: Process, qgate: Process) -> None:
    """The key is one token below its limit and six requests arrive at once (--parallel 1).

    A request is admitted at its arrival (refused only if its key is already at or over the
    limit), its quota is checked again when its turn comes, and its tokens are counted when it
    ends. So the request that crosses the limit is served in full, and the ones still waiting
    behind it are refused at their turn (429 insufficient_quota) instead of each spending the
    quota again: the overshoot is bounded by what runs at once,

        used - limit <= sum of the tokens of the requests running when the limit was crossed

    Here a holder keeps the gate busy until all six are in line; with one slot the first
    racer runs alone, crosses the limit (overshoot tokens - 1), and the other five are
    refused without reaching the box. The next request is refused too."""
    tag = nonce()
    prefill = chat_body(f"prefill-{tag}", RACER_PER_DAY - 2)  # 1 word + 98 = limit - 1
    start = used(qgate, "racer")
    assert start == 0, "the racer key is used by this test only"
    assert_served_in_full(post_chat(qgate, "racer", prefill), prefill)
    before = used(qgate, "racer")
    assert before == RACER_PER_DAY - 1

    bodies = [chat_body(f"race-{tag}-{i}", RACE_TOKENS) for i in range(RACERS)]
    per_request = tokens_of(bodies[0])
    barrier = threading.Barrier(RACERS)

    def race(body: dict[str, Any]) -> httpx.Response:
        barrier.wait(timeout=10)
        return qgate.http.post("/v1/chat/completions", json=body, headers=bearer(KEYS["racer"]), timeout=30)

    with holding(qgate) as holder, ThreadPoolExecutor(RACERS) as pool:
        futures = [pool.submit(race, body) for body in bodies]
        wait_until(lambda: admin_queue(qgate)["depth"] == RACERS, 10, "all six racers in line")
        assert used(qgate, "racer") == before  # nothing counted while they wait
        holder.close()
        replies = [f.result(timeout=30) for f in futures]

    served = [(resp, body) for resp, body in zip(replies, bodies) if resp.status_code == 200]
    assert len(served) == 1, [r.status_code for r in replies]
    assert_served_in_full(*served[0])
    for resp in replies:
        if resp.status_code != 200:
            assert resp.status_code == 429 and resp.json()["error"]["code"] == "insufficient_quota"
    after = used(qgate, "racer")
    assert after == before + per_request
    overshoot = after - RACER_PER_DAY
    assert overshoot == per_request - 1
    assert len(generations(sim, f"race-{tag}")) == 1
    resp, t0, t1 = refused_now(qgate, "racer", chat_body(f"late-{tag}", 5))
    assert_quota_refusal(resp, next_midnight(t0), t0, t1)
    assert used(qgate, "racer") == after
    assert len(generations(sim, f"late-{tag}")) == 0


# -- streams of a quota key --------------------------------------------------------------
def payloads(lines: list[str]) -> list[Any]:
    """The data payloads, without the simulator's per-generation id and timestamp."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            raw = line[6:]
            if raw == "[DONE]":
                out.append(raw)
            else:
                out.append({k: v for k, v in json.loads(raw).items() if k not in ("id", "created")})
    return out


def test_a_quota_stream_is_counted_without_showing_the_usage_chunk(sim: Process, qgate: Process) -> None:
    tag = nonce()
    body = chat_body(f"stream {tag} please", 9, stream=True)
    # what the simulator reports for this body when asked
    asked = {**body, "stream_options": {"include_usage": True}}
    reported = [d for d in payloads(read_stream(sim, asked)[1]) if isinstance(d, dict) and "usage" in d]
    assert len(reported) == 1
    total = reported[0]["usage"]["total_tokens"]
    assert total == tokens_of(body)

    _, direct = read_stream(sim, body)
    for variant in (body, {**body, "stream_options": {"include_usage": False}}):
        before = used(qgate, "streamer")
        _, lines = read_stream(qgate, variant, bearer(KEYS["streamer"]))
        assert not any('"usage"' in line for line in lines)
        assert all(line == "" or line.startswith(("data: ", ": queue_")) for line in lines), lines
        assert payloads(lines) == payloads(direct)  # exactly what a direct request gives
        assert used(qgate, "streamer") == before + total


def test_a_waiting_quota_stream_with_feedback_is_counted_and_shows_no_usage(sim: Process,
                                                                           qgate: Process) -> None:
    """lmgate's waiting chunks first, then exactly the upstream's events without the usage
    chunk lmgate asked for; the tokens counted all the same."""
    body = chat_body(f"wait and count {nonce()}", 8, stream=True)
    _, direct = read_stream(sim, body)
    before = used(qgate, "streamer")
    with holding(qgate) as holder:
        _, lines = read_stream(qgate, body, {**bearer(KEYS["streamer"]), "X-Queue-Feedback": "reasoning"},
                               on_head=lambda resp: holder.close())
    docs = payloads(lines)
    waiting = [d for d in docs if isinstance(d, dict) and "reasoning_content" in d["choices"][0]["delta"]]
    assert waiting, lines
    assert re.match(r"^Waiting in line: #1(, about \d+ (s|min))?\n$",
                    waiting[0]["choices"][0]["delta"]["reasoning_content"])
    assert docs[:len(waiting)] == waiting  # all before the answer
    assert not any('"usage"' in line for line in lines)
    assert docs[len(waiting):] == payloads(direct)
    assert used(qgate, "streamer") == before + tokens_of(body)


def test_a_quota_stream_with_stream_options_null_is_counted_in_full(qgate: Process) -> None:
    """``"stream_options": null`` is what OpenAI's schema allows for "no options" (the SDK
    sends it when given ``stream_options=None``): the client did not ask for usage, so lmgate
    must ask the upstream for it like it does when the field is absent, and count the
    upstream's total_tokens, prompt included."""
    body = chat_body(f"null options {nonce()}", 9, stream=True, stream_options=None)
    before = used(qgate, "streamer")
    _, lines = read_stream(qgate, body, bearer(KEYS["streamer"]))
    assert not any('"usage"' in line for line in lines)
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in payloads(lines)
                   if isinstance(d, dict) and d["choices"])
    assert text == expected_reply(body)
    assert used(qgate, "streamer") - before == tokens_of(body)  # 3 prompt + 9 completion


def test_a_quota_stream_that_asked_for_usage_gets_it(qgate: Process) -> None:
    tag = nonce()
    body = chat_body(f"usage for {tag} too", 7)
    before = used(qgate, "streamer")
    client = sdk(qgate, KEYS["streamer"], timeout=20)
    try:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                     **body))
    finally:
        client.close()
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].choices == []
    assert with_usage[0].usage.total_tokens == tokens_of(body)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_reply(body)
    assert used(qgate, "streamer") == before + tokens_of(body)


# -- metrics, /usage views, one process per state directory -------------------------------
def test_metrics_agree_with_usage(qgate: Process) -> None:
    # a refusal of its own, whatever ran before: the racer key is used up here if need be
    for _ in range(10):
        resp = post_chat(qgate, "racer", chat_body(f"use up {nonce()}", 60))
        if resp.status_code == 429:
            break
        assert resp.status_code == 200, resp.text
    else:
        raise AssertionError("the racer key was never refused")
    assert error_of(resp)["code"] == "insufficient_quota"
    wait_idle(qgate)
    reports = usage(qgate, "admin")["keys"]
    counted = {r["key"]: r["day"]["used"] for r in reports}
    assert counted["racer"] >= RACER_PER_DAY
    for key, tokens in counted.items():
        assert (metric(qgate, "lmgate_tokens_total", key=key) or 0) == tokens, key
    assert (metric(qgate, "lmgate_rejections_total", reason="insufficient_quota") or 0) >= 1


def test_usage_views(qgate: Process) -> None:
    mine = usage(qgate, "streamer")
    assert set(mine) == {"key", "day", "month"} and mine["key"] == "streamer"
    now = time.time()
    assert mine["day"]["limit"] == 100000 and mine["month"]["limit"] is None
    assert mine["day"]["resets_at"] in {utc_iso(next_midnight(now - 5)), utc_iso(next_midnight(now))}
    assert mine["month"]["resets_at"] in {utc_iso(next_month(now - 5)), utc_iso(next_month(now))}
    # a user key sees its own only, even when it has no quota
    assert usage(qgate, "low")["key"] == "low"
    resp = qgate.http.get("/usage")
    assert resp.status_code == 401
    assert error_of(resp)["type"]
    resp = qgate.http.get("/usage", headers={"authorization": "Bearer sk-not-a-key-0000"})
    assert resp.status_code == 401


def test_a_second_lmgate_on_the_same_state_dir_exits_2(base: Path, sim: Process, qgate: Process) -> None:
    args = [sys.executable, "-m", "proxy", "--upstream", sim.url, "--port", str(free_port()),
            "--config", str(base / "keys.toml"), "--state-dir", str(base / "state-shared")]
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "another lmgate process" in lines[0], result.stderr
    assert result.stdout == ""
    # the first one goes on as before
    assert qgate.http.get("/healthz").status_code == 200
    assert usage(qgate, "streamer")["key"] == "streamer"


@pytest.mark.skipif(os.name == "nt", reason="the state directory's lock is an flock here")
def test_the_state_dir_is_never_free_between_the_check_and_serving(base: Path, sim: Process,
                                                                   http: httpx.Client) -> None:
    """lmgate checks at start that no other process uses its --state-dir and refuses with one
    line (status 2). The check must hold: another process that takes the state directory at
    any moment of the start-up (here the test itself, through the same lock file lmgate uses)
    must get the same one-line refusal, never a traceback. The test takes the lock as soon as
    lmgate has created its database and lets go of the lock; a start-up that keeps the
    directory locked from the check on never lets it, and then serves."""
    import fcntl

    state = base / f"state-startup-{nonce()}"
    db, lock_path = state / "lmgate.sqlite3", state / "lmgate.sqlite3.lock"
    port = free_port()
    args = [sys.executable, "-m", "proxy", "--upstream", sim.url, "--port", str(port),
            "--config", str(base / "keys.toml"), "--state-dir", str(state), "--log-level", "warning"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    serving = threading.Event()
    stop = threading.Event()

    def probe_health() -> None:
        # in a thread: the port is bound before lmgate serves, so a probe may wait a while
        while not stop.is_set() and proc.poll() is None:
            try:
                if http.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    serving.set()
                    return
            except httpx.HTTPError:
                pass
            stop.wait(0.05)

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    held = None
    try:
        deadline = time.monotonic() + 20
        for _ in range(1_000_000):
            if proc.poll() is not None or serving.is_set() or time.monotonic() > deadline:
                break
            if db.exists():
                f = lock_path.open("a+b")
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                else:
                    held = f
                    break
            time.sleep(0.0002)
        if held is not None:
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                raise AssertionError("lmgate went on running while another process held its "
                                     "state directory") from None
            assert (proc.returncode, len(err.splitlines())) == (2, 1), (proc.returncode, err)
            assert "another lmgate process" in err
        else:
            assert serving.is_set(), "lmgate neither served nor was refused"
            probe = lock_path.open("a+b")
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                probe.close()
    finally:
        stop.set()
        if held is not None:
            held.close()  # closing the file lets go of the lock
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        prober.join(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
