"""Tools the end-to-end suites share: request bodies and keys, the ``openai`` SDK pointed at
a process, polling with deadlines that fail, what lmgate and the simulator report about
themselves, and a raw HTTP/1.1 client for the bytes of a stream.

Every HTTP client here is a ``plain_client`` (no CA bundle, no proxies from the environment,
nothing kept alive), and a process's own ``Process.http`` is used wherever one is at hand."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from proxy.simulator import expected_reply
from tests.servers import Process, plain_client

MODEL = "qwen2.5-7b-instruct"
OTHER = "llama-3.2-3b-instruct"
EMBED = "text-embedding-nomic-embed-text-v1.5"
OPEN_KEY = "sk-open-access"  # what a client sends when lmgate has no keys
HOLD_TOKENS = 3000  # a holder's length: far longer than any test keeps one open

T = TypeVar("T")


# -- waiting -------------------------------------------------------------------------------
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


# -- requests ------------------------------------------------------------------------------
def nonce() -> str:
    return uuid.uuid4().hex[:8]


def chat_body(text: str, max_tokens: int, *, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def sdk(target: Process | str, key: str = OPEN_KEY, timeout: float = 30.0) -> openai.OpenAI:
    """The openai SDK in front of a process (or a base URL), without retries; closing it
    closes its HTTP client."""
    url = target.url if isinstance(target, Process) else target
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout,
                         http_client=plain_client(timeout))


# -- what the processes report -------------------------------------------------------------
def queue(gate: Process, headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = gate.http.get("/queue", headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_idle(gate: Process, headers: dict[str, str] | None = None, timeout: float = 15) -> None:
    def idle() -> bool:
        q = queue(gate, headers)
        return q["active"] == 0 and q["depth"] == 0
    wait_until(idle, timeout, "lmgate to be idle (active 0, depth 0)", interval=0.05)


def samples(gate: Process, name: str, headers: dict[str, str] | None = None) -> list[Any]:
    """Every sample of one metric on lmgate's /metrics."""
    resp = gate.http.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    return [s for family in text_string_to_metric_families(resp.text) for s in family.samples
            if s.name == name]


def box_name(proc: Process) -> str:
    """The name lmgate gives a box given as a URL: host:port."""
    return f"127.0.0.1:{proc.port}"


def sim_requests(sim: Process) -> list[dict[str, Any]]:
    return sim.http.get("/sim/requests").json()["requests"]


def sim_stats(sim: Process) -> dict[str, Any]:
    return sim.http.get("/sim/stats").json()


def sim_reset(sim: Process) -> None:
    sim.http.post("/sim/reset").raise_for_status()


def generations(sim: Process, tag: str) -> list[dict[str, Any]]:
    """The simulator's generations whose user text contains ``tag``, in arrival order."""
    return [g for g in sim_stats(sim)["log"] if tag in (g["user"] or "")]


# -- responses -----------------------------------------------------------------------------
def error_of(resp: httpx.Response) -> dict[str, Any]:
    """The OpenAI-shaped error of an lmgate refusal."""
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


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


def text_of(lines: Iterable[str]) -> str:
    """The assistant text of a chat completion stream's lines."""
    out = []
    for event in sse_data(lines):
        if isinstance(event, dict):
            for choice in event.get("choices") or []:
                out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def read_stream(proc: Process, body: dict[str, Any], headers: dict[str, str] | None = None, *,
                path: str = "/v1/chat/completions", timeout: float = 20,
                on_head: Callable[[httpx.Response], None] | None = None) -> tuple[httpx.Headers, list[str]]:
    """A streamed POST read to its end; status 200 expected. The response headers and every
    line of the body; ``on_head`` runs once the response head is in (a waiting stream gets it
    at once)."""
    with proc.http.stream("POST", path, json=body, headers=headers, timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        if on_head is not None:
            on_head(resp)
        return resp.headers, list(resp.iter_lines())


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


def stream_open(gate: Process, body: dict[str, Any], *, headers: dict[str, str] | None = None,
                source: str | None = None, path: str = "/v1/chat/completions",
                rcvbuf: int | None = None) -> Raw:
    """A streaming request sent by hand; its response head read (waiting streams get theirs
    at once)."""
    conn = Raw(gate.port, source=source, rcvbuf=rcvbuf)
    try:
        conn.request("POST", path, {**body, "stream": True}, headers)
        conn.read_head()
    except BaseException:
        conn.close()
        raise
    return conn


def stream_text(conn: Raw) -> str:
    """The assistant text of a chat completion stream read so far."""
    return text_of(conn.lines())


def started(conn: Raw, timeout: float = 15.0) -> bool:
    """The stream got past the line: its upstream bytes began."""
    return conn.read_until(lambda b: b"data:" in b, timeout)


def hold(gate: Process, model: str, text: str, headers: dict[str, str] | None = None,
         max_tokens: int = HOLD_TOKENS) -> Raw:
    """A long stream that runs at once (position 0) and has begun generating; it holds its
    slot until its connection is closed."""
    conn = stream_open(gate, chat_body(text, max_tokens, model=model), headers=headers)
    try:
        assert conn.status == 200, conn.body
        assert conn.headers["x-queue-position"] == "0", conn.headers
        assert started(conn), conn.body
    except BaseException:
        conn.close()
        raise
    return conn


def assert_complete_stream(conn: Raw, body: dict[str, Any]) -> None:
    """The stream ended normally: the whole reply, [DONE], no error event."""
    events = sse_data(conn.lines())
    assert conn.complete, conn.body[-500:]
    assert events and events[-1] == "[DONE]", conn.body[-500:]
    assert not [e for e in events if isinstance(e, dict) and "error" in e], events
    assert stream_text(conn) == expected_reply(body)
