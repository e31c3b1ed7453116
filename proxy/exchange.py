"""The state one gated request shares with the tasks that may interrupt it (its disconnect
watcher, shutdown, an admin cancel)."""

from __future__ import annotations

import asyncio
from typing import Any

from . import streaming as sse
from .errors import ProxyError
from .inbound import Receive, Scope
from .protocol import DISCONNECT_HOOK


class Exchange:
    """State shared between a handler task and the tasks that may interrupt it."""

    __slots__ = ("task", "gone", "abort", "headers_sent", "finished", "boundary")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.gone = False
        self.abort: ProxyError | None = None
        self.headers_sent = False
        self.finished = False
        self.boundary = sse.Boundary()

    def interrupt(self, reason: ProxyError | None) -> None:
        """Stop the handler: a disconnect (reason None), shutdown or admin cancel."""
        if self.finished or self.task is None:
            return
        if reason is None:
            self.gone = True
        elif self.abort is None:
            self.abort = reason
        self.task.cancel()


def watch(scope: Scope, receive: Receive, ex: Exchange) -> asyncio.Task[None] | None:
    """Interrupt the exchange as soon as its client is gone. lmgate's own HTTP protocol says
    so through the request's hook (no task per request); under another server a task waits
    on ``receive()`` for the disconnect (returned, for the caller to cancel at the end)."""
    hook = scope.get(DISCONNECT_HOOK)
    if hook is None:
        return asyncio.create_task(watch_disconnect(receive, ex))
    hook.callback = lambda: ex.interrupt(None)
    if hook.fired:
        ex.interrupt(None)
    return None


async def watch_disconnect(receive: Receive, ex: Exchange) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            ex.interrupt(None)
            return
