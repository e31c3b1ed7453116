"""LM Studio simulator for demos and tests.

Serves the OpenAI-compatible ``/v1`` API and LM Studio's ``/api/v0`` REST API
with deterministic replies, and reproduces LM Studio's "Only Keep Last JIT
Loaded Model" behaviour: a request for a model that is not loaded unloads the
current one, killing every generation still running on it.

Run it with ``python -m proxy.simulator --port 1234``.  ``GET /sim/stats`` (generations),
``GET /sim/requests`` (every request received, /sim/* excepted) and ``POST /sim/reset``
(clears both) are simulator-only introspection endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEFAULT_MODELS: tuple[str, ...] = (
    "qwen2.5-7b-instruct",
    "llama-3.2-3b-instruct",
    "text-embedding-nomic-embed-text-v1.5",
)
DEFAULT_MAX_TOKENS = 12
MAX_TOKENS_CAP = 4096
LOG_CAP = 10_000
REQUEST_LOG_CAP = 10_000
MAX_WORD_LEN = 65_536  # cap of the ``x_word_len`` body field (test knob: long filler words)
_REQUEST_FIELDS = ("model", "max_tokens", "max_completion_tokens", "max_output_tokens", "stream")
EMBEDDING_DIM = 8
_FILLER = "the quick brown fox jumps over the lazy dog".split()
_KNOWN_META = {
    "qwen2.5-7b-instruct": ("lmstudio-community", "qwen2"),
    "llama-3.2-3b-instruct": ("hugging-quants", "llama"),
    "text-embedding-nomic-embed-text-v1.5": ("nomic-ai", "nomic-bert"),
}
_LOG_FIELDS = ("seq", "model", "stream", "path", "user", "started", "ended", "outcome")
_UNLOADED_ERROR = {"error": {"message": "Model unloaded.", "type": "model_unloaded",
                             "param": None, "code": "model_unloaded"}}


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return " ".join(str(p) for p in prompt)
    return prompt if isinstance(prompt, str) else ""


def last_user_text(body: dict) -> str:
    """The last user message text (chat) or the prompt (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return _content_text(msg.get("content"))
        return ""
    return _prompt_text(body.get("prompt"))


def _prompt_tokens(body: dict) -> int:
    """Word count of the whole prompt (all chat messages, or the prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(_content_text(m.get("content")).split())
                   for m in messages if isinstance(m, dict))
    return len(_prompt_text(body.get("prompt")).split())


def _max_tokens(body: dict) -> int:
    value = body.get("max_tokens") or body.get("max_completion_tokens")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        value = DEFAULT_MAX_TOKENS
    return min(value, MAX_TOKENS_CAP)


def _word_len(body: dict) -> int:
    """The ``x_word_len`` test knob: filler words padded to this many characters (0 = off),
    so that a stream can carry megabytes with few tokens."""
    value = body.get("x_word_len")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return 0
    return min(value, MAX_WORD_LEN)


def _reply_words(body: dict) -> tuple[list[str], bool]:
    """Reply tokens and whether the echo had to be truncated."""
    words = [f"[{body.get('model', '')}]"] + last_user_text(body).split()
    limit = _max_tokens(body)
    truncated = len(words) > limit
    width = _word_len(body)
    i = 0
    while len(words) < limit:
        word = _FILLER[i % len(_FILLER)]
        words.append((word * (width // len(word) + 1))[:width] if width else word)
        i += 1
    return words[:limit], truncated


def expected_reply(body: dict) -> str:
    """Exact assistant text the simulator produces for a (chat) completion body."""
    return " ".join(_reply_words(body)[0])


def _chosen_tool(body: dict) -> str | None:
    """Name of the tool the simulator will call, or None for a text reply."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    names = [(t.get("function") or {}).get("name") or t.get("name") or "tool"
             for t in tools if isinstance(t, dict)]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        if wanted in names:
            return wanted
    return names[0] if names else None


def expected_tool_call(body: dict) -> dict[str, str]:
    """``{"name", "arguments"}`` of the tool call the simulator makes (arguments is JSON)."""
    name = _chosen_tool(body) or ""
    return {"name": name, "arguments": json.dumps({"location": last_user_text(body)})}


def _tool_call_id(body: dict, call: dict[str, str]) -> str:
    seed = f"{body.get('model')}|{call['name']}|{call['arguments']}".encode()
    return "call_" + hashlib.sha256(seed).hexdigest()[:24]


def _embedding(model: str, text: str) -> list[float]:
    digest = hashlib.sha256(f"{model}|{text}".encode()).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest[:EMBEDDING_DIM]]


def _error(status: int, message: str, *, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _model_not_found(model: str) -> JSONResponse:
    return _error(404, f"Model '{model}' not found", param="model", code="model_not_found")


@dataclass(eq=False)
class _Generation:
    seq: int
    model: str
    stream: bool
    path: str
    user: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    outcome: str | None = None
    stop_reason: str | None = None
    task: asyncio.Task | None = None

    def stop(self, reason: str) -> None:
        """Cancel the generation task, remembering why (``killed``/``cancelled``)."""
        if self.stop_reason is None and self.task is not None and not self.task.done():
            self.stop_reason = reason
            self.task.cancel()

    def record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _LOG_FIELDS}


class _SimState:
    """Everything mutable about one simulator instance."""

    def __init__(self, models: Sequence[str], tokens_per_s: float, load_s: float,
                 max_concurrent: int, loaded: str | None) -> None:
        self.models = list(models)
        self.delay = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.load_s = max(0.0, load_s)
        self.max_concurrent = max(1, max_concurrent)
        self.loaded = loaded if loaded in self.models else None
        self.running: set[_Generation] = set()
        self.seq = 0
        self.active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reset()

    def reset(self) -> None:
        """Clear counters and log; keeps the loaded model, live gauges and ``seq``."""
        self.counters = {"completed": 0, "killed": 0, "cancelled": 0, "errors": 0, "loads": 0}
        self.active_max = self.active
        self.log: deque[_Generation] = deque(maxlen=LOG_CAP)
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_CAP)
        self.requests_total = 0

    def bind_loop(self) -> None:
        """(Re)create asyncio primitives when served from a new event loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self.lock = asyncio.Lock()
            self.slots = asyncio.Semaphore(self.max_concurrent)

    def new_generation(self, model: str, stream: bool, path: str, user: str) -> _Generation:
        self.seq += 1
        gen = _Generation(self.seq, model, stream, path, user)
        self.log.append(gen)
        return gen

    async def enter_model(self, gen: _Generation) -> None:
        """JIT: make ``gen.model`` the loaded model (killing others) and register ``gen``."""
        async with self.lock:
            if self.loaded != gen.model:
                for other in list(self.running):
                    other.stop("killed")
                self.loaded = None
                await asyncio.sleep(self.load_s)
                self.loaded = gen.model
                self.counters["loads"] += 1
            self.running.add(gen)

    def finish(self, gen: _Generation, outcome: str) -> None:
        self.running.discard(gen)
        gen.ended = time.monotonic()
        gen.outcome = outcome
        key = {"ok": "completed", "error": "errors"}.get(outcome, outcome)
        self.counters[key] += 1

    def stats(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "active": self.active, "max_active": self.active_max,
                **self.counters, "log": [g.record() for g in self.log]}


class _Sender:
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

    async def end(self) -> None:
        await self.start()
        self.finished = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def json(self, status: int, data: dict) -> None:
        self.stream = False
        await self.start(status)
        self.finished = True
        await self.send({"type": "http.response.body", "body": json.dumps(data).encode()})


class _GenerationResponse(Response):
    """Runs one generation through JIT loading and the concurrency slots."""

    def __init__(self, state: _SimState, gen: _Generation, body: dict, kind: str) -> None:
        super().__init__()
        self.state, self.gen, self.body, self.kind = state, gen, body, kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = _Sender(send, self.gen.stream)
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

    async def _work(self, out: _Sender) -> None:
        state, gen = self.state, self.gen
        outcome = "error"
        try:
            await state.enter_model(gen)
            async with state.slots:
                state.active += 1
                state.active_max = max(state.active_max, state.active)
                try:
                    await self._produce(out)
                finally:
                    state.active -= 1
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = gen.stop_reason or "cancelled"
            if outcome == "killed" and out.finished:
                outcome = "ok"  # killed after the last byte went out: nothing was lost
            elif outcome == "killed":
                await self._fail(out, _UNLOADED_ERROR)
        except Exception as exc:  # noqa: BLE001 - a simulator bug must not hang the client
            await self._fail(out, {"error": {"message": str(exc), "type": "internal_error",
                                             "param": None, "code": None}})
        finally:
            state.finish(gen, outcome)

    @staticmethod
    async def _fail(out: _Sender, error: dict) -> None:
        """Send ``error`` as a final SSE event (stream) or a 500 JSON body, if still possible."""
        with contextlib.suppress(Exception):
            if out.stream and not out.finished:
                await out.event(error)
                await out.end()
            elif not out.started:
                await out.json(500, error)

    async def _pace(self) -> None:
        # also at 0 tokens/s: yield, so a client that left is noticed (uvicorn's send()
        # returns silently after a disconnect; without a yield the rest of the reply would
        # be "sent" into the void and the generation logged as ok, not cancelled)
        await asyncio.sleep(self.state.delay)

    async def _produce(self, out: _Sender) -> None:
        if self.kind == "embeddings":
            await out.json(200, self._embeddings())
            return
        base = {"id": f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-sim{self.gen.seq}",
                "created": int(time.time()), "model": self.gen.model,
                "system_fingerprint": self.gen.model}
        tool = _chosen_tool(self.body) if self.kind == "chat" else None
        if tool is not None:  # piece 0 is the call header, then 8-char argument fragments
            args = expected_tool_call(self.body)["arguments"]
            pieces = ["", *(args[i:i + 8] for i in range(0, len(args), 8))]
            finish = "tool_calls"
        else:
            words, truncated = _reply_words(self.body)
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
            finish = "length" if truncated else "stop"
        prompt_tokens = _prompt_tokens(self.body)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
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
            call = {"index": 0, "id": _tool_call_id(self.body, tc), "type": "function",
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
                {"id": _tool_call_id(self.body, tc), "type": "function", "function": tc}]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    def _embeddings(self) -> dict:
        raw = self.body.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
        data = [{"object": "embedding", "index": i, "embedding": _embedding(self.gen.model, t)}
                for i, t in enumerate(texts)]
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "data": data, "model": self.gen.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _v0_model(state: _SimState, model: str) -> dict[str, Any]:
    publisher, arch = _KNOWN_META.get(model, ("lmstudio-community", model.split("-")[0]))
    kind = "embeddings" if "embed" in model.lower() else "llm"
    return {"id": model, "object": "model", "type": kind, "publisher": publisher, "arch": arch,
            "compatibility_type": "gguf", "quantization": "Q4_K_M",
            "state": "loaded" if state.loaded == model else "not-loaded",
            "max_context_length": 32768}


def _v1_model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "owned_by": "organization_owner"}


def _routes(state: _SimState) -> list[Route]:
    async def list_models(request: Request) -> Response:
        v0 = request.url.path.startswith("/api/v0")
        data = [_v0_model(state, m) if v0 else _v1_model(m) for m in state.models]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        model = request.path_params["model"]
        if model not in state.models:
            return _model_not_found(model)
        v0 = request.url.path.startswith("/api/v0")
        return JSONResponse(_v0_model(state, model) if v0 else _v1_model(model))

    def generation(kind: str):
        async def endpoint(request: Request) -> Response:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                return _error(400, "Invalid JSON in request body", code="invalid_json")
            if not isinstance(body, dict):
                return _error(400, "Request body must be a JSON object", code="invalid_json")
            model = body.get("model")
            if not isinstance(model, str) or not model:
                return _error(400, "'model' is required", param="model", code="model_required")
            if model not in state.models:
                return _model_not_found(model)
            state.bind_loop()
            stream = bool(body.get("stream")) and kind != "embeddings"
            inp = body.get("input")
            user = _prompt_text(inp) if kind == "embeddings" else last_user_text(body)
            gen = state.new_generation(model, stream, request.url.path, user)
            return _GenerationResponse(state, gen, body, kind)
        return endpoint

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse(state.stats())

    async def requests(request: Request) -> Response:
        return JSONResponse({"total": state.requests_total, "requests": list(state.requests)})

    routes = [Route("/sim/stats", stats), Route("/sim/reset", reset, methods=["POST"]),
              Route("/sim/requests", requests)]
    for prefix in ("/v1", "/api/v0"):
        routes += [
            Route(f"{prefix}/models", list_models),
            Route(f"{prefix}/models/{{model:path}}", get_model),
            Route(f"{prefix}/chat/completions", generation("chat"), methods=["POST"]),
            Route(f"{prefix}/completions", generation("completions"), methods=["POST"]),
            Route(f"{prefix}/embeddings", generation("embeddings"), methods=["POST"]),
        ]
    return routes


class _RequestLog:
    """ASGI wrapper: records every HTTP request (except ``/sim/*``) in ``state.requests``:
    method, path, query, arrival ``t`` (``time.monotonic()``, comparable across processes on
    one machine), whether an Authorization header came, and for a JSON object body the
    values of ``_REQUEST_FIELDS`` that it names. The body is read here and replayed."""

    def __init__(self, app: Starlette, state: _SimState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/sim/"):
            await self.app(scope, receive, send)
            return
        entry: dict[str, Any] = {
            "method": scope["method"], "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"), "t": time.monotonic(),
            "auth": any(k.lower() == b"authorization" for k, _ in scope.get("headers", ())),
        }
        self.state.requests.append(entry)
        self.state.requests_total += 1
        chunks: list[bytes] = []
        first: dict[str, Any] | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left before its body was complete
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        entry["body_bytes"] = len(body)
        if body:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                doc = json.loads(body)
                if isinstance(doc, dict):
                    entry.update({k: doc[k] for k in _REQUEST_FIELDS if k in doc})
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                if first is not None:
                    return first
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_simulator_app(*, models: Sequence[str] = DEFAULT_MODELS, tokens_per_s: float = 50.0,
                         load_s: float = 0.3, max_concurrent: int = 4,
                         loaded: str | None = None) -> Starlette:
    """Build a simulator app; ``app.state.sim`` holds its state object."""
    state = _SimState(models, tokens_per_s, load_s, max_concurrent, loaded)
    app = Starlette(routes=_routes(state))
    app.state.sim = state
    app.add_middleware(_RequestLog, state=state)
    return app


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``lmgate-sim`` / ``python -m proxy.simulator``."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="lmgate-sim",
        description="LM Studio simulator: an OpenAI-compatible /v1 and LM Studio /api/v0 server "
        "with deterministic replies that, like LM Studio's JIT loading, unloads the current model "
        "(killing its generations) when a request names another one. For demos and tests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=1234,
                        help="port to listen on (the one LM Studio uses by default)")
    parser.add_argument("--tokens-per-s", type=float, default=50.0,
                        help="generation speed per request, in tokens per second (0 = instant)")
    parser.add_argument("--load-time", type=float, default=0.3,
                        help="seconds a model takes to load when a request names one not loaded")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated model ids the simulator serves")
    parser.add_argument("--max-concurrent", type=int, default=4,
                        help="generations that run at once, like LM Studio 0.4's "
                        "\"Max Concurrent Predictions\"; more wait inside the simulator")
    parser.add_argument("--loaded", default=None,
                        help="model already loaded at start (None: nothing loaded)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    app = create_simulator_app(models=models, tokens_per_s=args.tokens_per_s,
                               load_s=args.load_time, max_concurrent=args.max_concurrent,
                               loaded=args.loaded)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
