"""SSE pieces: queue comments, event-boundary tracking, usage sniffing. Pure byte work.

lmgate never re-encodes upstream events. What it adds to a stream (queue comments before
the relay starts, an error event after it stops) must sit between whole events, and an
upstream write can end anywhere inside an event, so the relay keeps a ``Boundary``.
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

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

    def usage(self) -> Usage:
        tail = b"".join(self.last)
        idx = tail.rfind(b'"usage"')
        if idx != -1:
            start = tail.rfind(b"data:", 0, idx)
            end = tail.find(b"\n", idx)
            if start != -1:
                try:
                    found = read_usage(json.loads(tail[start + 5: end if end != -1 else None]))
                except ValueError:
                    found = None
                if found is not None:
                    return found
        completion = max(0, self.deltas)
        return Usage(None, completion, completion, True)


class Usage(NamedTuple):
    """``total`` is the upstream's ``total_tokens``, or the sum of what is known: a lower
    bound when the upstream reported nothing (``approx``)."""

    prompt: int | None
    completion: int | None
    total: int | None
    approx: bool = False


def read_usage(doc: Any) -> Usage | None:
    """The usage object of a chat/completions/embeddings answer or chunk, or of a Responses
    API ``response.completed`` event (``{"response": {"usage": ...}}``)."""
    if not isinstance(doc, dict):
        return None
    u = doc.get("usage")
    if not isinstance(u, dict) and isinstance(doc.get("response"), dict):
        u = doc["response"].get("usage")
    if not isinstance(u, dict):
        return None
    prompt = _int(u.get("prompt_tokens", u.get("input_tokens")))
    completion = _int(u.get("completion_tokens", u.get("output_tokens")))
    total = _int(u.get("total_tokens"))
    if total is None and (prompt is not None or completion is not None):
        total = (prompt or 0) + (completion or 0)
    return Usage(prompt, completion, total)


def usage_from_json(body: bytes) -> Usage:
    try:
        found = read_usage(json.loads(body))
    except ValueError:
        found = None
    return found if found is not None else Usage(None, None, None)


class UsageRemover:
    """Takes out of a stream the usage-only chunk that lmgate asked the upstream for (to count
    a key's tokens) when the client did not ask for it, so the client sees what it would see
    without lmgate. Every other byte passes unchanged. An event is only let through once it
    is complete (a usage chunk cut across two reads must be recognisable), which holds back
    nothing when the upstream writes whole events, as LM Studio does."""

    __slots__ = ("pending", "usage")

    def __init__(self) -> None:
        self.pending = b""
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        nn, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        cut = max(nn + 2 if nn != -1 else 0, crlf + 4 if crlf != -1 else 0)
        ready, self.pending = data[:cut], data[cut:]
        if b'"usage"' not in ready:
            return ready
        kept: list[bytes] = []
        start = 0
        while start < len(ready):
            nn, crlf = ready.find(b"\n\n", start), ready.find(b"\r\n\r\n", start)
            if crlf != -1 and (nn == -1 or crlf < nn):
                end = crlf + 4
            elif nn != -1:
                end = nn + 2
            else:  # not reached: ``ready`` ends on a boundary
                end = len(ready)
            event = ready[start:end]
            start = end
            if b'"usage"' in event and self._is_usage_only(event):
                continue
            kept.append(event)
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest

    def _is_usage_only(self, event: bytes) -> bool:
        text = event.strip()
        if not text.startswith(b"data:") or b"\n" in text:
            return False
        try:
            doc = json.loads(text[5:])
        except ValueError:
            return False
        if not isinstance(doc, dict) or doc.get("choices") != []:
            return False
        found = read_usage(doc)
        if found is None:
            return False
        self.usage = found
        return True


def waiting_line(position: int, eta_ms: int | None) -> str:
    """What a person in a chat UI reads while waiting: ``Waiting in line: #3, about 40 s``."""
    text = f"Waiting in line: #{position}"
    if eta_ms is not None:
        seconds = max(1, round(eta_ms / 1000))
        text += f", about {seconds} s" if seconds < 120 else f", about {round(seconds / 60)} min"
    return text + "\n"


def reasoning_chunk(chunk_id: str, model: str, text: str) -> bytes:
    """A chat.completion.chunk carrying only ``delta.reasoning_content``: chat UIs show it as
    the model's "thinking" while the real answer has not started. One ``data:`` line. The
    role is set (some clients build the message from the first chunk's role)."""
    doc = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                              "reasoning_content": text},
                                        "logprobs": None, "finish_reason": None}]}
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


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
