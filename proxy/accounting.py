"""What a finished request leaves behind: its metrics, its tokens against its key's quota,
what the wait estimates learn from it, the status page's totals and one access-log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from .config import ApiKey
from .errors import QuotaExceeded
from .eta import Estimator
from .metrics import Metrics, RequestRecord
from .quota import Quotas

access_log = logging.getLogger("lmgate.access")


class Accounts:
    """Observes every request once, when it ends."""

    def __init__(self, metrics: Metrics, quotas: Quotas, eta: Estimator, *, log_format: str,
                 on_upstream_error: Callable[[], None]) -> None:
        self.metrics = metrics
        self.quotas = quotas
        self.eta = eta
        self.log_format = log_format
        self.on_upstream_error = on_upstream_error  # the boxes' loaded models may have changed
        self.totals = {"served": 0, "failed": 0, "rejected": 0, "completion_tokens": 0}

    async def check_quota(self, key: ApiKey) -> None:
        refusal = await self.quotas.check(key.name, key.tokens_per_day, key.tokens_per_month)
        if refusal is not None:
            raise QuotaExceeded(refusal.message, retry_after_s=refusal.retry_after_s)

    def observe(self, rec: RequestRecord) -> None:
        if rec.total_tokens is None and (rec.prompt_tokens or rec.completion_tokens):
            # cut short before a report: what is known, as a lower bound
            rec.total_tokens = (rec.prompt_tokens or 0) + (rec.completion_tokens or 0)
            rec.tokens_approx = True
        self.metrics.observe(rec)
        if rec.key and rec.total_tokens and rec.total_tokens > rec.quota_counted:
            self.quotas.add(rec.key, rec.total_tokens - rec.quota_counted)
        if rec.model:
            bucket = {"ok": "served", "rejected": "rejected"}.get(rec.outcome, "failed")
            self.totals[bucket] += 1
            self.totals["completion_tokens"] += rec.completion_tokens or 0
        if rec.outcome == "ok" and rec.wait_ms is not None:
            # ttft only for streams: a plain answer's first byte comes at its end
            self.eta.observe(rec.model, rec.duration_ms / 1000 - rec.wait_ms / 1000, box=rec.upstream,
                             completion_tokens=rec.completion_tokens,
                             ttft_s=rec.ttft_ms / 1000 if rec.stream and rec.ttft_ms is not None else None)
        if (rec.outcome == "upstream_error" and rec.status >= 500) or rec.status in (502, 504):
            self.on_upstream_error()
        log_access(rec, self.log_format)


def log_access(rec: RequestRecord, fmt: str) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    if fmt == "json":
        access_log.info(json.dumps({
            "request_id": rec.request_id, "client": rec.client, "route": rec.route,
            "model": rec.model, "upstream": rec.upstream, "status": rec.status,
            "outcome": rec.outcome, "stream": rec.stream, "position": rec.position,
            "wait_ms": _r(rec.wait_ms), "ttft_ms": _r(rec.ttft_ms), "duration_ms": _r(rec.duration_ms),
            "prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
            "tokens_approx": rec.tokens_approx,
        }))
        return
    access_log.info(
        '%s %s "%s" model=%s upstream=%s status=%s outcome=%s pos=%s wait_ms=%s ttft_ms=%s '
        "duration_ms=%s tokens=%s/%s%s",
        rec.request_id, rec.client, rec.route, rec.model or "-",
        "-" if rec.upstream == "none" else rec.upstream, rec.status, rec.outcome,
        rec.position, _r(rec.wait_ms), _r(rec.ttft_ms), _r(rec.duration_ms),
        "-" if rec.prompt_tokens is None else rec.prompt_tokens,
        "-" if rec.completion_tokens is None else rec.completion_tokens,
        "~" if rec.tokens_approx else "",
    )


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)
