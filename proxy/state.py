"""What one lmgate instance owns and shares between its request handlers: the gate, the
upstream, keys, quotas, metrics, the requests in flight and recently finished, and the
lifecycle (start, watching the upstream, shutdown). Every other module reads it; it imports
none of the modules that handle requests, so nothing forms a circle through it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry

from .auth import Auth
from .config import ApiKey, ConfigError, Settings, UpstreamSpec, load_settings
from .errors import NotFound, QuotaExceeded, ShuttingDown, UpstreamUnavailable
from .eta import Estimator
from .exchange import Exchange
from .gate import Box, Gate, Ticket
from .history import History
from .identity import Identities
from .inbound import ByteBudget, Scope, client_address, header_map
from .metrics import Metrics, RequestRecord
from .models import ERROR, MANAGED, UNKNOWN, BoxModels
from .quota import DB_NAME, QuotaStore, QuotaStoreError, default_state_dir
from .upstream import Upstream, upstream_timeouts

if TYPE_CHECKING:
    from .auth import Principal

log = logging.getLogger("lmgate")
access_log = logging.getLogger("lmgate.access")

RECENT_CAP = 2000


class AppState:
    """Everything one lmgate instance owns. Lives in ``app.state.lmgate``."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None,
                 registry: CollectorRegistry, quotas: QuotaStore | None = None) -> None:
        self.settings = settings
        self.transport = transport
        self.upstreams: dict[str, Upstream] = {
            spec.name: Upstream(settings, transport, spec) for spec in settings.boxes()}
        self.managers: dict[str, BoxModels] = {
            name: self._manager(up) for name, up in self.upstreams.items()}
        self.gate = Gate(max_queue=settings.max_queue,
                         max_skips=settings.max_skips, policy=settings.policy,
                         groups=settings.groups, on_start=_grant,
                         max_priority_wait=settings.max_priority_wait,
                         boxes=[_box(spec, settings) for spec in settings.boxes()])
        self._aging: asyncio.TimerHandle | None = None
        self.quotas = quotas if quotas is not None else QuotaStore(quota_path(settings))
        self.auth = Auth(settings.keys)
        self.eta = Estimator()
        self.metrics = Metrics(registry, max_models=settings.max_models,
                               max_queue=settings.max_queue)
        self.metrics.attach_gate(lambda: self.gate, lambda: {n: u.up for n, u in self.upstreams.items()})
        self.registry = registry
        self.exchanges: dict[Ticket, Exchange] = {}
        self.identities = Identities(settings.trusted_proxies)
        self.waiting_bytes = ByteBudget(settings.max_waiting_bytes)
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # by internal id
        self.draining = False
        self.started_at = time.time()
        self._refresh: asyncio.Task[None] | None = None
        self._grace: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.probe_interval_s = settings.probe_interval
        self.argv: list[str] | None = None  # how to read the configuration again (reload)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.environ: dict[str, str] = {}
        self._retired: list[Upstream] = []
        self.extensions: list[Any] = []
        self.totals = {"served": 0, "failed": 0, "rejected": 0, "completion_tokens": 0}
        self.history = History.of(self)  # for the status page: /queue/history

    # -- boxes ---------------------------------------------------------------------------
    def _manager(self, up: Upstream) -> BoxModels:
        return BoxModels(up, up.spec, self.settings, on_load=self._loaded)

    def _loaded(self, box: str, model: str, seconds: float) -> None:
        self.metrics.model_load.labels(box, self.metrics.label.peek(model)).observe(seconds)
        self.eta.observe_load(model, seconds)

    def model_loading(self, model: str) -> bool:
        return any(model in m.loading for m in self.managers.values())

    async def prepare(self, ticket: Ticket, loading: Any = None) -> None:
        """Managed mode: the ticket's model gets an instance on its box before it is sent
        (a load, and room made for it, if needed). ``loading``: awaited with the model name
        when a load is about to be waited for (a waiting stream says so)."""
        mgr = self.managers.get(ticket.box or "")
        if mgr is None or mgr.mode != MANAGED:
            return
        box = self.gate.boxes.get(mgr.upstream.name)
        if mgr.needs_load(ticket.model) and loading is not None:
            await loading(ticket.model)
        ticket.meta["loading"] = mgr.needs_load(ticket.model)
        try:
            await mgr.ensure(ticket.model, lambda: {t.model for t in box.running.values()} if box else set())
        finally:
            ticket.meta["loading"] = False
        if box is not None:
            before = dict(box.slots), box.parallel
            mgr.slots(box)  # after its own load: the parallel LM Studio now reports
            if box.loaded != mgr.resident or (dict(box.slots), box.parallel) != before:
                self.gate.set_loaded(mgr.resident, box=box.name)  # and start what that allows

    @property
    def upstream(self) -> Upstream:
        """The first box (with a single box, the upstream)."""
        return next(iter(self.upstreams.values()))

    @property
    def several(self) -> bool:
        return len(self.upstreams) > 1

    def upstream_for(self, ticket: Ticket | None) -> Upstream:
        """The box a started request runs on; for an ungated call, the first box that is up."""
        if ticket is not None and ticket.box in self.upstreams:
            return self.upstreams[ticket.box]
        for up in self.upstreams.values():
            if up.up is not False:
                return up
        return self.upstream

    def reroute(self, ticket: Ticket) -> bool:
        """Its box refused the connection before anything was sent: mark the box down and put
        the request back in its place in line, for another box that lists its model. False
        when no other box could take it (the caller reports the refusal)."""
        if not self.several or ticket.box is None:
            return False
        refused = ticket.box
        others = [b for b in self.gate.boxes.values()
                  if b.name != refused and b.usable and b.lists(ticket.model)]
        self._mark_down(refused)
        if not others:
            return False
        ticket.waiter = asyncio.get_running_loop().create_future()
        self.gate.requeue(ticket)
        return True

    def _mark_down(self, name: str, *, quiet: bool = False) -> None:
        """The box refused or failed: skip it (with several boxes) and check it again after a
        growing pause. Logged once per outage, whichever path noticed it first."""
        up = self.upstreams.get(name)
        if up is None:
            return
        if not up.down_logged and not quiet:
            log.warning("upstream %s is not answering; %s", self._label(up),
                        "its requests go to the other boxes until it is back" if self.several
                        else "requests get 502 until it is back")
        up.down_logged = True
        up.up = False
        up.backoff_s = min(MAX_BACKOFF_S, up.backoff_s * 2 if up.backoff_s
                           else min(1.0, self.probe_interval_s))
        up.retry_at = time.monotonic() + up.backoff_s
        if self.several or quiet:
            self.gate.set_up(name, False)

    def _label(self, up: Upstream) -> str:
        return up.name if self.several else up.base

    async def check_servable(self, model: str) -> None:
        """404 at once for a model no box lists (one box or several; a box whose listing is
        not known lists everything), 502 at once when every box that lists it is down (it
        would only wait). A managed box that does not list the model and is idle reads its
        listing again first (at most every ``RELIST_S``), so a model downloaded a moment ago
        is found; a busy box is not asked."""
        gate = self.gate
        boxes = [b for b in gate.boxes.values() if not b.removed and b.lists(model)]
        if not boxes:
            for name, mgr in list(self.managers.items()):
                box = gate.boxes.get(name)
                if (box is None or box.removed or mgr.mode != MANAGED or not self.box_idle(name)
                        or (box.models and not box.lists_glob(model))):
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

    # -- reloading the configuration -------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the configuration (SIGHUP, ``POST /admin/reload``): keys, limits and boxes
        change in place; nothing waiting or running is dropped. A box taken out starts nothing
        more and leaves when its running requests end. Settings that only a restart can change
        are reported, not applied. A bad file raises ConfigError and changes nothing."""
        if self.argv is None:
            raise ConfigError("config", "lmgate was started without --config: nothing to re-read")
        new = load_settings(self.argv, self.environ)
        old = self.settings
        if old.demo:  # the simulated boxes stay
            new = new.with_(upstream=old.upstream, upstreams=old.upstreams)
        if new.max_queue > old.max_connections:
            raise ConfigError("max_queue", f"{new.max_queue} requests may wait, but this process "
                              f"accepts {old.max_connections} connections (max_connections needs a "
                              "restart)")
        later = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)
                 and not (name == "max_connections" and "max_connections" not in new.sources)]
        if quota_path(new) != quota_path(old):
            later.append("state_dir (quotas)")
        kept = {name: getattr(old, name) for name in RESTART_ONLY}
        self.settings = new.with_(**kept, demo=old.demo, upstreams=new.upstreams)
        self.auth.keys = new.keys
        self.identities = Identities(new.trusted_proxies)
        self.waiting_bytes.limit = new.max_waiting_bytes
        self.probe_interval_s = new.probe_interval
        self.gate.reconfigure(max_queue=new.max_queue, max_skips=new.max_skips, groups=new.groups,
                              max_priority_wait=new.max_priority_wait)
        added, removed = self._reload_boxes(new)
        log.info("configuration reloaded from %s: %d keys; boxes %s%s%s%s", new.config,
                 len(new.keys), ", ".join(s.name for s in new.boxes()),
                 f"; added {', '.join(added)}" if added else "",
                 f"; removing {', '.join(removed)} once their requests end" if removed else "",
                 f"; needs a restart to change: {', '.join(later)}" if later else "")
        return {"reloaded": True, "keys": len(new.keys), "upstreams": [s.name for s in new.boxes()],
                "added": added, "removing": removed, "restart_needed": later}

    def _reload_boxes(self, new: Settings) -> tuple[list[str], list[str]]:
        specs = {spec.name: spec for spec in new.boxes()}
        added, removed = [], []
        for name, box in list(self.gate.boxes.items()):
            spec = specs.get(name)
            if spec is None:
                if not box.removed:
                    removed.append(name)
                    self.gate.remove_box(name)
                continue
            box.removed = False  # taken out by an earlier reload, still busy, and back: it stays
            box.parallel, box.models = spec.parallel or new.parallel, spec.models
            up = self.upstreams.get(name)
            if up is not None and (up.spec != spec or up.key != (spec.key or new.upstream_key)
                                   or up.timeouts != upstream_timeouts(new)):
                self._retired.append(up)  # its running requests keep their connections
                up = self.upstreams[name] = Upstream(new, self.transport, spec)
                self.managers[name] = self._manager(up)
            mgr = self.managers.get(name)
            if mgr is not None:
                mgr.reconfigure(spec, new)
                mgr.slots(box)
        for name, spec in specs.items():
            if name in self.gate.boxes:
                continue
            if name in self.upstreams:  # removed earlier, still finishing: replace it
                self._retired.append(self.upstreams[name])
            up = self.upstreams[name] = Upstream(new, self.transport, spec)
            self.managers[name] = self._manager(up)
            up.up = False  # until its first check answers (the watcher checks it at once)
            box = _box(spec, new)
            box.up = False
            self.gate.add_box(box)
            added.append(name)
        if not self.several:  # one box: it is never skipped (a refusal is a 502, as always)
            for box in self.gate.boxes.values():
                box.up = True
        self.gate.rebalance()
        self._strand_check()
        if added:
            self.refresh_loaded_soon()
        return added, removed

    def _strand_check(self) -> None:
        """Requests waiting for a model that no box serves any more (a reload took its box
        away) get the answer a new request would get, at once, instead of waiting for the
        queue timeout."""
        for ticket in self.gate.waiting():
            if self.gate.serves(ticket.model):
                continue
            self.gate.cancel(ticket)
            waiter = ticket.waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(NotFound(f"no upstream serves the model '{ticket.model}' any "
                                              "more (the configuration was reloaded)",
                                              param="model", code="model_not_found"))

    # -- who is asking ------------------------------------------------------------------
    def client_of(self, scope: Scope, headers: dict[bytes, bytes] | None = None) -> str:
        """The caller's address: the socket peer, or what a trusted proxy forwarded for."""
        return self.identities.client(client_address(scope),
                                      header_map(scope) if headers is None else headers)

    def lookup(self, request_id: str, who: Principal | None) -> list[Ticket | dict[str, Any]]:
        """Running or waiting tickets, then finished records, that ``request_id`` names for
        ``who``: lmgate's internal id, or a request id (possibly client-chosen), among the
        caller's own requests only; an admin sees everyone's. Nobody else's, ever."""
        admin = who is not None and who.admin
        mine = None if who is None else who.identity

        def visible(identity: str) -> bool:
            return admin or identity == mine

        live: list[Ticket | dict[str, Any]] = [
            t for t in self.gate.tickets()
            if (t.uid == request_id or t.request_id == request_id) and visible(t.identity)]
        seen = {t.uid for t in live if isinstance(t, Ticket)}
        done = [r for r in self.recent.values()
                if (r["uid"] == request_id or r["request_id"] == request_id)
                and r["uid"] not in seen and visible(r["identity"])]
        return live + done[::-1]

    # -- priorities and quotas ----------------------------------------------------------
    def watch_aging(self) -> None:
        """Have the gate age its waiting requests on time: one timer, for the next one due."""
        if self._aging is not None:
            return
        at = self.gate.next_aging_at()
        if at is None:
            return
        loop = asyncio.get_running_loop()
        self._aging = loop.call_later(max(0.0, at - time.monotonic()), self._age)

    def _age(self) -> None:
        self._aging = None
        self.gate.tick()
        self.watch_aging()

    def check_quota(self, key: ApiKey) -> None:
        refusal = self.quotas.refusal(key.name, key.tokens_per_day, key.tokens_per_month)
        if refusal is not None:
            raise QuotaExceeded(refusal.message, retry_after_s=refusal.retry_after_s)

    # -- bookkeeping -------------------------------------------------------------------
    def observe(self, rec: RequestRecord) -> None:
        if rec.total_tokens is None and (rec.prompt_tokens or rec.completion_tokens):
            # cut short before a report: what is known, as a lower bound
            rec.total_tokens = (rec.prompt_tokens or 0) + (rec.completion_tokens or 0)
            rec.tokens_approx = True
        self.metrics.observe(rec)
        if rec.key and rec.total_tokens and rec.total_tokens > 0:
            self.quotas.add(rec.key, rec.total_tokens)
        if rec.model:
            bucket = {"ok": "served", "rejected": "rejected"}.get(rec.outcome, "failed")
            self.totals[bucket] += 1
            self.totals["completion_tokens"] += rec.completion_tokens or 0
        if rec.outcome == "ok" and rec.wait_ms is not None:
            # ttft only for streams: a plain answer's first byte comes at its end
            self.eta.observe(rec.model, rec.duration_ms / 1000 - rec.wait_ms / 1000, box=rec.upstream,
                             completion_tokens=rec.completion_tokens,
                             ttft_s=rec.ttft_ms / 1000 if rec.stream and rec.ttft_ms is not None else None)
        if (rec.outcome == "upstream_error" and rec.status >= 500) or rec.status in (502, 504):
            self.refresh_loaded_soon()
        log_access(rec, self.settings.log_format)

    def remember(self, ticket: Ticket, rec: RequestRecord) -> None:
        mgr = self.managers.get(ticket.box or "")
        if mgr is not None:
            mgr.used(ticket.model)  # idle from now: ttl and least-recently-used count from here
        self.recent[ticket.uid] = {
            "request_id": ticket.request_id, "uid": ticket.uid, "model": ticket.model, "state": "done",
            "outcome": rec.outcome, "status": rec.status, "position": -1,
            "position_at_arrival": ticket.position_at_arrival,
            "waited_s": round(ticket.waited_s(time.monotonic()), 3),
            "identity": ticket.identity, "client": ticket.meta.get("client"),
        }
        self.recent.move_to_end(ticket.uid)
        while len(self.recent) > RECENT_CAP:
            self.recent.popitem(last=False)

    def refresh_loaded_soon(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self.refresh_loaded())

    @property
    def idle(self) -> bool:
        """Nothing runs on any box."""
        return not self.gate.active

    def box_idle(self, name: str) -> bool:
        """Nothing runs on this box: only then may lmgate send it anything of its own."""
        box = self.gate.boxes.get(name)
        return box is not None and not box.running

    async def refresh_loaded(self, names: list[str] | None = None) -> None:
        """Read what each idle box has loaded (and, with several boxes, what it lists)."""
        for name in list(self.upstreams) if names is None else names:
            up = self.upstreams.get(name)
            if up is None or not self.box_idle(name) or up.up is False:
                continue
            mgr = self.managers.get(name)
            if mgr is not None and mgr.mode == MANAGED:
                if await mgr.refresh():
                    self._apply_listing(name, mgr)
                continue
            models, catalog = await up.models_state(catalog=self.several)
            if name not in self.gate.boxes or not self.box_idle(name):
                continue
            if models is not None:
                self.gate.set_loaded(models, box=name)
            if self.several:
                self.gate.set_catalog(name, catalog)

    def _apply_listing(self, name: str, mgr: BoxModels) -> None:
        """A managed box's listing, just read, into the gate: slots, catalog, resident models."""
        box = self.gate.boxes.get(name)
        if box is None or not self.box_idle(name):
            return
        mgr.slots(box)
        self.gate.set_catalog(name, mgr.catalog)  # one box or several: a load needs a listed model
        self.gate.set_loaded(mgr.resident, box=name)

    # -- lifecycle ---------------------------------------------------------------------
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await self.quotas.start()
        except QuotaStoreError as err:
            log.error("%s", err)
            raise SystemExit(2) from None
        for name, up in self.upstreams.items():
            await self._check(name, up, first=True)
            if not self.auth.open and up.up and await up.open_to_anyone():
                log.warning("upstream %s answers without a token, so anyone who can reach it goes "
                            "around lmgate's keys: turn on Require Authentication in LM Studio's "
                            "server settings and give lmgate the token (--upstream-key or the box's "
                            "key)", self._label(up))
        for spec in self.settings.boxes():
            room = spec.max_loaded or self.settings.max_loaded
            for group in self.settings.groups:
                if len(group) > room and self.managers[spec.name].mode != "jit":
                    log.warning("group %s has %d models but box %s keeps at most %d loaded "
                                "(max_loaded): in managed mode they cannot stay loaded together",
                                ", ".join(group), len(group), spec.name, room)
        self._watch = asyncio.get_running_loop().create_task(self._watch_upstream())
        self.history.start()
        if self.auth.open and self.settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no [[keys]] configured and listening on %s: ANYONE who can reach this "
                        "port can use the LLM server. Configure [[keys]] to require API keys.",
                        self.settings.host)

    async def _watch_upstream(self) -> None:
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
                if name not in self.gate.boxes:  # removed, and done
                    del self.upstreams[name]
                    self.managers.pop(name, None)
                    await up.aclose()
                    continue
                if not self.box_idle(name):
                    continue
                mgr = self.managers.get(name)
                if mgr is not None and mgr.mode == MANAGED and mgr.instances and up.up:
                    before = mgr.resident
                    await mgr.expire(set())
                    if mgr.resident != before and self.box_idle(name):
                        self.gate.set_loaded(mgr.resident, box=name)
                due = up.retry_at if up.up is False else up.last_probe + self.probe_interval_s
                if now >= due:
                    await self._check(name, up)

    async def _check(self, name: str, up: Upstream, first: bool = False) -> None:
        ok = await up.probe()
        mgr = self.managers.get(name)
        detected = ok and mgr is not None and (mgr.mode == UNKNOWN or up.down_logged or first)
        if detected:
            assert mgr is not None
            await mgr.detect()
            if mgr.mode == ERROR:  # answering, but not usable as configured: say why, once
                if not up.down_logged:
                    log.error("upstream %s: %s", self._label(up), mgr.error)
                self._mark_down(name, quiet=True)
                up.up = True  # it answers; the gate keeps it out of service
                return
            if name in self.gate.boxes:
                mgr.slots(self.gate.boxes[name])
        if not ok:
            self._mark_down(name)
            return
        up.backoff_s = 0.0
        was_down = up.down_logged
        up.down_logged = False
        # what it lists, before anything is sent to it (a listing just read is not read again)
        if detected and mgr is not None and mgr.mode == MANAGED:
            self._apply_listing(name, mgr)
        else:
            await self.refresh_loaded([name])
        if name in self.gate.boxes:
            self.gate.set_up(name, True)
        if first or was_down:
            log.info("upstream %s is %s (%s)", self._label(up), "up" if first else "back up",
                     self._box_summary(name))

    def _box_summary(self, name: str) -> str:
        """How a box will be used, for its "is up" line: load mode and the slots in force."""
        box, mgr = self.gate.boxes.get(name), self.managers.get(name)
        if box is None:
            return "removed"
        mode = mgr.mode if mgr is not None else "jit"
        slots = ", ".join(f"{m}: {box.slots_for(m)}" for m in sorted(box.loaded)) if box.loaded else ""
        return f"{mode}, " + (f"slots {slots}" if slots else f"{box.parallel} slot"
                              + ("s" if box.parallel != 1 else "") + " per model")

    def begin_shutdown(self) -> None:
        """Stop admitting; fail waiting requests now; give running ones the grace period."""
        if self.draining:
            return
        self.draining = True
        dropped = self.gate.close()
        for ticket in dropped:
            if ticket.waiter is not None and not ticket.waiter.done():
                ticket.waiter.set_exception(ShuttingDown("lmgate is shutting down; try again shortly"))
        log.info("shutting down: %s refused, %s %g s to finish", _count(len(dropped), "waiting request"),
                 _count(self.gate.active, "running request") + (" gets" if self.gate.active == 1 else " get"),
                 self.settings.shutdown_grace)
        if self.gate.active:
            self._grace = asyncio.get_running_loop().create_task(self._end_grace())

    async def _end_grace(self) -> None:
        await asyncio.sleep(self.settings.shutdown_grace)
        reason = ShuttingDown("lmgate is shutting down; the request was cut off")
        for ex in list(self.exchanges.values()):
            ex.interrupt(reason)
        for ext in self.extensions:
            ext.cut_off(reason)

    async def aclose(self) -> None:
        self.history.stop()
        if self._aging is not None:
            self._aging.cancel()
        await self.quotas.aclose()
        for task in (self._refresh, self._grace, self._watch):
            if task is not None:
                task.cancel()
        for up in [*self.upstreams.values(), *self._retired]:
            await up.aclose()

    def cancel(self, request_id: str, who: Principal, reason: Any) -> str:
        """Admin cancel: withdraw waiting requests or cut off running ones. Answers
        ``cancelled``, ``none`` (nothing waiting or running by that id), or ``ambiguous``: a
        client-chosen id that several identities used cancels nothing."""
        found = [t for t in self.lookup(request_id, who) if isinstance(t, Ticket)]
        exact = [t for t in found if t.uid == request_id]
        if exact:
            found = exact
        elif len({t.identity for t in found}) > 1:
            return "ambiguous"
        for ticket in found:
            ex = self.exchanges.get(ticket)
            if ex is not None:
                ex.interrupt(reason)
            else:
                for ext in self.extensions:
                    ext.cancel(ticket.uid, reason)
        return "cancelled" if found else "none"


MAX_BACKOFF_S = 30.0
RELIST_S = 2.0  # an idle managed box is asked again for a model it did not list, at most this often
# What a reload applies: keys and limits in place, boxes added or removed (an upstream whose
# address, key or timeouts changed is rebuilt; its running requests keep their connections).
RELOADED = ("upstreams", "keys", "groups", "models", "max_queue", "queue_timeout", "max_body",
            "parallel", "max_skips", "read_timeout", "connect_timeout", "shutdown_grace",
            "upstream_key", "result_ttl", "stream_open_timeout", "trusted_proxies",
            "max_waiting_bytes", "max_kept_results", "max_kept_bytes", "probe_interval",
            "max_loaded", "max_loaded_bytes", "feedback", "max_priority_wait")
# What a reload cannot change: the listening socket and its limits, logging, the quota file,
# the policy (tags of waiting requests), CORS (middleware), the metric label budget and how a
# box's load mode is found (at its first check).
RESTART_ONLY = ("host", "port", "max_connections", "client_read_timeout", "client_write_timeout",
                "log_level", "log_format", "policy", "cors_origins", "max_models", "state_dir",
                "load_mode")


def _box(spec: UpstreamSpec, settings: Settings) -> Box:
    return Box(spec.name, parallel=spec.parallel or settings.parallel, models=spec.models)


def quota_path(settings: Settings) -> Path | None:
    """Token counts persist only when some key has a quota (in ``--state-dir``); otherwise
    they are kept in memory for /usage and the metrics."""
    if not any(k.has_quota for k in settings.keys):
        return None
    base = Path(settings.state_dir).expanduser() if settings.state_dir else default_state_dir()
    return base / DB_NAME


def _grant(ticket: Ticket) -> None:
    waiter = ticket.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(True)


def log_access(rec: RequestRecord, fmt: str) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    if fmt == "json":
        access_log.info(json.dumps({
            "request_id": rec.request_id, "client": rec.client, "route": rec.route,
            "model": rec.model, "upstream": rec.upstream, "status": rec.status,
            "outcome": rec.outcome, "stream": rec.stream, "position": rec.position,
            "wait_ms": _r(rec.wait_ms), "ttft_ms": _r(rec.ttft_ms), "duration_ms": _r(rec.duration_ms),
            "prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
            "tokens_approx": rec.tokens_approx,
        }))
        return
    access_log.info(
        '%s %s "%s" model=%s upstream=%s status=%s outcome=%s pos=%s wait_ms=%s ttft_ms=%s '
        "duration_ms=%s tokens=%s/%s%s",
        rec.request_id, rec.client, rec.route, rec.model or "-",
        "-" if rec.upstream == "none" else rec.upstream, rec.status, rec.outcome,
        rec.position, _r(rec.wait_ms), _r(rec.ttft_ms), _r(rec.duration_ms),
        "-" if rec.prompt_tokens is None else rec.prompt_tokens,
        "-" if rec.completion_tokens is None else rec.completion_tokens,
        "~" if rec.tokens_approx else "",
    )


def _count(n: int, noun: str) -> str:
    """``1 waiting request``, ``2 waiting requests``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)
