"""Keys, per-key limits, admin rights, anonymised queue views, CORS, upstream credentials."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import httpx
import pytest

from proxy.config import ApiKey, Settings

from .harness import LISTING, chat_body, run, serve


def key(name: str, secret: str, **kw: object) -> ApiKey:
    return ApiKey(name=name, sha256=hashlib.sha256(secret.encode()).hexdigest(), **kw)  # type: ignore[arg-type]


KEYS = (
    key("alice", "sk-alice-123456", models=("m1", "qwen*"), max_queued=1, max_tokens=100),
    key("bob", "sk-bob-12345678", rpm=2),
    key("carol", "sk-carol-1234567", max_tokens=50, clamp_max_tokens=True),
    key("root", "sk-root-12345678", role="admin"),
)
ALICE = {"authorization": "Bearer sk-alice-123456"}
BOB = {"x-api-key": "sk-bob-12345678"}
CAROL = {"authorization": "Bearer sk-carol-1234567"}
ROOT = {"authorization": "Bearer sk-root-12345678"}


def keyed(**kw: object) -> Settings:
    return Settings(keys=KEYS, **kw)  # type: ignore[arg-type]


def test_missing_or_wrong_key_is_401_and_not_forwarded() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            for headers in ({}, {"authorization": "Bearer nope-nope-nope"}, {"authorization": "Basic abc"},
                            {"x-api-key": ""}):
                resp = await r.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
                assert resp.status_code == 401, headers
                assert resp.json()["error"]["type"] == "authentication_error"
            assert (await r.client.get("/v1/models")).status_code == 401
            assert r.upstream.seen == []
            ok = await r.client.post("/v1/chat/completions", json=chat_body(), headers=ALICE)
            assert ok.status_code == 200
            ok = await r.client.post("/v1/chat/completions", json=chat_body(), headers=BOB)
            assert ok.status_code == 200
    run(body)


def test_client_key_never_reaches_upstream_but_upstream_key_does() -> None:
    async def body() -> None:
        async with serve(keyed(upstream_key="lm-studio-token")) as r:
            await r.client.post("/v1/chat/completions", json=chat_body(), headers={**ALICE, "x-api-key": "zzz"})
            seen = r.upstream.seen[-1]
            assert seen.headers["authorization"] == "Bearer lm-studio-token"
            assert "x-api-key" not in seen.headers
    run(body)


def test_model_allowlist_is_403() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            resp = await r.client.post("/v1/chat/completions", json=chat_body("llama-3"), headers=ALICE)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "model_not_allowed"
            ok = await r.client.post("/v1/chat/completions", json=chat_body("qwen2.5-7b"), headers=ALICE)
            assert ok.status_code == 200
            assert len(r.upstream.seen) == 1
    run(body)


def test_token_cap_rejects_or_clamps() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            resp = await r.client.post("/v1/chat/completions", json=chat_body(max_tokens=500), headers=ALICE)
            assert resp.status_code == 400 and "100" in resp.json()["error"]["message"]
            assert resp.json()["error"]["param"] == "max_tokens"
            resp = await r.client.post("/v1/chat/completions", json=chat_body(max_tokens=500), headers=CAROL)
            assert resp.status_code == 200
            assert json.loads(r.upstream.seen[-1].body)["max_tokens"] == 50
            resp = await r.client.post("/v1/chat/completions", json=chat_body(), headers=CAROL)
            assert json.loads(r.upstream.seen[-1].body)["max_tokens"] == 50  # absent -> capped too
            raw = json.dumps(chat_body(max_tokens=10)).encode()
            await r.client.post("/v1/chat/completions", content=raw, headers=CAROL)
            assert r.upstream.seen[-1].body == raw  # under the cap: untouched bytes
    run(body)


def test_rpm_limit_is_429_with_retry_after() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            for _ in range(2):
                assert (await r.client.post("/v1/chat/completions", json=chat_body(), headers=BOB)).status_code == 200
            resp = await r.client.post("/v1/chat/completions", json=chat_body(), headers=BOB)
            assert resp.status_code == 429
            assert 1 <= int(resp.headers["retry-after"]) <= 60
            assert len(r.upstream.seen) == 2
    run(body)


def test_max_queued_per_key() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            holder = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold"),
                                                       headers=ROOT))
            await r.upstream.wait_for_requests(1)
            first = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(), headers=ALICE))
            await r.wait_depth(1)
            resp = await r.client.post("/v1/chat/completions", json=chat_body(), headers=ALICE)
            assert resp.status_code == 429 and resp.json()["error"]["code"] == "key_queue_full"
            assert "retry-after" in resp.headers
            r.upstream.release(0)
            await holder
            assert (await first).status_code == 200
    run(body)


def test_queue_view_is_anonymised_except_own_and_admin() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            holder = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold"),
                                                       headers=ROOT))
            await r.upstream.wait_for_requests(1)
            mine = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(),
                                                     headers={**ALICE, "x-request-id": "alice-1"}))
            await r.wait_depth(1)
            as_alice = (await r.client.get("/queue", headers=ALICE)).json()
            assert as_alice["waiting"][0]["request_id"] == "alice-1" and as_alice["waiting"][0]["mine"]
            assert as_alice["running"][0]["request_id"] is None and "client" not in as_alice["running"][0]
            as_bob = (await r.client.get("/queue", headers=BOB)).json()
            assert as_bob["waiting"][0]["request_id"] is None and not as_bob["waiting"][0]["mine"]
            anonymous = (await r.client.get("/queue")).json()
            assert anonymous["waiting"][0]["request_id"] is None
            as_root = (await r.client.get("/queue", headers=ROOT)).json()
            assert as_root["waiting"][0]["client"] == "alice" and as_root["running"][0]["client"] == "root"
            assert (await r.client.get("/queue", headers={"authorization": "Bearer wrong-key!"})).status_code == 401
            r.upstream.release(0)
            await holder
            await mine
    run(body)


def test_admin_may_manage_models_and_cancel() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            denied = await r.client.post("/api/v1/models/load", json={"model": "m1"}, headers=ALICE)
            assert denied.status_code == 403
            allowed = await r.client.post("/api/v1/models/load", json={"model": "m1"}, headers=ROOT)
            assert allowed.status_code == 200 and r.upstream.seen[-1].path == "/api/v1/models/load"
            holder = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold"),
                                                       headers={**BOB, "x-request-id": "run-1"}))
            await r.upstream.wait_for_requests(2)
            waiting = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(),
                                                        headers={**ALICE, "x-request-id": "wait-1"}))
            await r.wait_depth(1)
            assert (await r.client.delete("/queue/wait-1", headers=ALICE)).status_code == 403
            assert (await r.client.delete("/queue/wait-1")).status_code == 401
            assert (await r.client.delete("/queue/wait-1", headers=ROOT)).json()["cancelled"] is True
            cancelled = await waiting
            assert cancelled.status_code == 499 and cancelled.json()["error"]["code"] == "cancelled"
            assert (await r.client.delete("/queue/run-1", headers=ROOT)).status_code == 200
            assert (await holder).status_code == 499
            assert (await r.client.delete("/queue/none", headers=ROOT)).status_code == 404
            await r.wait_depth(0)
            assert r.state.gate.active == 0
    run(body)


def test_cors_preflight_answered_without_the_gate() -> None:
    async def body() -> None:
        async with serve(cors_origins=("http://app.local:8501",)) as r:
            pre = await r.client.options("/v1/chat/completions", headers={
                "origin": "http://app.local:8501", "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "http://app.local:8501"
            resp = await r.client.post("/v1/chat/completions", json=chat_body(),
                                       headers={"origin": "http://app.local:8501"})
            assert resp.headers["access-control-allow-origin"] == "http://app.local:8501"
            assert "x-queue-position" in resp.headers["access-control-expose-headers"]
            assert len(r.upstream.seen) == 1
            other = await r.client.options("/v1/chat/completions", headers={
                "origin": "http://evil.local", "access-control-request-method": "POST"})
            assert "access-control-allow-origin" not in other.headers
        async with serve() as r:  # off by default
            resp = await r.client.post("/v1/chat/completions", json=chat_body(),
                                       headers={"origin": "http://app.local:8501"})
            assert "access-control-allow-origin" not in resp.headers
    run(body)


def test_open_access_on_network_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        with caplog.at_level(logging.WARNING, logger="lmgate"):
            async with serve(host="0.0.0.0"):
                pass
    run(body)
    assert any("ANYONE" in rec.getMessage() for rec in caplog.records)


def test_fair_policy_serves_bob_within_two_turns() -> None:
    """A enqueues 20, then B enqueues 1: B within the next 2 turns under fair."""
    async def body() -> None:
        for policy, bob_turn_max in (("fair", 2), ("fifo", 21)):
            async with serve(keyed(policy=policy)) as r:
                holder = asyncio.create_task(r.client.post(
                    "/v1/chat/completions", json=chat_body(act="hold"), headers=ALICE))
                await r.upstream.wait_for_requests(1)
                others = []
                for _ in range(19):
                    others.append(asyncio.create_task(r.client.post(
                        "/v1/chat/completions", json=chat_body(x_who="alice"), headers=ROOT)))
                    await r.wait_depth(len(others))
                bob = asyncio.create_task(r.client.post(
                    "/v1/chat/completions", json=chat_body(x_who="bob"), headers=BOB))
                await r.wait_depth(20)
                r.upstream.release(0)
                await holder
                await asyncio.gather(bob, *others)
                order = [json.loads(s.body).get("x_who") for s in r.upstream.seen[1:]]
                turn = order.index("bob") + 1
                if policy == "fair":
                    assert turn <= bob_turn_max, order
                else:
                    assert turn == 20, order
    run(body)


def test_positions_follow_the_fair_policy() -> None:
    async def body() -> None:
        async with serve(keyed(policy="fair")) as r:
            holder = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold"),
                                                       headers=ROOT))
            await r.upstream.wait_for_requests(1)
            tasks = []
            for _ in range(3):
                tasks.append(asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(),
                                                               headers=ROOT)))
                await r.wait_depth(len(tasks))
            bob = await asyncio.wait_for(_post_and_position(r.client, BOB), 5)
            assert bob == 1  # root already had a turn: bob goes next
            r.upstream.release(0)
            await holder
            await asyncio.gather(*tasks)
    run(body)


async def _post_and_position(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True), headers=headers) as resp:
        return int(resp.headers["x-queue-position"])


def test_secrets_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        with caplog.at_level(logging.DEBUG):
            async with serve(keyed(upstream_key="lm-studio-token", log_format="json")) as r:
                await r.client.post("/v1/chat/completions", json=chat_body(), headers=ALICE)
                await r.client.post("/v1/chat/completions", json=chat_body(), headers=BOB)
                await r.client.post("/v1/chat/completions", json=chat_body(),
                                    headers={"authorization": "Bearer sk-wrong-secret-1"})
    run(body)
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    access = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "lmgate.access"]
    assert {a["client"] for a in access} >= {"alice", "bob"}
    for secret in ("sk-alice-123456", "sk-bob-12345678", "sk-wrong-secret-1", "lm-studio-token"):
        assert secret not in text


def test_admin_cancels_an_old_api_job() -> None:
    async def body() -> None:
        async with serve(keyed()) as r:
            holder = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold"),
                                                       headers=ROOT))
            await r.upstream.wait_for_requests(1)
            added = await r.client.post("/queue/add", headers=BOB, json={
                "client_id": "page", "model": "m1", "messages": [{"role": "user", "content": "x"}]})
            job_id = added.json()["request_id"]
            assert added.json()["queue_position"] == 1
            assert (await r.client.delete(f"/queue/{job_id}", headers=BOB)).status_code == 403
            assert (await r.client.delete(f"/queue/{job_id}", headers=ROOT)).status_code == 200
            for _ in range(100):
                record = (await r.client.get(f"/request/{job_id}", headers=BOB)).json()
                if record["status"] == "error":
                    break
                await asyncio.sleep(0.01)
            assert record["status"] == "error" and "administrator" in record["error"]
            assert r.state.gate.depth == 0 and len(r.upstream.seen) == 1
            r.upstream.release(0)
            await holder
    run(body)


def test_a_box_anyone_can_reach_without_a_token_is_warned_about(caplog) -> None:
    """lmgate with keys in front of a box on another machine that answers without a token:
    anyone on the network can go around lmgate. One warning line at start says so, and what
    to do (LM Studio's Require Authentication, and the token for lmgate)."""
    import logging

    from proxy.config import ApiKey

    key = ApiKey(name="a", sha256=hashlib.sha256(b"sk-warn-test-0001").hexdigest())
    # lmgate asks this only of a box on another machine (one on 127.0.0.1 is out of other
    # machines' reach) and tests listen on 127.0.0.1 alone, so this box is a mock transport
    remote = {"upstream": "http://upstream.test:1234",
              "transport": httpx.MockTransport(lambda _request: httpx.Response(200, json=LISTING))}

    async def body() -> None:
        async with serve(keys=(key,), **remote):
            pass
        async with serve(**remote):  # open access: nothing to go around
            pass
        async with serve(keys=(key,), upstream_key="sk-box-token", **remote):
            pass

    with caplog.at_level(logging.WARNING, logger="lmgate"):
        run(body)
    warnings = [r.getMessage() for r in caplog.records if "answers without a token" in r.getMessage()]
    # the scripted box answers everyone: warned with keys, with or without lmgate's own token
    assert len(warnings) == 2, warnings
    assert "Require Authentication" in warnings[0] and "upstream.test" in warnings[0]
