"""Hostile clients on the wire (DESIGN.md section 7, "Slow clients"): readers that stop
reading, huge and trickled request heads and bodies, idle connections, too many connections.
Real lmgate and simulator processes; raw sockets on 127.0.0.1.

After each attack: the gate is free, a normal request works, and where memory is the point
lmgate's RSS stays bounded."""

from __future__ import annotations

import http.client
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.hostile import (
    MODEL,
    Raw,
    assert_gate_free,
    auth,
    chat,
    keys_config,
    open_connections,
    queue,
    rss,
    sim_requests,
    sim_stats,
    stream_open,
    wait_until,
)
from tests.servers import Process, running_stack

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024
# a reply of ~64 MB, produced as fast as the reader takes it: far more than every socket
# buffer between the simulator and the client together
FLOOD = {"max_tokens": 4000, "x_word_len": 16384}


def posts(sim: Process) -> int:
    """Generation requests the simulator received (its idle probes are GETs)."""
    return sum(1 for r in sim_requests(sim) if r["method"] == "POST")


def flood_generation(sim: Process) -> dict | None:
    """The simulator's log entry of the flood request (the one with the most tokens)."""
    for entry in sim_stats(sim)["log"]:
        if entry["user"] == "flood":
            return entry
    return None


def trickle(conn: Raw, data: bytes, deadline: float) -> None:
    """Send ``data`` one byte per 0.2 s until the server answers or closes, all is sent, or
    ``deadline`` (bounded: the server is expected to end it long before)."""
    for byte in data:
        if time.monotonic() >= deadline or not conn.send(bytes([byte])):
            return
        ready, _, _ = select.select([conn.sock], [], [], 0.2)  # the attack's own pace
        if ready:
            return


# ---------------------------------------------------------------------------------------
# --client-write-timeout 2, --client-read-timeout 1
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("hostile-wire")
    with running_stack(tmp, "--log-level", "warning", "--client-write-timeout", "2",
                       "--client-read-timeout", "1", tokens_per_s=0, load_s=0) as pair:
        yield pair


def test_reader_that_stops_reading_loses_its_slot(strict: tuple[Process, Process]) -> None:
    """Item 4: a streaming client with a tiny receive window stops reading a multi-megabyte
    reply; after --client-write-timeout it counts as gone: the upstream generation is
    cancelled and the next client is served."""
    sim, gate = strict
    base = rss(gate)
    stuck = Raw(gate.port, rcvbuf=4096)
    try:
        stuck.request("POST", "/v1/chat/completions", chat("flood", stream=True, **FLOOD))
        t0 = time.monotonic()
        wait_until(lambda: flood_generation(sim), 10, "the flood to reach the simulator")
        assert queue(gate)["active"] == 1
        try:
            resp = gate.http.post("/v1/chat/completions", json=chat("next please", max_tokens=3),
                                  timeout=15)
        except httpx.TimeoutException:
            pytest.fail("the next request was not served in 15 s: the stuck reader still holds the gate")
        waited = time.monotonic() - t0
        assert resp.status_code == 200 and "next please" in resp.json()["choices"][0]["message"]["content"]
        assert waited < 15, waited
        entry = wait_until(lambda: (e := flood_generation(sim)) and e["outcome"] and e, 5,
                           "the flood generation to end")
        assert entry["outcome"] == "cancelled", entry
        assert sim_stats(sim)["cancelled"] >= 1
        assert rss(gate) - base < 100 * MIB  # the reply was not buffered in lmgate
    finally:
        stuck.close()
    assert_gate_free(gate)


def test_oversized_head_gets_431_and_close(strict: tuple[Process, Process]) -> None:
    """Item 5: a request head over 64 KiB -> 431, connection closed."""
    sim, gate = strict
    before = posts(sim)
    for pad in (70 * 1024, 200 * 1024):
        with Raw(gate.port) as conn:
            head = (f"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: {'a' * pad}\r\n\r\n").encode()
            conn.send(head)
            assert conn.read_head(5) == 431, conn.raw[:200]
            assert conn.wait_closed(5)
    with Raw(gate.port) as conn:  # many small headers add up too
        lines = "".join(f"x-h{i}: {'b' * 100}\r\n" for i in range(800))
        conn.send(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{lines}\r\n".encode())
        assert conn.read_head(5) == 431
        assert conn.wait_closed(5)
    assert posts(sim) == before
    assert_gate_free(gate)


def test_trickled_head_gets_408_and_close(strict: tuple[Process, Process]) -> None:
    """Item 5: one byte of the head per 0.2 s; --client-read-timeout 1 -> 408, closed."""
    _, gate = strict
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    with Raw(gate.port) as conn:
        t0 = time.monotonic()
        trickle(conn, head, t0 + 6)
        closed = conn.wait_closed(5)
        elapsed = time.monotonic() - t0
        assert closed, conn.raw[:200]
        assert elapsed < 5, elapsed
        assert conn.raw.startswith(b"HTTP/1.1 408"), conn.raw[:200]
    assert_gate_free(gate)


def test_trickled_body_gets_408_and_close(strict: tuple[Process, Process]) -> None:
    """Item 5: a complete head with Content-Length: 1000, then the body one byte per 0.2 s."""
    sim, gate = strict
    before = posts(sim)
    with Raw(gate.port) as conn:
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                  b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n")
        t0 = time.monotonic()
        trickle(conn, b'{"model": "' + MODEL.encode() + b'", "messages": [' + b" " * 900, t0 + 6)
        closed = conn.wait_closed(5)
        elapsed = time.monotonic() - t0
        assert closed and elapsed < 5, (closed, elapsed)
        assert conn.raw.startswith(b"HTTP/1.1 408"), conn.raw[:200]
    assert posts(sim) == before
    assert_gate_free(gate)


def test_silent_and_idle_connections_are_closed(strict: tuple[Process, Process]) -> None:
    """Item 5: a connection that sends nothing, and a keep-alive one idle after a response,
    are closed within --client-read-timeout (plus margin)."""
    _, gate = strict
    with Raw(gate.port) as silent, Raw(gate.port) as idle:
        t0 = time.monotonic()
        idle.request("GET", "/healthz")
        assert idle.read_head(5) == 200
        idle.read_all(5)
        assert silent.wait_closed(5) and idle.wait_closed(5)
        assert time.monotonic() - t0 < 5
        assert not silent.raw or silent.raw.startswith(b"HTTP/1.1 408"), silent.raw[:200]
    assert_gate_free(gate)


def test_a_keep_alive_client_that_keeps_asking_within_the_timeout_is_never_cut(
        strict: tuple[Process, Process]) -> None:
    """The read deadline counts from the last response, not from when the connection opened:
    a request every 0.5 s on one connection, for three times --client-read-timeout (1 s),
    is answered every time on the same socket."""
    _, gate = strict
    conn = http.client.HTTPConnection("127.0.0.1", gate.port, timeout=5)
    try:
        sock = None
        for i in range(6):
            if i:
                time.sleep(0.5)  # the bound under test is a time: spaced requests are the attack
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            assert resp.status == 200, resp.status
            resp.read()
            sock = sock or conn.sock
            assert conn.sock is sock, f"reconnected before request {i + 1}"
    finally:
        conn.close()
    assert_gate_free(gate)


# ---------------------------------------------------------------------------------------
# admin cancel of a stuck stream (--client-write-timeout 60)
# ---------------------------------------------------------------------------------------

def test_admin_cancel_frees_a_stuck_stream(tmp_path: Path) -> None:
    """Item 4: a reader stuck for good (write timeout 60 s) is cut off by an admin DELETE
    within about a second, and the next request starts."""
    with running_stack(tmp_path, "--config", keys_config(tmp_path), "--log-level", "warning",
                       "--client-write-timeout", "60", tokens_per_s=0, load_s=0) as (sim, gate):
        stuck = Raw(gate.port, rcvbuf=4096)
        conns = [stuck]
        try:
            stuck.request("POST", "/v1/chat/completions", chat("flood", stream=True, **FLOOD),
                          {**auth("alice"), "x-request-id": "stuck-1"})
            wait_until(lambda: flood_generation(sim), 10, "the flood to reach the simulator")
            nxt = stream_open(gate, chat("bob next", max_tokens=3), who="bob")
            conns.append(nxt)
            assert nxt.headers["x-queue-position"] == "1"
            time.sleep(1.0)  # let every buffer on the way fill up: the writer is now blocked
            assert nxt.read_until(lambda body: b"data:" in body, 0.1) is False  # still waiting
            running = queue(gate, "ops")["running"]
            assert [r["request_id"] for r in running] == ["stuck-1"]
            t0 = time.monotonic()
            resp = gate.http.delete(f"/queue/{running[0]['id']}", headers=auth("ops"))
            assert resp.status_code == 200, resp.text
            assert nxt.read_until(lambda body: b"data:" in body, 3), nxt.body[-300:]
            assert time.monotonic() - t0 < 3
            assert nxt.read_until(lambda body: b"data: [DONE]" in body, 10)
            entry = wait_until(lambda: (e := flood_generation(sim)) and e["outcome"] and e, 5, "flood end")
            assert entry["outcome"] == "cancelled"
        finally:
            for conn in conns:
                conn.close()
        assert_gate_free(gate, "alice")


# ---------------------------------------------------------------------------------------
# header floods and --max-connections 20
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def capped_conns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("hostile-conns")
    with running_stack(tmp, "--log-level", "warning", "--max-connections", "20",
                       "--client-read-timeout", "10", tokens_per_s=0, load_s=0) as pair:
        yield pair


def test_header_flood_is_cut_off_and_memory_bounded(capped_conns: tuple[Process, Process]) -> None:
    """Item 5: 16 connections each sending 8 MiB of header bytes are cut off early (431 or
    closed) and lmgate's memory grows by less than ~60 MB."""
    sim, gate = capped_conns
    gate.http.get("/queue")  # warm
    before = posts(sim)
    base = rss(gate)
    peak = [base]
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    chunk = b"x-flood: " + b"z" * (64 * 1024 - 11) + b"\r\n"
    total = 8 * MIB

    def flood() -> None:
        sent, outcome = 0, "accepted all"
        try:
            with Raw(gate.port, timeout=10) as conn:
                if conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"):
                    while sent < total:
                        if not conn.send(chunk):
                            outcome = "closed"
                            break
                        sent += len(chunk)
                try:
                    conn.read_head(5)
                    outcome = str(conn.status)
                except AssertionError:
                    outcome = "closed" if conn.eof else outcome
        except TimeoutError:
            outcome = "stalled"
        with lock:
            results.append((sent, outcome))

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        peak.append(rss(gate))
        threads[0].join(0.05)
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert len(results) == 16, results
    assert all(outcome in ("431", "closed") for _, outcome in results), results
    assert all(sent < total for sent, _ in results), results
    growth = max(peak) - base
    assert growth < 60 * MIB, growth / MIB
    wait_until(lambda: open_connections(gate) == 0, 10, "the flood connections to close")
    assert posts(sim) == before
    assert_gate_free(gate)


def test_connection_over_the_cap_gets_503_and_close(capped_conns: tuple[Process, Process]) -> None:
    """Item 5: with 20 idle connections open, the 21st gets 503 too_many_connections and is
    closed; once they close, requests work again."""
    _, gate = capped_conns
    wait_until(lambda: open_connections(gate) == 0, 10, "no client connections")
    idle = []
    try:
        for _ in range(20):
            idle.append(Raw(gate.port))
        wait_until(lambda: open_connections(gate) == 20, 10, "20 accepted connections")
        with Raw(gate.port) as extra:
            extra.request("GET", "/healthz")
            assert extra.read_head(5) == 503, extra.raw[:300]
            body = extra.read_all(5)
            err = httpx.Response(503, content=body).json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "too_many_connections"
            assert extra.wait_closed(5)
        # the 20 were not harmed: one of them is served
        idle[0].request("GET", "/healthz")
        assert idle[0].read_head(5) == 200
    finally:
        for conn in idle:
            conn.close()
    wait_until(lambda: open_connections(gate) == 0, 10, "the idle connections to close")
    for _ in range(3):
        assert gate.http.get("/healthz").status_code == 200
    assert_gate_free(gate)
