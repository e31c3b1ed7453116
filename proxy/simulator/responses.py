"""Writing a generation out: a JSON body or an SSE stream, paced at the simulated speed, cut
short when the client leaves or the instance is unloaded under it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .content import (
    as_chat,
    chosen_tool,
    embedding,
    expected_tool_call,
    prompt_tokens,
    reply_words,
    tool_call_id,
)
from .engine import Generation, SimError, SimState

UNLOADED_ERROR = {"error": {"message": "Model unloaded.", "type": "model_unloaded",
                            "param": None, "code": "model_unloaded"}}


class Sender:
    """Wraps ``send``; tracks whether headers went out and the body finished."""

    def __init__(self, send: Send, stream: bool) -> None:
        self.send, self.stream = send, stream
        self.started = self.finished = False

    async def start(self, status: int = 200) -> None:
        if self.started:
            return
        self.started = True
        ctype = b"text/event-stream" if self.stream else b"application/json"
        headers = [(b"content-type", ctype), (b"cache-control", b"no-cache")]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def event(self, data: dict | str) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        await self.start()
        await self.send({"type": "http.response.body", "more_body": True,
                         "body": f"data: {payload}\n\n".encode()})

    async def named(self, event: str, data: dict) -> None:
        """An event with a name (LM Studio's native chat stream: ``event: <type>``)."""
        await self.start()
        await self.send({"type": "http.response.body", "more_body": True,
                         "body": f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()})

    async def end(self) -> None:
        await self.start()
        self.finished = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def json(self, status: int, data: dict) -> None:
        self.stream = False
        await self.start(status)
        self.finished = True
        await self.send({"type": "http.response.body", "body": json.dumps(data).encode()})


class GenerationResponse(Response):
    """Runs one generation through JIT loading and the concurrency slots."""

    def __init__(self, state: SimState, gen: Generation, body: dict, kind: str) -> None:
        super().__init__()
        self.state, self.gen, self.body, self.kind = state, gen, body, kind
        ttl = body.get("ttl")  # LM Studio: idle TTL of a model this request JIT-loads
        valid = isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0
        self.ttl_s: float | None = float(ttl) if valid else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = Sender(send, self.gen.stream)
        work = asyncio.create_task(self._work(sender))
        self.gen.task = work
        watcher = asyncio.create_task(self._watch(receive))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                self.gen.stop("cancelled")
            await asyncio.wait({work})
        finally:
            watcher.cancel()
            self.gen.stop("cancelled")

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _work(self, out: Sender) -> None:
        state, gen = self.state, self.gen
        outcome = "error"
        try:
            inst = await state.enter_model(gen, self.ttl_s)
            async with inst.slots:  # the instance's "Max Concurrent Predictions"
                state.begin(gen)
                try:
                    await self._produce(out)
                finally:
                    state.end(gen)
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = gen.stop_reason or "cancelled"
            if outcome == "killed" and out.finished:
                outcome = "ok"  # killed after the last byte went out: nothing was lost
            elif outcome == "killed":
                await self._fail(out, UNLOADED_ERROR)
        except SimError as exc:  # the model could not be loaded (JIT) or is gone
            await self._fail(out, exc.openai(), status=exc.status)
        except Exception as exc:  # noqa: BLE001 - a simulator bug must not hang the client
            await self._fail(out, {"error": {"message": str(exc), "type": "internal_error",
                                             "param": None, "code": None}})
        finally:
            state.finish(gen, outcome)

    @staticmethod
    async def _fail(out: Sender, error: dict, status: int | None = None) -> None:
        """Send ``error`` as a final SSE event (stream) or a 500 JSON body, if still possible;
        with ``status``, as a JSON body with that status if nothing was sent yet."""
        with contextlib.suppress(Exception):
            if status is not None and not out.started:
                await out.json(status, error)
            elif out.stream and not out.finished:
                await out.event(error)
                await out.end()
            elif not out.started:
                await out.json(500, error)

    async def _pace(self) -> None:
        # also at 0 tokens/s: yield, so a client that left is noticed (uvicorn's send()
        # returns silently after a disconnect; without a yield the rest of the reply would
        # be "sent" into the void and the generation logged as ok, not cancelled)
        await asyncio.sleep(self.state.delay)

    async def _produce(self, out: Sender) -> None:
        if self.kind == "embeddings":
            await out.json(200, self._embeddings())
            return
        if self.kind == "native":
            await self._native(out)
            return
        base = {"id": f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-sim{self.gen.seq}",
                "created": int(time.time()), "model": self.gen.model,
                "system_fingerprint": self.gen.model}
        tool = chosen_tool(self.body) if self.kind == "chat" else None
        if tool is not None:  # piece 0 is the call header, then 8-char argument fragments
            args = expected_tool_call(self.body)["arguments"]
            pieces = ["", *(args[i:i + 8] for i in range(0, len(args), 8))]
            finish = "tool_calls"
        else:
            words, truncated = reply_words(self.body)
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
            finish = "length" if truncated else "stop"
        prompt = prompt_tokens(self.body)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces),
                 "total_tokens": prompt + len(pieces)}
        if not out.stream:
            for _ in pieces:
                await self._pace()
            await out.json(200, self._complete(base, tool, pieces, finish, usage))
            return
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {**base, "object": obj}
        if self.kind == "chat":
            role = {"role": "assistant", "content": "" if tool is None else None}
            await out.event({**chunk, "choices": [self._choice(role)]})
        for i, piece in enumerate(pieces):
            await self._pace()
            await out.event({**chunk, "choices": [self._delta(piece, tool, i)]})
        await out.event({**chunk, "choices": [self._delta("", None, -1, finish)]})
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await out.event({**chunk, "choices": [], "usage": usage})
        await out.event("[DONE]")
        await out.end()

    async def _native(self, out: Sender) -> None:
        """LM Studio's own ``/api/v1/chat``: ``output`` and ``stats`` (``input_tokens``,
        ``total_output_tokens``), never ``usage``; streamed as named events ending with
        ``chat.end``, which carries the whole result."""
        chat = as_chat(self.body)
        words, _ = reply_words(chat)
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        started = time.monotonic()
        if out.stream:
            await out.named("chat.start", {"type": "chat.start", "model_instance_id": self.gen.model})
            await out.named("message.start", {"type": "message.start"})
        for piece in pieces:
            await self._pace()
            if out.stream:
                await out.named("message.delta", {"type": "message.delta", "content": piece})
        took = max(time.monotonic() - started, 1e-6)
        result = {"model_instance_id": self.gen.model,
                  "output": [{"type": "message", "content": "".join(pieces)}],
                  "stats": {"input_tokens": prompt_tokens(chat), "total_output_tokens": len(pieces),
                            "reasoning_output_tokens": 0,
                            "tokens_per_second": round(len(pieces) / took, 2),
                            "time_to_first_token_seconds": 0.0}}
        if not out.stream:
            await out.json(200, result)
            return
        await out.named("message.end", {"type": "message.end"})
        await out.named("chat.end", {"type": "chat.end", "result": result})
        await out.end()

    def _choice(self, delta: dict, finish: str | None = None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _delta(self, piece: str, tool: str | None, i: int, finish: str | None = None) -> dict:
        if self.kind != "chat":
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        if tool is None:
            return self._choice({"content": piece} if piece or finish is None else {}, finish)
        call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
        if i == 0:
            tc = expected_tool_call(self.body)
            call = {"index": 0, "id": tool_call_id(self.body, tc), "type": "function",
                    "function": {"name": tc["name"], "arguments": ""}}
        return self._choice({"tool_calls": [call]})

    def _complete(self, base: dict, tool: str | None, pieces: list[str], finish: str,
                  usage: dict) -> dict:
        if self.kind != "chat":
            choice = {"index": 0, "text": "".join(pieces), "logprobs": None,
                      "finish_reason": finish}
            return {**base, "object": "text_completion", "choices": [choice], "usage": usage}
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
        if tool is not None:
            tc = expected_tool_call(self.body)
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": tool_call_id(self.body, tc), "type": "function", "function": tc}]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    def _embeddings(self) -> dict:
        raw = self.body.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
        data = [{"object": "embedding", "index": i, "embedding": embedding(self.gen.model, t)}
                for i, t in enumerate(texts)]
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "data": data, "model": self.gen.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
