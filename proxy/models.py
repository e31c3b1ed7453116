"""Managed models: lmgate, not LM Studio's just-in-time loader, decides what is loaded.

LM Studio loads a model on first use and evicts another to make room: whatever request
arrives decides what is in memory, the root of the problem lmgate exists for. Models loaded
through LM Studio's REST API v1 (``POST /api/v1/models/load``) are not auto-evicted. So in
managed mode, when a request's turn comes on a box that has no instance of its model, lmgate
loads it (with the ``[[models]]`` settings), waits, then forwards; it keeps up to
``max_loaded`` models (and ``max_loaded_bytes`` of their ``size_bytes``) per box, unloading the
least recently used one that nothing runs on. A burst of requests for one model loads it once.

One ``BoxModels`` per box. The mode is found out at the box's first check: ``managed`` where
``GET /api/v1/models`` answers a ``models`` array (``--load-mode auto`` or ``managed``),
``jit`` otherwise, and ``error`` for ``--load-mode managed`` in front of a box without that
API (the box is kept down and says why).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from .config import ModelSpec, Settings, UpstreamSpec
from .errors import ModelLoadFailed, NotFound

if TYPE_CHECKING:
    from .gate import Box
    from .upstream import Upstream

log = logging.getLogger("lmgate")

MANAGED, JIT, ERROR, UNKNOWN = "managed", "jit", "error", "unknown"
# After a failed load, requests for that model on that box get the same answer for this long
# instead of each trying (and waiting for) the load again.
FAILED_LOAD_HOLD_S = 10.0
LISTING = "/api/v1/models"


class BoxModels:
    """What lmgate knows about one box's models, and the loads and unloads it makes there."""

    def __init__(self, upstream: Upstream, spec: UpstreamSpec, settings: Settings,
                 on_load: Callable[[str, str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.spec = spec
        self.settings = settings
        self.on_load = on_load  # (box, model, seconds) after a successful load
        self.clock = clock
        self.mode = UNKNOWN
        self.error: str | None = None
        self.instances: dict[str, list[str]] = {}  # model -> instance ids
        self.catalog: frozenset[str] = frozenset()  # every model key the listing names
        self.listed_at: float | None = None  # when the listing was last read (clock)
        self.sizes: dict[str, int] = {}
        self.reported_parallel: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self.loading: dict[str, asyncio.Future[None]] = {}
        self.failed: dict[str, tuple[float, ModelLoadFailed]] = {}
        self.models: dict[str, ModelSpec] = {m.name: m for m in settings.models}

    # -- settings ---------------------------------------------------------------------------
    @property
    def max_loaded(self) -> int:
        return self.spec.max_loaded or self.settings.max_loaded

    @property
    def max_loaded_bytes(self) -> int | None:
        return self.spec.max_loaded_bytes or self.settings.max_loaded_bytes

    def reconfigure(self, spec: UpstreamSpec, settings: Settings) -> None:
        self.spec, self.settings = spec, settings
        self.models = {m.name: m for m in settings.models}

    def slots(self) -> tuple[int, dict[str, int]]:
        """The box's slots: (for any model, per model where it differs).
        ``[[upstreams]].parallel`` > ``[[models]].parallel`` > ``--parallel`` if given > what
        LM Studio reports for the loaded instance > 1."""
        given = "parallel" in self.settings.sources or self.settings.parallel != 1
        if self.spec.parallel:
            return self.spec.parallel, {}
        slots: dict[str, int] = {}
        if not given and self.mode == MANAGED:
            slots.update(self.reported_parallel)
        for name, model in self.models.items():
            if model.parallel:
                slots[name] = model.parallel
        return (self.settings.parallel if given else 1), slots

    # -- what the box says --------------------------------------------------------------------
    async def detect(self) -> None:
        """Find the mode at the box's first check (and after it was down)."""
        mode = self.settings.load_mode
        if mode == JIT:
            self.mode = JIT
            return
        status, doc = await self._listing()
        if doc is not None:
            self.mode, self.error = MANAGED, None
            self._read(doc)
            return
        if status in (401, 403):
            self.mode, self.error = ERROR, (f"{LISTING} answered {status}: the box needs its "
                                            "key ([[upstreams]] key or --upstream-key)")
            return
        if mode == MANAGED:
            self.mode, self.error = ERROR, (f"--load-mode managed, but the box does not answer "
                                            f"{LISTING} (LM Studio 0.4 or later has it)")
            return
        self.mode, self.error = JIT, None

    async def refresh(self) -> bool:
        """Re-read the listing (managed mode). False if the box did not answer it."""
        _, doc = await self._listing()
        if doc is None:
            return False
        self._read(doc)
        return True

    async def _listing(self) -> tuple[int | None, dict[str, Any] | None]:
        """``GET /api/v1/models``: its status (None: no answer) and the document when it is
        the REST API v1 listing (a ``models`` array)."""
        try:
            r = await self.upstream.own_get(LISTING)
            doc = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None, None
        if isinstance(doc, dict) and isinstance(doc.get("models"), list):
            return r.status_code, doc
        return r.status_code, None

    def _read(self, doc: dict[str, Any]) -> None:
        instances: dict[str, list[str]] = {}
        catalog: set[str] = set()
        for m in doc["models"]:
            if not isinstance(m, dict) or not isinstance(m.get("key"), str):
                continue
            key = m["key"]
            catalog.add(key)
            if isinstance(m.get("size_bytes"), int):
                self.sizes[key] = m["size_bytes"]
            for inst in m.get("loaded_instances") or []:
                if not isinstance(inst, dict):
                    continue
                instances.setdefault(key, []).append(str(inst.get("id") or key))
                config = inst.get("config")
                parallel = config.get("parallel") if isinstance(config, dict) else None
                if isinstance(parallel, int) and not isinstance(parallel, bool) and parallel >= 1:
                    self.reported_parallel[key] = parallel
        self.instances = instances
        self.catalog = frozenset(catalog) | frozenset(instances)
        now = self.listed_at = self.clock()
        self.last_used = {key: self.last_used.get(key, now) for key in instances}

    def used(self, model: str) -> None:
        """A request for ``model`` has ended: its idle time (ttl, least recently used) starts."""
        if model in self.instances:
            self.last_used[model] = self.clock()

    @property
    def resident(self) -> frozenset[str]:
        return frozenset(self.instances)

    # -- loading ------------------------------------------------------------------------------
    def needs_load(self, model: str) -> bool:
        return self.mode == MANAGED and model not in self.instances

    def lists(self, model: str) -> bool:
        """Does the box's listing name ``model`` (downloaded or loaded)? Only such a model is
        ever loaded, and only its load may unload another."""
        return model in self.catalog or model in self.instances

    async def ensure(self, model: str, running: Callable[[], set[str]]) -> float | None:
        """Make sure ``model`` has an instance on the box; the seconds a load took, or None
        if it was there already. Raises ModelLoadFailed (every request waiting for this load
        gets the same error); the box stays usable. ``running``: the models with running
        requests on the box now (never unloaded)."""
        if model in self.instances:
            self.last_used[model] = self.clock()
            return None
        if not self.lists(model):  # never unload a model for a load that cannot succeed
            raise NotFound(f"the model '{model}' is not on {self.upstream.name} (its "
                           f"{LISTING} does not list it)", param="model", code="model_not_found")
        failed = self.failed.get(model)
        if failed is not None and self.clock() - failed[0] < FAILED_LOAD_HOLD_S:
            raise ModelLoadFailed(failed[1].message)
        pending = self.loading.get(model)
        if pending is not None:
            await asyncio.shield(pending)
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.loading[model] = future
        t0 = self.clock()
        try:
            await self._make_room(model, running)
            await self._load(model)
            await self.refresh()  # the instance's id and its parallel, before forwarding
            if model not in self.instances:  # the box did not list it: trust the load's answer
                self.instances[model] = [model]
        except BaseException as exc:
            if isinstance(exc, ModelLoadFailed):
                err = exc
                now = self.clock()  # any model name a client sends can fail: keep only the held
                self.failed = {m: f for m, f in self.failed.items() if now - f[0] < FAILED_LOAD_HOLD_S}
                self.failed[model] = (now, err)
            else:  # cut short (the requester left, a bug): the waiters still get an answer
                err = ModelLoadFailed(f"loading {model} on {self.upstream.name} failed: "
                                      f"{type(exc).__name__}")
            future.set_exception(err)
            future.exception()  # retrieved: waiters get it through their own await
            raise
        finally:
            self.loading.pop(model, None)
        seconds = self.clock() - t0
        self.failed.pop(model, None)
        future.set_result(None)
        self.last_used[model] = self.clock()
        if self.on_load is not None:
            self.on_load(self.upstream.name, model, seconds)
        log.info("loaded %s on %s in %.1f s", model, self.upstream.name, seconds)
        return seconds

    async def _load(self, model: str) -> None:
        spec = self.models.get(model)
        body: dict[str, Any] = {"model": model, **dict(spec.load if spec else ())}
        try:
            r = await self.upstream.own_post("/api/v1/models/load", body,
                                             timeout=self.settings.read_timeout)
        except httpx.HTTPError as exc:
            raise ModelLoadFailed(f"loading {model} on {self.upstream.name} failed: "
                                  f"{type(exc).__name__}") from None
        if r.status_code >= 300:
            raise ModelLoadFailed(f"loading {model} on {self.upstream.name} failed: "
                                  f"{_message(r)}")

    async def _make_room(self, model: str, running: Callable[[], set[str]]) -> None:
        """Unload least recently used models nothing runs on until ``model`` fits within
        ``max_loaded`` and ``max_loaded_bytes``."""
        while True:
            resident = [m for m in self.instances if m != model]
            count_ok = len(resident) + 1 <= self.max_loaded
            budget = self.max_loaded_bytes
            size = sum(self.sizes.get(m, 0) for m in resident) + self.sizes.get(model, 0)
            if count_ok and (budget is None or size <= budget):
                return
            busy = running() | set(self.loading)
            idle = sorted((m for m in resident if m not in busy),
                          key=lambda m: self.last_used.get(m, 0.0))
            if not idle:
                log.warning("%s: no room to load %s within max_loaded=%d / max_loaded_bytes=%s, and "
                            "every loaded model is in use; loading anyway", self.upstream.name,
                            model, self.max_loaded, budget)
                return
            await self.unload(idle[0])

    async def unload(self, model: str) -> None:
        for instance in self.instances.get(model, []):
            try:
                r = await self.upstream.own_post("/api/v1/models/unload", {"instance_id": instance},
                                                 timeout=self.settings.read_timeout)
                if r.status_code >= 300:
                    log.warning("unloading %s on %s: %s", instance, self.upstream.name, _message(r))
            except httpx.HTTPError as exc:
                log.warning("unloading %s on %s failed: %s", instance, self.upstream.name,
                            type(exc).__name__)
        self.instances.pop(model, None)
        log.info("unloaded %s on %s", model, self.upstream.name)

    async def expire(self, running: set[str]) -> None:
        """Unload models whose ``ttl`` has passed since their last use (and nothing runs on)."""
        now = self.clock()
        for model in list(self.instances):
            spec = self.models.get(model)
            if (spec is not None and spec.ttl is not None and model not in running
                    and model not in self.loading and now - self.last_used.get(model, now) >= spec.ttl):
                await self.unload(model)


def _message(r: httpx.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return r.text[:500] or f"HTTP {r.status_code}"
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if isinstance(err, str):
        return err
    return str(doc)[:500]
