"""API keys, per-key limits and identities. No keys configured means open access."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .config import ApiKey
from .errors import Forbidden, TokenCapExceeded, TooManyRequests, Unauthorized
from .inbound import TOKEN_FIELDS

RPM_WINDOW_S = 60.0


class RateWindows(Protocol):
    """Requests-per-minute windows kept elsewhere (shared by replicas)."""

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        """Count a request for ``key`` if it is under ``limit`` in the last ``window_s``
        seconds (None); else the seconds until it would be."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a configured key, or (open access) a client address."""

    identity: str
    key: ApiKey | None = None

    @property
    def admin(self) -> bool:
        return self.key is not None and self.key.admin

    @property
    def reads_metrics(self) -> bool:
        return self.key is not None and (self.key.admin or self.key.scraper)

    @property
    def label(self) -> str:
        return self.key.name if self.key else self.identity


class Auth:
    def __init__(self, keys: tuple[ApiKey, ...], clock: Callable[[], float] = time.monotonic,
                 rates: RateWindows | None = None) -> None:
        self.keys = keys
        self.clock = clock
        self.rates = rates
        self._hits: dict[str, deque[float]] = {}

    @property
    def open(self) -> bool:
        return not self.keys

    def authenticate(self, headers: Mapping[bytes, bytes], client: str) -> Principal:
        if self.open:
            return Principal(identity=client)
        presented = _presented_key(headers)
        if presented is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        digest = hashlib.sha256(presented).hexdigest().encode()
        found: ApiKey | None = None
        for key in self.keys:  # compare against all, constant time each
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return Principal(identity="key:" + found.name, key=found)

    def key_named(self, name: str | None) -> ApiKey | None:
        """The configured key called ``name`` now (a reload may have changed or dropped it)."""
        return next((k for k in self.keys if k.name == name), None) if name else None

    def allowed_models(self, who: Principal) -> tuple[str, ...] | None:
        """The globs of the models ``who`` may use; None: any model."""
        key = who.key
        return key.models if key is not None and key.models else None

    def may_use(self, who: Principal, model: str) -> bool:
        globs = self.allowed_models(who)
        return globs is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in globs)

    def check_model(self, who: Principal, model: str) -> None:
        key = who.key
        if key is not None and key.scraper:
            raise Forbidden(f"key '{key.name}' has role 'metrics': it reads /metrics and sends no "
                            "requests to a model", code="metrics_only")
        if not self.may_use(who, model):
            assert key is not None
            raise Forbidden(f"key '{key.name}' may not use model '{model}'", param="model",
                            code="model_not_allowed")

    def token_cap(self, who: Principal, doc: Mapping[str, object], route_field: str | None) -> dict[str, int]:
        """What a key's ``max_tokens`` cap changes in a request: every token field it names
        is checked (400 over the cap, or lowered with ``clamp_max_tokens``), and a request
        that names none gets the route's own field set to the cap. ``route_field`` None: the
        route generates no tokens (embeddings)."""
        key = who.key
        if key is None or key.max_tokens is None or route_field is None:
            return {}
        cap = key.max_tokens
        named = [name for name in TOKEN_FIELDS if doc.get(name) is not None]
        if not named:
            return {route_field: cap}
        changes: dict[str, int] = {}
        for name in named:
            value = doc[name]
            if isinstance(value, int) and value > cap:
                if not key.clamp_max_tokens:
                    raise TokenCapExceeded(f"{name} {value} is over this key's cap of {cap}",
                                           param=name)
                changes[name] = cap
        return changes

    async def check_rate(self, who: Principal) -> None:
        """429 when the key is over its requests per minute; the hit counts otherwise. Shared
        by replicas when ``rates`` is set (a sliding window kept in Redis)."""
        key = who.key
        if key is None or key.rpm is None:
            return
        if self.rates is not None:
            wait = await self.rates.hit(key.name, key.rpm, RPM_WINDOW_S)
            if wait is not None:
                raise TooManyRequests(f"key '{key.name}' is over its limit of {key.rpm} requests "
                                      "per minute", retry_after_s=wait)
            return
        now = self.clock()
        hits = self._hits.setdefault(key.name, deque())
        while hits and now - hits[0] >= RPM_WINDOW_S:
            hits.popleft()
        if len(hits) >= key.rpm:
            raise TooManyRequests(f"key '{key.name}' is over its limit of {key.rpm} requests per "
                                  "minute", retry_after_s=RPM_WINDOW_S - (now - hits[0]))
        hits.append(now)


def _presented_key(headers: Mapping[bytes, bytes]) -> bytes | None:
    auth = headers.get(b"authorization")
    if auth:
        scheme, _, value = auth.strip().partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return value.strip()
    key = headers.get(b"x-api-key")
    if key and key.strip():
        return key.strip()
    return None
