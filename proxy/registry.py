"""The requests in flight and recently finished: who owns each, how it can be interrupted,
and how an id finds it.

Every request has its own random internal id (``uid``) and a request id that may be one its
client chose (``X-Request-ID``). An id resolves only among the caller's own requests (an
admin's: everyone's), so ids cannot be probed, and a client-chosen id that several identities
used cancels nothing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .exchange import Exchange
from .gate import Ticket
from .metrics import RequestRecord

if TYPE_CHECKING:
    from .auth import Principal
    from .errors import ProxyError

RECENT_CAP = 2000


class Registry:
    """Live exchanges by ticket, and a bounded record of finished requests."""

    def __init__(self, live: Callable[[], Iterable[Ticket]], clock: Callable[[], float]) -> None:
        self.live = live  # every running and waiting ticket of the line
        self.clock = clock  # the line's
        self.exchanges: dict[Ticket, Exchange] = {}
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # by internal id

    def register(self, ticket: Ticket, ex: Exchange) -> None:
        self.exchanges[ticket] = ex

    def unregister(self, ticket: Ticket) -> None:
        self.exchanges.pop(ticket, None)

    def remember(self, ticket: Ticket, rec: RequestRecord) -> None:
        """A request has ended: kept (without its body) for ``/queue/{id}``."""
        self.recent[ticket.uid] = {
            "request_id": ticket.request_id, "uid": ticket.uid, "model": ticket.model, "state": "done",
            "outcome": rec.outcome, "status": rec.status, "position": -1,
            "position_at_arrival": ticket.position_at_arrival,
            "waited_s": round(ticket.waited_s(self.clock()), 3),
            "identity": ticket.identity, "client": ticket.meta.get("client"),
        }
        self.recent.move_to_end(ticket.uid)
        while len(self.recent) > RECENT_CAP:
            self.recent.popitem(last=False)

    def lookup(self, request_id: str, who: Principal | None) -> list[Ticket | dict[str, Any]]:
        """Running or waiting tickets, then finished records, that ``request_id`` names for
        ``who``: lmgate's internal id, or a request id (possibly client-chosen), among the
        caller's own requests only; an admin sees everyone's. Nobody else's, ever."""
        admin = who is not None and who.admin
        mine = None if who is None else who.identity

        def visible(identity: str) -> bool:
            return admin or identity == mine

        live: list[Ticket | dict[str, Any]] = [
            t for t in self.live()
            if (t.uid == request_id or t.request_id == request_id) and visible(t.identity)]
        seen = {t.uid for t in live if isinstance(t, Ticket)}
        done = [r for r in self.recent.values()
                if (r["uid"] == request_id or r["request_id"] == request_id)
                and r["uid"] not in seen and visible(r["identity"])]
        return live + done[::-1]

    def cancel(self, request_id: str, who: Principal, reason: ProxyError) -> str:
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
        return "cancelled" if found else "none"

    def interrupt_all(self, reason: ProxyError) -> None:
        """The shutdown grace is over: every request still running is cut off."""
        for ex in list(self.exchanges.values()):
            ex.interrupt(reason)
