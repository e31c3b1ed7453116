"""Application assembly: which paths are gated, the outermost ASGI dispatch, lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from . import routes
from .compat import LegacyQueue
from .config import Settings
from .gated import GatedRequest
from .inbound import Receive, Scope, Send
from .quota import QuotaStore
from .store import StateDB
from .state import AppState

GATED_ROUTES = {
    "/v1/chat/completions": "/v1/chat/completions",
    "/v1/completions": "/v1/completions",
    "/v1/embeddings": "/v1/embeddings",
    "/v1/responses": "/v1/responses",
    "/v1/messages": "/v1/messages",
    "/api/v0/chat/completions": "/api/v0/chat/completions",
    "/api/v0/completions": "/api/v0/completions",
    "/api/v0/embeddings": "/api/v0/embeddings",
    "/api/v1/chat": "/api/v1/chat",
}
FORWARDED_ROUTES = {
    "/v1/models": "/v1/models",
    "/api/v0/models": "/api/v0/models",
    "/api/v1/models": "/api/v1/models",
}
MODEL_DETAIL_PREFIXES = (("/v1/models/", "/v1/models/{id}"), ("/api/v0/models/", "/api/v0/models/{id}"))
ADMIN_PREFIXES = ("/api/v1/models/load", "/api/v1/models/unload", "/api/v1/models/download")


def classify(method: str, path: str) -> tuple[str, str] | None:
    """Which kind of proxied path this is: ("gated"|"forward"|"admin", route template)."""
    if method == "POST" and path in GATED_ROUTES:
        return "gated", GATED_ROUTES[path]
    if path.startswith(ADMIN_PREFIXES):
        for prefix in ADMIN_PREFIXES:
            if path == prefix or path.startswith(prefix + "/"):
                return "admin", prefix + ("/*" if path != prefix else "")
    if method in ("GET", "HEAD"):
        if path in FORWARDED_ROUTES:
            return "forward", FORWARDED_ROUTES[path]
        for prefix, route in MODEL_DETAIL_PREFIXES:
            rest = path[len(prefix):]
            if path.startswith(prefix) and rest and "/" not in rest.strip("/"):
                return "forward", route
    return None


async def dispatch(state: AppState, scope: Scope, receive: Receive, send: Send) -> bool:
    """Serve a proxied path (gated inference, model listings, model management); False for
    anything else (lmgate's own routes)."""
    if scope["type"] != "http":
        return False
    kind = classify(scope["method"], scope["path"])
    if kind is None:
        return False
    request = GatedRequest(state, scope, receive, send, kind[1])
    if kind[0] == "gated":
        await request.run()
    else:
        await request.passthrough(admin_only=kind[0] == "admin")
    return True


class GateDispatch:
    """ASGI layer that takes the proxied paths before the routes (used inside CORS)."""

    def __init__(self, app: Any, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await dispatch(self.state, scope, receive, send):
            await self.app(scope, receive, send)


class Lmgate(Starlette):
    """The app: proxied paths are served before Starlette's middleware stack (they handle
    their own errors, and every layer costs each request), the rest by its routes. With CORS
    on, everything goes through the CORS layer first."""

    lmgate: AppState
    direct: bool = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.direct and await dispatch(self.lmgate, scope, receive, send):
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None,
               registry: CollectorRegistry | None = None, quotas: QuotaStore | None = None,
               db: StateDB | None = None) -> Starlette:
    """Build lmgate. ``transport`` replaces the upstream connection (tests); metrics go to
    ``registry`` (a fresh one if omitted), never to the process-global registry; ``db`` is
    the state database already opened (old-API jobs survive restarts in it; None: memory)."""
    state = AppState(settings, transport=transport, registry=registry or CollectorRegistry(),
                     quotas=quotas, db=db)
    legacy = LegacyQueue(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.startup()
        await legacy.start()
        try:
            yield
        finally:
            state.begin_shutdown()
            await legacy.stop()
            await state.aclose()

    middleware = []
    if settings.cors_origins:
        middleware = [Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
            allow_headers=["*"], expose_headers=["x-request-id", "x-queue-position",
                                                 "x-queue-depth", "x-queue-wait-ms", "x-queue-eta-ms"]),
            Middleware(GateDispatch, state=state)]
    app = Lmgate(routes=routes.build_routes(legacy.routes()), middleware=middleware, lifespan=lifespan,
                 exception_handlers=routes.exception_handlers())
    app.lmgate, app.direct = state, not settings.cors_origins
    app.state.lmgate = state
    app.state.legacy = legacy
    return app
