"""A job of the old queue API: its status record and events (``Job``), where its relayed
response goes (``JobSink``), and how it is kept in the state database so that no restart
loses it (``JobStore``).

A job is kept from the moment ``/queue/add`` admits it (committed before the answer leaves)
until its result expires: waiting and running ones with their request body, so that a restart
puts them back in line (a running one from the start, at the front), finished ones with their
events and result, so that ``/request/{id}`` and ``/stream/{id}`` answer as before."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import datetime
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ProxyError
from .inbound import Message
from .store import StateDB
from .streaming import upstream_error_message

if TYPE_CHECKING:
    from .gated import GatedRequest

EVENT_OVERHEAD = 80  # bytes a kept event costs beyond its text (string and list slot)
ERROR_KEEP = 64 * 1024  # bytes of an error answer kept for its message


def now_iso() -> str:
    return datetime.now().isoformat()


def record_of(job: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /request/{id}`` answers, from a job's fields (a Job's, or its document)."""
    status, text = job["status"], job["text"]
    return {
        "status": status,
        "client_id": job["client_id"],
        "created_at": job["created_at"],
        "started_at": job["started_at"],
        "completed_at": job["completed_at"],
        "result": "".join(text) if status == "complete" and text else None,
        "tool_calls": job["tool_calls"] or None,
        "error": job["error"],
        "queue_entered_position": job["queue_entered_position"],
    }


class LegacyBody(ProxyError):
    """A ``/queue/add`` body the old server would have refused: 422 with its ``detail`` list."""

    status = 422
    type = "invalid_request_error"
    code = "invalid_body"

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__("invalid body")
        self.problems = problems

    def body(self) -> dict[str, Any]:  # type: ignore[override]
        return {"detail": self.problems}


class Job:
    """One /queue/add request: its status record and every event it produced, for replay."""

    def __init__(self, req: GatedRequest, client_id: str, identity: str) -> None:
        self.req = req
        self.id = req.uid
        self.client_id = client_id
        self.identity = identity
        self.seq = 0  # order of arrival among the jobs kept in the state database
        self.status = "queued"
        self.created_at = now_iso()
        self.started_at: str | None = None
        self.completed_at: str | None = None
        self.text: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.error: str | None = None
        self.queue_entered_position: int | None = None
        self.events: list[str] = []  # serialized, as sent on /stream
        self.size = 0  # bytes kept for this job, roughly
        self.changed = asyncio.Event()
        self.started_mono: float | None = None
        self.finished_at: float | None = None
        self.last_interest = time.monotonic()
        self.stream_opened = False
        self.task: asyncio.Task[None] | None = None
        self.finished_unix: float | None = None  # wall clock: a kept result outlives a restart
        self.attempt = 0  # with replicas: how many times another replica started it again
        self.publish: Callable[[Job, str], None] | None = None  # with replicas: each event to Redis

    @property
    def ticket(self) -> Any:
        assert self.req.adm is not None
        return self.req.adm.ticket

    def record(self) -> dict[str, Any]:
        return record_of(vars(self))

    def emit(self, event: dict[str, Any], text: str = "") -> None:
        data = json.dumps(event)
        self.events.append(data)
        if self.publish is not None:
            self.publish(self, data)
        self.size += len(data) + len(text) + EVENT_OVERHEAD
        self.notify()

    def notify(self) -> None:
        """Wake every stream reading this job."""
        self.changed.set()
        self.changed = asyncio.Event()

    def started(self) -> None:
        """Its turn came."""
        self.status, self.started_at, self.started_mono = "processing", now_iso(), time.monotonic()
        self.notify()

    def doc(self) -> dict[str, Any]:
        """What the state database keeps of the job: enough to put an unfinished one back in
        line after a restart (its body, its owner), and a finished one's answers."""
        adm = self.req.adm
        unfinished = self.status in ("queued", "processing")
        return {
            "id": self.id, "client_id": self.client_id, "identity": self.identity,
            "label": self.req.rec.client, "key": self.req.rec.key, "model": self.req.rec.model,
            "status": self.status, "created_at": self.created_at, "started_at": self.started_at,
            "completed_at": self.completed_at, "error": self.error,
            "queue_entered_position": self.queue_entered_position,
            "body": self.req.body.decode("utf-8", "surrogateescape") if unfinished else None,
            "drop_usage": bool(adm is not None and adm.drop_usage),
            "text": self.text if not unfinished else [], "tool_calls": self.tool_calls,
            "events": self.events if not unfinished else [], "size": self.size,
            "finished_unix": self.finished_unix,
        }

    def restore(self, doc: dict[str, Any]) -> None:
        """A finished job read back from the state database."""
        self.created_at, self.started_at = doc["created_at"], doc["started_at"]
        self.completed_at, self.error = doc["completed_at"], doc["error"]
        self.queue_entered_position = doc["queue_entered_position"]
        self.text, self.tool_calls, self.events = doc["text"], doc["tool_calls"], doc["events"]
        self.size, self.status, self.finished_unix = doc["size"], doc["status"], doc["finished_unix"]

    def merge_tool_calls(self, deltas: list[Any]) -> None:
        for d in deltas:
            if not isinstance(d, dict):
                continue
            idx = d.get("index", 0) if isinstance(d.get("index"), int) else 0
            while len(self.tool_calls) <= idx:
                self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            slot = self.tool_calls[idx]
            if d.get("id"):
                slot["id"] = d["id"]
            if d.get("type"):
                slot["type"] = d["type"]
            fn = d.get("function") or {}
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""


class JobSink:
    """Where a job's response goes instead of a client connection: the relayed SSE stream is
    read line by line into the old events (``{"chunk": text}`` per content delta, tool-call
    deltas whole); an error event, or an error answer, becomes the job's error."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.status = 0
        self.buf = b""
        self.error_body = bytearray()
        self.failed: str | None = None  # the error the response ended with

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        data = message.get("body", b"")
        if self.status >= 400:
            self.error_body += data[:ERROR_KEEP - len(self.error_body)]
            if not message.get("more_body", False):
                self.failed = upstream_error_message(self.status, bytes(self.error_body))["error"]["message"]
            return
        buf = self.buf + data if self.buf else data
        *lines, self.buf = buf.split(b"\n")
        for line in lines:
            self._line(line.strip())
        if not message.get("more_body", False) and self.buf.strip():
            self._line(self.buf.strip())
            self.buf = b""

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]" or not payload:
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        job = self.job
        if "error" in doc:
            err = doc["error"]
            self.failed = str(err.get("message") if isinstance(err, dict) else err)
            return
        choices = doc.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return
        delta = choices[0].get("delta") or {}
        content = delta.get("content")
        if content:
            job.text.append(content)
            job.emit({"chunk": content}, content)
        elif delta.get("tool_calls"):
            job.merge_tool_calls(delta["tool_calls"])
            job.emit({"delta": {k: v for k, v in delta.items() if v is not None},
                      "finish_reason": choices[0].get("finish_reason")})


class JobStore:
    """The jobs table: ``id``, ``seq`` (arrival order) and the job's document as JSON.
    Without a database (a state dir that cannot be used) jobs live in memory only."""

    def __init__(self, db: StateDB | None) -> None:
        self.db = db
        self._seq = 0

    @property
    def durable(self) -> bool:
        return self.db is not None

    def save(self, job: Job) -> None:
        """Keep the job as it is now (queued to the writer; ``committed`` waits for it)."""
        if self.db is None:
            return
        if not job.seq:
            self._seq += 1
            job.seq = self._seq
        row = (job.id, job.seq, json.dumps(job.doc()))
        self.db.write(lambda db: db.execute(
            "INSERT OR REPLACE INTO jobs (id, seq, doc) VALUES (?, ?, ?)", row))

    async def committed(self) -> None:
        if self.db is not None:
            await self.db.commit()

    def forget(self, job_id: str, attempt: int = 0) -> None:
        if self.db is not None:
            self.db.write(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    async def load(self) -> list[tuple[int, dict[str, Any]]]:
        """Every kept job, in arrival order; later ones get numbers after them."""
        if self.db is None:
            return []
        rows = await self.db.read(_rows)
        self._seq = max((seq for seq, _ in rows), default=0)
        return rows


def _rows(db: sqlite3.Connection) -> list[tuple[int, dict[str, Any]]]:
    return [(int(seq), json.loads(doc)) for seq, doc in db.execute("SELECT seq, doc FROM jobs ORDER BY seq")]
