"""What arrives from a client: headers, request ids, the body (bounded), the JSON checks
needed to schedule it, and error responses written as plain ASGI."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import BadRequest, PayloadTooLarge, ProxyError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ClientGone(Exception):
    """The client went away before lmgate could answer."""


def header_map(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}


def request_id_from(headers: dict[bytes, bytes], ids: RequestIds) -> str:
    given = headers.get(b"x-request-id", b"").decode("latin-1").strip()
    if given and len(given) <= 128 and given.isprintable():
        return given
    return ids.next()


class RequestIds:
    """Unique, unguessable-enough ids without a syscall per request: a random per-process
    prefix and a counter."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):08x}"


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def parse_request(body: bytes) -> dict[str, Any]:
    """The JSON body, checked just enough to schedule it: a ``model`` and a boolean ``stream``."""
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object with a 'model' field")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = doc.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' is required and must be a non-empty string", param="model",
                         code="missing_model")
    if len(model) > 512:
        raise BadRequest("'model' is too long", param="model")
    stream = doc.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = doc.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise BadRequest(f"'{name}' must be a non-negative integer", param=name)
    return doc


def requested_tokens(doc: dict[str, Any]) -> tuple[str, int | None]:
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if doc.get(name) is not None:
            return name, doc[name]
    return "max_tokens", None


async def send_error(send: Send, err: ProxyError, extra: list[tuple[bytes, bytes]]) -> None:
    body = err.to_json()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in err.headers().items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body, "more_body": False})
