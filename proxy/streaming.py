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


class Usage(NamedTuple):
    """``total`` is the upstream's ``total_tokens``, or the sum of what is known: a lower
    bound when the upstream reported nothing (``approx``)."""

    prompt: int | None
    completion: int | None
    total: int | None
    approx: bool = False


USAGE_MARKERS = (b'"usage"', b'"stats"')
EVENT_CAP = 4 * 1024 * 1024  # an event with a usage report is read whole up to this size
BODY_CAP = 4 * 1024 * 1024  # a JSON body is parsed whole up to this size, else its tail is read
TAIL_KEEP = 256 * 1024


class UsageMeter:
    """What a response says it used, in whatever shape the route reports it, while the relay
    passes every byte on untouched: ``usage`` (OpenAI chat, completions, embeddings, Anthropic
    messages, the Responses API's ``response.usage``) or LM Studio's ``stats``
    (``/api/v1/chat``: ``input_tokens``, ``total_output_tokens``, also in ``chat.end``).

    Streams: content deltas are counted cheaply as they pass (one token each, as LM Studio
    streams them), and only the events that carry a usage marker are parsed, once whole (an
    upstream write may cut an event anywhere). What several events report is merged (Anthropic
    sends the prompt in ``message_start`` and the output in ``message_delta``). Where nothing
    is reported, the count is what was streamed: a lower bound, marked ``approx``.

    JSON bodies: parsed whole up to ``BODY_CAP``; a larger one (an embeddings batch) is read
    from its tail, where the usage object sits, so its size never makes it free."""

    __slots__ = ("sse", "deltas", "partial", "prompt", "completion", "total", "found",
                 "body", "size", "tail")

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.deltas = 0
        self.partial = b""  # the unfinished event at the end of what was fed
        self.prompt: int | None = None
        self.completion: int | None = None
        self.total: int | None = None
        self.found = False
        self.body: list[bytes] = []
        self.size = 0
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        if not self.sse:
            self._keep(chunk)
            return
        if b'nt"' in chunk or b'ts"' in chunk:
            self.deltas += (chunk.count(b'"content":"') + chunk.count(b'"content": "')
                            + chunk.count(b'"arguments":"') + chunk.count(b'"arguments": "')
                            - chunk.count(b'"content":""') - chunk.count(b'"content": ""')
                            - chunk.count(b'"arguments":""') - chunk.count(b'"arguments": ""'))
        data = self.partial + chunk if self.partial else chunk
        if not self.partial and b'"usage"' not in chunk and b'"stats"' not in chunk:
            if data.endswith((b"\n\n", b"\r\n\r\n")):
                return  # the common case: whole events, none with a report
        cut = _last_boundary(data)
        ready, self.partial = data[:cut], data[cut:]
        if len(self.partial) > EVENT_CAP:
            self.partial = b""  # an event this large is not read for usage
        if ready and (b'"usage"' in ready or b'"stats"' in ready):
            for event in _events(ready):
                if b'"usage"' in event or b'"stats"' in event:
                    self._read_event(event)

    def _keep(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= BODY_CAP:
            self.body.append(chunk)
            return
        if self.body:  # over the cap: from now on only the tail is kept
            self.tail = b"".join(self.body)[-TAIL_KEEP:]
            self.body = []
        self.tail = (self.tail + chunk)[-TAIL_KEEP:]

    def _read_event(self, event: bytes) -> None:
        for line in event.splitlines():
            if line.startswith(b"data:"):
                try:
                    self._merge(json.loads(line[5:]))
                except ValueError:
                    continue

    def _merge(self, doc: Any) -> None:
        found = _reported(doc)
        if found is None:
            return
        prompt, completion, total = found
        self.found = True
        if prompt is not None:
            self.prompt = prompt
        if completion is not None:
            self.completion = completion
        if total is not None:
            self.total = total

    def usage(self) -> Usage:
        if not self.sse:
            self._read_body()
        if not self.found:
            if not self.sse:
                return Usage(None, None, None)
            completion = max(0, self.deltas)
            return Usage(None, completion, completion, True)
        total = self.total
        if total is None:
            total = (self.prompt or 0) + (self.completion or 0)
        return Usage(self.prompt, self.completion, total)

    def _read_body(self) -> None:
        if self.body:
            try:
                self._merge(json.loads(b"".join(self.body)))
            except (ValueError, RecursionError):
                pass
            self.body = []
        elif self.tail:
            self._merge(_tail_report(self.tail))
            self.tail = b""


def _last_boundary(data: bytes) -> int:
    nn, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(nn + 2 if nn != -1 else 0, crlf + 4 if crlf != -1 else 0)


def _events(data: bytes) -> list[bytes]:
    """``data`` (ending on an event boundary) cut into its events, each with its blank line."""
    out: list[bytes] = []
    start = 0
    while start < len(data):
        nn, crlf = data.find(b"\n\n", start), data.find(b"\r\n\r\n", start)
        if crlf != -1 and (nn == -1 or crlf < nn):
            end = crlf + 4
        elif nn != -1:
            end = nn + 2
        else:
            end = len(data)
        out.append(data[start:end])
        start = end
    return out


def _tail_report(tail: bytes) -> dict[str, Any] | None:
    """The last ``"usage": {...}`` or ``"stats": {...}`` member in the tail of a JSON body, as
    a document ``_reported`` understands (the body itself is too large to parse whole)."""
    decoder = json.JSONDecoder()
    best: tuple[int, str, Any] | None = None
    for marker, name in ((b'"usage"', "usage"), (b'"stats"', "stats")):
        at = tail.rfind(marker)
        while at != -1:
            colon = tail.find(b":", at + len(marker))
            try:
                value, _ = decoder.raw_decode(tail[colon + 1:].decode("utf-8", "replace").lstrip())
            except ValueError:
                at = tail.rfind(marker, 0, at)
                continue
            if isinstance(value, dict) and (best is None or at > best[0]):
                best = (at, name, value)
            break
    return None if best is None else {best[1]: best[2]}


def _reported(doc: Any) -> tuple[int | None, int | None, int | None] | None:
    """(prompt, completion, total) as the document reports them (None where it does not), or
    None when it carries no report at all."""
    if not isinstance(doc, dict):
        return None
    u = doc.get("usage")
    if not isinstance(u, dict):
        for outer in ("response", "message"):  # Responses API; Anthropic's message_start
            inner = doc.get(outer)
            if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                u = inner["usage"]
                break
    if isinstance(u, dict):
        prompt = _int(u.get("prompt_tokens", u.get("input_tokens")))
        completion = _int(u.get("completion_tokens", u.get("output_tokens")))
        total = _int(u.get("total_tokens"))
    else:
        stats = doc.get("stats")
        if not isinstance(stats, dict) and isinstance(doc.get("result"), dict):
            stats = doc["result"].get("stats")  # LM Studio's chat.end event
        if not isinstance(stats, dict):
            return None
        prompt = _int(stats.get("input_tokens"))
        completion = _int(stats.get("total_output_tokens"))
        total = None
    if prompt is None and completion is None and total is None:
        return None
    return prompt, completion, total


def read_usage(doc: Any) -> Usage | None:
    """The usage a chat/completions/embeddings answer or chunk reports, in any of the shapes
    ``UsageMeter`` knows; None when it reports none."""
    found = _reported(doc)
    if found is None:
        return None
    prompt, completion, total = found
    if total is None:
        total = (prompt or 0) + (completion or 0)
    return Usage(prompt, completion, total)


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
