"""The floor under lmgate: the same server stack with none of lmgate's logic.

uvicorn with httptools and uvloop (what lmgate runs on), a raw ASGI app, and lmgate's own
upstream transport (``proxy.transport.LeanTransport``): the request body is read and sent on
with the client's end-to-end headers, the answer relayed chunk by chunk. No gate, no keys, no
metrics, no client bounds. What it adds over a direct connection is what the stack costs
before lmgate does anything; lmgate's figure minus this one is lmgate's own work.

    python -m bench.bare_hop --port 8003 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from proxy.transport import LeanTransport, RawRequest

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"te", b"trailer", b"transfer-encoding", b"upgrade"})
NOT_SENT_ON = HOP_BY_HOP | {b"host", b"content-length"}


class BareHop:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.netloc = f"{self.host}:{self.port}".encode()
        self.transport = LeanTransport()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        lines = [scope["method"].encode(), b" ", target, b" HTTP/1.1\r\nhost: ", self.netloc, b"\r\n"]
        for name, value in scope["headers"]:
            if name not in NOT_SENT_ON:  # uvicorn gives header names in lower case
                lines += (name, b": ", value, b"\r\n")
        if body:
            lines += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        lines.append(b"\r\n")
        answer = await self.transport.send(RawRequest(scope["method"], self.host, self.port,
                                                      b"".join(lines), body, {}))
        headers = [(k, v) for k, v in answer.headers.raw if k.lower() not in HOP_BY_HOP]
        await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
        try:
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await answer.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bare_hop", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8001")
    args = p.parse_args(argv)
    uvicorn.run(BareHop(args.upstream), host=args.host, port=args.port, loop="auto", http="auto",
                access_log=False, log_level="warning", lifespan="off", server_header=False)


if __name__ == "__main__":
    main()
