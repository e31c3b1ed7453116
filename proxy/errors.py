"""Errors that lmgate itself produces, rendered in the OpenAI error shape.

    ProxyError                      (500 internal_error)
    ├── BadRequest                  400 invalid_request_error
    │   └── TokenCapExceeded        400 invalid_request_error / max_tokens
    ├── Unauthorized                401 authentication_error
    ├── Forbidden                   403 permission_error
    ├── NotFound                    404 not_found_error
    ├── RequestTimeout              408 invalid_request_error / request_timeout
    ├── Conflict                    409 invalid_request_error
    ├── PayloadTooLarge             413 invalid_request_error
    ├── HeadersTooLarge             431 invalid_request_error
    ├── Cancelled                   499 cancelled (by an administrator)
    ├── TooManyRequests             429 rate_limit_error (+ Retry-After)
    │   ├── QueueFullError          429 rate_limit_error / queue_full
    │   └── QuotaExceeded           429 insufficient_quota (Retry-After to the reset, uncapped)
    ├── UpstreamUnavailable         502 upstream_error
    │   └── ModelLoadFailed         502 / model_load_failed
    ├── ServiceUnavailable          503 service_unavailable
    │   ├── QueueTimeout            503 / queue_timeout
    │   ├── ShuttingDown            503 / shutting_down
    │   └── TooManyConnections      503 / too_many_connections
    └── UpstreamTimeout             504 upstream_timeout

Errors that LM Studio produces are never wrapped: they pass through unchanged.

``X-Should-Retry`` (which the openai SDKs obey over their own rules: they retry 408, 409, 429
and 5xx twice by default) is ``false`` where a resend cannot help or may do harm: the request
may already have reached the box (it broke off or went silent after the request was written,
so a resend could run the generation twice), or a quota is used up until its reset. Without
it, a client's own retry rules apply.
"""

from __future__ import annotations

import json

MAX_RETRY_AFTER_S = 120


class ProxyError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = "internal_error"
    param: str | None = None
    retry_after_s: int | None = None
    refused = False  # the upstream refused the connection: nothing was sent
    retry: bool | None = None  # X-Should-Retry, when lmgate knows better than the client's rules

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param
        if retry_after_s is not None:
            self.retry_after_s = max(1, min(MAX_RETRY_AFTER_S, int(retry_after_s + 0.999)))

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return json.dumps(self.body()).encode()

    def headers(self) -> dict[str, str]:
        out = {} if self.retry_after_s is None else {"retry-after": str(self.retry_after_s)}
        if self.retry is not None:
            out["x-should-retry"] = "true" if self.retry else "false"
        return out

    def sse_event(self) -> bytes:
        """The error as one SSE event, for a stream whose headers were already sent."""
        return b"data: " + self.to_json() + b"\n\n"


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class TokenCapExceeded(BadRequest):
    code = "max_tokens_exceeded"
    param = "max_tokens"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_too_large"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Cancelled(ProxyError):
    status = 499
    type = "cancelled"
    code = "cancelled"


class TooManyRequests(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class QuotaExceeded(TooManyRequests):
    """A key's token quota is used up. Unlike every other Retry-After, this one is not capped:
    the honest answer is the time until the quota resets, hours or days away."""

    type = "insufficient_quota"
    code = "insufficient_quota"
    retry = False  # nothing changes before the reset

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s + 0.999))


class QueueFullError(TooManyRequests):
    code = "queue_full"


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class ModelLoadFailed(UpstreamUnavailable):
    """lmgate's own load of a model (managed mode) failed; LM Studio's message is passed on."""

    code = "model_load_failed"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class QueueTimeout(ServiceUnavailable):
    code = "queue_timeout"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class TooManyConnections(ServiceUnavailable):
    code = "too_many_connections"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_timeout"
    code = "upstream_timeout"
