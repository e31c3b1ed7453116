"""The simulated server's state: models, instances, loading, JIT eviction, generations, stats.

No HTTP here: the routes call into ``SimState`` and render what it returns or raises.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .catalog import default_config, kind_of, size_of

LOG_CAP = 10_000
REQUEST_LOG_CAP = 10_000
DEFAULT_JIT_TTL_S = 3600.0  # LM Studio: JIT-loaded models default to a 60 minute idle TTL
_LOG_FIELDS = ("seq", "model", "instance", "stream", "path", "user", "started", "ended",
               "outcome", "cut_by")
_COUNTERS = ("completed", "killed", "cancelled", "errors", "loads", "jit_loads", "api_loads",
             "unloads", "evictions", "ttl_unloads", "cut_generations", "failed_loads",
             "refused_loads")
_GUARDRAIL_MESSAGE = ("Model loading aborted due to insufficient system resources. Overloading the "
                      "system will likely cause it to freeze. If you believe this is a mistake, you "
                      "can try to change the model loading guardrails in the settings.")


class SimError(Exception):
    """A request the simulator refuses: ``status``, ``type``, ``code`` and ``message``, which
    the routes render in LM Studio's native or in the OpenAI error shape."""

    def __init__(self, status: int, type_: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.message = status, type_, code, message

    def openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": "model",
                          "code": self.code}}


@dataclass(eq=False)
class Instance:
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
    running: set[Generation] = field(default_factory=set)
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
        return kind_of(self.model)

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
class Generation:
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
    inst: Instance | None = field(default=None, repr=False)
    cut_by: str | None = None  # "unload" or "evict": why its instance went away under it
    generating: bool = False

    def stop(self, reason: str) -> None:
        """Cancel the generation task, remembering why (``killed``/``cancelled``)."""
        if self.stop_reason is None and self.task is not None and not self.task.done():
            self.stop_reason = reason
            self.task.cancel()

    def record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _LOG_FIELDS}


class SimState:
    """Everything mutable about one simulator instance."""

    def __init__(self, models: Sequence[str], tokens_per_s: float, load_s: float,
                 max_concurrent: int, loaded: str | None, *,
                 load_times: dict[str, float] | None = None,
                 sizes: dict[str, int] | None = None, memory_bytes: int | None = None,
                 fail_loads: Sequence[str] = (), preload: Sequence[str] = (),
                 jit_ttl_s: float | None = DEFAULT_JIT_TTL_S, accept_parallel: bool = False) -> None:
        self.models = list(models)
        self.delay = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.load_s = max(0.0, load_s)
        self.load_times = {m: max(0.0, s) for m, s in (load_times or {}).items()}
        self.max_concurrent = max(1, max_concurrent)
        self.sizes = {m: sizes[m] if sizes and m in sizes else size_of(m) for m in self.models}
        self.memory_bytes = memory_bytes if memory_bytes is None else max(0, memory_bytes)
        self.fail_loads = set(fail_loads)
        self.jit_ttl_s = jit_ttl_s if jit_ttl_s and jit_ttl_s > 0 else None
        self.accept_parallel = accept_parallel
        self.instances: list[Instance] = []  # in load order
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
        self.log: deque[Generation] = deque(maxlen=LOG_CAP)
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

    def loaded_instances(self, model: str) -> list[Instance]:
        return [i for i in self.instances if i.model == model and i.state == "loaded"]

    def knows(self, name: str) -> bool:
        """A model key, or the id of a loaded instance (``key:2``), that requests may name."""
        return name in self.models or any(i.id == name and i.state == "loaded"
                                          for i in self.instances)

    def load_time(self, model: str) -> float:
        return self.load_times.get(model, self.load_s)

    def _new_instance(self, model: str, origin: str, asked: dict[str, Any],
                      ttl_s: float | None = None) -> Instance:
        """Reserve a loading instance (its memory counts from now on)."""
        taken = {i.id for i in self.instances}
        n = 1
        while (iid := model if n == 1 else f"{model}:{n}") in taken:
            n += 1
        parallel = self.max_concurrent
        if "parallel" in asked and kind_of(model) == "llm":
            parallel = asked["parallel"]
        config = default_config(model, parallel)
        config.update({k: v for k, v in asked.items() if k in config or
                       (k == "num_experts" and kind_of(model) == "llm")})
        inst = Instance(iid, model, origin, self.sizes[model], config, parallel,
                        ttl_s if origin == "jit" else None)
        self.instances.append(inst)
        self.max_loaded_bytes = max(self.max_loaded_bytes, self.loaded_bytes())
        return inst

    def _drop(self, inst: Instance, why: str) -> None:
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

    def _route(self, name: str) -> Instance | None:
        """The instance a request naming ``name`` (model key or instance id) goes to: the
        instance with that id, else the first instance of that model (loading ones too)."""
        for inst in self.instances:
            if inst.id == name:
                return inst
        return next((i for i in self.instances if i.model == name), None)

    def _register(self, gen: Generation, inst: Instance) -> None:
        inst.running.add(gen)
        inst.last_used = time.monotonic()
        gen.inst, gen.instance = inst, inst.id

    # -- loading ---------------------------------------------------------------------------
    async def _load(self, inst: Instance) -> float:
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
            raise SimError(500, "model_load_failed", "model_load_failed",
                           f"Failed to load model \"{inst.model}\". Error loading model. "
                           "(Exit code: 1). Unknown error. Try a different model and/or config.")
        inst.state, inst.loaded_at = "loaded", time.monotonic()
        inst.last_used = inst.loaded_at
        inst.ready.set()
        self.counters["loads"] += 1
        self.counters["jit_loads" if inst.origin == "jit" else "api_loads"] += 1
        return inst.loaded_at - started

    def _refuse(self) -> SimError:
        self.counters["refused_loads"] += 1
        return SimError(500, "model_load_failed", "insufficient_resources", _GUARDRAIL_MESSAGE)

    async def _jit_load(self, model: str, ttl_s: float | None) -> Instance:
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

    async def load_api(self, model: str, asked: dict[str, Any]) -> tuple[Instance, float]:
        """``POST /api/v1/models/load``: a new instance, even if the model has one already."""
        async with self.lock:
            self.expire_idle()
            if (self.memory_bytes is not None
                    and self.loaded_bytes() + self.sizes[model] > self.memory_bytes):
                raise self._refuse()
            inst = self._new_instance(model, "api", asked)
            took = await self._load(inst)
            return inst, took

    def unload(self, instance_id: str) -> Instance | None:
        """``POST /api/v1/models/unload``: cuts the generations running on it."""
        inst = next((i for i in self.instances if i.id == instance_id and i.state == "loaded"), None)
        if inst is not None:
            self._drop(inst, "unload")
            self.counters["unloads"] += 1
        return inst

    async def enter_model(self, gen: Generation, ttl_s: float | None = None) -> Instance:
        """Route ``gen`` to an instance of ``gen.model`` (JIT-loading one if there is none)
        and register it there."""
        while True:
            self.expire_idle()
            inst = self._route(gen.model)
            if inst is None:
                if gen.model not in self.models:  # an instance id that went away
                    raise SimError(404, "invalid_request_error", "model_not_found",
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

    # -- generations -----------------------------------------------------------------------
    def new_generation(self, model: str, stream: bool, path: str, user: str) -> Generation:
        self.seq += 1
        gen = Generation(self.seq, model, stream, path, user)
        self.log.append(gen)
        return gen

    def begin(self, gen: Generation) -> None:
        """``gen`` got a slot of its instance and produces tokens now."""
        gen.generating = True
        self.active += 1
        self.active_max = max(self.active_max, self.active)
        model = gen.inst.model if gen.inst else gen.model
        self.generating[model] = self.generating.get(model, 0) + 1
        self.max_concurrent_models = max(self.max_concurrent_models, len(self.generating))

    def end(self, gen: Generation) -> None:
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

    def finish(self, gen: Generation, outcome: str) -> None:
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
