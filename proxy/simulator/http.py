"""The simulator's Starlette app: routes, LM Studio's request validation, error bodies and the
request log."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .catalog import DEFAULT_MODELS, native_entry, v0_entry, v1_entry
from .content import as_chat, last_user_text, prompt_text
from .engine import DEFAULT_JIT_TTL_S, SimError, SimState
from .responses import GenerationResponse

_REQUEST_FIELDS = ("model", "max_tokens", "max_completion_tokens", "max_output_tokens", "stream",
                   "instance_id")
# POST /api/v1/models/load: LM Studio validates the body against a closed schema
_LOAD_FIELDS: dict[str, str] = {
    "model": "string", "context_length": "count", "eval_batch_size": "count",
    "flash_attention": "boolean", "num_experts": "number", "offload_kv_cache_to_gpu": "boolean",
    "echo_load_config": "boolean",
}
_UNLOAD_FIELDS: dict[str, str] = {"instance_id": "string"}


# -- error bodies --------------------------------------------------------------------------
def _error(status: int, message: str, *, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _model_not_found(model: str) -> JSONResponse:
    return _error(404, f"Model '{model}' not found", param="model", code="model_not_found")


def _native_error(status: int, type_: str, message: str, *, code: str | None = None,
                  param: str | None = None) -> JSONResponse:
    """An error in the shape of LM Studio's native ``/api/v1`` endpoints."""
    error: dict[str, Any] = {"type": type_, "message": message}
    if code is not None:
        error["code"] = code
    if param is not None:
        error["param"] = param
    return JSONResponse({"error": error}, status_code=status)


def _native_refusal(exc: SimError) -> JSONResponse:
    return _native_error(exc.status, exc.type, exc.message, code=exc.code)


# -- LM Studio's closed-schema validation of native bodies ---------------------------------
def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "unknown")


def _check_body(body: Any, fields: dict[str, str], required: str) -> JSONResponse | None:
    """LM Studio's closed-schema validation of a native request body: None if it passes."""
    if not isinstance(body, dict):
        return _native_error(400, "invalid_request",
                             f"Expected object, received {_json_type(body)}", code="invalid_type")
    unknown = [k for k in body if k not in fields]
    if unknown:
        keys = ", ".join(f"'{k}'" for k in unknown)
        return _native_error(400, "invalid_request", f"Unrecognized key(s) in object: {keys}",
                             code="unrecognized_keys")
    if required not in body:
        return _native_error(400, "invalid_request", f'"{required}" is required',
                             code="missing_required_parameter", param=required)
    for key, value in body.items():
        want = fields[key]
        got = _json_type(value)
        ok = {"string": got == "string" and bool(value), "boolean": got == "boolean",
              "number": got == "number",
              "count": got == "number" and float(value).is_integer() and value > 0}[want]
        if not ok:
            expected = {"count": "positive integer"}.get(want, want)
            return _native_error(400, "invalid_request",
                                 f"Invalid value for '{key}': expected {expected}, received {got}",
                                 code="invalid_type", param=key)
    return None


async def _json_body(request: Request) -> tuple[Any, JSONResponse | None]:
    try:
        return json.loads(await request.body()), None
    except (ValueError, UnicodeDecodeError):
        return None, _native_error(400, "invalid_request", "Invalid body: failed to parse JSON "
                                   "value. Please check the value to ensure it is valid JSON",
                                   code="invalid_json")


# -- routes --------------------------------------------------------------------------------
def _routes(state: SimState) -> list[Route]:
    async def list_models(request: Request) -> Response:
        state.expire_idle()
        v0 = request.url.path.startswith("/api/v0")
        data = [v0_entry(m, bool(state.loaded_instances(m))) if v0 else v1_entry(m)
                for m in state.models]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        state.expire_idle()
        model = request.path_params["model"]
        if model not in state.models:
            return _model_not_found(model)
        v0 = request.url.path.startswith("/api/v0")
        return JSONResponse(v0_entry(model, bool(state.loaded_instances(model))) if v0
                            else v1_entry(model))

    async def native_models(request: Request) -> Response:
        state.expire_idle()
        return JSONResponse({"models": [
            native_entry(m, state.sizes[m], [i.listed() for i in state.loaded_instances(m)])
            for m in state.models]})

    async def load(request: Request) -> Response:
        body, bad = await _json_body(request)
        fields = {**_LOAD_FIELDS, "parallel": "count"} if state.accept_parallel else _LOAD_FIELDS
        bad = bad or _check_body(body, fields, "model")
        if bad is not None:
            return bad
        model = body["model"]
        if model not in state.models:
            return _native_error(404, "model_not_found",
                                 f"Model {model} not found in downloaded models")
        state.bind_loop()
        asked = {k: int(v) if fields[k] == "count" else v for k, v in body.items()
                 if k not in ("model", "echo_load_config")}
        try:
            inst, took = await state.load_api(model, asked)
        except SimError as exc:
            return _native_refusal(exc)
        answer: dict[str, Any] = {"type": inst.kind, "instance_id": inst.id,
                                  "load_time_seconds": round(took, 3), "status": "loaded"}
        if body.get("echo_load_config"):
            answer["load_config"] = dict(inst.config)
        return JSONResponse(answer)

    async def unload(request: Request) -> Response:
        body, bad = await _json_body(request)
        bad = bad or _check_body(body, _UNLOAD_FIELDS, "instance_id")
        if bad is not None:
            return bad
        instance_id = body["instance_id"]
        if state.unload(instance_id) is None:
            return _native_error(404, "model_not_found",
                                 f"Model with instance identifier '{instance_id}' is not loaded.")
        return JSONResponse({"instance_id": instance_id})

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
            if not state.knows(model):
                return _model_not_found(model)
            state.bind_loop()
            stream = bool(body.get("stream")) and kind != "embeddings"
            inp = body.get("input")
            if kind == "embeddings":
                user = prompt_text(inp)
            else:
                user = last_user_text(as_chat(body) if kind == "native" else body)
            gen = state.new_generation(model, stream, request.url.path, user)
            return GenerationResponse(state, gen, body, kind)
        return endpoint

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse(state.stats())

    async def requests(request: Request) -> Response:
        return JSONResponse({"total": state.requests_total, "requests": list(state.requests)})

    routes = [Route("/sim/stats", stats), Route("/sim/reset", reset, methods=["POST"]),
              Route("/sim/requests", requests),
              Route("/api/v1/models", native_models),
              Route("/api/v1/models/load", load, methods=["POST"]),
              Route("/api/v1/models/unload", unload, methods=["POST"]),
              Route("/api/v1/chat", generation("native"), methods=["POST"])]
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

    def __init__(self, app: Starlette, state: SimState) -> None:
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
                         loaded: str | None = None, load_times: dict[str, float] | None = None,
                         sizes: dict[str, int] | None = None, memory_bytes: int | None = None,
                         fail_loads: Sequence[str] = (), preload: Sequence[str] = (),
                         jit_ttl_s: float | None = DEFAULT_JIT_TTL_S,
                         accept_parallel: bool = False) -> Starlette:
    """Build a simulator app; ``app.state.sim`` holds its state object."""
    state = SimState(models, tokens_per_s, load_s, max_concurrent, loaded, load_times=load_times,
                     sizes=sizes, memory_bytes=memory_bytes, fail_loads=fail_loads,
                     preload=preload, jit_ttl_s=jit_ttl_s, accept_parallel=accept_parallel)
    app = Starlette(routes=_routes(state))
    app.state.sim = state
    app.add_middleware(_RequestLog, state=state)
    return app
