"""Model listings as a caller sees them: with several boxes every box's list, merged (a chat
UI offers every model any box serves); for a key with a ``models`` allowlist only the models it
may use (a chat UI would offer the others, then get 403)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from .errors import ProxyError, UpstreamUnavailable
from .forward import UpstreamResponse

if TYPE_CHECKING:
    from .auth import Principal
    from .state import AppState
    from .upstream import Upstream

# route -> (the list's field, the field naming each model)
MERGED_LISTINGS = {"/v1/models": ("data", "id"), "/api/v0/models": ("data", "id"),
                   "/api/v1/models": ("models", "key")}
MODEL_DETAIL_ROUTES = frozenset({"/v1/models/{id}", "/api/v0/models/{id}"})
LISTING_CAP = 4 * 1024 * 1024  # a box's model listing, read to merge several boxes' lists


def needs_rewrite(st: AppState, route: str, who: Principal) -> bool:
    """Is this listing answered by lmgate (merged or filtered) rather than passed through?"""
    return route in MERGED_LISTINGS and (st.fleet.several or limited(st, who))


def limited(st: AppState, who: Principal) -> bool:
    return not who.admin and st.auth.allowed_models(who) is not None


async def listing(st: AppState, route: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                  who: Principal, request_id: str) -> bytes:
    """The listing's JSON body: every box that is up asked at once (first box wins for a model
    that several list), filtered by the caller's allowlist. UpstreamUnavailable when no box
    answered it."""
    field_name, id_key = MERGED_LISTINGS[route]
    filtered = limited(st, who)

    async def one(up: Upstream) -> list[Any] | None:
        request = up.build("GET", path, query, headers, b"", request_id)
        try:
            response = UpstreamResponse(await up.send(request), up.name, st.fleet)
        except ProxyError:
            return None
        try:
            body = await response.read_capped(LISTING_CAP)
        finally:
            await response.aclose()
        if response.status_code != 200:
            return None
        try:
            items = json.loads(body).get(field_name)
        except (ValueError, AttributeError):
            return None
        return items if isinstance(items, list) else None

    boxes = [up for name, up in st.fleet.upstreams.items() if st.fleet.health[name].up is not False]
    lists = await asyncio.gather(*(one(up) for up in boxes))
    if all(items is None for items in lists):
        raise UpstreamUnavailable("no upstream answered the model listing")
    merged: list[Any] = []
    seen: set[str] = set()
    for items in lists:
        for item in items or []:
            key = item.get(id_key) if isinstance(item, dict) else None
            if isinstance(key, str) and key in seen:
                continue
            if filtered and not (isinstance(key, str) and st.auth.may_use(who, key)):
                continue
            if isinstance(key, str):
                seen.add(key)
            merged.append(item)
    doc: dict[str, Any] = {"object": "list", field_name: merged} if field_name == "data" \
        else {field_name: merged}
    return json.dumps(doc).encode()
