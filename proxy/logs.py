"""Log output: plain text for people, or one JSON object per line for log collectors.

Every logger goes through the root handler set up here (uvicorn's included: it is started
with ``log_config=None`` so it installs no handlers of its own), so ``--log-format json``
holds for every line, not only the access log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "lmgate.access"
# Loggers that speak on every upstream request (httpx: one INFO line per request, so one per
# 15 s probe, ~17,000 lines a day): only worth reading when debugging.
CHATTY_LOGGERS = ("httpx", "httpcore")
_RESERVED = ("time", "level", "logger")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` per record. An access-log record's message is
    already a JSON object: its fields are merged in, so collectors see fields, not a string."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        message = record.getMessage()
        fields = _json_object(message) if record.name == ACCESS_LOGGER else None
        if fields is None:
            out["message"] = message
        else:
            out.update((k, v) for k, v in fields.items() if k not in _RESERVED)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def setup(level: str, fmt: str) -> None:
    """One stderr handler on the root logger, replacing any earlier one (tests call this
    more than once); chatty client libraries at WARNING unless ``level`` is debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.NOTSET if level.lower() == "debug" else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def _utc(created: float) -> str:
    stamp = datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")
