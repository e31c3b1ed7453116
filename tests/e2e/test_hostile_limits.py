"""Hostile load against lmgate's resource bounds (DESIGN.md section 7: memory, quiet upstream,
shutdown): request bodies held for waiting requests, kept old-API results, probes that must
not disturb a busy upstream, and old-API streams on SIGTERM. Real processes, real sockets."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.simulator import expected_reply
from tests.e2e.hostile import (
    UNKNOWN_ID_BODY,
    Raw,
    add_job,
    assert_gate_free,
    chat,
    client,
    error_of,
    legacy,
    sim_requests,
    sim_stats,
    started,
    stream_open,
    wait_until,
)
from tests.servers import Process, running_stack

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024
BIG = 400 * 1024  # bytes of one waiting request's body


def record(gate: Process, jid: str) -> dict[str, Any]:
    return gate.http.get(f"/request/{jid}").json()


def finish(gate: Process, jid: str, evicted_ok: bool = True) -> dict[str, Any]:
    """Poll until the job is done (or, with ``evicted_ok``, already dropped from the kept
    results); return its record."""
    def done() -> dict[str, Any] | None:
        r = record(gate, jid)
        if r.get("status") in ("complete", "error") or (evicted_ok and r == UNKNOWN_ID_BODY):
            return r
        return None
    return wait_until(done, 20, f"job {jid} to finish", interval=0.05)


def big_body(marker_tokens: int) -> bytes:
    """A streaming chat body of exactly BIG bytes; ``max_tokens`` marks it in the simulator log."""
    doc: dict[str, Any] = {**chat("big", max_tokens=marker_tokens, stream=True), "pad": ""}
    doc["pad"] = "x" * (BIG - len(json.dumps(doc)))
    data = json.dumps(doc).encode()
    assert len(data) == BIG
    return data


# ---------------------------------------------------------------------------------------
# --max-waiting-bytes 1 MiB, --max-kept-results 3
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("hostile-memory")
    with running_stack(tmp, "--log-level", "warning", "--max-waiting-bytes", str(MIB),
                       "--max-kept-results", "3", "--stream-open-timeout", "60",
                       tokens_per_s=50, load_s=0) as pair:
        yield pair


def test_waiting_bodies_are_capped_in_bytes(bounded: tuple[Process, Process]) -> None:
    """Item 6: with the gate held, 400 KiB waiting requests are admitted while the bodies
    held stay within 1 MiB; the next is refused 429 queue_memory_full from its Content-Length
    alone (its body never sent) and never reaches the simulator."""
    sim, gate = bounded
    t0 = time.monotonic()
    conns: list[Raw] = []
    try:
        holder = stream_open(gate, chat("hold", max_tokens=2000))
        conns.append(holder)
        assert started(holder)
        for position, marker in ((1, 3), (2, 4)):
            conn = Raw(gate.port)
            conns.append(conn)
            conn.request("POST", "/v1/chat/completions", big_body(marker))
            assert conn.read_head() == 200
            assert conn.headers["x-queue-position"] == str(position)
        for send_body in (False, True):
            with Raw(gate.port) as refused:
                refused.request("POST", "/v1/chat/completions", big_body(7), send_body=send_body)
                assert refused.read_head(5) == 429, refused.raw[:300]
                assert 1 <= int(refused.headers["retry-after"]) <= 120
                err = error_of(httpx.Response(429, content=refused.read_all(5)))
                assert err["code"] == "queue_memory_full", err
        small = stream_open(gate, chat("small", max_tokens=5))  # bytes are the limit, not a count
        conns.append(small)
        assert small.status == 200 and small.headers["x-queue-position"] == "3"
        holder.close()
        for conn in conns[1:]:
            assert conn.read_until(lambda body: b"data: [DONE]" in body, 15), conn.body[-200:]
    finally:
        for conn in conns:
            conn.close()
    sent = [r.get("max_tokens") for r in sim_requests(sim) if r["method"] == "POST" and r["t"] >= t0]
    assert sorted(sent) == [3, 4, 5, 2000], sent  # the refused (max_tokens 7) never went up
    assert_gate_free(gate)
    # the bytes were given back: the same two fit again
    conns = []
    try:
        holder = stream_open(gate, chat("hold again", max_tokens=2000))
        conns.append(holder)
        assert started(holder)
        for marker in (8, 9):
            conn = Raw(gate.port)
            conns.append(conn)
            conn.request("POST", "/v1/chat/completions", big_body(marker))
            assert conn.read_head() == 200, conn.raw[:300]
    finally:
        for conn in conns:
            conn.close()
    assert_gate_free(gate)


def test_kept_results_are_capped_in_count(bounded: tuple[Process, Process]) -> None:
    """Item 6: --max-kept-results 3: after 5 finished jobs the 2 oldest are unknown ids."""
    _, gate = bounded
    jobs = []
    for i in range(5):
        body = legacy(f"job {i}", max_tokens=3)
        jid = add_job(gate, body)
        assert finish(gate, jid, evicted_ok=False)["status"] == "complete"
        jobs.append((jid, body))
    for jid, _ in jobs[:2]:
        assert record(gate, jid) == UNKNOWN_ID_BODY
        assert gate.http.get(f"/stream/{jid}").json() == UNKNOWN_ID_BODY
    for jid, body in jobs[2:]:
        rec = record(gate, jid)
        assert rec["status"] == "complete" and rec["result"] == expected_reply({**body, "stream": True}), rec
    assert_gate_free(gate)


def test_kept_results_are_capped_in_bytes(tmp_path: Path) -> None:
    """Item 6: --max-kept-bytes 4000 with ~500-byte results: the oldest go first, what is
    kept is the newest ones and fits the cap; a huge prompt is not part of what is kept."""
    cap = 4000
    with running_stack(tmp_path, "--log-level", "warning", "--max-kept-bytes", str(cap),
                       "--stream-open-timeout", "60", tokens_per_s=0, load_s=0) as (_, gate):
        huge = legacy("x " * 300_000, max_tokens=2)  # a 600 KB prompt, a tiny result
        jid = add_job(gate, huge)
        assert finish(gate, jid, evicted_ok=False)["status"] == "complete"  # kept: no prompt held
        jobs = []
        for i in range(10):
            body = legacy(f"long {i}", max_tokens=12, x_word_len=45)
            jid = add_job(gate, body)
            finish(gate, jid)
            jobs.append((jid, body))
        one = len(expected_reply(jobs[0][1]))
        assert one * len(jobs) > cap * 1.1 and one < cap / 4  # all of them do not fit, a few do
        records = [record(gate, jid) for jid, _ in jobs]
        kept = [r.get("status") == "complete" for r in records]
        assert not kept[0] and kept[-1], kept
        assert kept == sorted(kept), kept  # evicted oldest first: the kept ones are the newest
        assert sum(len(r["result"]) for r in records if r.get("result")) <= cap
        for r, (_, body) in zip(records, jobs):
            assert r == UNKNOWN_ID_BODY or r["result"] == expected_reply({**body, "stream": True})
        assert record(gate, jobs[0][0]) == UNKNOWN_ID_BODY
        assert_gate_free(gate)


# ---------------------------------------------------------------------------------------
# quiet upstream: --probe-interval 0.2
# ---------------------------------------------------------------------------------------

def test_no_probes_while_a_request_runs_and_readyz_is_cached(tmp_path: Path) -> None:
    """Item 9: lmgate's own checks reach the upstream only while it is idle; /readyz and
    /health answer from cached state and never reach it."""
    with running_stack(tmp_path, "--log-level", "warning", "--probe-interval", "0.2",
                       tokens_per_s=50, load_s=0) as (sim, gate):
        def own_requests(after: float, before: float = float("inf")) -> list[dict[str, Any]]:
            return [r for r in sim_requests(sim) if after < r["t"] < before and r["method"] == "GET"]

        t0 = time.monotonic()
        wait_until(lambda: own_requests(t0), 3, "a probe while idle")
        with client() as c:
            t1 = time.monotonic()
            for _ in range(25):
                assert c.get(gate.url + "/readyz").status_code == 200
                assert c.get(gate.url + "/health").status_code == 200
            t2 = time.monotonic()
        seen = [r for r in sim_requests(sim) if t1 <= r["t"] <= t2]
        # probes at their pace (a round reads up to two listings), nothing per call: 50 calls
        # answered from cache while at most a few probe rounds went by
        assert len(seen) <= 2 * ((t2 - t1) / 0.2 + 2), seen

        stream = stream_open(gate, chat("long stream", max_tokens=150))  # ~3 s
        try:
            assert started(stream)
            chat_entry = [r for r in sim_requests(sim) if r["method"] == "POST"][-1]
            with client() as c:
                for _ in range(25):
                    ready = c.get(gate.url + "/readyz")
                    assert ready.status_code == 200 and ready.json()["upstream_up"] is True, ready.text
                    assert c.get(gate.url + "/health").status_code == 200
            assert stream.read_until(lambda body: b"data: [DONE]" in body, 15)
        finally:
            stream.close()
        gen = wait_until(lambda: [g for g in sim_stats(sim)["log"]
                                  if g["user"] == "long stream" and g["ended"]],
                         5, "the stream's generation to end")[0]
        assert gen["ended"] - chat_entry["t"] > 2  # the stream did last several probe intervals
        during = [r for r in sim_requests(sim) if chat_entry["t"] + 0.1 < r["t"] < gen["ended"]]
        assert during == [], during
        wait_until(lambda: own_requests(gen["ended"]), 3, "probes to resume once idle")
        assert_gate_free(gate)


# ---------------------------------------------------------------------------------------
# SIGTERM with old-API streams open
# ---------------------------------------------------------------------------------------

class StreamReader(threading.Thread):
    """Reads one /stream/{id} to its very end (no break on done), noting every data event,
    any exception (an incomplete chunked read included) and when it ended."""

    def __init__(self, gate: Process, jid: str) -> None:
        super().__init__(daemon=True)
        self.gate, self.path = gate, f"/stream/{jid}"
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.ended: float | None = None

    def run(self) -> None:
        try:
            with self.gate.http.stream("GET", self.path, timeout=20) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(json.loads(line[5:]))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        self.ended = time.monotonic()


def test_sigterm_ends_every_old_api_stream_cleanly(tmp_path: Path) -> None:
    """Item 12: on SIGTERM (--shutdown-grace 2) a running and a waiting /stream/{id} each get
    a final {"done": true} or {"error": ...} and a clean end, within the grace plus margin."""
    with running_stack(tmp_path, "--log-level", "warning", "--shutdown-grace", "2",
                       "--stream-open-timeout", "60", tokens_per_s=10, load_s=0) as (_, gate):
        running = add_job(gate, legacy("slow one", max_tokens=300))  # ~30 s
        waiting = add_job(gate, legacy("behind it", max_tokens=3))
        readers = [StreamReader(gate, running), StreamReader(gate, waiting)]
        for reader in readers:
            reader.start()
        wait_until(lambda: any("chunk" in e for e in readers[0].events), 10, "the first chunk")
        wait_until(lambda: any("position" in e for e in readers[1].events), 10, "a position event")
        t0 = time.monotonic()
        gate.signal(signal.SIGTERM)
        for reader in readers:
            reader.join(15)
        for reader in readers:
            assert not reader.is_alive(), "a stream is still open after SIGTERM"
            assert reader.error is None, repr(reader.error)
            last = reader.events[-1]
            assert last == {"done": True} or (set(last) == {"error"} and last["error"]), reader.events[-3:]
            assert reader.ended is not None and reader.ended - t0 < 2 + 4, reader.ended - t0
        assert gate.proc.wait(10) is not None
        assert "Traceback" not in gate.log_path.read_text(errors="replace")
