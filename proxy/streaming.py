"""SSE pieces: queue comments, event-boundary tracking, usage sniffing. Pure byte work.

lmgate never re-encodes upstream events. What it adds to a stream (queue comments before
the relay starts, an error event after it stops) must sit between whole events, and an
upstream write can end anywhere inside an event, so the relay keeps a ``Boundary``.
"""

from __future__ import annotations

import json
from typing import Any

KEEPALIVE_S = 15.0
POSITION_MIN_INTERVAL_S = 1.0
NO_BUFFERING = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), *NO_BUFFERING]


def comment(text: str) -> bytes:
    """One SSE comment line, ended as its own (empty) event. Never an ``id:`` line."""
    return b": " + text.replace("\n", " ").replace("\r", " ").encode() + b"\n\n"


def queue_entered(position: int) -> bytes:
    return comment(f"queue_entered={position}")


def queue_position(position: int) -> bytes:
    return comment(f"queue_position={position}")


def keepalive() -> bytes:
    return comment("keepalive")


def error_event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Boundary:
    """Tracks whether the bytes relayed so far end exactly between two SSE events."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b"\n\n"  # nothing sent yet counts as a boundary

    def feed(self, chunk: bytes) -> None:
        if chunk:
            self.tail = (self.tail + chunk)[-4:] if len(chunk) < 4 else chunk[-4:]

    @property
    def clean(self) -> bool:
        t = self.tail
        return t.endswith(b"\n\n") or t.endswith(b"\r\n\r\n") or t.endswith(b"\r\r")


class UsageSniffer:
    """Counts content deltas cheaply and keeps the last chunks to read ``usage``.

    Parsing every chunk as JSON would cost more CPU than the relay itself, so completion
    tokens are approximated by counting non-empty ``content``/``arguments`` deltas (one
    token each, as LM Studio streams them) unless the upstream reports a usage object
    (LM Studio does with ``stream_options.include_usage``).
    """

    __slots__ = ("deltas", "last")
    KEEP = 4

    def __init__(self) -> None:
        self.deltas = 0
        self.last: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        if b'nt"' in chunk or b'ts"' in chunk:
            self.deltas += (chunk.count(b'"content":"') + chunk.count(b'"content": "')
                            + chunk.count(b'"arguments":"') + chunk.count(b'"arguments": "')
                            - chunk.count(b'"content":""') - chunk.count(b'"content": ""')
                            - chunk.count(b'"arguments":""') - chunk.count(b'"arguments": ""'))
        last = self.last
        last.append(chunk)
        if len(last) > self.KEEP:
            del last[0]

    def usage(self) -> tuple[int | None, int | None, bool]:
        """(prompt, completion, approximate)."""
        tail = b"".join(self.last)
        idx = tail.rfind(b'"usage"')
        if idx != -1:
            start = tail.rfind(b"data:", 0, idx)
            end = tail.find(b"\n", idx)
            if start != -1:
                try:
                    doc = json.loads(tail[start + 5: end if end != -1 else None])
                    u = doc.get("usage") or {}
                    return _int(u.get("prompt_tokens")), _int(u.get("completion_tokens")), False
                except (ValueError, AttributeError):
                    pass
        return None, max(0, self.deltas), True


def usage_from_json(body: bytes) -> tuple[int | None, int | None]:
    try:
        u = json.loads(body).get("usage") or {}
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(u, dict):
        return None, None
    prompt = _int(u.get("prompt_tokens", u.get("input_tokens")))
    completion = _int(u.get("completion_tokens", u.get("output_tokens")))
    return prompt, completion


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def upstream_error_message(status: int, body: bytes) -> dict[str, Any]:
    """An upstream error response turned into the body of an SSE error event."""
    message: str = body.decode("utf-8", "replace").strip()[:2000] or f"upstream answered {status}"
    etype, code = "upstream_error", str(status)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            etype = str(err.get("type") or etype)
            code = str(err.get("code") or code)
        elif isinstance(err, str):
            message = err
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}
