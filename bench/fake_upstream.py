"""The fastest practical fake OpenAI upstream: one raw ASGI app under uvicorn.

    POST /v1/chat/completions   {"stream": false}  -> a small fixed chat.completion, at once
                                {"stream": true}   -> ``bench_chunks`` SSE chunks (default 1000),
                                                      each its own body write, then ``data: [DONE]``
        bench_delay_ms   sleep (asyncio.sleep) before the answer (non-streaming) or after
                         every chunk (streaming)
        bench_hold       streaming only: keep sending a chunk every ``bench_delay_ms`` (default
                         100) until ``POST /release``, then ``[DONE]`` (holds lmgate's gate)
        bench_index      an integer recorded with the request (service order checks)
    GET  /v1/models              a one-model list (lmgate probes it at startup)
    GET  /stats                  {"records": [[index, arrival_ns, end_ns], ...]} in arrival order
    POST /reset                  clear the records and re-arm the hold
    POST /release                end every held stream

Timestamps are ``time.perf_counter_ns()`` of this process: arrival when the app is called
(request head parsed), end after the last body write of the response.

    python -m bench.fake_upstream --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOLD_CAP_S = 900.0
DEFAULT_CHUNKS = 1000

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}, separators=(",", ":")).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]},
                    separators=(",", ":")).encode()
CHUNK = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
         b'"model":"bench","choices":[{"index":0,"delta":{"content":"t%d"},"finish_reason":null}]}\n\n')
DONE = b"data: [DONE]\n\n"

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
NOT_FOUND = b'{"error":{"message":"not found","type":"not_found_error","code":"not_found"}}'


class FakeUpstream:
    """The ASGI app. State lives on the instance: records, the hold flag, the chunk cache."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, int]] = []
        self.released = False
        self._chunks: list[bytes] = []

    def chunk(self, i: int) -> bytes:
        cache = self._chunks
        while len(cache) <= i:
            cache.append(CHUNK % len(cache))
        return cache[i]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        arrived = time.perf_counter_ns()
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        method, path = scope["method"], scope["path"]
        if path == "/v1/chat/completions" and method == "POST":
            await self.chat(body, send, arrived)
        elif path == "/v1/models" and method == "GET":
            await reply(send, 200, MODELS)
        elif path == "/stats" and method == "GET":
            await reply(send, 200, json.dumps({"records": self.records}).encode())
        elif path == "/reset" and method == "POST":
            self.records = []
            self.released = False
            await reply(send, 200, b'{"reset":true}')
        elif path == "/release" and method == "POST":
            self.released = True
            await reply(send, 200, b'{"released":true}')
        else:
            await reply(send, 404, NOT_FOUND)

    async def chat(self, body: bytes, send: Send, arrived: int) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            await reply(send, 400, b'{"error":{"message":"bad json","type":"invalid_request_error"}}')
            return
        index = doc.get("bench_index", -1)
        delay_s = float(doc.get("bench_delay_ms") or 0) / 1000
        if doc.get("stream") is True:
            await self.stream(doc, send, delay_s)
        else:
            if delay_s:
                await asyncio.sleep(delay_s)
            await reply(send, 200, COMPLETION)
        self.records.append((index if isinstance(index, int) else -1, arrived, time.perf_counter_ns()))

    async def stream(self, doc: dict[str, Any], send: Send, delay_s: float) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        if doc.get("bench_hold"):
            step = delay_s or 0.1
            deadline = time.monotonic() + HOLD_CAP_S
            i = 0
            while not self.released and time.monotonic() < deadline:
                await send({"type": "http.response.body", "body": self.chunk(i), "more_body": True})
                i += 1
                await asyncio.sleep(step)
        else:
            n = int(doc.get("bench_chunks", DEFAULT_CHUNKS))
            for i in range(n):
                await send({"type": "http.response.body", "body": self.chunk(i), "more_body": True})
                if delay_s:
                    await asyncio.sleep(delay_s)
        await send({"type": "http.response.body", "body": DONE, "more_body": False})


async def reply(send: Send, status: int, body: bytes) -> None:
    headers = JSON_HEADERS + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def fast_options() -> dict[str, str]:
    """uvicorn's fastest available protocol and loop (httptools/uvloop are the ``bench`` extra)."""
    opts = {"http": "h11", "loop": "asyncio"}
    try:
        import httptools  # noqa: F401
        opts["http"] = "httptools"
    except ImportError:
        pass
    try:
        import uvloop  # noqa: F401
        opts["loop"] = "uvloop"
    except ImportError:
        pass
    return opts


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.fake_upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvicorn.run(FakeUpstream(), host=args.host, port=args.port, log_level="warning", access_log=False,
                lifespan="off", server_header=False, date_header=False, timeout_keep_alive=900,
                backlog=4096, **fast_options())  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
