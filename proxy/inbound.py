"""What arrives from a client: headers, request ids, the body (bounded), the JSON checks
needed to schedule it, and error responses written as plain ASGI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import BadRequest, PayloadTooLarge, ProxyError, QueueFullError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ClientGone(Exception):
    """The client went away before lmgate could answer."""


def header_map(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}


def new_id() -> str:
    """A request id nobody can guess from another: a random UUID (122 random bits)."""
    return str(uuid.uuid4())


def client_request_id(headers: dict[bytes, bytes]) -> str | None:
    """The client's own ``X-Request-ID``, if it sent a usable one. It is echoed back and
    resolves only among that client's own requests: anyone may choose any id."""
    given = headers.get(b"x-request-id", b"").decode("latin-1").strip()
    if given and len(given) <= 128 and given.isprintable():
        return given
    return None


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class ByteBudget:
    """Bytes of request bodies lmgate holds for requests that are read or waiting
    (``--max-waiting-bytes``). Running requests have handed theirs on and hold none."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def hold(self, n: int) -> Hold:
        out = Hold(self)
        out.grow(n)
        return out


class Hold:
    """One request's share of a ByteBudget; ``release`` is idempotent."""

    __slots__ = ("budget", "n")

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.n = 0

    def grow(self, n: int) -> None:
        budget = self.budget
        if n and budget.held + n > budget.limit:
            raise QueueFullError(
                f"lmgate holds {budget.held} bytes of waiting requests' bodies and the limit is "
                f"{budget.limit} (--max-waiting-bytes); try again shortly",
                code="queue_memory_full", retry_after_s=5)
        budget.held += n
        self.n += n

    def release(self) -> None:
        self.budget.held -= self.n
        self.n = 0


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int,
                    budget: ByteBudget | None = None) -> tuple[bytes, Hold | None]:
    """The whole body, within ``limit``; with a ``budget``, the bytes are counted in it
    before they are read (from Content-Length, or chunk by chunk without one). The caller
    releases the returned hold; on an exception it is already released."""
    raw = headers.get(b"content-length")
    declared = int(raw) if raw is not None and raw.isdigit() else None
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    hold = None if budget is None else budget.hold(declared or 0)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone()
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            if hold is not None and declared is None:
                hold.grow(len(chunk))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks), hold
    except BaseException:
        if hold is not None:
            hold.release()
        raise


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


TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def token_limit(doc: dict[str, Any], changes: dict[str, int] | None = None) -> int | None:
    """The most tokens the request lets the model generate (after a key's cap), or None."""
    merged = {**{name: doc.get(name) for name in TOKEN_FIELDS}, **(changes or {})}
    values = [v for v in merged.values() if isinstance(v, int) and not isinstance(v, bool)]
    return min(values) if values else None


def apply_token_cap(body: bytes, doc: dict[str, Any], changes: dict[str, int] | None) -> bytes:
    """The body to forward after a key's token cap: unchanged, with the cap field inserted
    (a byte-level insert, so everything else stays byte for byte), or re-encoded when a
    value had to be lowered."""
    if not changes:
        return body
    if any(name in doc for name in changes):
        doc.update(changes)
        return json.dumps(doc).encode()
    return insert_members(body, b", ".join(b'"%s": %d' % (name.encode(), value)
                                            for name, value in changes.items()))


def insert_members(body: bytes, members: bytes) -> bytes:
    """``members`` (``"a": 1, "b": 2``) added at the start of the body's top-level object,
    every other byte left as the client sent it."""
    start = body.index(b"{") + 1
    rest = body[start:]
    if rest.strip().startswith(b"}"):  # an object with no other members
        return body[:start] + members + rest
    return body[:start] + members + b", " + rest


USAGE_ROUTES = frozenset({"/v1/chat/completions", "/api/v0/chat/completions", "/v1/completions",
                          "/api/v0/completions"})


def ask_for_usage(body: bytes, doc: dict[str, Any], route: str) -> tuple[bytes, bool]:
    """A stream whose tokens must be counted but whose client did not ask for usage: the body
    with ``stream_options.include_usage`` set, and True (the usage chunk this adds must then
    be taken out of the stream). Inserted at byte level when the request names no
    ``stream_options``; re-encoded otherwise."""
    if doc.get("stream") is not True or route not in USAGE_ROUTES:
        return body, False
    options = doc.get("stream_options")
    if options is None and "stream_options" not in doc:  # absent: a byte-level insert
        return insert_members(body, b'"stream_options": {"include_usage": true}'), True
    if options is not None and not isinstance(options, dict):
        # a quota must see the usage: a value the upstream may ignore would make the prompt free
        raise BadRequest("'stream_options' must be an object, e.g. {\"include_usage\": true}",
                         param="stream_options", code="invalid_stream_options")
    if options is not None and options.get("include_usage") is True:
        return body, False  # asked already
    current = json.loads(body)  # the body as it stands (a token cap may have changed it)
    current["stream_options"] = {**(options or {}), "include_usage": True}  # null: as absent
    return json.dumps(current).encode(), True


async def send_error(send: Send, err: ProxyError, extra: list[tuple[bytes, bytes]]) -> None:
    body = err.to_json()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in err.headers().items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body, "more_body": False})
