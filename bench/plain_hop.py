"""A plain Python reverse proxy: the bar lmgate's hot path is measured against.

An ordinary aiohttp hop, as a competent Python developer writes one in an afternoon: an
aiohttp.web server, one shared ClientSession (keep-alive to the upstream), the request body read
and sent on, the answer streamed back chunk by chunk as it arrives, status and end-to-end headers
passed through. No queue, no metrics, no access log.

    python -m bench.plain_hop --port 8002 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}
NOT_SENT_ON = HOP_BY_HOP | {"host", "content-length"}  # aiohttp sets both for the upstream request

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def pick(headers: CIMultiDictProxy[str], drop: set[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    try:
        upstream = await request.app[SESSION].request(
            request.method, request.app[UPSTREAM] + request.path_qs,
            headers=pick(request.headers, NOT_SENT_ON), data=body or None)
    except aiohttp.ClientError as exc:
        raise web.HTTPBadGateway(text=f"upstream unreachable: {exc}") from exc
    async with upstream:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=pick(upstream.headers, HOP_BY_HOP))
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionResetError:  # the client went away; leaving the block drops the upstream
            pass
    return resp


async def client_session(app: web.Application) -> AsyncIterator[None]:
    # no total timeout: a generation may stream for minutes; bodies pass through undecoded
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plain_hop", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8001")
    args = p.parse_args(argv)
    app = web.Application(client_max_size=64 * 2**20)
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=new_loop())


if __name__ == "__main__":
    main()
