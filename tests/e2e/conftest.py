"""Fixtures of the end-to-end suites: a plain HTTP client, simulator+lmgate pairs shared by the
tests of a module, and threads for blocking calls. Helpers (bodies, the SDK, polling, the raw
client) are in ``tests.e2e.helpers``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.servers import Process, plain_client, running_stack

Stack = tuple[Process, Process]


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    """One plain HTTP client for URLs that belong to no ``Process`` (each process has its own
    ``Process.http``). Nothing kept alive, so it leaves no connection open on a server."""
    with plain_client(15.0) as client:
        yield client


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """``shared_stack(*lmgate_args, **sim_kwargs)``: a simulator and lmgate in front of it
    (``running_stack``'s arguments), started the first time these arguments are asked for in
    the module and shared by its tests from then on; every pair is stopped by PID when the
    module's tests are done, failed or not.

    For tests that do not need fresh processes: they wait for an idle gate and read the
    simulator's records by their own tag (or after ``sim_reset``)."""
    pairs: dict[tuple[Any, ...], Stack] = {}
    with contextlib.ExitStack() as running:
        def get(*lmgate_args: str, **sim_kwargs: Any) -> Stack:
            key = (lmgate_args, tuple(sorted((k, repr(v)) for k, v in sim_kwargs.items())))
            if key not in pairs:
                tmp = tmp_path_factory.mktemp("stack")
                pairs[key] = running.enter_context(running_stack(tmp, *lmgate_args, **sim_kwargs))
            return pairs[key]
        yield get


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for blocking client calls; never waited for on the way out (a test that
    failed may leave a call blocked until its process is stopped)."""
    executor = ThreadPoolExecutor(4)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)
