"""The composition root: what one lmgate instance is made of, built once and shared by the
request handlers.

    AppState
    ├── line       the waiting line (line.py: LocalLine around the pure Gate)
    ├── fleet      the boxes: connections, health, models, reroute (fleet.py)
    ├── requests   requests in flight and recently finished: ids, owners, interrupts (registry.py)
    ├── accounts   what a finished request leaves: metrics, quota, estimates, the access log
    ├── auth, identities, waiting_bytes, eta, quotas, metrics, history
    └── lifecycle  start, reload (each part reconfigures itself), drain, close

It imports none of the modules that handle requests, so nothing forms a circle through it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry

from .accounting import Accounts
from .auth import Auth
from .config import ApiKey, ConfigError, Settings, load_settings
from .errors import NotFound, ShuttingDown
from .eta import Estimator
from .fleet import Fleet
from .gate import Gate
from .history import History
from .identity import Identities
from .inbound import ByteBudget, Scope, client_address, header_map
from .counters import RedisQuotas, RedisRates
from .line import LocalLine
from .metrics import Metrics, RequestRecord
from .quota import Quotas, QuotaStore, default_state_dir
from .shared import ConfigMismatch, SharedLine, StateUnavailable
from .store import DB_NAME, StateDB, StoreError
from .registry import Registry

if TYPE_CHECKING:
    from .upstream import Upstream

log = logging.getLogger("lmgate")

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
RETRY_WHILE_STOPPING_S = 5  # the openai SDKs retry a 503 with Retry-After by themselves
RESTART_ONLY = ("host", "port", "max_connections", "client_read_timeout", "client_write_timeout",
                "log_level", "log_format", "policy", "cors_origins", "max_models", "state_dir",
                "load_mode", "state_url", "lease_ttl")


class AppState:
    """Everything one lmgate instance owns. Lives in ``app.state.lmgate``."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None,
                 registry: CollectorRegistry, quotas: QuotaStore | None = None,
                 db: StateDB | None = None) -> None:
        self.settings = settings
        self.auth = Auth(settings.keys)
        self.identities = Identities(settings.trusted_proxies)
        self.waiting_bytes = ByteBudget(settings.max_waiting_bytes)
        # the line: this process's own, or (--state-url) the group's, shared through Redis
        self.shared: SharedLine | None = None
        self.line: LocalLine | SharedLine
        if settings.state_url:
            self.line = self.shared = SharedLine(settings, Fleet.boxes_for(settings), url=settings.state_url,
                                                 lease_ttl=settings.lease_ttl)
        else:
            self.line = LocalLine(Gate(max_queue=settings.max_queue, max_skips=settings.max_skips,
                                       policy=settings.policy, groups=settings.groups,
                                       max_priority_wait=settings.max_priority_wait,
                                       boxes=Fleet.boxes_for(settings)))
        self.eta = Estimator()
        self.prometheus = registry
        self.metrics = Metrics(registry, max_models=settings.max_models, max_queue=settings.max_queue)
        self.fleet = Fleet(settings, self.line, transport=transport, on_load=self._loaded)
        shared = self.shared
        self.metrics.attach_gate(
            lambda: self.line.view, self.fleet.up_states,
            # with replicas: the line's depth from the scheduler only, each replica's own requests
            reports_depth=(lambda: True) if shared is None else (lambda: shared.scheduler),
            counts=None if shared is None else (lambda t: t.meta.get("replica") == shared.replica))
        self.requests = Registry(lambda: self.line.view.tickets(), lambda: self.line.view.clock())
        self.db = db  # the state database (quotas, old-API jobs); None: jobs in memory only
        if self.shared is not None:  # the group's, in Redis
            quotas = RedisQuotas(self.shared.client(), self.shared.prefix)
            self.auth.rates = RedisRates(self.shared.client(), self.shared.prefix)
        if quotas is None:  # quotas persist only when some key has one (then in the database)
            path = quota_path(settings)
            quotas = QuotaStore(None if path is None else db if db is not None else path)
        self.quotas: Quotas = quotas
        self.accounts = Accounts(self.metrics, self.quotas, self.eta, log_format=settings.log_format,
                                 on_upstream_error=self.fleet.refresh_soon)
        self.history = History.of(self)  # for the status page: /queue/history
        self.draining = False
        self.on_grace_end: Callable[[], None] | None = None  # replicas: old-API jobs handed over
        self.started_at = time.time()
        self.argv: list[str] | None = None  # how to read the configuration again (reload)
        self.environ: dict[str, str] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._grace: asyncio.Task[None] | None = None

    # -- what the parts say, for readers ----------------------------------------------------
    @property
    def gate(self) -> Gate:
        """The line as it stands (read only)."""
        return self.line.view

    @property
    def upstreams(self) -> dict[str, Upstream]:
        return self.fleet.upstreams

    @property
    def exchanges(self) -> dict[Any, Any]:
        """The requests in flight that can be interrupted (read only)."""
        return self.requests.exchanges

    @property
    def totals(self) -> dict[str, int]:
        return self.accounts.totals

    def client_of(self, scope: Scope, headers: dict[bytes, bytes] | None = None) -> str:
        """The caller's address: the socket peer, or what a trusted proxy forwarded for."""
        return self.identities.client(client_address(scope),
                                      header_map(scope) if headers is None else headers)

    async def check_quota(self, key: ApiKey) -> None:
        await self.accounts.check_quota(key)

    def observe(self, rec: RequestRecord) -> None:
        self.accounts.observe(rec)

    def _loaded(self, box: str, model: str, seconds: float) -> None:
        self.metrics.model_load.labels(box, self.metrics.label.peek(model)).observe(seconds)
        self.eta.observe_load(model, seconds)

    # -- reloading the configuration ----------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the configuration (SIGHUP, ``POST /admin/reload``): each part takes what is
        its own in place; nothing waiting or running is dropped. Settings that only a restart
        can change are reported, not applied. A bad file raises ConfigError and changes
        nothing."""
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
        self.line.reconfigure(max_queue=new.max_queue, max_skips=new.max_skips, groups=new.groups,
                              max_priority_wait=new.max_priority_wait)
        if self.shared is not None:
            self.shared.configure(self.settings)
        added, removed = self.fleet.reconfigure(new)
        self._strand_check()
        log.info("configuration reloaded from %s: %d keys; boxes %s%s%s%s", new.config,
                 len(new.keys), ", ".join(s.name for s in new.boxes()),
                 f"; added {', '.join(added)}" if added else "",
                 f"; removing {', '.join(removed)} once their requests end" if removed else "",
                 f"; needs a restart to change: {', '.join(later)}" if later else "")
        return {"reloaded": True, "keys": len(new.keys), "upstreams": [s.name for s in new.boxes()],
                "added": added, "removing": removed, "restart_needed": later}

    def _strand_check(self) -> None:
        """Requests waiting for a model that no box serves any more (a reload took its box
        away) get the answer a new request would get, at once, instead of waiting for the
        queue timeout."""
        for ticket in self.line.view.waiting():
            if not self.line.view.serves(ticket.model):
                self.line.fail(ticket, NotFound(f"no upstream serves the model '{ticket.model}' any "
                                                "more (the configuration was reloaded)",
                                                param="model", code="model_not_found"))

    # -- lifecycle -------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await self.quotas.start()
        except StoreError as err:
            log.error("%s", err)
            raise SystemExit(2) from None
        shared = self.shared
        if shared is not None:  # caught up with the group's line before anything else
            shared.on_unavailable = self._state_lost
            shared.on_scheduler = self.fleet.watching
            await shared.start()
        await self.fleet.start(warn_open=not self.auth.open, watch=shared is None)
        self.history.start()
        if self.auth.open and self.settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no [[keys]] configured and listening on %s: ANYONE who can reach this "
                        "port can use the LLM server. Configure [[keys]] to require API keys.",
                        self.settings.host)

    def check_service(self) -> None:
        """A replica out of service: without its shared state (fail closed), or with a
        configuration that differs from its group's."""
        shared = self.shared
        if shared is None:
            return
        if not shared.available:
            raise StateUnavailable()
        if not shared.config_matches:
            raise ConfigMismatch("this replica's configuration differs from its group's; try "
                                 "again shortly", retry_after_s=RETRY_WHILE_STOPPING_S)

    def out_of_service(self) -> str | None:
        """Why this process takes nothing new, for ``/readyz``: ``draining``,
        ``state_unavailable`` or ``config_mismatch``; None while it serves."""
        if self.draining:
            return "draining"
        shared = self.shared
        if shared is not None:
            if not shared.available:
                return "state_unavailable"
            if not shared.config_matches:
                return "config_mismatch"
        return None

    def _state_lost(self) -> None:
        """Away from the shared state longer than the lease: the group has dropped this
        replica's requests, so what still runs here is cut (two replicas never hold one slot
        for longer than that)."""
        self.requests.interrupt_all(StateUnavailable("the shared state (Redis) was unreachable "
                                                     "for too long; the request was cut off"))

    def begin_shutdown(self) -> None:
        """Stop admitting; fail waiting requests now; give running ones the grace period. A
        replica keeps serving what is connected to it, waiting requests included, for the
        grace; only then is what still waits refused."""
        if self.draining:
            return
        self.draining = True
        if self.shared is not None:
            log.info("shutting down: this replica takes nothing new; what is connected to it gets "
                     "%g s", self.settings.shutdown_grace)
            self.shared.close()
            self._grace = asyncio.get_running_loop().create_task(self._end_grace())
            return
        dropped = self.line.close()
        for ticket in dropped:
            if ticket.waiter is not None and not ticket.waiter.done():
                ticket.waiter.set_exception(ShuttingDown("lmgate is shutting down; try again shortly",
                                                         retry_after_s=RETRY_WHILE_STOPPING_S))
        active = self.line.view.active
        log.info("shutting down: %s refused, %s %g s to finish", _count(len(dropped), "waiting request"),
                 _count(active, "running request") + (" gets" if active == 1 else " get"),
                 self.settings.shutdown_grace)
        if active:
            self._grace = asyncio.get_running_loop().create_task(self._end_grace())

    async def drained(self) -> None:
        """A replica that shuts down: until what is connected to it is done (its own tickets,
        waiting or running, have left the group's line) or the grace is over. Meanwhile it
        still accepts connections, and answers them 503 (``/readyz`` included)."""
        shared = self.shared
        if shared is None or not shared.holding:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def check() -> None:
            if not shared.holding and not done.done():
                done.set_result(None)
        unsubscribe = shared.subscribe(check)
        try:
            waits = [done] + ([self._grace] if self._grace is not None else [])
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            unsubscribe()

    async def _end_grace(self) -> None:
        await asyncio.sleep(self.settings.shutdown_grace)
        if self.on_grace_end is not None:
            self.on_grace_end()
        if self.shared is not None:
            for ticket in self.shared.withdraw():
                if ticket.waiter is not None and not ticket.waiter.done():
                    ticket.waiter.set_exception(ShuttingDown("lmgate is shutting down; try again shortly",
                                                             retry_after_s=RETRY_WHILE_STOPPING_S))
        self.requests.interrupt_all(ShuttingDown("lmgate is shutting down; the request was cut off"))

    async def aclose(self) -> None:
        self.history.stop()
        self.line.stop()
        await self.quotas.aclose()
        if self._grace is not None:
            self._grace.cancel()
        await self.fleet.aclose()
        if self.shared is not None:
            await self.shared.aclose()
        if self.db is not None:
            await self.db.aclose()


def state_path(settings: Settings) -> Path:
    """The state database's file: in ``--state-dir``, else systemd's ``$STATE_DIRECTORY``,
    else the OS's per-user data directory."""
    base = Path(settings.state_dir).expanduser() if settings.state_dir else default_state_dir()
    return base / DB_NAME


def quota_path(settings: Settings) -> Path | None:
    """Token counts persist only when some key has a quota (in ``--state-dir``); otherwise
    they are kept in memory for /usage and the metrics."""
    if not any(k.has_quota for k in settings.keys):
        return None
    base = Path(settings.state_dir).expanduser() if settings.state_dir else default_state_dir()
    return base / DB_NAME


def _count(n: int, noun: str) -> str:
    """``1 waiting request``, ``2 waiting requests``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
