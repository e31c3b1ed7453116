"""A minimal HTTP/1.1 load client on raw asyncio streams: keep-alive, Content-Length and
chunked bodies, nothing else. Its cost per request is a few tens of microseconds, small next to
what the bench measures, and the runner reports it (client CPU per request) anyway.

It speaks only to the servers the bench starts: no redirects, no TLS, no trailers, no
``Connection: close`` handling beyond noticing EOF.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
Sink = Callable[[int, bytes], None]


class HttpError(Exception):
    """The server answered something the bench did not expect."""


def build_request(method: str, path: str, port: int, body: bytes = b"",
                  content_type: bytes = b"application/json") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\n".encode()
    if body or method in ("POST", "PUT", "PATCH"):
        head += b"content-type: " + content_type + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
    return head + b"\r\n" + body


def chat_request(port: int, **fields: Any) -> bytes:
    doc = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], **fields}
    return build_request("POST", CHAT_PATH, port, json.dumps(doc, separators=(",", ":")).encode())


class Head:
    __slots__ = ("headers", "raw", "status")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"not an HTTP response: {lines[0][:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                self.headers[name.strip().lower()] = value.strip()

    @property
    def chunked(self) -> bool:
        return b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()

    @property
    def length(self) -> int | None:
        v = self.headers.get(b"content-length")
        return int(v) if v is not None else None


class Conn:
    """One keep-alive connection. Not safe for concurrent requests (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.reader = reader
        self.writer = writer
        self.port = port

    @classmethod
    async def open(cls, port: int, timeout_s: float = 10.0) -> Conn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, limit=1 << 20),
                                                timeout_s)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, port)

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def read_head(self) -> Head:
        try:
            return Head(await self.reader.readuntil(b"\r\n\r\n"))
        except asyncio.IncompleteReadError as exc:
            raise HttpError(f"connection closed before a response head ({len(exc.partial)} bytes)") from None

    async def read_body(self, head: Head, sink: Sink | None = None) -> bytes:
        """The whole body; with ``sink`` every chunk goes to ``sink(t_ns, data)`` as it arrives
        (and the return value is empty)."""
        n = head.length
        if n is not None:
            data = await self.reader.readexactly(n)
            if sink is None:
                return data
            sink(time.perf_counter_ns(), data)
            return b""
        if not head.chunked:
            raise HttpError("response has neither content-length nor chunked encoding")
        parts: list[bytes] = []
        reader = self.reader
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from our servers
                break
            data = (await reader.readexactly(size + 2))[:-2]
            if sink is None:
                parts.append(data)
            else:
                sink(time.perf_counter_ns(), data)
        return b"".join(parts)

    async def request(self, raw: bytes) -> tuple[Head, bytes]:
        self.writer.write(raw)
        head = await self.read_head()
        return head, await self.read_body(head)

    async def get_json(self, path: str) -> Any:
        head, body = await self.request(build_request("GET", path, self.port))
        if head.status != 200:
            raise HttpError(f"GET {path}: {head.status} {body[:200]!r}")
        return json.loads(body)

    async def post(self, path: str, body: bytes = b"") -> tuple[Head, bytes]:
        return await self.request(build_request("POST", path, self.port, body))


class SseCollector:
    """Splits a byte stream into SSE events as it arrives, timestamping each complete event.

    ``events`` holds (t_ns, kind, value): kind ``data`` (value: the payload), ``done``
    (``data: [DONE]``) or ``comment`` (value: the text after ``: ``). ``raw`` keeps every
    byte for identity checks when ``keep_raw`` is set.
    """

    __slots__ = ("_buf", "done_ns", "events", "first_ns", "keep_raw", "n_data", "on_comment", "raw")

    def __init__(self, keep_raw: bool = False,
                 on_comment: Callable[[int, bytes], None] | None = None) -> None:
        self.events: list[tuple[int, str, bytes]] = []
        self.raw: list[bytes] = []
        self.keep_raw = keep_raw
        self._buf = b""
        self.first_ns: int | None = None
        self.n_data = 0
        self.done_ns: int | None = None
        self.on_comment = on_comment

    def __call__(self, t_ns: int, data: bytes) -> None:
        if self.keep_raw:
            self.raw.append(data)
        buf = self._buf + data if self._buf else data
        pos = 0
        events = self.events
        while True:
            i = buf.find(b"\n\n", pos)
            if i < 0:
                break
            ev = buf[pos:i]
            pos = i + 2
            if ev.startswith(b"data: "):
                if ev == b"data: [DONE]":
                    self.done_ns = t_ns
                    events.append((t_ns, "done", b""))
                else:
                    if self.first_ns is None:
                        self.first_ns = t_ns
                    self.n_data += 1
                    events.append((t_ns, "data", ev[6:]))
            elif ev.startswith(b":"):
                text = ev[1:].strip()
                events.append((t_ns, "comment", text))
                if self.on_comment is not None:
                    self.on_comment(t_ns, text)
            else:
                events.append((t_ns, "other", ev))
        self._buf = buf[pos:]

    def body(self) -> bytes:
        return b"".join(self.raw)

    def data_times(self) -> list[int]:
        return [t for t, kind, _ in self.events if kind == "data"]


async def wait_ready(port: int, path: str, timeout_s: float) -> None:
    """Poll ``GET path`` until it answers below 500."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            conn = await Conn.open(port, timeout_s=1.0)
            try:
                head, _ = await asyncio.wait_for(conn.request(build_request("GET", path, port)), 2.0)
                if head.status < 500:
                    return
            finally:
                conn.close()
        except (OSError, asyncio.TimeoutError, HttpError, asyncio.IncompleteReadError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port}{path} not ready in {timeout_s} s ({last!r})")
