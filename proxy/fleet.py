"""The boxes behind lmgate: one ``Upstream`` (connection pool, credentials) and one
``BoxModels`` (what it has loaded, loads and unloads) per box, and each box's health, which
the fleet alone decides: a box is up when it answers, down (skipped with several boxes,
checked again with backoff) when it refuses or fails, and out of service when it answers but
cannot be used as configured (``--load-mode managed`` without the REST API, a missing key).

The fleet tells the line what the boxes do (loaded models, catalog, up or down, added or
removed) and never sends a box anything of its own while a request runs there: checks and
listings happen only while the box is idle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from .config import Settings, UpstreamSpec
from .errors import NotFound, UpstreamUnavailable
from .gate import Box, Ticket
from .line import LocalLine
from .models import ERROR, MANAGED, UNKNOWN, BoxModels
from .upstream import Upstream, upstream_timeouts

log = logging.getLogger("lmgate")

MAX_BACKOFF_S = 30.0
RELIST_S = 2.0  # an idle managed box is asked again for a model it did not list, at most this often


@dataclass
class Health:
    """One box's health. ``up`` None: not checked yet."""

    up: bool | None = None
    last_probe: float = 0.0
    retry_at: float = 0.0  # a box that is down: when to check it again
    backoff_s: float = 0.0
    down_logged: bool = False  # its outage was logged (once per outage)


class Fleet:
    """Every box, its health and its models. Box state reaches the gate through the line."""

    def __init__(self, settings: Settings, line: LocalLine, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 on_load: Callable[[str, str, float], None] | None = None) -> None:
        self.settings = settings
        self.line = line
        self.transport = transport
        self.on_load = on_load
        self.upstreams: dict[str, Upstream] = {}
        self.managers: dict[str, BoxModels] = {}
        self.health: dict[str, Health] = {}
        for spec in settings.boxes():
            self._add(spec, settings)
        self.probe_interval_s = settings.probe_interval
        self._retired: list[Upstream] = []
        self._refresh: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    @staticmethod
    def boxes_for(settings: Settings) -> list[Box]:
        """The gate's share of each configured box."""
        return [_box(spec, settings) for spec in settings.boxes()]

    def _add(self, spec: UpstreamSpec, settings: Settings) -> Upstream:
        up = self.upstreams[spec.name] = Upstream(settings, self.transport, spec)
        self.managers[spec.name] = BoxModels(up, spec, settings, on_load=self.on_load)
        self.health[spec.name] = Health()
        return up

    # -- reading ---------------------------------------------------------------------------
    @property
    def first(self) -> Upstream:
        """The first box (with a single box, the upstream)."""
        return next(iter(self.upstreams.values()))

    @property
    def several(self) -> bool:
        return len(self.upstreams) > 1

    def is_up(self, name: str) -> bool:
        """Answering and usable as configured."""
        health, mgr = self.health.get(name), self.managers.get(name)
        return bool(health is not None and health.up) and not (mgr is not None and mgr.error)

    @property
    def any_up(self) -> bool:
        return any(self.is_up(name) for name in self.upstreams)

    def errors(self) -> dict[str, str]:
        return {name: m.error for name, m in self.managers.items() if m.error}

    def up_states(self) -> dict[str, bool | None]:
        """Each box's last known state (for metrics and pages)."""
        return {name: self.health[name].up for name in self.upstreams if name in self.health}

    def label(self, name: str) -> str:
        """How a box is named in a log line: its name among several, else its URL."""
        up = self.upstreams.get(name)
        return name if self.several or up is None else up.base

    def upstream_for(self, ticket: Ticket | None) -> Upstream:
        """The box a started request runs on; for an ungated call, the first box that is up."""
        if ticket is not None and ticket.box in self.upstreams:
            return self.upstreams[ticket.box]
        for name, up in self.upstreams.items():
            if self.health[name].up is not False:
                return up
        return self.first

    def box_idle(self, name: str) -> bool:
        """Nothing runs on this box: only then may lmgate send it anything of its own."""
        box = self.line.view.boxes.get(name)
        return box is not None and not box.running

    def model_loading(self, model: str) -> bool:
        return any(model in m.loading for m in self.managers.values())

    def summary(self, name: str) -> str:
        """How a box will be used, for its "is up" line: load mode and the slots in force."""
        box, mgr = self.line.view.boxes.get(name), self.managers.get(name)
        if box is None:
            return "removed"
        mode = mgr.mode if mgr is not None else "jit"
        slots = ", ".join(f"{m}: {box.slots_for(m)}" for m in sorted(box.loaded)) if box.loaded else ""
        return f"{mode}, " + (f"slots {slots}" if slots else f"{box.parallel} slot"
                              + ("s" if box.parallel != 1 else "") + " per model")

    # -- health: the fleet's alone --------------------------------------------------------------
    def answered(self, name: str) -> None:
        """A response came from the box: it is up (its running requests say so)."""
        health = self.health.get(name)
        if health is not None:
            health.up = True

    def suspect(self, name: str) -> None:
        """A request to the box failed: it counts as not up until it answers again (a check
        while it is idle, or the next response)."""
        health = self.health.get(name)
        if health is not None:
            health.up = False

    def failed(self, name: str, *, quiet: bool = False) -> None:
        """The box refused or failed: skip it (with several boxes) and check it again after a
        growing pause. Logged once per outage, whichever path noticed it first."""
        health = self.health.get(name)
        if health is None:
            return
        if not health.down_logged and not quiet:
            log.warning("upstream %s is not answering; %s", self.label(name),
                        "its requests go to the other boxes until it is back" if self.several
                        else "requests get 502 until it is back")
        health.down_logged = True
        health.up = False
        health.backoff_s = min(MAX_BACKOFF_S, health.backoff_s * 2 if health.backoff_s
                               else min(1.0, self.probe_interval_s))
        health.retry_at = time.monotonic() + health.backoff_s
        if (self.several or quiet) and name in self.line.view.boxes:
            self.line.set_up(name, False)

    def reroute(self, ticket: Ticket) -> bool:
        """Its box refused the connection before anything was sent: mark the box down and put
        the request back in its place in line, for another box that lists its model. False
        when no other box could take it (the caller reports the refusal)."""
        if not self.several or ticket.box is None:
            return False
        refused = ticket.box
        others = [b for b in self.line.view.boxes.values()
                  if b.name != refused and b.usable and b.lists(ticket.model)]
        self.failed(refused)
        if not others:
            return False
        self.line.requeue(ticket)
        return True

    async def check_servable(self, model: str) -> None:
        """404 at once for a model no box lists (one box or several; a box whose listing is
        not known lists everything), 502 at once when every box that lists it is down (it
        would only wait). A managed box that does not list the model and is idle reads its
        listing again first (at most every ``RELIST_S``), so a model downloaded a moment ago
        is found; a busy box is not asked."""
        gate = self.line.view
        boxes = [b for b in gate.boxes.values() if not b.removed and b.lists(model)]
        if not boxes:
            for name, mgr in list(self.managers.items()):
                box = gate.boxes.get(name)
                if (box is None or box.removed or mgr.mode != MANAGED or not self.box_idle(name)
                        or not box.lists_glob(model)):
                    continue
                if mgr.listed_at is None or mgr.clock() - mgr.listed_at >= RELIST_S:
                    if await mgr.refresh():
                        self._apply_listing(name, mgr)
            boxes = [b for b in gate.boxes.values() if not b.removed and b.lists(model)]
        if not boxes:
            raise NotFound(f"no upstream serves the model '{model}'", param="model",
                           code="model_not_found")
        if not self.several:
            mgr = next(iter(self.managers.values()), None)
            if mgr is not None and mgr.mode == ERROR:
                raise UpstreamUnavailable(f"upstream {mgr.upstream.name}: {mgr.error}")
            return
        if not any(b.up for b in boxes):
            raise UpstreamUnavailable(f"every upstream that serves '{model}' is down "
                                      f"({', '.join(b.name for b in boxes)}); try again shortly")

    # -- models ----------------------------------------------------------------------------
    async def prepare(self, ticket: Ticket, loading: Callable[[], Awaitable[None]] | None = None) -> None:
        """Managed mode: the ticket's model gets an instance on its box before it is sent
        (a load, and room made for it, if needed). ``loading``: awaited when a load is about
        to be waited for (a stream says so at once)."""
        mgr = self.managers.get(ticket.box or "")
        if mgr is None or mgr.mode != MANAGED:
            return
        box = self.line.view.boxes.get(mgr.upstream.name)
        if mgr.needs_load(ticket.model) and loading is not None:
            await loading()
        ticket.meta["loading"] = mgr.needs_load(ticket.model)
        try:
            await mgr.ensure(ticket.model, lambda: {t.model for t in box.running.values()} if box else set())
        finally:
            ticket.meta["loading"] = False
        if box is not None:
            self.line.set_slots(box.name, *mgr.slots())  # after its own load: what LM Studio reports
            if box.loaded != mgr.resident:
                self.line.set_loaded(box.name, mgr.resident)  # and start what that allows

    def used(self, ticket: Ticket) -> None:
        """A request has ended: its model's idle time (ttl, least recently used) starts."""
        mgr = self.managers.get(ticket.box or "")
        if mgr is not None:
            mgr.used(ticket.model)

    def refresh_soon(self) -> None:
        """Read what the idle boxes have loaded, soon (after an upstream error)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self.refresh_loaded())

    async def refresh_loaded(self, names: list[str] | None = None) -> None:
        """Read what each idle box has loaded (and, with several boxes, what it lists)."""
        for name in list(self.upstreams) if names is None else names:
            up = self.upstreams.get(name)
            if up is None or not self.box_idle(name) or self.health[name].up is False:
                continue
            mgr = self.managers.get(name)
            if mgr is not None and mgr.mode == MANAGED:
                if await mgr.refresh():
                    self._apply_listing(name, mgr)
                continue
            models, catalog = await up.models_state(catalog=self.several)
            if name not in self.line.view.boxes or not self.box_idle(name):
                continue
            if models is not None:
                self.line.set_loaded(name, models)
            if self.several:
                self.line.set_catalog(name, catalog)

    def _apply_listing(self, name: str, mgr: BoxModels) -> None:
        """A managed box's listing, just read, into the gate: slots, catalog, resident models."""
        box = self.line.view.boxes.get(name)
        if box is None or not self.box_idle(name):
            return
        self.line.set_slots(name, *mgr.slots())
        self.line.set_catalog(name, mgr.catalog)  # one box or several: a load needs a listed model
        self.line.set_loaded(name, mgr.resident)

    # -- checks ----------------------------------------------------------------------------
    async def start(self, *, warn_open: bool, watch: bool = True) -> None:
        """Check every box once before serving (what it has loaded and lists), then keep
        watching them (``watch``; a replica watches only while it schedules its group's line).
        ``warn_open``: lmgate has keys, so a box on another machine that answers without a
        token is one warning line (anyone could go around lmgate)."""
        for name, up in self.upstreams.items():
            await self._check(name, first=True)
            if warn_open and self.health[name].up and await up.open_to_anyone():
                log.warning("upstream %s answers without a token, so anyone who can reach it goes "
                            "around lmgate's keys: turn on Require Authentication in LM Studio's "
                            "server settings and give lmgate the token (--upstream-key or the box's "
                            "key)", self.label(name))
        for spec in self.settings.boxes():
            room = spec.max_loaded or self.settings.max_loaded
            for group in self.settings.groups:
                if len(group) > room and self.managers[spec.name].mode != "jit":
                    log.warning("group %s has %d models but box %s keeps at most %d loaded "
                                "(max_loaded): in managed mode they cannot stay loaded together",
                                ", ".join(group), len(group), spec.name, room)
        self.watching(watch)

    def watching(self, on: bool) -> None:
        """Keep checking the boxes (``watch``), or stop (another replica does it)."""
        if on and (self._watch is None or self._watch.done()):
            self._watch = asyncio.get_running_loop().create_task(self.watch())
        elif not on and self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def watch(self) -> None:
        """Keep each box's up/down state true to life, and notice a model loaded by hand in LM
        Studio. A box is checked only while nothing runs on it: some servers stop the running
        generation when any other request arrives (llama.cpp's ``interrupt_requests``), and
        while a request runs its own answer tells whether the box is up. A box that is down is
        checked again after 1, 2, 4 ... up to 30 s; one removed by a reload is closed once its
        last request has ended."""
        while True:
            await asyncio.sleep(min(self.probe_interval_s, 1.0))
            now = time.monotonic()
            for name, up in list(self.upstreams.items()):
                if name not in self.line.view.boxes:  # removed, and done
                    del self.upstreams[name]
                    self.managers.pop(name, None)
                    self.health.pop(name, None)
                    await up.aclose()
                    continue
                if not self.box_idle(name):
                    continue
                health, mgr = self.health[name], self.managers.get(name)
                if mgr is not None and mgr.mode == MANAGED and mgr.instances and health.up:
                    before = mgr.resident
                    await mgr.expire(set())
                    if mgr.resident != before and self.box_idle(name):
                        self.line.set_loaded(name, mgr.resident)
                due = health.retry_at if health.up is False else health.last_probe + self.probe_interval_s
                if now >= due:
                    await self._check(name)

    async def _check(self, name: str, first: bool = False) -> None:
        up, health = self.upstreams[name], self.health[name]
        ok = await up.probe()
        health.last_probe = time.monotonic()
        mgr = self.managers.get(name)
        detected = ok and mgr is not None and (mgr.mode == UNKNOWN or health.down_logged or first)
        if detected:
            assert mgr is not None
            await mgr.detect()
            if mgr.mode == ERROR:  # answering, but not usable as configured: say why, once
                if not health.down_logged:
                    log.error("upstream %s: %s", self.label(name), mgr.error)
                self.failed(name, quiet=True)
                health.up = True  # it answers; the gate keeps it out of service
                return
            if name in self.line.view.boxes:
                self.line.set_slots(name, *mgr.slots())
        if not ok:
            self.failed(name)
            return
        health.up = True
        health.backoff_s = 0.0
        was_down = health.down_logged
        health.down_logged = False
        # what it lists, before anything is sent to it (a listing just read is not read again)
        if detected and mgr is not None and mgr.mode == MANAGED:
            self._apply_listing(name, mgr)
        else:
            await self.refresh_loaded([name])
        if name in self.line.view.boxes:
            self.line.set_up(name, True)
        if first or was_down:
            log.info("upstream %s is %s (%s)", self.label(name), "up" if first else "back up",
                     self.summary(name))

    # -- reload ------------------------------------------------------------------------------
    def reconfigure(self, new: Settings) -> tuple[list[str], list[str]]:
        """Boxes added, removed (a removed box finishes its running requests first; one added
        back while it still does stays), changed in place; (added, removed)."""
        self.settings = new
        self.probe_interval_s = new.probe_interval
        gate = self.line.view
        specs = {spec.name: spec for spec in new.boxes()}
        added, removed = [], []
        for name, box in list(gate.boxes.items()):
            spec = specs.get(name)
            if spec is None:
                if not box.removed:
                    removed.append(name)
                    self.line.remove_box(name)
                continue
            box.removed = False  # taken out by an earlier reload, still busy, and back: it stays
            box.models = spec.models
            up = self.upstreams.get(name)
            if up is not None and (up.spec != spec or up.key != (spec.key or new.upstream_key)
                                   or up.timeouts != upstream_timeouts(new)):
                self._retired.append(up)  # its running requests keep their connections
                health = self.health[name]
                self._add(spec, new)
                self.health[name] = health
            mgr = self.managers.get(name)
            if mgr is not None:
                mgr.reconfigure(spec, new)
                self.line.set_slots(name, *mgr.slots())
        for name, spec in specs.items():
            if name in gate.boxes:
                continue
            if name in self.upstreams:  # removed earlier, still finishing: replace it
                self._retired.append(self.upstreams[name])
            self._add(spec, new)
            self.health[name].up = False  # until its first check answers (the watcher: at once)
            box = _box(spec, new)
            box.up = False
            self.line.add_box(box)
            added.append(name)
        if not self.several:  # one box: it is never skipped (a refusal is a 502, as always)
            for box in gate.boxes.values():
                box.up = True
        self.line.rebalance()
        if added:
            self.refresh_soon()
        return added, removed

    async def aclose(self) -> None:
        for task in (self._refresh, self._watch):
            if task is not None:
                task.cancel()
        for up in [*self.upstreams.values(), *self._retired]:
            await up.aclose()


def _box(spec: UpstreamSpec, settings: Settings) -> Box:
    return Box(spec.name, parallel=spec.parallel or settings.parallel, models=spec.models)
