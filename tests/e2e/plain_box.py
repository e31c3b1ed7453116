"""A minimal OpenAI-compatible server without LM Studio's REST API, in a thread of the test on
127.0.0.1: ``GET /v1/models`` lists its models, ``POST /v1/chat/completions`` answers
``content`` at once, anything else is 404. It records every request's method, path and
``Authorization`` header (the simulator only records whether one came)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class PlainBox:
    def __init__(self, models: list[str], content: str = "recorded") -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, authorization
        box = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> bytes:
                size = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(size) if size else b""
                box.seen.append((self.command, self.path, self.headers.get("authorization")))
                return body

            def do_GET(self) -> None:
                self._record()
                if self.path == "/v1/models":
                    self._answer(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "owned_by": "me"} for m in models]})
                else:
                    self._answer(404, {"error": "Unexpected endpoint or method."})

            def do_POST(self) -> None:
                doc = json.loads(self._record() or b"{}")
                if self.path != "/v1/chat/completions":
                    self._answer(404, {"error": "Unexpected endpoint or method."})
                    return
                self._answer(200, {
                    "id": "chatcmpl-plain", "object": "chat.completion", "created": int(time.time()),
                    "model": doc.get("model"), "choices": [{
                        "index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="plain-box", daemon=True)
        self.thread.start()

    @property
    def paths(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _ in self.seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
