"""lmgate's own endpoints: health, queue views, metrics, status page, and the 404 catch-all.

Proxied paths (inference, model listings, model management) never reach these routes:
``app.GateDispatch`` takes them first.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .auth import Principal
from .config import ConfigError
from .errors import BadRequest, Cancelled, Conflict, Forbidden, NotFound, ProxyError, Unauthorized
from .gate import Ticket
from .inbound import client_address, header_map

if TYPE_CHECKING:
    from .state import AppState

DEFAULT_LIST_LIMIT = 500
log = logging.getLogger("lmgate")


def error_response(err: ProxyError, extra: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers={**err.headers(), **(extra or {})})


def viewer(state: AppState, request: Request) -> Principal | None:
    """Who is looking at the queue. Without a key (when keys exist) they see it anonymised."""
    headers = header_map(request.scope)
    if not state.auth.open and b"authorization" not in headers and b"x-api-key" not in headers:
        return None
    return state.auth.authenticate(headers, state.client_of(request.scope, headers))


def caller(state: AppState, request: Request) -> Principal:
    """Who is asking about one request: a valid key when keys exist (401 otherwise)."""
    headers = header_map(request.scope)
    return state.auth.authenticate(headers, state.client_of(request.scope, headers))


def ticket_view(state: AppState, t: Ticket, who: Principal | None, now: float,
                position: int | None = None) -> dict[str, Any]:
    if position is None:
        position = state.line.position(t)
    mine = who is not None and (who.admin or who.identity == t.identity)
    out: dict[str, Any] = {
        "request_id": t.request_id if mine else None,
        "id": t.uid if mine else None,
        "model": t.model,
        "state": "loading" if t.meta.get("loading") else t.state,
        "position": position,
        "position_at_arrival": t.position_at_arrival,
        "waited_s": round(t.waited_s(now), 3),
        "stream": bool(t.meta.get("stream")),
        "priority": t.priority,
        "upstream": t.box if t.state == "running" else None,
        "mine": bool(who is not None and who.identity == t.identity),
    }
    if t.started_at is not None:
        out["running_s"] = round(now - t.started_at, 3)
    else:
        out["eta_ms"] = state.eta.eta_ms(state.line.view, t, position)
    if who is not None and who.admin:
        out["client"] = t.meta.get("client")
    return out


async def queue_snapshot(request: Request) -> Response:
    state: AppState = request.app.state.lmgate
    who = viewer(state, request)
    gate = state.line.view
    now = gate.clock()
    limit = _int_param(request, "limit", DEFAULT_LIST_LIMIT)
    # the first `limit` in line (?limit=N; `depth` is the full count; /queue/{id} finds any one)
    waiting = [ticket_view(state, t, who, now, index + 1)
               for index, t in enumerate(gate.waiting()[:limit])]
    return JSONResponse({
        "object": "queue",
        "depth": gate.depth,
        "active": gate.active,
        "parallel": gate.parallel,
        "max_queue": gate.max_queue,
        "policy": gate.policy,
        "max_skips": gate.max_skips,
        "loaded_models": sorted(gate.loaded),
        "model_switches": gate.switches,
        "upstream_up": state.fleet.any_up,
        "upstreams": upstream_views(state),
        "draining": state.draining,
        "totals": dict(state.totals),
        "uptime_s": round(time.time() - state.started_at, 1),
        "running": [ticket_view(state, t, who, now) for t in gate.running],
        "waiting": waiting,
        "waiting_listed": len(waiting),
    })


def upstream_views(state: AppState) -> list[dict[str, Any]]:
    """Every box: up or down, what it has loaded, what runs on it. Never its key."""
    out = []
    fleet = state.fleet
    for box in state.line.view.boxes.values():
        up = fleet.upstreams.get(box.name)
        mgr = fleet.managers.get(box.name)
        health = fleet.health.get(box.name)
        out.append({
            "name": box.name, "url": up.base if up is not None else None,
            "up": bool(health.up) if health is not None else False, "removed": box.removed,
            "loaded_models": sorted(box.loaded), "running": len(box.running),
            "parallel": box.slots_in_force, "models": list(box.models),
            "catalog": None if box.catalog is None else len(box.catalog),
            "switches": box.switches,
            "load_mode": mgr.mode if mgr is not None else None,
            "error": mgr.error if mgr is not None else None,
            "loading": sorted(mgr.loading) if mgr is not None else [],
            "slots": dict(box.slots),
        })
    return out


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise BadRequest(f"'{name}' must be a non-negative integer", param=name)
    return int(raw)


async def queue_item(request: Request) -> Response:
    """One request's state, for its owner (or an admin); anyone else gets the answer for an
    unknown id, so ids cannot be probed."""
    state: AppState = request.app.state.lmgate
    who = caller(state, request)
    request_id = request.path_params["request_id"]
    found = state.requests.lookup(request_id, who)
    if who.admin and len({_identity(x) for x in found if _uid(x) != request_id}) > 1:
        raise ambiguous(request_id)
    if not found:
        raise NotFound(f"no request with id '{request_id}' is queued, running or recently "
                       "finished", code="request_not_found")
    first = found[0]
    if isinstance(first, Ticket):
        view = ticket_view(state, first, who, state.line.view.clock())
        view["depth"] = state.line.view.depth
        return JSONResponse(view)
    shown = dict(first)
    identity = shown.pop("identity", None)
    client = shown.pop("client", None)
    shown["id"] = shown.pop("uid", None)
    if who.admin:
        shown["client"] = client
    shown["mine"] = who.identity == identity
    return JSONResponse(shown)


def _identity(x: Ticket | dict[str, Any]) -> str:
    return x.identity if isinstance(x, Ticket) else x["identity"]


def _uid(x: Ticket | dict[str, Any]) -> str:
    return x.uid if isinstance(x, Ticket) else x["uid"]


def ambiguous(request_id: str) -> Conflict:
    return Conflict(f"several clients used the request id '{request_id}'; use the request's own "
                    "'id' from GET /queue", code="ambiguous_request_id")


async def admin_reload(request: Request) -> Response:
    """Re-read the configuration file (what SIGHUP does, for systems without it). With keys,
    for admins; with open access, only from this machine."""
    state: AppState = request.app.state.lmgate
    if state.auth.open:
        if not state.identities.direct_local(client_address(request.scope), header_map(request.scope)):
            raise Forbidden("without keys, reloading is allowed only from a program on this machine "
                            "talking to lmgate directly (not through a reverse proxy)",
                            code="admin_only")
    else:
        who = caller(state, request)
        if not who.admin:
            raise Forbidden("reloading the configuration needs an admin key", code="admin_only")
    try:
        result = state.reload()
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        raise BadRequest(f"the configuration was not reloaded: {exc}", code="invalid_config") from None
    return JSONResponse(result)


async def queue_cancel(request: Request) -> Response:
    state: AppState = request.app.state.lmgate
    who = viewer(state, request)
    if who is None:
        raise Unauthorized("cancelling a request needs an admin key")
    if not who.admin:
        raise Forbidden("cancelling a request needs an admin key", code="admin_only")
    request_id = request.path_params["request_id"]
    reason = Cancelled("the request was cancelled by an administrator")
    outcome = state.requests.cancel(request_id, who, reason)
    if outcome == "ambiguous":
        raise ambiguous(request_id)
    if outcome == "none":
        raise NotFound(f"no waiting or running request with id '{request_id}'", code="request_not_found")
    return JSONResponse({"request_id": request_id, "cancelled": True})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """From what lmgate already knows (its last check while idle, or the last response):
    never a request of its own to the upstream, which may be busy generating."""
    state: AppState = request.app.state.lmgate
    fleet = state.fleet
    up = fleet.any_up
    reason = state.out_of_service() or (None if up else "upstream_down")
    body = {"status": "not ready" if reason else "ready",
            "upstream": ", ".join(u.base for u in fleet.upstreams.values()),
            "upstream_up": up, "draining": state.draining,
            "upstreams": {name: bool(h) for name, h in fleet.up_states().items()},
            "errors": fleet.errors()}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=503 if reason else 200)


async def metrics(request: Request) -> Response:
    """Prometheus exposition. It names every key and its token counts, so with keys it needs
    an admin key or a key with ``role = "metrics"``; with open access it stays open."""
    state: AppState = request.app.state.lmgate
    if not state.auth.open and not caller(state, request).reads_metrics:
        raise Unauthorized("reading /metrics needs an admin key or a key with role = \"metrics\"")
    return Response(generate_latest(state.prometheus), media_type=CONTENT_TYPE_LATEST)


async def status_page(request: Request) -> Response:
    """The page for browsers; for everything else the old queue server's root document,
    which the team's scripts read with ``response.json()``."""
    if "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"status": "running", "message": f"lmgate {__version__}: shared LM Studio "
                             "gateway (OpenAI API under /v1, status page at / in a browser)",
                             "version": __version__})
    html = resources.files("proxy").joinpath("status.html").read_bytes()
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={"cache-control": "no-cache"})


async def not_found(request: Request) -> Response:
    return error_response(NotFound(f"unknown path {request.method} {request.url.path}; lmgate "
                                   "serves the OpenAI-compatible API under /v1"))


def exception_handlers() -> dict[Any, Any]:
    async def proxy_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (404, 405):  # a known path with another method is unknown too
            return await not_found(request)
        err = ProxyError(str(exc.detail))
        err.status, err.type = exc.status_code, "invalid_request_error"
        return error_response(err)

    return {ProxyError: proxy_error, HTTPException: http_error}


def build_routes(first: list[BaseRoute]) -> list[BaseRoute]:
    """lmgate's own routes after ``first`` (the old API's: /queue/status must win over
    /queue/{request_id})."""
    routes: list[BaseRoute] = list(first)
    routes += [
        Route("/", status_page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/queue", queue_snapshot, methods=["GET"]),
        Route("/queue/history", queue_history, methods=["GET"]),
        Route("/usage", usage, methods=["GET"]),
        Route("/admin/reload", admin_reload, methods=["POST"]),
        Route("/queue/{request_id}", queue_item, methods=["GET"]),
        Route("/queue/{request_id}", queue_cancel, methods=["DELETE"]),
    ]
    routes.append(Route("/{path:path}", not_found,
                        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]))
    return routes


async def queue_history(request: Request) -> Response:
    """The last five minutes of queue depth, running requests and finished-request counters
    (``proxy/history.py``): the status page has its chart and throughput from the first load.
    Aggregates only, so anyone who may read ``/queue`` may read this."""
    state: AppState = request.app.state.lmgate
    return JSONResponse(state.history.snapshot(), headers={"cache-control": "no-store"})


async def usage(request: Request) -> Response:
    """Tokens used against each quota this UTC day and month: a key sees its own, an admin
    every configured key's. Keys are needed to ask (401 without one when keys exist); with
    open access there are no keys to report."""
    state: AppState = request.app.state.lmgate
    who = caller(state, request)
    quotas = state.quotas
    if who.key is None:
        return JSONResponse({"keys": []}, headers={"cache-control": "no-store"})
    if who.admin:
        body: dict[str, Any] = {"keys": [await quotas.usage(k.name, k.tokens_per_day, k.tokens_per_month)
                                         for k in state.auth.keys]}
    else:
        key = who.key
        body = await quotas.usage(key.name, key.tokens_per_day, key.tokens_per_month)
    return JSONResponse(body, headers={"cache-control": "no-store"})
