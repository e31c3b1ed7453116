"""The line: where requests wait their turn, as the code around the gate sees it.

The gate (gate.py) is the policy: pure, synchronous, no I/O. The line is the one small
interface everything else uses to reach it: submit a ticket, wait for its turn, cancel,
release, requeue, read positions and the line itself, hear about changes, and tell it what
the boxes are doing. ``LocalLine`` is the line of one lmgate process: the gate, the futures
its waiting handlers sleep on, and the timer that ages waiting tickets. A line shared by
several processes implements the same interface; handlers do not know which one they use.

    handler ── submit ──> Line ── Gate.submit ──> on_start ──> ticket.waiter resolved
            <── wait ────┘                                        (the handler wakes)
            ── release / cancel / requeue ──> Gate ──> whoever may start now starts
    fleet   ── set_loaded / set_catalog / set_up / add_box / remove_box ──> Gate
    readers ── view (positions, waiting, running, boxes), subscribe(on_change)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from .errors import ProxyError
from .gate import RUNNING, Box, Gate, KeyQueueFull, Ticket


class Line(Protocol):
    """What handlers, the fleet and the pages need of the waiting line."""

    @property
    def view(self) -> Gate:
        """The line as it stands, for reading only (positions, waiting, running, boxes)."""

    async def submit(self, ticket: Ticket, *, max_queued: int | None = None) -> None:
        """Admit ``ticket``: it starts now or waits. Raises gate.KeyQueueFull (its identity
        already has ``max_queued`` waiting), gate.QueueFull or gate.GateClosed, leaving the
        line unchanged."""

    async def wait(self, ticket: Ticket, timeout: float) -> bool:
        """Until ``ticket`` starts (True) or ``timeout`` seconds pass (False); raises the
        error the line answered it with instead (shutdown, its model gone)."""

    def release(self, ticket: Ticket) -> None:
        """``ticket`` has finished, or leaves while waiting. Idempotent."""

    def requeue(self, ticket: Ticket) -> None:
        """A started ``ticket`` whose box refused it goes back to its place in line."""

    def fail(self, ticket: Ticket, error: ProxyError) -> None:
        """Withdraw a waiting ``ticket`` and answer it with ``error``."""

    def position(self, ticket: Ticket) -> int:
        """0 running, N >= 1 waiting, -1 gone."""

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every change of the line; returns the unsubscribe."""

    def close(self) -> list[Ticket]:
        """Admit nothing more; withdraw every waiting ticket (each answered ShuttingDown by
        the caller) and return them."""


class LocalLine:
    """The line of one process: a Gate owned by this event loop."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        gate.on_start = _grant
        self._subscribers: list[Callable[[], None]] = []
        self._version = gate.version
        self._aging: asyncio.TimerHandle | None = None

    @property
    def view(self) -> Gate:
        return self.gate

    # -- a ticket's life ---------------------------------------------------------------------
    async def submit(self, ticket: Ticket, *, max_queued: int | None = None) -> None:
        self.submit_now(ticket, max_queued=max_queued)

    def submit_now(self, ticket: Ticket, *, max_queued: int | None = None) -> None:
        """``submit`` without a suspension point: admission stays one step of the loop."""
        if max_queued is not None and self.gate.waiting_for(ticket.identity) >= max_queued:
            raise KeyQueueFull(f"{max_queued} requests of this identity are waiting")
        ticket.waiter = asyncio.get_running_loop().create_future()
        self.gate.submit(ticket)
        if ticket.state != RUNNING:
            self._watch_aging()
        self._changed()

    async def wait(self, ticket: Ticket, timeout: float) -> bool:
        return await wait_turn(ticket, timeout)

    def release(self, ticket: Ticket) -> None:
        self.gate.release(ticket)
        self._changed()

    def requeue(self, ticket: Ticket) -> None:
        ticket.waiter = asyncio.get_running_loop().create_future()
        self.gate.requeue(ticket)
        self._changed()

    def fail(self, ticket: Ticket, error: ProxyError) -> None:
        self.gate.cancel(ticket)
        waiter = ticket.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._changed()

    def position(self, ticket: Ticket) -> int:
        return self.gate.position(ticket)

    def close(self) -> list[Ticket]:
        dropped = self.gate.close()
        if self._aging is not None:
            self._aging.cancel()
            self._aging = None
        self._changed()
        return dropped

    # -- the boxes -----------------------------------------------------------------------------
    def set_loaded(self, box: str, models: Iterable[str]) -> None:
        self.gate.set_loaded(models, box=box)
        self._changed()

    def set_catalog(self, box: str, models: Iterable[str] | None) -> None:
        self.gate.set_catalog(box, models)
        self._changed()

    def set_slots(self, box: str, parallel: int, slots: dict[str, int]) -> None:
        self.gate.set_slots(box, parallel, slots)
        self._changed()

    def set_up(self, box: str, up: bool) -> None:
        self.gate.set_up(box, up)
        self._changed()

    def add_box(self, box: Box) -> None:
        self.gate.add_box(box)
        self._changed()

    def remove_box(self, name: str) -> None:
        self.gate.remove_box(name)
        self._changed()

    def rebalance(self) -> None:
        """Boxes' slots changed in place: start whatever may start now."""
        self.gate.rebalance()
        self._changed()

    def reconfigure(self, *, max_queue: int, max_skips: int, groups: Iterable[Iterable[str]],
                    max_priority_wait: float) -> None:
        self.gate.reconfigure(max_queue=max_queue, max_skips=max_skips, groups=groups,
                              max_priority_wait=max_priority_wait)
        self._aging_changed()
        self._changed()

    # -- hearing about it ------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def _changed(self) -> None:
        version = self.gate.version
        if version == self._version:
            return
        self._version = version
        for callback in tuple(self._subscribers):
            callback()

    # -- aging -------------------------------------------------------------------------------
    def _watch_aging(self) -> None:
        """One timer, for the next waiting ticket due to age (the gate never reads the clock
        on its own)."""
        if self._aging is not None or self.gate.closed:
            return
        at = self.gate.next_aging_at()
        if at is None:
            return
        loop = asyncio.get_running_loop()
        self._aging = loop.call_later(max(0.0, at - time.monotonic()), self._age)

    def _aging_changed(self) -> None:
        if self._aging is not None:
            self._aging.cancel()
            self._aging = None
        self._watch_aging()

    def _age(self) -> None:
        self._aging = None
        self.gate.tick()
        self._changed()
        self._watch_aging()

    def stop(self) -> None:
        if self._aging is not None:
            self._aging.cancel()
            self._aging = None


async def wait_turn(ticket: Ticket, timeout: float) -> bool:
    """Until the ticket's turn (True), its refusal (raised) or ``timeout`` seconds (False)."""
    waiter = ticket.waiter
    if not waiter.done():
        await asyncio.wait((waiter,), timeout=max(0.0, timeout))
        if not waiter.done():
            return False
    err = waiter.exception()
    if err is not None:
        raise err
    return True


def _grant(ticket: Ticket) -> None:
    waiter = ticket.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(True)
