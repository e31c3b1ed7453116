"""LM Studio simulator for demos and tests.

Serves the OpenAI-compatible ``/v1`` API, LM Studio's ``/api/v0`` REST API and the model
management part of its ``/api/v1`` REST API (LM Studio 0.4+) with deterministic replies.

Models live in *instances*, as in LM Studio 0.4: each has an ``instance_id`` (the model key,
then ``key:2``, ``key:3`` ... for further instances of the same model), an origin (``jit``:
loaded because a request named the model; ``api``: ``POST /api/v1/models/load``), a config
(``context_length``, ``parallel`` ...) and its model's size in bytes.

* ``GET /api/v1/models`` lists every model with its ``loaded_instances``.
* ``POST /api/v1/models/load`` loads an instance (closed body schema, as in LM Studio: an
  unknown key is a 400), ``POST /api/v1/models/unload`` unloads one by ``instance_id``;
  generations running on an unloaded instance are cut (their streams end with an error).
* A chat/completions/embeddings request for a model with no instance loads it JIT and
  auto-evicts JIT-loaded instances only (never API-loaded ones): without a memory budget
  (``--memory-bytes``) at most one JIT model is kept, which reproduces LM Studio's
  "Only Keep Last JIT Loaded Model" (a request for another model unloads the current one,
  killing every generation still running on it); with a budget, least recently used JIT
  instances are evicted until the new model fits, and the request fails if API-loaded
  instances leave no room.  JIT instances unload after an idle TTL (``--jit-ttl``, or the
  request's ``ttl``).
* Each instance runs up to its ``parallel`` generations at once (LM Studio 0.4's "Max
  Concurrent Predictions", ``--max-concurrent``); instances run side by side.

Run it with ``python -m proxy.simulator --port 1234``.  ``GET /sim/stats`` (generations,
loads, instances), ``GET /sim/requests`` (every request received, /sim/* excepted) and
``POST /sim/reset`` (clears both) are simulator-only introspection endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
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
_REQUEST_FIELDS = ("model", "max_tokens", "max_completion_tokens", "max_output_tokens", "stream",
                   "instance_id")
EMBEDDING_DIM = 8
_FILLER = "the quick brown fox jumps over the lazy dog".split()
_KNOWN_META = {
    "qwen2.5-7b-instruct": ("lmstudio-community", "qwen2"),
    "llama-3.2-3b-instruct": ("hugging-quants", "llama"),
    "text-embedding-nomic-embed-text-v1.5": ("nomic-ai", "nomic-bert"),
}
# plausible Q4_K_M GGUF file sizes of the default models; others are guessed from their name
_KNOWN_SIZES = {
    "qwen2.5-7b-instruct": 4_683_074_240,
    "llama-3.2-3b-instruct": 2_019_377_696,
    "text-embedding-nomic-embed-text-v1.5": 84_106_624,
}
_BYTES_PER_PARAM = 0.6  # Q4_K_M: about 4.85 bits per weight
_MAX_CONTEXT = 32768
_DEFAULT_CONTEXT = {"llm": 4096, "embedding": 2048}
_DEFAULT_JIT_TTL_S = 3600.0  # LM Studio: JIT-loaded models default to a 60 minute idle TTL
_LOG_FIELDS = ("seq", "model", "instance", "stream", "path", "user", "started", "ended",
               "outcome", "cut_by")
_UNLOADED_ERROR = {"error": {"message": "Model unloaded.", "type": "model_unloaded",
                             "param": None, "code": "model_unloaded"}}
# POST /api/v1/models/load: LM Studio validates the body against a closed schema
_LOAD_FIELDS: dict[str, str] = {
    "model": "string", "context_length": "count", "eval_batch_size": "count",
    "flash_attention": "boolean", "num_experts": "number", "offload_kv_cache_to_gpu": "boolean",
    "echo_load_config": "boolean",
}
_UNLOAD_FIELDS: dict[str, str] = {"instance_id": "string"}
_GUARDRAIL_MESSAGE = ("Model loading aborted due to insufficient system resources. Overloading the "
                      "system will likely cause it to freeze. If you believe this is a mistake, you "
                      "can try to change the model loading guardrails in the settings.")


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


def _native_error(status: int, type_: str, message: str, *, code: str | None = None,
                  param: str | None = None) -> JSONResponse:
    """An error in the shape of LM Studio's native ``/api/v1`` endpoints."""
    error: dict[str, Any] = {"type": type_, "message": message}
    if code is not None:
        error["code"] = code
    if param is not None:
        error["param"] = param
    return JSONResponse({"error": error}, status_code=status)


class _SimError(Exception):
    """A request the simulator refuses: ``status`` and both error bodies (native, OpenAI)."""

    def __init__(self, status: int, type_: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.message = status, type_, code, message

    def native(self) -> JSONResponse:
        return _native_error(self.status, self.type, self.message, code=self.code)

    def openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": "model",
                          "code": self.code}}


def _kind_of(model: str) -> str:
    return "embedding" if "embed" in model.lower() else "llm"


def _params_billions(model: str) -> float | None:
    """``7`` for ``qwen2.5-7b-instruct``, ``0.5`` for ``x-0.5b``; None if the name tells none."""
    for part in reversed(model.lower().split("-")):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)b", part)
        if match:
            return float(match.group(1))
    return None


def _guess_size(model: str) -> int:
    billions = _params_billions(model)
    if billions is not None:
        return int(billions * 1e9 * _BYTES_PER_PARAM)
    return 100_000_000 if _kind_of(model) == "embedding" else 1_000_000_000


def _params_string(model: str) -> str | None:
    billions = _params_billions(model)
    if billions is None or _kind_of(model) == "embedding":
        return None
    return f"{billions:g}B"


def _display_name(model: str) -> str:
    return " ".join(w.upper() if re.fullmatch(r"\d+(?:\.\d+)?[bm]", w) else w[:1].upper() + w[1:]
                    for w in model.split("-") if w)


@dataclass(eq=False)
class _Instance:
    """One loaded (or loading) copy of a model, as LM Studio 0.4 lists in ``loaded_instances``."""

    id: str
    model: str
    origin: str  # "jit" (a request named the model) or "api" (POST /api/v1/models/load)
    size_bytes: int
    config: dict[str, Any]
    parallel: int
    ttl_s: float | None = None  # idle TTL (JIT instances only)
    state: str = "loading"  # "loading", "loaded", then "gone"
    loaded_at: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    running: set[_Generation] = field(default_factory=set)
    slots: asyncio.Semaphore = field(init=False)
    ready: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        self.bind()

    def bind(self) -> None:
        """(Re)create the asyncio primitives (a new event loop serves the app)."""
        self.slots = asyncio.Semaphore(self.parallel)
        self.ready = asyncio.Event()
        if self.state != "loading":
            self.ready.set()

    @property
    def kind(self) -> str:
        return _kind_of(self.model)

    def listed(self) -> dict[str, Any]:
        """The ``loaded_instances`` entry of ``GET /api/v1/models``."""
        return {"id": self.id, "config": dict(self.config)}

    def record(self) -> dict[str, Any]:
        """The ``instances`` entry of ``/sim/stats``."""
        return {"id": self.id, "model": self.model, "origin": self.origin, "state": self.state,
                "size_bytes": self.size_bytes, "parallel": self.parallel,
                "config": dict(self.config), "running": len(self.running),
                "ttl_s": self.ttl_s, "loaded_at": self.loaded_at, "last_used": self.last_used}


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
    instance: str | None = None  # id of the instance that served (or was to serve) it
    inst: _Instance | None = field(default=None, repr=False)
    cut_by: str | None = None  # "unload" or "evict": why its instance went away under it
    generating: bool = False

    def stop(self, reason: str) -> None:
        """Cancel the generation task, remembering why (``killed``/``cancelled``)."""
        if self.stop_reason is None and self.task is not None and not self.task.done():
            self.stop_reason = reason
            self.task.cancel()

    def record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _LOG_FIELDS}


_COUNTERS = ("completed", "killed", "cancelled", "errors", "loads", "jit_loads", "api_loads",
             "unloads", "evictions", "ttl_unloads", "cut_generations", "failed_loads",
             "refused_loads")


class _SimState:
    """Everything mutable about one simulator instance."""

    def __init__(self, models: Sequence[str], tokens_per_s: float, load_s: float,
                 max_concurrent: int, loaded: str | None, *,
                 load_times: dict[str, float] | None = None,
                 sizes: dict[str, int] | None = None, memory_bytes: int | None = None,
                 fail_loads: Sequence[str] = (), preload: Sequence[str] = (),
                 jit_ttl_s: float | None = _DEFAULT_JIT_TTL_S, accept_parallel: bool = False) -> None:
        self.models = list(models)
        self.delay = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.load_s = max(0.0, load_s)
        self.load_times = {m: max(0.0, s) for m, s in (load_times or {}).items()}
        self.max_concurrent = max(1, max_concurrent)
        self.sizes = {m: sizes[m] if sizes and m in sizes else _KNOWN_SIZES.get(m, _guess_size(m))
                      for m in self.models}
        self.memory_bytes = memory_bytes if memory_bytes is None else max(0, memory_bytes)
        self.fail_loads = set(fail_loads)
        self.jit_ttl_s = jit_ttl_s if jit_ttl_s and jit_ttl_s > 0 else None
        self.accept_parallel = accept_parallel
        self.instances: list[_Instance] = []  # in load order
        self.generating: dict[str, int] = {}  # model -> generations producing tokens now
        self.seq = 0
        self.active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lock = asyncio.Lock()
        self.reset()
        startup = [(loaded, "jit")] if loaded in self.models else []
        startup += [(m, "api") for m in preload if m in self.models]
        for model, origin in startup:
            inst = self._new_instance(model, origin, {}, self.jit_ttl_s)
            if self.memory_bytes is not None and self.loaded_bytes() > self.memory_bytes:
                raise ValueError(f"{model} does not fit in --memory-bytes {self.memory_bytes}")
            inst.state, inst.loaded_at = "loaded", time.monotonic()
            inst.ready.set()

    # -- bookkeeping -----------------------------------------------------------------------
    def reset(self) -> None:
        """Clear counters and log; keeps the instances, live gauges and ``seq``."""
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.active_max = self.active
        self.max_loaded_bytes = self.loaded_bytes()
        self.max_concurrent_models = len(self.generating)
        self.log: deque[_Generation] = deque(maxlen=LOG_CAP)
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_CAP)
        self.requests_total = 0

    def bind_loop(self) -> None:
        """(Re)create asyncio primitives when served from a new event loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self.lock = asyncio.Lock()
            for inst in self.instances:
                inst.bind()

    def loaded_bytes(self) -> int:
        """Memory taken by every instance, loading ones included."""
        return sum(i.size_bytes for i in self.instances)

    @property
    def loaded(self) -> str | None:
        """The model of the most recently loaded instance (None: nothing loaded)."""
        done = [i for i in self.instances if i.state == "loaded"]
        return max(done, key=lambda i: i.loaded_at or 0.0).model if done else None

    def loaded_instances(self, model: str) -> list[_Instance]:
        return [i for i in self.instances if i.model == model and i.state == "loaded"]

    def knows(self, name: str) -> bool:
        """A model key, or the id of a loaded instance (``key:2``), that requests may name."""
        return name in self.models or any(i.id == name and i.state == "loaded"
                                          for i in self.instances)

    def load_time(self, model: str) -> float:
        return self.load_times.get(model, self.load_s)

    def default_config(self, model: str, parallel: int) -> dict[str, Any]:
        if _kind_of(model) == "embedding":
            return {"context_length": _DEFAULT_CONTEXT["embedding"]}
        return {"context_length": _DEFAULT_CONTEXT["llm"], "eval_batch_size": 512,
                "flash_attention": True, "offload_kv_cache_to_gpu": True, "parallel": parallel}

    def _new_instance(self, model: str, origin: str, asked: dict[str, Any],
                      ttl_s: float | None = None) -> _Instance:
        """Reserve a loading instance (its memory counts from now on)."""
        taken = {i.id for i in self.instances}
        n = 1
        while (iid := model if n == 1 else f"{model}:{n}") in taken:
            n += 1
        parallel = self.max_concurrent
        if "parallel" in asked and _kind_of(model) == "llm":
            parallel = asked["parallel"]
        config = self.default_config(model, parallel)
        config.update({k: v for k, v in asked.items() if k in config or
                       (k == "num_experts" and _kind_of(model) == "llm")})
        inst = _Instance(iid, model, origin, self.sizes[model], config, parallel,
                         ttl_s if origin == "jit" else None)
        self.instances.append(inst)
        self.max_loaded_bytes = max(self.max_loaded_bytes, self.loaded_bytes())
        return inst

    def _drop(self, inst: _Instance, why: str) -> None:
        """Take ``inst`` out of memory; generations on it are cut (``why``: unload/evict/ttl)."""
        if inst in self.instances:
            self.instances.remove(inst)
        inst.state = "gone"
        inst.ready.set()
        for gen in list(inst.running):
            if gen.stop_reason is None:
                gen.cut_by = why
            gen.stop("killed")

    def expire_idle(self) -> None:
        """Unload JIT instances idle for longer than their TTL (LM Studio's Idle TTL)."""
        now = time.monotonic()
        for inst in list(self.instances):
            if (inst.origin == "jit" and inst.state == "loaded" and inst.ttl_s is not None
                    and not inst.running and now - inst.last_used > inst.ttl_s):
                self._drop(inst, "ttl")
                self.counters["ttl_unloads"] += 1

    def _route(self, name: str) -> _Instance | None:
        """The instance a request naming ``name`` (model key or instance id) goes to: the
        instance with that id, else the first instance of that model (loading ones too)."""
        for inst in self.instances:
            if inst.id == name:
                return inst
        return next((i for i in self.instances if i.model == name), None)

    def _register(self, gen: _Generation, inst: _Instance) -> None:
        inst.running.add(gen)
        inst.last_used = time.monotonic()
        gen.inst, gen.instance = inst, inst.id

    # -- loading ---------------------------------------------------------------------------
    async def _load(self, inst: _Instance) -> float:
        """Wait out the load time of a reserved instance; returns it. Called with the lock."""
        started = time.monotonic()
        try:
            await asyncio.sleep(self.load_time(inst.model))
        except BaseException:
            self._drop(inst, "cancelled")
            raise
        if inst.model in self.fail_loads:
            self._drop(inst, "failed")
            self.counters["failed_loads"] += 1
            raise _SimError(500, "model_load_failed", "model_load_failed",
                            f"Failed to load model \"{inst.model}\". Error loading model. "
                            "(Exit code: 1). Unknown error. Try a different model and/or config.")
        inst.state, inst.loaded_at = "loaded", time.monotonic()
        inst.last_used = inst.loaded_at
        inst.ready.set()
        self.counters["loads"] += 1
        self.counters["jit_loads" if inst.origin == "jit" else "api_loads"] += 1
        return inst.loaded_at - started

    def _refuse(self) -> _SimError:
        self.counters["refused_loads"] += 1
        return _SimError(500, "model_load_failed", "insufficient_resources", _GUARDRAIL_MESSAGE)

    async def _jit_load(self, model: str, ttl_s: float | None) -> _Instance:
        """JIT: evict JIT instances (never API ones) to make room, then load ``model``."""
        size = self.sizes[model]
        jit = sorted((i for i in self.instances if i.origin == "jit"), key=lambda i: i.last_used)
        if self.memory_bytes is None:
            victims = jit  # "Only Keep Last JIT Loaded Model"
        else:
            pinned = sum(i.size_bytes for i in self.instances if i.origin != "jit")
            if pinned + size > self.memory_bytes:
                raise self._refuse()
            victims, used = [], self.loaded_bytes()
            while used + size > self.memory_bytes:
                victims.append(jit[len(victims)])
                used -= victims[-1].size_bytes
        for victim in victims:
            self._drop(victim, "evict")
            self.counters["evictions"] += 1
        inst = self._new_instance(model, "jit", {}, ttl_s if ttl_s else self.jit_ttl_s)
        await self._load(inst)
        return inst

    async def load_api(self, model: str, asked: dict[str, Any]) -> tuple[_Instance, float]:
        """``POST /api/v1/models/load``: a new instance, even if the model has one already."""
        async with self.lock:
            self.expire_idle()
            if (self.memory_bytes is not None
                    and self.loaded_bytes() + self.sizes[model] > self.memory_bytes):
                raise self._refuse()
            inst = self._new_instance(model, "api", asked)
            took = await self._load(inst)
            return inst, took

    def unload(self, instance_id: str) -> _Instance | None:
        """``POST /api/v1/models/unload``: cuts the generations running on it."""
        inst = next((i for i in self.instances if i.id == instance_id and i.state == "loaded"), None)
        if inst is not None:
            self._drop(inst, "unload")
            self.counters["unloads"] += 1
        return inst

    async def enter_model(self, gen: _Generation, ttl_s: float | None = None) -> _Instance:
        """Route ``gen`` to an instance of ``gen.model`` (JIT-loading one if there is none)
        and register it there."""
        while True:
            self.expire_idle()
            inst = self._route(gen.model)
            if inst is None:
                if gen.model not in self.models:  # an instance id that went away
                    raise _SimError(404, "invalid_request_error", "model_not_found",
                                    f"Model '{gen.model}' not found")
                async with self.lock:
                    inst = self._route(gen.model)
                    if inst is None:
                        inst = await self._jit_load(gen.model, ttl_s)
                        self._register(gen, inst)  # before the lock goes: nobody evicts it first
                        return inst
            if inst.state == "loading":
                await inst.ready.wait()
                continue
            self._register(gen, inst)
            return inst

    def new_generation(self, model: str, stream: bool, path: str, user: str) -> _Generation:
        self.seq += 1
        gen = _Generation(self.seq, model, stream, path, user)
        self.log.append(gen)
        return gen

    def begin(self, gen: _Generation) -> None:
        """``gen`` got a slot of its instance and produces tokens now."""
        gen.generating = True
        self.active += 1
        self.active_max = max(self.active_max, self.active)
        model = gen.inst.model if gen.inst else gen.model
        self.generating[model] = self.generating.get(model, 0) + 1
        self.max_concurrent_models = max(self.max_concurrent_models, len(self.generating))

    def end(self, gen: _Generation) -> None:
        if not gen.generating:
            return
        gen.generating = False
        self.active -= 1
        model = gen.inst.model if gen.inst else gen.model
        left = self.generating.get(model, 0) - 1
        if left > 0:
            self.generating[model] = left
        else:
            self.generating.pop(model, None)

    def finish(self, gen: _Generation, outcome: str) -> None:
        if gen.inst is not None:
            gen.inst.running.discard(gen)
            gen.inst.last_used = time.monotonic()
        gen.ended = time.monotonic()
        gen.outcome = outcome
        key = {"ok": "completed", "error": "errors"}.get(outcome, outcome)
        self.counters[key] += 1
        if outcome == "killed" and gen.cut_by in ("unload", "evict"):
            self.counters["cut_generations"] += 1

    def stats(self) -> dict[str, Any]:
        self.expire_idle()
        return {"loaded": self.loaded, "active": self.active, "max_active": self.active_max,
                **self.counters, "max_loaded_bytes": self.max_loaded_bytes,
                "loaded_bytes": self.loaded_bytes(), "memory_bytes": self.memory_bytes,
                "max_concurrent_models": self.max_concurrent_models,
                "generating_models": sorted(self.generating),
                "instances": [i.record() for i in self.instances],
                "log": [g.record() for g in self.log]}


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
        ttl = body.get("ttl")  # LM Studio: idle TTL of a model this request JIT-loads
        valid = isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0
        self.ttl_s: float | None = float(ttl) if valid else None

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
                await self._fail(out, _UNLOADED_ERROR)
        except _SimError as exc:  # the model could not be loaded (JIT) or is gone
            await self._fail(out, exc.openai(), status=exc.status)
        except Exception as exc:  # noqa: BLE001 - a simulator bug must not hang the client
            await self._fail(out, {"error": {"message": str(exc), "type": "internal_error",
                                             "param": None, "code": None}})
        finally:
            state.finish(gen, outcome)

    @staticmethod
    async def _fail(out: _Sender, error: dict, status: int | None = None) -> None:
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
            "state": "loaded" if state.loaded_instances(model) else "not-loaded",
            "max_context_length": _MAX_CONTEXT}


def _v1_model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "owned_by": "organization_owner"}


def _native_model(state: _SimState, model: str) -> dict[str, Any]:
    """One entry of LM Studio 0.4's ``GET /api/v1/models``."""
    publisher, arch = _KNOWN_META.get(model, ("lmstudio-community", model.split("-")[0]))
    llm = _kind_of(model) == "llm"
    entry: dict[str, Any] = {"type": _kind_of(model), "publisher": publisher, "key": model,
                             "display_name": _display_name(model)}
    if llm:
        entry["architecture"] = arch
    entry.update({
        "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
        "size_bytes": state.sizes[model], "params_string": _params_string(model),
        "loaded_instances": [i.listed() for i in state.loaded_instances(model)],
        "max_context_length": _MAX_CONTEXT, "format": "gguf"})
    if llm:
        entry["capabilities"] = {"vision": False, "trained_for_tool_use": True}
        entry["description"] = None
    return entry


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


def _routes(state: _SimState) -> list[Route]:
    async def list_models(request: Request) -> Response:
        state.expire_idle()
        v0 = request.url.path.startswith("/api/v0")
        data = [_v0_model(state, m) if v0 else _v1_model(m) for m in state.models]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        state.expire_idle()
        model = request.path_params["model"]
        if model not in state.models:
            return _model_not_found(model)
        v0 = request.url.path.startswith("/api/v0")
        return JSONResponse(_v0_model(state, model) if v0 else _v1_model(model))

    async def native_models(request: Request) -> Response:
        state.expire_idle()
        return JSONResponse({"models": [_native_model(state, m) for m in state.models]})

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
        except _SimError as exc:
            return exc.native()
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
              Route("/sim/requests", requests),
              Route("/api/v1/models", native_models),
              Route("/api/v1/models/load", load, methods=["POST"]),
              Route("/api/v1/models/unload", unload, methods=["POST"])]
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
                         loaded: str | None = None, load_times: dict[str, float] | None = None,
                         sizes: dict[str, int] | None = None, memory_bytes: int | None = None,
                         fail_loads: Sequence[str] = (), preload: Sequence[str] = (),
                         jit_ttl_s: float | None = _DEFAULT_JIT_TTL_S,
                         accept_parallel: bool = False) -> Starlette:
    """Build a simulator app; ``app.state.sim`` holds its state object."""
    state = _SimState(models, tokens_per_s, load_s, max_concurrent, loaded, load_times=load_times,
                      sizes=sizes, memory_bytes=memory_bytes, fail_loads=fail_loads,
                      preload=preload, jit_ttl_s=jit_ttl_s, accept_parallel=accept_parallel)
    app = Starlette(routes=_routes(state))
    app.state.sim = state
    app.add_middleware(_RequestLog, state=state)
    return app


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _byte_count(text: str) -> int:
    """``4700000000``, ``4.7G``, ``8GiB`` ... as a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _per_model(convert):
    """An argparse type for ``model=value,model=value``."""
    def parse(text: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in _names(text):
            model, sep, value = item.rpartition("=")
            if not sep or not model.strip():
                raise argparse.ArgumentTypeError(f"expected model=value, got {item!r}")
            try:
                out[model.strip()] = convert(value.strip())
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise argparse.ArgumentTypeError(f"{item!r}: {exc}") from None
        return out
    return parse


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``lmgate-sim`` / ``python -m proxy.simulator``."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="lmgate-sim",
        description="LM Studio simulator: an OpenAI-compatible /v1, LM Studio /api/v0 and "
        "/api/v1 (models, load, unload) server with deterministic replies. Like LM Studio 0.4, a "
        "request for a model with no loaded instance loads it JIT and auto-evicts JIT-loaded "
        "instances only (killing their generations), and unloading an instance cuts the "
        "generations running on it. For demos and tests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=1234,
                        help="port to listen on (the one LM Studio uses by default)")
    parser.add_argument("--tokens-per-s", type=float, default=50.0,
                        help="generation speed per request, in tokens per second (0 = instant)")
    parser.add_argument("--load-time", type=float, default=0.3,
                        help="seconds a model takes to load (JIT or POST /api/v1/models/load)")
    parser.add_argument("--load-times", type=_per_model(float), default=None,
                        help="per-model load seconds overriding --load-time, e.g. "
                        "qwen2.5-7b-instruct=2.5,llama-3.2-3b-instruct=1")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated model ids the simulator serves")
    parser.add_argument("--model-sizes", type=_per_model(_byte_count), default=None,
                        help="per-model size in bytes (4700000000, 4.7G, 8GiB), e.g. "
                        "qwen2.5-7b-instruct=4700000000; others get a plausible size "
                        "guessed from the name")
    parser.add_argument("--memory-bytes", type=_byte_count, default=None,
                        help="memory budget for loaded instances (None: unlimited); a load "
                        "that does not fit is refused, JIT loads evict JIT instances to fit")
    parser.add_argument("--max-concurrent", type=int, default=4,
                        help="generations that run at once per loaded instance, like LM Studio "
                        "0.4's \"Max Concurrent Predictions\" (reported as config.parallel); "
                        "more wait inside the simulator")
    parser.add_argument("--loaded", default=None,
                        help="model already loaded (JIT) at start (None: nothing loaded)")
    parser.add_argument("--preload", type=_names, default=[],
                        help="comma-separated models loaded at start as through "
                        "POST /api/v1/models/load (never auto-evicted)")
    parser.add_argument("--fail-loads", type=_names, default=[],
                        help="comma-separated models whose loads fail (test knob)")
    parser.add_argument("--jit-ttl", type=float, default=_DEFAULT_JIT_TTL_S,
                        help="idle seconds after which a JIT-loaded instance unloads, unless "
                        "the request that loaded it gave a ttl (0: never)")
    parser.add_argument("--accept-parallel", action="store_true",
                        help="accept a 'parallel' key in POST /api/v1/models/load bodies (LM "
                        "Studio's documented schema has none and rejects unknown keys)")
    args = parser.parse_args(argv)
    models = _names(args.models)
    named = [*(args.load_times or {}), *(args.model_sizes or {}), *args.preload, *args.fail_loads]
    unknown = sorted({m for m in named if m not in models})
    if unknown:
        parser.error(f"not among --models: {', '.join(unknown)}")
    try:
        app = create_simulator_app(models=models, tokens_per_s=args.tokens_per_s,
                                   load_s=args.load_time, max_concurrent=args.max_concurrent,
                                   loaded=args.loaded, load_times=args.load_times,
                                   sizes=args.model_sizes, memory_bytes=args.memory_bytes,
                                   fail_loads=args.fail_loads, preload=args.preload,
                                   jit_ttl_s=args.jit_ttl, accept_parallel=args.accept_parallel)
    except ValueError as exc:
        parser.error(str(exc))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
