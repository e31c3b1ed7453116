"""Shared tools for the hostile-client suites (tests/e2e/test_hostile_*.py): API keys, clients
from another peer, old-API jobs, and the checks run after every attack (gate free, upstream
untouched, memory bounded). The raw HTTP/1.1 client and polling with deadlines live in
``tests.e2e.helpers`` and are importable from here as well."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.e2e.helpers import (  # noqa: F401 - importable from here too
    EMBED,
    MODEL,
    OTHER,
    Raw,
    T,
    error_of,
    sim_requests,
    sim_reset,
    sim_stats,
    sse_data,
    started,
    stream_text,
    wait_until,
)
from tests.e2e.helpers import stream_open as _stream_open
from tests.servers import Process, plain_client

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

def keys_config(tmp: Path) -> str:
    path = tmp / "keys.toml"
    path.write_text(KEYS_TOML)
    return str(path)


def auth(name: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"} if name else {}


def chat(content: str = "hi", model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def client(source: str | None = None, timeout: float = 15.0) -> httpx.Client:
    """A plain httpx client; ``source`` picks the local address (127.0.0.2 = another peer)."""
    return plain_client(timeout, source=source)


# -- old-API jobs --------------------------------------------------------------------------

def legacy(content: str = "hi", model: str = MODEL, **extra: Any) -> dict[str, Any]:
    """A /queue/add body."""
    return {"client_id": "hostile", "model": model,
            "messages": [{"role": "user", "content": content}], **extra}


def add_job(gate: Process, body: dict[str, Any], who: str | None = None, source: str | None = None,
            headers: dict[str, str] | None = None) -> str:
    """POST /queue/add (200 expected): the job's id."""
    with client(source) as c:
        resp = c.post(gate.url + "/queue/add", json=body, headers={**auth(who), **(headers or {})})
    assert resp.status_code == 200, resp.text
    return resp.json()["request_id"]


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
    resp = gate.http.post("/v1/chat/completions", json=body, headers=auth(who), timeout=20)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith(f"[{MODEL}] still")


def rss(gate: Process) -> int:
    return psutil.Process(gate.proc.pid).memory_info().rss


def open_connections(gate: Process) -> int:
    """Established client connections on lmgate's listening port."""
    conns = psutil.Process(gate.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == gate.port
               and c.status == psutil.CONN_ESTABLISHED)


def is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value.lower()
    except (ValueError, TypeError):
        return False


def stream_open(gate: Process, body: dict[str, Any], *, who: str | None = None,
                source: str | None = None, headers: dict[str, str] | None = None,
                path: str = "/v1/chat/completions", rcvbuf: int | None = None) -> Raw:
    """A streaming request sent by hand as ``who`` (a name in KEYS); its response head read
    (waiting streams get theirs at once)."""
    return _stream_open(gate, body, headers={**auth(who), **(headers or {})}, source=source,
                        path=path, rcvbuf=rcvbuf)
