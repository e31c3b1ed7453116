"""CLI entry point: ``lmgate`` and ``python -m proxy``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, NoReturn

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from . import __version__, logs
from .app import create_app
from .config import ConfigError, Settings, UpstreamSpec, fit_connections, load_settings
from .listen import ListenError, bind_listeners
from .protocol import HEAD_LIMIT, ClientLimits, protocol_class, raise_fd_limit
from .quota import QuotaStore
from .store import StateDB, StoreError
from .state import AppState, quota_path, state_path
from .upstream import redact

log = logging.getLogger("lmgate")
GC_GEN0_THRESHOLD = 20_000
EXIT_FORCED = 130  # a second Ctrl-C: the conventional status of a process killed by SIGINT


class LmgateServer(uvicorn.Server):
    """uvicorn, plus lmgate's drain: on SIGTERM/SIGINT waiting requests are refused at once
    and running ones get ``--shutdown-grace`` seconds before they are cut off.

    A finished drain is a normal end (status 0). uvicorn instead re-raises the caught signal
    once it has shut down, so Ctrl-C ended in a KeyboardInterrupt traceback (status 130) and
    SIGTERM in status 143; ``capture_signals`` here restores the handlers without that. A
    second signal during the drain means "now": the process leaves at once, quietly."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.lmgate = state

    async def shutdown(self, sockets: Any = None) -> None:
        self.lmgate.begin_shutdown()
        # a replica keeps its door open while it drains: /readyz answers 503 (the balancer
        # stops sending) and stray requests get 503 shutting_down, not a refused connection
        await self.lmgate.drained()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread (embedded use, tests)
            return
        previous = {}
        for sig in HANDLED_SIGNALS:
            with contextlib.suppress(OSError, ValueError):  # not settable here: keep the default
                previous[sig] = signal.signal(sig, self.handle_exit)
        if hasattr(signal, "SIGHUP"):  # re-read the configuration (POST /admin/reload elsewhere)
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.handle_reload)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_reload(self, sig: int, frame: FrameType | None) -> None:
        loop = self.lmgate.loop
        if loop is not None:
            loop.call_soon_threadsafe(self._reload)

    def _reload(self) -> None:
        try:
            self.lmgate.reload()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            quit_now()
        self.should_exit = True


def quit_now() -> None:
    """Leave at once: no waiting for running requests, no traceback. The OS closes every
    socket, so LM Studio sees its clients go and stops generating."""
    log.warning("second interrupt: quitting without waiting for running requests")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_FORCED)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Every log line, uvicorn's and httpx's included, in one format on stderr."""
    logs.setup(level, fmt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DEMO_BOXES = (
    ("demo-a", ("qwen2.5-7b-instruct", "text-embedding-nomic-embed-text-v1.5")),
    ("demo-b", ("qwen2.5-7b-instruct", "llama-3.2-3b-instruct")),
)


def start_demo_upstreams() -> tuple[UpstreamSpec, ...]:
    """Two simulated LM Studio boxes on free loopback ports, in background threads: one chat
    model on both, one only on each, so the demo shows routing across boxes."""
    from .simulator import create_simulator_app

    specs = []
    for name, models in DEMO_BOXES:
        port = free_port()
        config = uvicorn.Config(create_simulator_app(models=models, tokens_per_s=20.0, load_s=1.0),
                                host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                log_config=None)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"lmgate-{name}", daemon=True)
        thread.start()
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.025)
        log.info("demo mode: simulated LM Studio %s on http://127.0.0.1:%d with %s", name, port,
                 ", ".join(models))
        specs.append(UpstreamSpec(name=name, url=f"http://127.0.0.1:{port}"))
    return tuple(specs)


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """How lmgate's uvicorn serves ``app``: on ``settings.host``/``port``, with lmgate's
    client bounds. ``build_server`` uses it, and so do the in-process tests."""
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, lifespan="on", server_header=False, log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        timeout_keep_alive=30,
        # client bounds (proxy/protocol.py); identity from X-Forwarded-For only through
        # --trusted-proxies, never uvicorn's own (it trusts 127.0.0.1 by default)
        http=protocol_class(ClientLimits(read_timeout=settings.client_read_timeout,
                                         write_timeout=settings.client_write_timeout,
                                         max_connections=settings.max_connections)),
        proxy_headers=False,
        h11_max_incomplete_event_size=HEAD_LIMIT,
    )


def build_server(settings: Settings, quotas: QuotaStore | None = None,
                 db: StateDB | None = None) -> LmgateServer:
    app = create_app(settings, quotas=quotas, db=db)
    config = uvicorn_config(app, settings)
    raise_fd_limit(settings.max_connections)
    return LmgateServer(config, app.state.lmgate)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signals: just leave
        raise SystemExit(EXIT_FORCED) from None


def run(args: list[str]) -> None:
    """Settings, then the port, then everything else: whatever can be refused is refused
    with one line (status 2) before anything is logged or started."""
    if "--version" in args:
        print(f"lmgate {__version__}")
        return
    check_only = "--check" in args
    try:
        settings = load_settings([a for a in args if a != "--check"])
    except ConfigError as exc:
        refuse(f"configuration error: {exc}")
    migrate = migrate_source(args)
    if migrate is not None:
        print(migrate_quotas(settings, migrate))
        return
    settings, raised = fit_connections(settings)
    if check_only:
        print(describe(settings))
        return
    try:
        sockets = bind_listeners(settings.host, settings.port)
    except ListenError as exc:
        refuse(str(exc))
    settings = settings.with_(port=int(sockets[0].getsockname()[1]))  # the real one, for port 0
    try:  # opened (and locked) before serving: one line and status 2 if it cannot be
        db, quotas, unusable = asyncio.run(open_state(settings))
    except StoreError as exc:
        refuse(str(exc))
    configure_logging(settings.log_level, settings.log_format)
    if raised:
        log.info("%s", raised)
    if unusable:
        log.warning("%s; old-API jobs are kept in memory only (a restart loses them)", unusable)
    if settings.demo:
        boxes = start_demo_upstreams()
        settings = settings.with_(upstream=boxes[0].url, upstreams=boxes)
    boxes = settings.boxes()
    given = "parallel" in settings.sources or settings.parallel != 1
    log.info("lmgate %s listening on %s, %s %s, %s, max queue %d",
             __version__, listen_url(settings.host, settings.port),
             "upstream" if len(boxes) == 1 else "upstreams",
             ", ".join(redact(b.url) if len(boxes) == 1 else f"{b.name}={redact(b.url)}" for b in boxes),
             f"parallel {settings.parallel}" if given else "slots per model as each box reports them",
             settings.max_queue)
    server = build_server(settings, quotas, db)
    server.lmgate.argv, server.lmgate.environ = args, dict(os.environ)
    # Everything built so far lives as long as the process: keep it out of the collector's
    # way, and collect less often, so thousands of waiting clients do not cause long pauses.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 50)
    server.run(sockets=sockets)


def migrate_source(args: Sequence[str]) -> str | None:
    """The file of ``--migrate-quotas FILE`` (or ``=FILE``), if given."""
    for i, arg in enumerate(args):
        if arg == "--migrate-quotas" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--migrate-quotas="):
            return arg.split("=", 1)[1]
    return None


def migrate_quotas(settings: Settings, source: str) -> str:
    """``lmgate --migrate-quotas FILE``: a single lmgate's token counts (periods not yet
    over) added to the group's counters in the Redis of ``--state-url``; one line saying how
    many, or status 2 and one line saying why not."""
    from redis.exceptions import RedisError

    from .counters import import_quotas
    from .shared import group_prefix, redis_client

    if not settings.state_url:
        refuse("--migrate-quotas copies into the group's Redis: give --state-url "
               "(or LMGATE_STATE_URL, or state_url in the file) too")

    async def copy() -> int:
        client = redis_client(settings.state_url)
        try:
            return await import_quotas(client, group_prefix(), source)
        finally:
            await client.aclose()
    try:
        rows = asyncio.run(copy())
    except StoreError as exc:
        refuse(f"cannot read the quota counts: {exc}")
    except (RedisError, OSError) as exc:
        refuse(f"cannot reach the shared state at {redact(settings.state_url)}: {exc}")
    return (f"copied {rows} token {'count' if rows == 1 else 'counts'} (days and months not yet "
            f"over) from {source} into {redact(settings.state_url)}")


def describe(settings: Settings) -> str:
    """``lmgate --check``: one line saying the configuration is valid and what it sets up.
    Nothing is contacted and nothing is opened."""
    boxes = settings.boxes()
    quota = quota_path(settings)
    return (f"lmgate {__version__}: configuration OK ({settings.config or 'no file'}): "
            f"{len(boxes)} upstream {'box' if len(boxes) == 1 else 'boxes'} "
            f"({', '.join(redact(b.url) for b in boxes)}), "
            f"{len(settings.keys) or 'no'} {'key' if len(settings.keys) == 1 else 'keys'}"
            f"{'' if settings.keys else ' (open access)'}, listening on "
            f"{listen_url(settings.host, settings.port)}, max queue {settings.max_queue}"
            + (f", quotas in {quota}" if quota is not None and not settings.state_url else "")
            + (f", one replica of the group at {redact(settings.state_url)}" if settings.state_url else ""))


async def open_state(settings: Settings) -> tuple[StateDB | None, QuotaStore | None, str | None]:
    """Open the state database (and take its lock) before serving; the app then uses it, so
    the lock is never let go in between. When a key has a quota, a file that cannot be used
    (or that another lmgate holds) is refused with one line, not a traceback; otherwise lmgate
    goes on without it, and the reason is returned for one warning line. A replica
    (``--state-url``) keeps its state in the group's Redis: nothing is opened here."""
    if settings.state_url:
        return None, None, None
    db: StateDB | None = StateDB(state_path(settings))
    unusable = None
    try:
        await db.open()
    except StoreError as exc:
        if quota_path(settings) is not None:
            raise
        db, unusable = None, str(exc)
    quotas = QuotaStore(db if quota_path(settings) is not None else None)
    await quotas.start()
    return db, quotas, unusable


def refuse(message: str) -> NoReturn:
    sys.stderr.write(f"lmgate: {message}\n")
    raise SystemExit(2)


def listen_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


if __name__ == "__main__":
    main()
