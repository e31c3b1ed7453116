"""Shared tools for the hostile-client suites (tests/e2e/test_hostile_*.py): API keys, a raw
HTTP/1.1 socket client (for clients that misbehave on the wire), polling with deadlines, and
the checks run after every attack (gate free, upstream untouched, memory bounded)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from tests.servers import Process

MODEL = "qwen2.5-7b-instruct"
OTHER = "llama-3.2-3b-instruct"
EMBED = "text-embedding-nomic-embed-text-v1.5"
UNKNOWN_ID_BODY = {"error": "Request ID not found"}

KEYS = {
    "alice": "sk-alice-test-0001",
    "bob": "sk-bob-test-0002",
    "ops": "sk-ops-test-0003",
    "capped": "sk-cap-test-0004",
    "clamped": "sk-clamp-test-0005",
    "narrow": "sk-narrow-test-06",
}
KEYS_TOML = """
[[keys]]
name = "alice"
key = "sk-alice-test-0001"

[[keys]]
name = "bob"
key = "sk-bob-test-0002"

[[keys]]
name = "ops"
key = "sk-ops-test-0003"
role = "admin"

[[keys]]
name = "capped"
key = "sk-cap-test-0004"
max_tokens = 50

[[keys]]
name = "clamped"
key = "sk-clamp-test-0005"
max_tokens = 50
clamp_max_tokens = true

[[keys]]
name = "narrow"
key = "sk-narrow-test-06"
models = ["qwen*"]
"""

T = TypeVar("T")


def keys_config(tmp: Path) -> str:
    path = tmp / "keys.toml"
    path.write_text(KEYS_TOML)
    return str(path)


def auth(name: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"} if name else {}


def chat(content: str = "hi", model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def wait_until(pred: Callable[[], T], timeout: float, what: str = "condition",
               interval: float = 0.02) -> T:
    """Poll ``pred`` until it returns something truthy (returned); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def client(source: str | None = None, timeout: float = 15.0) -> httpx.Client:
    """An httpx client; ``source`` picks the local address (127.0.0.2 = another peer)."""
    transport = httpx.HTTPTransport(local_address=source) if source else None
    return httpx.Client(transport=transport, timeout=timeout)


# -- the simulator's logs ----------------------------------------------------------------

def sim_requests(sim: Process) -> list[dict[str, Any]]:
    return httpx.get(sim.url + "/sim/requests", timeout=5).json()["requests"]


def sim_stats(sim: Process) -> dict[str, Any]:
    return httpx.get(sim.url + "/sim/stats", timeout=5).json()


def sim_reset(sim: Process) -> None:
    httpx.post(sim.url + "/sim/reset", timeout=5).raise_for_status()


# -- after every attack ------------------------------------------------------------------

def queue(gate: Process, who: str | None = None, source: str | None = None) -> dict[str, Any]:
    with client(source) as c:
        resp = c.get(gate.url + "/queue", headers=auth(who))
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_gate_idle(gate: Process, timeout: float = 10.0, who: str | None = None) -> None:
    def idle() -> bool:
        q = queue(gate, who)
        return q["active"] == 0 and q["depth"] == 0
    wait_until(idle, timeout, "the gate to be free (active 0, depth 0)", interval=0.05)


def assert_gate_free(gate: Process, who: str | None = None, timeout: float = 10.0) -> None:
    """The gate is empty and a normal request goes through."""
    wait_gate_idle(gate, timeout, who)
    body = chat("still serving?", max_tokens=3)
    resp = httpx.post(gate.url + "/v1/chat/completions", json=body, headers=auth(who), timeout=20)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith(f"[{MODEL}] still")


def rss(gate: Process) -> int:
    return psutil.Process(gate.proc.pid).memory_info().rss


def open_connections(gate: Process) -> int:
    """Established client connections on lmgate's listening port."""
    conns = psutil.Process(gate.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == gate.port
               and c.status == psutil.CONN_ESTABLISHED)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    """The OpenAI-shaped error of an lmgate refusal."""
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value.lower()
    except (ValueError, TypeError):
        return False


def sse_data(lines: Iterable[str]) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data:"):
            payload = line[5:].strip()
            try:
                out.append(json.loads(payload))
            except ValueError:
                out.append(payload)
    return out


# -- a raw HTTP/1.1 client ---------------------------------------------------------------

class Raw:
    """One TCP connection to lmgate driven by hand: send what you like, read the response
    head and a (possibly chunked) body incrementally, notice when the server closes."""

    def __init__(self, port: int, *, source: str | None = None, rcvbuf: int | None = None,
                 timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:  # before connect, so the window is small from the handshake on
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source:
                self.sock.bind((source, 0))
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
        except BaseException:
            self.sock.close()
            raise
        self.raw = b""  # received, not yet parsed
        self.eof = False
        self.reset = False
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""  # de-chunked body so far
        self.complete = False
        self._chunked = False
        self._left: int | None = None  # content-length bytes still to come

    # sending
    def send(self, data: bytes) -> bool:
        """False when the server no longer takes bytes (closed or reset)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                send_body: bool = True) -> bytes:
        data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
        if body is not None:
            lines += ["content-type: application/json", f"content-length: {len(data)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.send(head + data if send_body else head)
        return data

    # receiving
    def _recv(self, deadline: float) -> bool:
        """One recv; False on EOF, reset or deadline."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, ConnectionAbortedError):
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.raw += data
        return True

    def read_head(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.raw:
            if not self._recv(deadline):
                raise AssertionError(f"no response head (eof={self.eof}, got {self.raw[:200]!r})")
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in self.headers:
            self._left = int(self.headers["content-length"])
        self._parse()
        return self.status

    def _parse(self) -> None:
        while not self.complete:
            if self._chunked:
                if b"\r\n" not in self.raw:
                    return
                size_line, rest = self.raw.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                if len(rest) < size + 2:
                    return
                self.body += rest[:size]
                self.raw = rest[size + 2:]
                if size == 0:
                    self.complete = True
            elif self._left is not None:
                take = self.raw[: self._left]
                self.body += take
                self.raw = self.raw[len(take):]
                self._left -= len(take)
                self.complete = self._left == 0
                return
            else:  # until close
                self.body += self.raw
                self.raw = b""
                self.complete = self.eof
                return

    def read_until(self, pred: Callable[[bytes], bool], timeout: float = 10.0) -> bool:
        """Read body bytes until ``pred(body)`` holds (True) or the body ends/deadline (False)."""
        deadline = time.monotonic() + timeout
        while not pred(self.body):
            if self.complete:
                return False
            if not self._recv(deadline):
                self._parse()
                return bool(pred(self.body))
            self._parse()
        return True

    def read_all(self, timeout: float = 15.0) -> bytes:
        self.read_until(lambda _: self.complete, timeout)
        return self.body

    def lines(self) -> list[str]:
        return self.body.decode("utf-8", "replace").splitlines()

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Read (and keep) whatever comes until the server closes: True if it did in time."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._recv(deadline) and not self.eof:
                return False
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_open(gate: Process, body: dict[str, Any], *, who: str | None = None,
                source: str | None = None, headers: dict[str, str] | None = None,
                path: str = "/v1/chat/completions", rcvbuf: int | None = None) -> Raw:
    """A streaming request sent by hand; its response head read (waiting streams get theirs
    at once)."""
    conn = Raw(gate.port, source=source, rcvbuf=rcvbuf)
    try:
        conn.request("POST", path, {**body, "stream": True}, {**auth(who), **(headers or {})})
        conn.read_head()
    except BaseException:
        conn.close()
        raise
    return conn


def stream_text(conn: Raw) -> str:
    """The assistant text of a chat completion stream read so far."""
    out = []
    for event in sse_data(conn.lines()):
        if isinstance(event, dict):
            for choice in event.get("choices") or []:
                out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def started(conn: Raw, timeout: float = 15.0) -> bool:
    """The stream got past the line: its upstream bytes began."""
    return conn.read_until(lambda b: b"data:" in b, timeout)
