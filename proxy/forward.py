"""The upstream call: one request sent to its box, with everything that can go wrong on the
way mapped to ProxyErrors in one place (``upstream.map_error``).

    forward(ticket) ── fleet.prepare (a load in managed mode) ── Upstream.send
        refused before anything was sent ── the box marked down, the ticket back in line
                                            (fleet.reroute), wait its turn, another box
        any other failure ── fleet.suspect(box) ── ProxyError
        an answer ── fleet.answered(box) ── UpstreamResponse

An ``UpstreamResponse`` is the box's answer as the relay sees it: status, headers, and a body
read as it arrives (``raw``, no wrapper per chunk on the hot loop); a transport failure while
reading becomes a ProxyError through ``broken`` (the box suspected on the way), the one
place the relay turns one into the other."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from .errors import ProxyError, UpstreamUnavailable
from .fleet import Fleet
from .gate import Ticket
from .upstream import ERROR_BODY_CAP, Upstream, map_error


class UpstreamResponse:
    """A box's answer: status, headers, and its body (``raw``; a failure as ``broken`` maps it)."""

    __slots__ = ("response", "box", "fleet", "status_code", "headers")

    def __init__(self, response: httpx.Response, box: str, fleet: Fleet) -> None:
        self.response = response
        self.box = box
        self.fleet = fleet
        self.status_code = response.status_code
        self.headers = response.headers

    def raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, without a layer per chunk: its httpx errors go to
        ``broken``, which the caller raises (the relay's hot loop)."""
        return self.response.aiter_raw()

    def broken(self, exc: httpx.HTTPError) -> ProxyError:
        self.fleet.suspect(self.box)
        return map_error(exc)

    async def read_capped(self, cap: int = ERROR_BODY_CAP) -> bytes:
        """Up to ``cap`` bytes of a (usually error) body; a broken stream just ends it."""
        out = bytearray()
        try:
            async for chunk in self.response.aiter_raw():
                out += chunk
                if len(out) >= cap:
                    break
        except httpx.HTTPError:
            pass
        return bytes(out[:cap])

    async def aclose(self) -> None:
        await self.response.aclose()


async def forward(fleet: Fleet, ticket: Ticket | None, build: Callable[[Upstream], httpx.Request], *,
                  loading: Callable[[], Awaitable[None]] | None = None,
                  wait_again: Callable[[Ticket], Awaitable[None]] | None = None,
                  sending: Callable[[Upstream], None] | None = None) -> UpstreamResponse:
    """Send the request for ``ticket`` (None: an ungated call, to the first box that is up)
    and return the box's answer. ``loading`` is awaited before a load the request must wait
    for; ``wait_again`` waits for the ticket's next turn after its box refused it;
    ``sending`` is told which box it goes to, just before it goes."""
    for _ in range(len(fleet.upstreams) + 1):
        if ticket is not None:
            await fleet.prepare(ticket, loading)
        upstream = fleet.upstream_for(ticket)
        request = build(upstream)
        if sending is not None:
            sending(upstream)
        try:
            response = await upstream.send(request)
        except ProxyError as err:
            fleet.suspect(upstream.name)
            if ticket is None or not err.refused or wait_again is None or not fleet.reroute(ticket):
                raise
            await wait_again(ticket)  # refused before anything was sent: another box, in turn
            continue
        fleet.answered(upstream.name)
        return UpstreamResponse(response, upstream.name, fleet)
    raise UpstreamUnavailable("no upstream accepted the connection")  # pragma: no cover
