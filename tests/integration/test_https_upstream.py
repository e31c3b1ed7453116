"""A box lmgate reaches over https goes through httpx's own connection layer, not the lean
transport (plain http only). respx scripts that box at the exact points where an upstream can
fail (connect, read, mid-stream), since a real TLS box cannot be made to fail on cue here."""

from __future__ import annotations

import json

import httpx
import respx

from .harness import chat_body, run, serve

BOX = "https://box.test:8443"
EVENTS = [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n"]


class _Events(httpx.AsyncByteStream):
    def __init__(self, events: list[bytes], fail: Exception | None = None) -> None:
        self.events, self.fail = events, fail

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for event in self.events:
            yield event
        if self.fail is not None:
            raise self.fail


def scripted(router: respx.MockRouter) -> None:
    router.route(host="127.0.0.1").pass_through()  # lmgate itself

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m1"}]})
        act = json.loads(request.content).get("x_act", "ok")
        if act == "connect":
            raise httpx.ConnectError("refused", request=request)
        if act == "read_timeout":
            raise httpx.ReadTimeout("silent", request=request)
        if act == "break":
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=_Events(EVENTS[:1], httpx.ReadError("reset")))
        if act == "stream":
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Events(EVENTS))
        return httpx.Response(200, json={"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "over tls"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})

    router.route(host="box.test").mock(side_effect=answer)


def test_an_https_box_is_served_through_httpx_with_the_same_errors() -> None:
    async def body() -> None:
        with respx.mock(assert_all_called=False) as router:
            scripted(router)
            async with serve(upstream=BOX, transport=httpx.AsyncHTTPTransport()) as r:
                assert r.state.fleet.first.lean is None  # https: httpx's own layer
                ok = await r.client.post("/v1/chat/completions", json=chat_body())
                assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "over tls"
                streamed = await r.client.post("/v1/chat/completions", json=chat_body(stream=True, act="stream"))
                assert streamed.text == ": queue_entered=0\n\n: queue_position=0\n\n" + b"".join(EVENTS).decode()
                refused = await r.client.post("/v1/chat/completions", json=chat_body(act="connect"))
                assert refused.status_code == 502
                assert refused.json()["error"]["code"] == "upstream_unavailable"
                silent = await r.client.post("/v1/chat/completions", json=chat_body(act="read_timeout"))
                assert silent.status_code == 504
                broken = await r.client.post("/v1/chat/completions", json=chat_body(stream=True, act="break"))
                assert broken.status_code == 200
                assert broken.text.startswith(": queue_entered=0\n\n: queue_position=0\n\n" + EVENTS[0].decode())
                assert '"code": "upstream_unavailable"' in broken.text
                await r.assert_gate_free()
    run(body)
