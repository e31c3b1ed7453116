"""CLI entry point: ``lmgate`` and ``python -m proxy``."""

from __future__ import annotations

import gc
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import uvicorn

from . import __version__
from .app import AppState, create_app
from .config import ConfigError, Settings, load_settings

log = logging.getLogger("lmgate")
GC_GEN0_THRESHOLD = 20_000


class LmgateServer(uvicorn.Server):
    """uvicorn, plus lmgate's drain: on SIGTERM/SIGINT waiting requests are refused at once
    and running ones get ``--shutdown-grace`` seconds before they are cut off."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.lmgate = state

    async def shutdown(self, sockets: Any = None) -> None:
        self.lmgate.begin_shutdown()
        await super().shutdown(sockets)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_demo_upstream() -> str:
    """Run the LM Studio simulator on a free loopback port in a background thread."""
    from .simulator import create_simulator_app

    port = free_port()
    config = uvicorn.Config(create_simulator_app(tokens_per_s=20.0, load_s=1.0), host="127.0.0.1",
                            port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lmgate-demo-upstream", daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.025)
    log.info("demo mode: simulated LM Studio on http://127.0.0.1:%d (models: see /v1/models)", port)
    return f"http://127.0.0.1:{port}"


def build_server(settings: Settings) -> LmgateServer:
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, lifespan="on", server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        timeout_keep_alive=30,
    )
    return LmgateServer(config, app.state.lmgate)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"lmgate {__version__}")
        return
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        sys.stderr.write(f"lmgate: configuration error: {exc}\n")
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    if settings.demo:
        settings = settings.with_(upstream=start_demo_upstream())
    log.info("lmgate %s listening on http://%s:%d, upstream %s, parallel %d, max queue %d",
             __version__, settings.host, settings.port, settings.upstream, settings.parallel,
             settings.max_queue)
    server = build_server(settings)
    # Everything built so far lives as long as the process: keep it out of the collector's
    # way, and collect less often, so thousands of waiting clients do not cause long pauses.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 50)
    server.run()


if __name__ == "__main__":
    main()
