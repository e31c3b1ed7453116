"""Hostile clients against who-may-see-what (DESIGN.md section 7: ownership, ids, identity,
token caps, labels, credentials): real lmgate and simulator processes, real sockets.

After each attack: the gate is free, a normal request works, and the simulator's request
log shows that nothing refused reached it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.simulator import expected_reply
from tests.e2e.hostile import (
    EMBED,
    MODEL,
    OTHER,
    UNKNOWN_ID_BODY,
    add_job,
    assert_gate_free,
    auth,
    chat,
    client,
    error_of,
    is_uuid4,
    keys_config,
    legacy,
    queue,
    sim_requests,
    started,
    stream_open,
    stream_text,
    wait_until,
)
from tests.servers import Process, running_stack, start_lmgate, start_simulator

pytestmark = pytest.mark.timeout(60)


def job_record(gate: Process, jid: str, who: str | None = None, source: str | None = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
    with client(source) as c:
        return c.get(f"{gate.url}/request/{jid}", headers={**auth(who), **(headers or {})})


def wait_job(gate: Process, jid: str, status: str | tuple[str, ...] = ("complete", "error"),
             who: str | None = None, source: str | None = None, timeout: float = 20,
             headers: dict[str, str] | None = None) -> dict:
    wanted = (status,) if isinstance(status, str) else status

    def done() -> dict | None:
        record = job_record(gate, jid, who, source, headers).json()
        return record if record.get("status") in wanted else None
    return wait_until(done, timeout, f"job {jid} to be {wanted}", interval=0.05)


def read_legacy_stream(gate: Process, jid: str, who: str | None = None,
                       source: str | None = None) -> list[Any]:
    events: list[Any] = []
    url = f"{gate.url}/stream/{jid}"
    with client(source, timeout=20) as c, c.stream("GET", url, headers=auth(who)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if "done" in events[-1] or "error" in events[-1]:
                    break
    return events


def unknown_answers(gate: Process, jid: str, who: str | None = None, source: str | None = None) -> None:
    """``jid`` is, for this caller, exactly an id that never existed."""
    other = str(uuid.uuid4())
    with client(source) as c:
        for kind in ("stream", "request"):
            got = c.get(f"{gate.url}/{kind}/{jid}", headers=auth(who))
            never = c.get(f"{gate.url}/{kind}/{other}", headers=auth(who))
            assert got.headers["content-type"].startswith("application/json"), \
                (f"/{kind}/{{id}} of another identity's job was served", got.status_code, got.text[:200])
            answers = [(r.status_code, r.json()) for r in (got, never)]
            assert answers == [(200, UNKNOWN_ID_BODY)] * 2, (kind, answers)
            assert got.headers["content-type"] == never.headers["content-type"]
        got = c.get(f"{gate.url}/queue/{jid}", headers=auth(who))
        never = c.get(f"{gate.url}/queue/{other}", headers=auth(who))
    assert got.status_code == never.status_code == 404, got.text
    assert error_of(got)["code"] == error_of(never)["code"] == "request_not_found"
    assert got.text.replace(jid, "ID") == never.text.replace(other, "ID")


def posts(sim: Process, since: int = 0) -> list[dict[str, Any]]:
    return [r for r in sim_requests(sim)[since:] if r["method"] == "POST"]


# ---------------------------------------------------------------------------------------
# with keys
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("hostile-keys")
    with running_stack(tmp, "--config", keys_config(tmp), "--log-level", "warning",
                       "--stream-open-timeout", "60", "--queue-timeout", "30",
                       tokens_per_s=200, load_s=0.05) as pair:
        yield pair


def test_old_api_job_belongs_to_its_key(keyed: tuple[Process, Process]) -> None:
    """Item 1: no key -> 401; another key -> the unknown-id answer; owner and admin read it."""
    _, gate = keyed
    body = legacy("mine alone", max_tokens=4)
    jid = add_job(gate, body, "alice")
    wait_job(gate, jid, "complete", "alice")
    for path in (f"/stream/{jid}", f"/request/{jid}", f"/queue/{jid}"):
        for headers in ({}, {"authorization": "Bearer sk-not-a-real-key-9"}):
            resp = gate.http.get(path, headers=headers)
            assert resp.status_code == 401, (path, resp.status_code, resp.text[:200])
            assert jid not in resp.text
    unknown_answers(gate, jid, "bob")
    want = expected_reply({**body, "stream": True})
    for who in ("alice", "ops"):
        record = job_record(gate, jid, who).json()
        assert record["status"] == "complete" and record["result"] == want, (who, record)
        events = read_legacy_stream(gate, jid, who)
        assert events[-1] == {"done": True}
        assert "".join(e.get("chunk", "") for e in events) == want
        resp = gate.http.get(f"/queue/{jid}", headers=auth(who))
        assert resp.status_code == 200, (who, resp.text)
    assert_gate_free(gate, "alice")


def test_running_ids_never_shown_to_others(keyed: tuple[Process, Process]) -> None:
    """Item 1: /queue/status, /health, /queue (and /) as bob or anonymous: none of alice's ids,
    current_request_id null, while her old-API job runs and her gated request waits."""
    _, gate = keyed
    running = add_job(gate, legacy("long one", max_tokens=1600), "alice")  # ~8 s at 200 tokens/s
    wait_job(gate, running, "processing", "alice")
    waiting = stream_open(gate, chat("alice waits", max_tokens=3), who="alice")
    try:
        rid = waiting.headers["x-request-id"]
        assert waiting.headers["x-queue-position"] == "1"
        for who in (None, "bob"):
            for path in ("/queue/status", "/health", "/queue", "/"):
                resp = gate.http.get(path, headers=auth(who))
                assert running not in resp.text and rid not in resp.text, (who, path, resp.text[:300])
            for path in ("/queue/status", "/health"):
                resp = gate.http.get(path, headers=auth(who))
                if resp.status_code == 200:
                    assert resp.json()["stats"]["current_request_id"] is None, (who, path)
                else:
                    assert who is None and resp.status_code == 401
            q = gate.http.get("/queue", headers=auth(who)).json()
            assert q["active"] == 1 and q["depth"] == 1  # counts are public, ids are not
            assert not any(e.get("mine") for e in q["running"] + q["waiting"])
        for who in ("alice", "ops"):  # the owner and an admin see them
            status = gate.http.get("/queue/status", headers=auth(who)).json()
            assert status["stats"]["current_request_id"] == running, who
            text = gate.http.get("/queue", headers=auth(who)).text
            assert running in text and rid in text, who
    finally:
        waiting.close()
        resp = gate.http.delete(f"/queue/{running}", headers=auth("ops"))
    assert resp.status_code == 200, resp.text
    assert_gate_free(gate, "alice")


def test_shared_request_id_resolves_per_owner_and_ambiguous_delete_refused(
        keyed: tuple[Process, Process]) -> None:
    """Item 3: alice and bob both wait with X-Request-ID shared-1; admin DELETE by it -> 409,
    nothing cancelled; each sees only their own; both complete."""
    sim, gate = keyed
    holder = stream_open(gate, chat("hold", max_tokens=2000), who="alice")
    conns = [holder]
    try:
        assert started(holder)
        a = stream_open(gate, chat("alice waits", max_tokens=4), who="alice",
                        headers={"x-request-id": "shared-1"})
        conns.append(a)
        b = stream_open(gate, chat("bob waits", model=OTHER, max_tokens=4), who="bob",
                        headers={"x-request-id": "shared-1"})
        conns.append(b)
        assert a.status == b.status == 200
        assert a.headers["x-request-id"] == b.headers["x-request-id"] == "shared-1"
        assert (a.headers["x-queue-position"], b.headers["x-queue-position"]) == ("1", "2")

        resp = gate.http.delete("/queue/shared-1", headers=auth("ops"))
        assert resp.status_code == 409, resp.text
        assert error_of(resp)["code"] == "ambiguous_request_id"
        q = queue(gate, "ops")
        assert q["depth"] == 2 and q["active"] == 1
        for who, model in (("alice", MODEL), ("bob", OTHER)):
            resp = gate.http.get("/queue/shared-1", headers=auth(who))
            assert resp.status_code == 200, (who, resp.text)
            view = resp.json()
            assert view["mine"] is True and view["model"] == model and view["state"] == "waiting", (who, view)
        holder.close()
        for conn, text in ((a, "alice waits"), (b, "bob waits")):
            assert conn.read_until(lambda body: b"data: [DONE]" in body, 15), conn.body[-300:]
            assert text in stream_text(conn)
    finally:
        for conn in conns:
            conn.close()
    assert_gate_free(gate, "alice")


def test_admin_cancels_one_request_by_its_internal_id(keyed: tuple[Process, Process]) -> None:
    """Item 3: admin /queue shows each entry's own "id"; DELETE /queue/{id} cancels exactly it."""
    sim, gate = keyed
    before = len(sim_requests(sim))
    holder = stream_open(gate, chat("hold", max_tokens=2000), who="alice")
    conns = [holder]
    try:
        assert started(holder)
        a = stream_open(gate, chat("alice waits", max_tokens=4), who="alice",
                        headers={"x-request-id": "shared-2"})
        conns.append(a)
        b = stream_open(gate, chat("bob waits", model=OTHER, max_tokens=4), who="bob",
                        headers={"x-request-id": "shared-2"})
        conns.append(b)
        q = queue(gate, "ops")
        entries = [e for e in q["waiting"] if e["request_id"] == "shared-2"]
        assert len(entries) == 2, q["waiting"]
        ids = [e["id"] for e in entries]
        assert len(set(ids)) == 2 and "shared-2" not in ids and all(ids), entries
        assert {e["client"] for e in entries} == {"alice", "bob"}
        running_id = q["running"][0]["id"]
        assert running_id and running_id not in ids
        bobs = next(e for e in entries if e["client"] == "bob")
        resp = gate.http.delete(f"/queue/{bobs['id']}", headers=auth("ops"))
        assert resp.status_code == 200, resp.text
        b.read_all(10)
        assert b.complete, b.body[-300:]
        errors = [line for line in b.lines() if line.startswith("data:") and '"error"' in line]
        assert errors, b.body[-300:]
        q = queue(gate, "ops")
        assert q["depth"] == 1 and q["waiting"][0]["client"] == "alice" and q["active"] == 1
        holder.close()
        assert a.read_until(lambda body: b"data: [DONE]" in body, 15)
    finally:
        for conn in conns:
            conn.close()
    assert_gate_free(gate, "alice")
    assert not [r for r in posts(sim, before) if r.get("model") == OTHER]  # bob's never went up


CAP_ROUTES = [
    ("/v1/chat/completions", "max_tokens", chat("x")),
    ("/v1/chat/completions", "max_completion_tokens", chat("x")),
    ("/v1/chat/completions", "max_output_tokens", chat("x")),
    ("/v1/completions", "max_tokens", {"model": MODEL, "prompt": "x"}),
    ("/api/v0/chat/completions", "max_tokens", chat("x")),
    ("/api/v0/completions", "max_tokens", {"model": MODEL, "prompt": "x"}),
    ("/v1/responses", "max_output_tokens", {"model": MODEL, "input": "x"}),
    ("/v1/messages", "max_tokens", chat("x")),
]


@pytest.mark.parametrize(("path", "field", "body"), CAP_ROUTES, ids=[f"{p}:{f}" for p, f, _ in CAP_ROUTES])
def test_token_cap_refused_on_every_gated_route(keyed: tuple[Process, Process], path: str, field: str,
                                                body: dict[str, Any]) -> None:
    """Item 7: over the key's cap -> 400 max_tokens_exceeded; never reaches the upstream."""
    sim, gate = keyed
    before = len(sim_requests(sim))
    for doc in ({**body, field: 100}, {**body, "max_tokens": 50, field: 100_000} if field != "max_tokens"
                else {**body, field: 100_000, "max_completion_tokens": 10}):
        for stream in (False, True):
            resp = gate.http.post(path, json={**doc, "stream": stream}, headers=auth("capped"))
            assert resp.status_code == 400, (doc, resp.status_code, resp.text[:200])
            assert error_of(resp)["code"] == "max_tokens_exceeded"
    assert posts(sim, before) == []


def test_token_cap_on_old_api(keyed: tuple[Process, Process]) -> None:
    """Item 7: /queue/add over the cap -> 400 and no job."""
    sim, gate = keyed
    before = len(sim_requests(sim))
    def tracked() -> int:
        return gate.http.get("/queue/status", headers=auth("ops")).json()["tracked_requests"]

    tracked_before = tracked()
    for extra in ({"max_tokens": 100}, {"max_tokens": 50, "max_completion_tokens": 100_000},
                  {"max_output_tokens": 51}):
        resp = gate.http.post("/queue/add", json=legacy("over", **extra), headers=auth("capped"))
        assert resp.status_code == 400, (extra, resp.text)
        assert error_of(resp)["code"] == "max_tokens_exceeded"
    assert tracked() == tracked_before
    assert posts(sim, before) == []
    assert_gate_free(gate, "alice")


def test_token_cap_inserted_in_the_routes_own_field(keyed: tuple[Process, Process]) -> None:
    """Item 7: a capped key's request naming no token field reaches the simulator with the
    route's field set to the cap (max_tokens / max_output_tokens; none for embeddings)."""
    sim, gate = keyed
    cases = [
        ("/v1/chat/completions", chat("no field"), "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "no field", "stream": True}, "max_tokens"),
        ("/v1/responses", {"model": MODEL, "input": "no field"}, "max_output_tokens"),
        ("/v1/embeddings", {"model": EMBED, "input": "no field"}, None),
    ]
    fields = {"max_tokens", "max_completion_tokens", "max_output_tokens"}
    for path, body, field in cases:
        before = len(sim_requests(sim))
        resp = gate.http.post(path, json=body, headers=auth("capped"), timeout=20)
        assert resp.status_code < 500, resp.text
        sent = [r for r in posts(sim, before) if r["path"] == path]
        assert len(sent) == 1, (path, sent)
        named = {k: v for k, v in sent[0].items() if k in fields}
        assert named == ({field: 50} if field else {}), (path, sent)
    # the old API, too
    before = len(sim_requests(sim))
    jid = add_job(gate, legacy("no field"), "capped")
    assert wait_job(gate, jid, who="capped")["status"] == "complete"
    sent = posts(sim, before)
    assert len(sent) == 1 and sent[0]["max_tokens"] == 50, sent
    assert not {"max_completion_tokens", "max_output_tokens"} & set(sent[0])
    # within the cap: passes unchanged
    before = len(sim_requests(sim))
    assert gate.http.post("/v1/chat/completions", json=chat("ok", max_completion_tokens=7),
                          headers=auth("capped"), timeout=20).status_code == 200
    sent = posts(sim, before)
    assert sent[0]["max_completion_tokens"] == 7 and "max_tokens" not in sent[0], sent


def test_clamped_key_is_lowered_to_its_cap(keyed: tuple[Process, Process]) -> None:
    """Item 7: clamp_max_tokens=true: over-cap fields reach the simulator as the cap."""
    sim, gate = keyed
    for path, body, field in (("/v1/chat/completions", chat("clamp", max_completion_tokens=100_000),
                               "max_completion_tokens"),
                              ("/v1/chat/completions", chat("clamp", max_tokens=100, stream=True),
                               "max_tokens"),
                              ("/v1/responses", {"model": MODEL, "input": "c", "max_output_tokens": 999},
                               "max_output_tokens")):
        before = len(sim_requests(sim))
        resp = gate.http.post(path, json=body, headers=auth("clamped"), timeout=20)
        assert resp.status_code < 500, resp.text
        sent = posts(sim, before)
        assert len(sent) == 1 and sent[0][field] == 50, (path, sent)
    before = len(sim_requests(sim))
    jid = add_job(gate, legacy("clamp", max_tokens=1000), "clamped")
    assert wait_job(gate, jid, who="clamped")["status"] == "complete"
    assert [r["max_tokens"] for r in posts(sim, before)] == [50]
    assert_gate_free(gate, "alice")


# ---------------------------------------------------------------------------------------
# without keys: identity is the socket peer
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_fair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("hostile-open")
    with running_stack(tmp, "--log-level", "warning", "--policy", "fair", "--stream-open-timeout", "60",
                       tokens_per_s=50, load_s=0.05) as pair:
        yield pair


def test_without_keys_a_job_is_unknown_to_another_peer(open_fair: tuple[Process, Process]) -> None:
    """Item 1: a job created from 127.0.0.1 is unknown from 127.0.0.2, also while it runs."""
    _, gate = open_fair
    jid = add_job(gate, legacy("from one", max_tokens=150))  # ~3 s
    wait_job(gate, jid, "processing")
    for path in ("/queue/status", "/health", "/queue"):
        with client("127.0.0.2") as c:
            resp = c.get(gate.url + path)
        assert resp.status_code == 200 and jid not in resp.text, (path, resp.text[:300])
    with client("127.0.0.2") as c:
        assert c.get(gate.url + "/queue/status").json()["stats"]["current_request_id"] is None
    with client() as c:
        assert c.get(gate.url + "/queue/status").json()["stats"]["current_request_id"] == jid
    unknown_answers(gate, jid, source="127.0.0.2")
    assert wait_job(gate, jid)["status"] == "complete"
    unknown_answers(gate, jid, source="127.0.0.2")
    assert read_legacy_stream(gate, jid)[-1] == {"done": True}
    assert_gate_free(gate)


def test_generated_ids_are_uuid4_and_distinct(open_fair: tuple[Process, Process]) -> None:
    """Item 2: X-Request-ID of gated requests that sent none, and /queue/add request_id."""
    _, gate = open_fair
    ids: list[str] = []
    with client() as c:
        for i in range(36):
            resp = c.post(gate.url + "/v1/chat/completions", json=chat(f"id {i}", max_tokens=1))
            assert resp.status_code == 200
            ids.append(resp.headers["x-request-id"])
        for i in range(4):
            with c.stream("POST", gate.url + "/v1/chat/completions",
                          json=chat(f"s {i}", max_tokens=1, stream=True)) as resp:
                resp.read()
                ids.append(resp.headers["x-request-id"])
        for i in range(10):
            resp = c.post(gate.url + "/queue/add", json=legacy(f"job {i}", max_tokens=1))
            assert resp.status_code == 200
            ids.append(resp.json()["request_id"])
            if "x-request-id" in resp.headers:
                assert resp.headers["x-request-id"] == ids[-1]
    bad = [i for i in ids if not is_uuid4(i)]
    assert not bad, bad
    assert len(set(ids)) == len(ids) == 50
    assert_gate_free(gate)


def test_forwarded_for_is_ignored_without_trusted_proxies(open_fair: tuple[Process, Process]) -> None:
    """Item 8: under --policy fair, an attacker's 5 requests with 5 made-up X-Forwarded-For
    are one identity: the victim's request is at most second in line."""
    sim, gate = open_fair
    conns = []
    try:
        holder = stream_open(gate, chat("hold", max_tokens=2000), source="127.0.0.4")
        conns.append(holder)
        assert started(holder)
        for i in range(5):
            conns.append(stream_open(gate, chat(f"attack {i}", max_tokens=2), source="127.0.0.2",
                                     headers={"x-forwarded-for": f"10.66.{i}.{i + 1}",
                                              "forwarded": f"for=10.77.{i}.1"}))
        victim = stream_open(gate, chat("victim", max_tokens=2), source="127.0.0.1")
        conns.append(victim)
        assert int(victim.headers["x-queue-position"]) <= 2, victim.headers
        attacker_view = queue(gate, source="127.0.0.2")
        assert sum(1 for e in attacker_view["waiting"] if e["mine"]) == 5
        victim_view = queue(gate, source="127.0.0.1")
        mine = [e for e in victim_view["waiting"] if e["mine"]]
        assert len(mine) == 1 and mine[0]["position"] <= 2, victim_view["waiting"]
        with client("127.0.0.2") as c:  # claiming to be the victim changes nothing
            spoofed = c.get(gate.url + "/queue", headers={"x-forwarded-for": "127.0.0.1"}).json()
        assert sum(1 for e in spoofed["waiting"] if e["mine"]) == 5
        holder.close()
        assert victim.read_until(lambda body: b"data: [DONE]" in body, 15)
    finally:
        for conn in conns:
            conn.close()
    assert_gate_free(gate)


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("hostile-xff")
    with running_stack(tmp, "--log-level", "warning", "--trusted-proxies", "127.0.0.3",
                       "--stream-open-timeout", "60", tokens_per_s=50, load_s=0.05) as pair:
        yield pair


def test_forwarded_for_from_a_trusted_proxy_only(behind_proxy: tuple[Process, Process]) -> None:
    """Item 8: from 127.0.0.3 (trusted) `X-Forwarded-For: 10.9.9.9, 127.0.0.3` is identity
    10.9.9.9; from any other peer the header is ignored."""
    _, gate = behind_proxy
    xff = {"x-forwarded-for": "10.9.9.9, 127.0.0.3"}
    holder = stream_open(gate, chat("hold", max_tokens=2000), source="127.0.0.3", headers=xff)
    try:
        assert started(holder)

        def mine(source: str, headers: dict[str, str]) -> bool:
            with client(source) as c:
                q = c.get(gate.url + "/queue", headers=headers).json()
            assert q["active"] == 1
            return bool(q["running"][0]["mine"])

        assert mine("127.0.0.3", {"x-forwarded-for": "10.9.9.9"})
        assert mine("127.0.0.3", {"forwarded": "for=10.9.9.9"})
        assert mine("127.0.0.3", {"x-forwarded-for": "6.6.6.6, 10.9.9.9"})  # spoofed left part ignored
        assert not mine("127.0.0.1", {})
        assert not mine("127.0.0.3", {})
        assert not mine("127.0.0.3", {"x-forwarded-for": "10.9.9.9, 10.1.1.1"})  # rightmost untrusted wins
        assert not mine("127.0.0.2", {"x-forwarded-for": "10.9.9.9"})
        assert not mine("127.0.0.2", {"forwarded": "for=10.9.9.9"})
    finally:
        holder.close()
    # the old API: a job is owned by the forwarded identity behind the proxy ...
    jid = add_job(gate, legacy("via proxy", max_tokens=2), source="127.0.0.3", headers=xff)
    rec = wait_job(gate, jid, source="127.0.0.3", headers={"x-forwarded-for": "10.9.9.9"})
    assert rec["status"] == "complete"
    assert job_record(gate, jid, source="127.0.0.3").json() == UNKNOWN_ID_BODY
    other = job_record(gate, jid, source="127.0.0.3", headers={"x-forwarded-for": "10.8.8.8"})
    assert other.json() == UNKNOWN_ID_BODY
    # ... and by the peer itself from an untrusted peer, whatever it claims
    jid2 = add_job(gate, legacy("direct", max_tokens=2), source="127.0.0.2",
                   headers={"x-forwarded-for": "10.9.9.9"})
    assert wait_job(gate, jid2, source="127.0.0.2")["status"] == "complete"
    spoofed = job_record(gate, jid2, source="127.0.0.3", headers={"x-forwarded-for": "10.9.9.9"})
    assert spoofed.json() == UNKNOWN_ID_BODY
    assert_gate_free(gate)


# ---------------------------------------------------------------------------------------
# labels and credentials
# ---------------------------------------------------------------------------------------

def test_refused_models_do_not_claim_metric_labels(tmp_path: Path) -> None:
    """Item 11: 60 refused junk model names fold into model="other"; the real model still
    gets its own label with --max-models 5."""
    with running_stack(tmp_path, "--config", keys_config(tmp_path), "--max-models", "5",
                       "--log-level", "warning", tokens_per_s=0, load_s=0) as (sim, gate):
        with client() as c:
            for i in range(60):
                resp = c.post(gate.url + "/v1/chat/completions", headers=auth("narrow"),
                              json=chat("junk", model=f"junk-model-{i}", max_tokens=1))
                assert resp.status_code == 403, resp.text
            resp = c.post(gate.url + "/queue/add", headers=auth("narrow"), json=legacy(model="junk-model-x"))
            assert resp.status_code == 403
            for _ in range(2):
                resp = c.post(gate.url + "/v1/chat/completions", headers=auth("narrow"),
                              json=chat("real", max_tokens=1))
                assert resp.status_code == 200, resp.text
            text = c.get(gate.url + "/metrics", headers=auth("ops")).text
        lines = [line for line in text.splitlines() if line.startswith("lmgate_requests_total{")]
        assert any(f'model="{MODEL}"' in line and 'outcome="ok"' in line for line in lines), lines
        assert "junk-model" not in text
        refused = sum(float(line.rsplit(" ", 1)[1]) for line in lines
                      if 'model="other"' in line and 'outcome="rejected"' in line)
        assert refused >= 60, lines
        assert not [r for r in sim_requests(sim) if "junk" in str(r.get("model"))]


def test_upstream_credentials_never_shown(tmp_path: Path) -> None:
    """Item 10: `--upstream http://user:s3cretpw@...`: the password appears in no response
    and no log line; requests still work."""
    secret = "s3cretpw"
    sim = start_simulator(tmp_path, tokens_per_s=0, load_s=0)
    try:
        gate = start_lmgate(tmp_path, f"http://user:{secret}@127.0.0.1:{sim.port}", "--log-level", "debug",
                            "--probe-interval", "0.2", "--connect-timeout", "1")
        try:
            seen: list[str] = []
            with client() as c:
                resp = c.post(gate.url + "/v1/chat/completions", json=chat("works", max_tokens=2))
                assert resp.status_code == 200 and "works" in resp.text
                seen.append(resp.text)
                for path in ("/v1/models", "/health", "/readyz", "/healthz", "/queue", "/queue/status",
                             "/metrics", "/"):
                    seen.append(c.get(gate.url + path).text)
                seen.append(c.post(gate.url + "/v1/chat/completions", json=chat(model="nope")).text)
                sim.stop()  # upstream gone: errors and warnings name it, without the password
                resp = c.post(gate.url + "/v1/chat/completions", json=chat("down", max_tokens=2))
                assert resp.status_code == 502
                seen.append(resp.text)
                wait_until(lambda: c.get(gate.url + "/readyz").status_code == 503, 10, "readyz to notice")
                for path in ("/health", "/readyz", "/queue", "/queue/status", "/metrics"):
                    seen.append(c.get(gate.url + path).text)
        finally:
            gate.stop()
        seen.append(gate.log_path.read_text(errors="replace"))
        for text in seen:
            assert secret not in text, text[:500]
        assert "127.0.0.1" in "".join(seen)  # the upstream is still named
    finally:
        sim.stop()
