"""lmgate in a real uvicorn in front of a scripted upstream server: routing, pass-through,
queue feedback, disconnects, overload, timeouts and bad input. After every failure the gate
is free."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import struct
import uuid

import httpx
import openai
import pytest

from proxy.gated import STARTED_AT_ONCE
from proxy.protocol import GuardedProtocol
from proxy.transport import LeanTransport

from .harness import Running, chat_body, run, serve, sse_events


def comments(raw: bytes) -> list[str]:
    return [line for line in raw.decode().split("\n") if line.startswith(":")]


def data_payloads(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


SILENCE_S = 1.0  # --read-timeout where a test has the box fall silent


def box_up(r: Running) -> bool | None:
    """What lmgate last found about the box (None: not checked yet)."""
    return r.state.fleet.up_states()[r.box_name]


async def until_box_up_is(r: Running, up: bool, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if box_up(r) is up:
            return
        await asyncio.sleep(0.01)
    assert box_up(r) is up, f"lmgate did not find the box {'up' if up else 'down'} within {timeout_s} s"


async def hold_gate(r: Running) -> asyncio.Task[httpx.Response]:
    """Start a request that holds the gate until ``r.upstream.release(0)``."""
    n = len(r.upstream.seen)
    task = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold")))
    await r.upstream.wait_for_requests(n + 1)
    return task


# -- pass-through ------------------------------------------------------------------------
def test_body_and_headers_pass_through_byte_for_byte() -> None:
    async def body() -> None:
        async with serve() as r:
            raw = (b'{"model": "m1",  "messages":[{"role":"user","content":"caf\\u00e9 \xc3\xa9"}],'
                   b'"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],'
                   b'"response_format":{"type":"json_object"}, "logprobs": true}')
            resp = await r.client.post(
                "/v1/chat/completions?trace=1", content=raw,
                headers={"content-type": "application/json", "x-custom": "kept", "connection": "keep-alive",
                         "keep-alive": "timeout=5", "x-request-id": "my-id-1", "authorization": "Bearer sk-x"})
            assert resp.status_code == 200
            seen = r.upstream.seen[-1]
            assert seen.body == raw
            assert seen.headers["x-custom"] == "kept"
            assert seen.headers["host"] == r.box_name
            assert "keep-alive" not in seen.headers
            assert seen.headers["authorization"] == "Bearer sk-x"  # open mode: client's own header
            # the client's id stays with lmgate: the box gets lmgate's own id, a UUID (llama.cpp's
            # server answers 400 with an empty body to any id that is not one)
            sent = seen.headers.get_list("x-request-id")
            assert len(sent) == 1 and uuid.UUID(sent[0]).version == 4, sent
            assert resp.headers["x-request-id"] == "my-id-1"
            assert resp.json()["choices"][0]["message"]["content"] == "hello"
            mine = (await r.client.get("/queue/my-id-1")).json()
            assert mine["id"] == sent[0]  # the id the box saw is the request's own id on /queue
    run(body)


def test_the_boxs_own_id_and_queue_headers_do_not_pass_beside_lmgates() -> None:
    """Regression: a box behind lmgate (another lmgate, or a server that sets them) had its
    X-Upstream / X-Queue-* / X-Request-ID relayed next to lmgate's, so a client saw two
    different values."""
    async def body() -> None:
        async with serve() as r:
            r.upstream.extra_headers = {"x-upstream": "inner", "x-queue-position": "7",
                                        "x-queue-depth": "9", "x-queue-wait-ms": "5",
                                        "x-queue-eta-ms": "1", "x-request-id": "inner-id"}
            for stream in (False, True):
                async with r.client.stream("POST", "/v1/chat/completions",
                                           json=chat_body(stream=stream, act="stream" if stream else "ok"),
                                           headers={"x-request-id": "outer"}) as resp:
                    await resp.aread()
                    assert resp.status_code == 200
                    assert resp.headers.get_list("x-request-id") == ["outer"]
                    assert resp.headers.get_list("x-queue-position") == ["0"]
                    assert resp.headers.get_list("x-queue-depth") == ["0"]
                    assert resp.headers.get_list("x-upstream") == [r.box_name]
                    assert "x-queue-eta-ms" not in resp.headers
    run(body)


def test_stream_relayed_verbatim_including_odd_splits_and_done() -> None:
    async def body() -> None:
        async with serve() as r:
            events = sse_events(4)
            whole = b"".join(events)
            # re-split the same bytes at awkward places: inside "data:", inside JSON, mid "\n\n"
            r.upstream.events = [whole[:3], whole[3:57], whole[57:58], whole[58:200], whole[200:]]
            async with r.client.stream("POST", "/v1/chat/completions",
                                       json=chat_body(stream=True, act="stream")) as resp:
                got = await resp.aread()
                assert resp.headers["content-type"].startswith("text/event-stream")
                assert resp.headers["x-accel-buffering"] == "no"
                assert resp.headers["cache-control"] == "no-cache"
                assert resp.headers["x-queue-position"] == "0"
            assert got == STARTED_AT_ONCE + whole  # the two queue comments, then the bytes untouched
            assert data_payloads(got)[-1] == "[DONE]"
    run(body)


def test_model_listing_forwarded_at_once_even_while_gate_is_busy() -> None:
    async def body() -> None:
        async with serve() as r:
            holder = await hold_gate(r)
            resp = await r.client.get("/v1/models")
            assert resp.status_code == 200 and resp.json()["data"][0]["id"] == "m1"
            assert (await r.client.get("/api/v0/models")).status_code == 200
            assert (await r.client.get("/v1/models/m1")).status_code == 200
            r.upstream.release(0)
            assert (await holder).status_code == 200
            await r.assert_gate_free()
    run(body)


@pytest.mark.parametrize("path", ["/api/v1/models/load", "/api/v1/models/unload",
                                  "/api/v1/models/download", "/api/v1/models/download/status"])
def test_model_management_refused_without_admin(path: str) -> None:
    async def body() -> None:
        async with serve() as r:
            resp = await r.client.post(path, json={"model": "m1"})
            assert resp.status_code == 403
            assert resp.json()["error"]["type"] == "permission_error"
            assert r.upstream.seen == []
    run(body)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v2/whatever"), ("POST", "/queue/x/y"),
                                              ("GET", "/v1/chat/completions"), ("PUT", "/v1/models")])
def test_unknown_paths_are_404_and_never_forwarded(method: str, path: str) -> None:
    async def body() -> None:
        async with serve() as r:
            resp = await r.client.request(method, path)
            assert resp.status_code == 404
            err = resp.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "not_found"
            assert r.upstream.seen == []
    run(body)


# -- queue feedback ----------------------------------------------------------------------
def test_queue_headers_positions_depth_and_wait() -> None:
    async def body() -> None:
        async with serve() as r:
            holder = await hold_gate(r)
            waiters = [asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body()))
                       for _ in range(3)]
            await r.wait_depth(3)
            snap = (await r.client.get("/queue")).json()
            assert [w["position"] for w in snap["waiting"]] == [1, 2, 3]
            short = (await r.client.get("/queue?limit=2")).json()
            assert [w["position"] for w in short["waiting"]] == [1, 2] and short["depth"] == 3
            assert (await r.client.get("/queue?limit=x")).status_code == 400
            assert snap["active"] == 1 and snap["depth"] == 3
            one = snap["waiting"][0]
            item = (await r.client.get(f"/queue/{one['request_id']}")).json()
            assert item["state"] == "waiting" and item["position"] == 1 and "eta_ms" in item
            r.upstream.release(0)
            first = await holder
            assert first.headers["x-queue-position"] == "0"
            results = await asyncio.gather(*waiters)
            positions = sorted(int(x.headers["x-queue-position"]) for x in results)
            depths = sorted(int(x.headers["x-queue-depth"]) for x in results)
            assert positions == [1, 2, 3] and depths == [1, 2, 3]  # never 'number 1 in a line of 0'
            assert all(int(x.headers["x-queue-wait-ms"]) >= 0 for x in results)
            assert all("x-queue-eta-ms" not in x.headers for x in results)  # nothing learned yet
            done = (await r.client.get(f"/queue/{results[0].headers['x-request-id']}")).json()
            assert done["state"] == "done" and done["outcome"] == "ok"
            assert (await r.client.get("/queue/nope")).status_code == 404
            await r.assert_gate_free()
    run(body)


def test_waiting_stream_gets_headers_at_once_then_comments_then_upstream_bytes() -> None:
    async def body() -> None:
        async with serve() as r:
            holder = await hold_gate(r)
            second = await hold_gate_second(r)
            async with r.client.stream("POST", "/v1/chat/completions",
                                       json=chat_body(stream=True, act="stream")) as resp:
                # headers arrive while the request is still waiting (position 2)
                assert resp.status_code == 200
                assert resp.headers["x-queue-position"] == "2"
                assert resp.headers["content-type"].startswith("text/event-stream")
                chunks = resp.aiter_raw()
                first = await chunks.__anext__()
                assert first.startswith(b": queue_entered=2\n\n")
                r.upstream.release(0)
                await holder
                # position drops to 1 and is announced (at most once a second)
                buf = first
                while b"queue_position=1" not in buf:
                    buf += await chunks.__anext__()
                r.upstream.release(1)
                await second
                async for c in chunks:
                    buf += c
            lines = comments(buf)
            assert lines[0] == ": queue_entered=2"
            assert ": queue_position=1" in lines
            assert not any(line.startswith("id:") for line in buf.decode().split("\n"))
            upstream_part = buf[buf.index(b"data: "):]
            assert upstream_part == b"".join(r.upstream.events)
            await r.assert_gate_free()
    run(body)


async def hold_gate_second(r: Running) -> asyncio.Task[httpx.Response]:
    n = len(r.upstream.seen)
    task = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold")))
    await r.wait_depth(1)
    assert len(r.upstream.seen) == n
    return task


def test_immediate_stream_keeps_upstream_error_status() -> None:
    async def body() -> None:
        async with serve() as r:
            resp = await r.client.post("/v1/chat/completions", json=chat_body(stream=True, act="status:404"))
            assert resp.status_code == 404
            assert resp.json() == {"error": "upstream says 404"}  # LM Studio's own shape, unchanged
            await r.assert_gate_free()
    run(body)


def test_waited_stream_turns_upstream_error_into_error_event() -> None:
    async def body() -> None:
        async with serve() as r:
            holder = await hold_gate(r)
            task = asyncio.create_task(r.client.post(
                "/v1/chat/completions", json=chat_body(stream=True, act="status:500")))
            await r.wait_depth(1)
            r.upstream.release(0)
            await holder
            resp = await task
            assert resp.status_code == 200
            payloads = data_payloads(resp.content)
            err = json.loads(payloads[-1])["error"]
            assert err["message"] == "upstream says 500" and err["code"] == "500"
            await r.assert_gate_free()
    run(body)


# -- disconnects -------------------------------------------------------------------------
def test_client_leaving_while_queued_is_never_sent_upstream() -> None:
    async def body() -> None:
        async with serve() as r:
            holder = await hold_gate(r)
            async with httpx.AsyncClient(base_url=r.base) as other:
                leaver = asyncio.create_task(other.post("/v1/chat/completions", json=chat_body(act="ok")))
                await r.wait_depth(1)
                leaver.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaver
            await r.wait_depth(0)
            assert len(r.upstream.seen) == 1
            r.upstream.release(0)
            assert (await holder).status_code == 200
            assert len(r.upstream.seen) == 1  # the leaver never reached the upstream
            await r.assert_gate_free()
    run(body)


def test_client_leaving_mid_stream_closes_upstream_and_next_starts() -> None:
    async def body() -> None:
        async with serve() as r:
            next_req = None
            async with httpx.AsyncClient(base_url=r.base) as other:
                async with other.stream("POST", "/v1/chat/completions",
                                        json=chat_body(stream=True, act="hold_stream")) as resp:
                    it = resp.aiter_raw()
                    await it.__anext__()
                    next_req = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body()))
                    await r.wait_depth(1)
                # leaving the block closes the connection mid-stream
            seen = r.upstream.seen[0]
            await asyncio.wait_for(seen.closed.wait(), 1.0)  # upstream closed within 1 s
            resp2 = await asyncio.wait_for(next_req, 2.0)
            assert resp2.status_code == 200 and resp2.headers["x-queue-position"] == "1"
            await r.assert_gate_free()
    run(body)


# -- overload, timeouts, bad input -------------------------------------------------------
def test_queue_full_is_429_with_retry_after_and_not_forwarded() -> None:
    async def body() -> None:
        async with serve(max_queue=1) as r:
            holder = await hold_gate(r)
            waiter = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body()))
            await r.wait_depth(1)
            resp = await r.client.post("/v1/chat/completions", json=chat_body())
            assert resp.status_code == 429
            assert 1 <= int(resp.headers["retry-after"]) <= 120
            assert resp.json()["error"]["code"] == "queue_full"
            assert len(r.upstream.seen) == 1
            r.upstream.release(0)
            await holder
            assert (await waiter).status_code == 200
            await r.assert_gate_free()
    run(body)


@pytest.mark.parametrize("stream", [False, True])
def test_queue_timeout_is_503_or_error_event(stream: bool) -> None:
    async def body() -> None:
        async with serve(queue_timeout=0.3) as r:
            holder = await hold_gate(r)
            resp = await r.client.post("/v1/chat/completions", json=chat_body(stream=stream))
            if stream:
                assert resp.status_code == 200
                err = json.loads(data_payloads(resp.content)[-1])["error"]
            else:
                assert resp.status_code == 503
                err = resp.json()["error"]
            assert err["code"] == "queue_timeout"
            assert len(r.upstream.seen) == 1
            r.upstream.release(0)
            await holder
            await r.assert_gate_free()
    run(body)


@pytest.mark.parametrize(
    ("content", "code"),
    [(b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json"), (b"", "invalid_request"),
     (b'{"messages": []}', "missing_model"), (b'{"model": 42}', "missing_model"),
     (b'{"model": "m1", "stream": "yes"}', "invalid_request"),
     (b'{"model": "m1", "max_tokens": -3}', "invalid_request"),
     (b"[" * 100_000 + b"]" * 100_000, "invalid_json")],
)
def test_bad_input_is_400_and_never_forwarded(content: bytes, code: str) -> None:
    async def body() -> None:
        async with serve() as r:
            resp = await r.client.post("/v1/chat/completions", content=content)
            assert resp.status_code == 400
            err = resp.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == code
            assert r.upstream.seen == []
            await r.assert_gate_free()
    run(body)


def test_body_too_large_is_413() -> None:
    async def body() -> None:
        async with serve(max_body=1000) as r:
            big = json.dumps(chat_body(pad="x" * 2000)).encode()
            resp = await r.client.post("/v1/chat/completions", content=big)
            assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"

            async def chunks():  # no content-length: counted while reading
                for _ in range(5):
                    yield b"x" * 400
            resp = await r.client.post("/v1/chat/completions", content=chunks())
            assert resp.status_code == 413
            assert r.upstream.seen == []
            await r.assert_gate_free()
    run(body)


@pytest.mark.parametrize(("act", "status", "code"), [("connect", 502, "upstream_unavailable"),
                                                     ("read_timeout", 504, "upstream_timeout")])
def test_upstream_down_or_silent(act: str, status: int, code: str) -> None:
    """``connect``: the box is not listening, so the connect is refused; ``read_timeout``:
    it takes the request and says nothing for longer than --read-timeout."""
    async def body() -> None:
        async with serve(read_timeout=SILENCE_S) as r:
            if act == "connect":
                async with r.box.refusing():
                    resp = await r.client.post("/v1/chat/completions", json=chat_body())
            else:
                resp = await r.client.post("/v1/chat/completions", json=chat_body(act=act))
            assert resp.status_code == status and resp.json()["error"]["code"] == code
            await r.assert_gate_free()
    run(body)


@pytest.mark.parametrize(("act", "status"), [("reset", 502), ("read_timeout", 504)])
def test_a_request_that_may_have_reached_the_box_is_not_resent_by_the_openai_sdk(act: str, status: int) -> None:
    """The box took the request, then reset the connection (``reset``) or said nothing for
    longer than --read-timeout: the generation may have run, so lmgate answers with
    ``X-Should-Retry: false``, and the openai SDK, which by default retries a 5xx twice,
    sends it once. A refused connect (nothing reached the box) leaves the SDK its own rules."""
    async def body() -> None:
        async with serve(read_timeout=SILENCE_S) as r:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                sdk = openai.AsyncOpenAI(base_url=r.base + "/v1", api_key="none", http_client=http)
                assert sdk.max_retries == 2
                with pytest.raises(openai.APIStatusError) as info:
                    await sdk.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}],
                                                      extra_body={"x_act": act})
            assert info.value.status_code == status
            assert info.value.response.headers["x-should-retry"] == "false"
            assert len(r.upstream.seen) == 1
            async with r.box.refusing():
                resp = await r.client.post("/v1/chat/completions", json=chat_body())
            assert resp.status_code == 502 and "x-should-retry" not in resp.headers
            await r.assert_gate_free()
    run(body)


def test_upstream_silent_mid_stream_ends_with_error_event() -> None:
    async def body() -> None:
        async with serve(read_timeout=SILENCE_S) as r:
            resp = await r.client.post("/v1/chat/completions", json=chat_body(stream=True, act="slow_body"))
            payloads = data_payloads(resp.content)
            assert json.loads(payloads[-1])["error"]["code"] == "upstream_timeout"
            assert resp.content.startswith(STARTED_AT_ONCE + r.upstream.events[0])
            await r.assert_gate_free()
    run(body)


def test_upstream_breaking_off_between_events_and_inside_one() -> None:
    async def body() -> None:
        async with serve() as r:
            resp = await r.client.post("/v1/chat/completions", json=chat_body(stream=True, act="break"))
            ev = r.upstream.events
            assert resp.content.startswith(STARTED_AT_ONCE + ev[0] + ev[1] + b"data: {")
            assert json.loads(data_payloads(resp.content)[-1])["error"]["code"] == "upstream_unavailable"
            resp = await r.client.post("/v1/chat/completions", json=chat_body(stream=True, act="break_mid"))
            # the broken event is closed off, then the error is an event of its own
            assert resp.content.startswith(STARTED_AT_ONCE + ev[0] + ev[1][:10] + b"\n\n")
            assert json.loads(data_payloads(resp.content)[-1])["error"]["code"] == "upstream_unavailable"
            await r.assert_gate_free()
    run(body)


# -- health, shutdown --------------------------------------------------------------------
def test_healthz_and_readyz() -> None:
    async def body() -> None:
        async with serve() as r:
            assert (await r.client.get("/healthz")).json() == {"status": "ok"}
            ready = await r.client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["upstream_up"] is True
    run(body)


def test_readyz_answers_from_the_last_check_and_never_probes() -> None:
    async def body() -> None:
        async with serve(probe_interval=0.05) as r:
            for _ in range(20):
                assert (await r.client.get("/readyz")).status_code == 200
            r.state.fleet.probe_interval_s = 3600.0  # no checks of its own from here on
            await asyncio.sleep(0.1)  # let a check already sleeping run out
            listed = len(r.upstream.listings)
            for _ in range(20):
                await r.client.get("/readyz")
            assert len(r.upstream.listings) == listed  # /readyz itself sent nothing upstream
            async with r.box.refusing():  # the box goes away
                r.state.fleet.probe_interval_s = 0.05  # and the idle check finds it gone
                await until_box_up_is(r, False)
                ready = await r.client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["upstream_up"] is False
                assert (await r.client.get("/healthz")).status_code == 200
    run(body)


def test_shutdown_refuses_waiting_and_gives_running_the_grace() -> None:
    async def body() -> None:
        async with serve(shutdown_grace=0.5) as r:
            holder = await hold_gate(r)
            plain = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body()))
            streamed = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(stream=True)))
            await r.wait_depth(2)
            r.state.begin_shutdown()
            resp = await plain
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
            sresp = await streamed
            assert json.loads(data_payloads(sresp.content)[-1])["error"]["code"] == "shutting_down"
            late = await r.client.post("/v1/chat/completions", json=chat_body())
            assert late.status_code == 503
            # the running one is cut off once the grace period is over
            cut = await asyncio.wait_for(holder, 5)
            assert cut.status_code == 503
            assert r.state.gate.active == 0 and len(r.upstream.seen) == 1
    run(body)


def test_the_harness_serves_lmgate_as_production_does() -> None:
    """Every test here goes through lmgate's own client-bounds protocol and upstream
    transport, configured as ``lmgate`` configures them: a harness that swapped either out
    would make the rest of this file test something else."""
    async def body() -> None:
        async with serve() as r:
            config = r.server.config
            assert issubclass(config.http_protocol_class, GuardedProtocol)
            assert config.proxy_headers is False and config.server_header is False
            assert isinstance(r.state.upstreams[r.box_name].lean, LeanTransport)
            resp = await r.client.get("/healthz", headers={"x-big": "a" * 70_000})
            assert resp.status_code == 431  # the head limit, which only lmgate's protocol has
            resp = await r.client.post("/v1/chat/completions", json=chat_body())
            assert resp.status_code == 200 and "server" not in resp.headers
            assert r.upstream.seen[-1].headers["host"] == r.box_name  # a real socket to the box
    run(body)


def test_client_connections_do_not_wait_for_delayed_acks() -> None:
    """Regression: lmgate binds its listening sockets itself (``proxy/listen.py``) and made
    them with ``socket.socket(family, SOCK_STREAM)``, whose proto is 0. asyncio's loop sets
    TCP_NODELAY on an accepted connection only when the socket's proto is IPPROTO_TCP (as
    getaddrinfo, and so uvicorn's own binding, names it), so without uvloop (Windows, or
    wherever it is missing) every client connection kept Nagle's algorithm on: a response
    written as head then body waited for the client's delayed ACK, about 40 ms (200 ms on
    Windows) on each request after the first on a keep-alive connection. Fix: the socket is
    made with ``socket.IPPROTO_TCP``. Reproduce: two ``GET /healthz`` on one connection to
    ``lmgate`` run with uvloop unavailable."""
    async def body() -> None:
        async with serve() as r:
            assert (await r.client.get("/healthz")).status_code == 200
            (connection,) = r.server.server_state.connections
            sock = connection.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    run(body)


def test_connections_reset_by_their_clients_leave_nothing_behind() -> None:
    """Clients that reset their connections (a crash, SO_LINGER 0) right after a response:
    each closed connection's protocol is freed at once. uvicorn cancels its keep-alive timer
    only on a clean close, so after a reset the timer held the protocol and its buffers for
    the keep-alive timeout: a client resetting thousands of connections a second made lmgate
    hold thousands of them (RSS grew about 4 KiB per connection, 58 -> 151 MB over 24,000)."""
    async def body() -> None:
        async with serve() as r:
            connections = r.server.server_state.connections
            for _ in range(50):
                reader, writer = await asyncio.open_connection("127.0.0.1", int(r.base.rsplit(":", 1)[1]))
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # RST, not FIN
            for _ in range(500):  # lmgate notices each reset as the loop reads it
                if not connections:
                    break
                await asyncio.sleep(0.01)
            assert not connections, f"{len(connections)} connections still open"
            gc.collect()
            state = r.server.server_state
            left = [o for o in gc.get_objects() if isinstance(o, GuardedProtocol) and o.server_state is state]
            assert left == [], f"{len(left)} closed connections' protocols are still held"
            await r.assert_gate_free()
    run(body)


def test_parallel_same_model_overlaps_other_model_waits() -> None:
    async def body() -> None:
        async with serve(parallel=2) as r:
            a1 = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body("A", act="hold")))
            a2 = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body("A", act="hold")))
            await r.upstream.wait_for_requests(2)  # both A requests run upstream at once
            b = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body("B")))
            await r.wait_depth(1)
            a3 = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body("A")))
            await r.wait_depth(2)  # strict FIFO: A3 may not overtake B
            r.upstream.release(0)
            await a1
            assert r.state.gate.depth == 2 and len(r.upstream.seen) == 2  # B waits for A2 too
            r.upstream.release(1)
            await a2
            assert (await b).headers["x-queue-position"] == "1"
            assert (await a3).status_code == 200
            assert [json.loads(s.body)["model"] for s in r.upstream.seen] == ["A", "A", "B", "A"]
            await r.assert_gate_free()
    run(body)


def test_upstream_watch_notices_an_outage() -> None:
    async def body() -> None:
        async with serve(probe_interval=0.05) as r:
            assert box_up(r) is True
            async with r.box.refusing():  # the box goes away
                await until_box_up_is(r, False)
                metrics = (await r.client.get("/metrics")).text
                assert f'lmgate_upstream_up{{upstream="{r.box_name}"}} 0.0' in metrics
    run(body)
