"""Admission: everything that decides whether a request may join the line, in one order, for
the OpenAI routes and the old queue API alike (the same fault gets the same answer on both).

    authenticate (key or client address)  -> 401
    shutting down                         -> 503 shutting_down
    a replica out of service              -> 503 state_unavailable / config_mismatch
    read the body within --max-body, held within --max-waiting-bytes -> 413 / 429
    parse: JSON object, model, stream, token fields -> 400
    role and model allowlist              -> 403
    some box serves the model             -> 404 model_not_found / 502
    X-Queue-Feedback                      -> 400
    the key's token cap                   -> 400, or the body's cap field set
    the key's quota (usage asked for)     -> 429 insufficient_quota
    the key's requests per minute         -> 429 rate_limited
    the line: the key's max_queued, --max-queue, closed -> 429 / 503

Every refusal is a ProxyError raised before anything reaches a box; whatever was held for the
request (its body's bytes) is given back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import FEEDBACK_MODES, ApiKey
from .errors import BadRequest, QueueFullError, ShuttingDown
from .gate import GateClosed, KeyQueueFull, QueueFull, Ticket
from .inbound import Hold, Receive, apply_token_cap, ask_for_usage, parse_request, read_body, token_limit
from .metrics import RequestRecord

if TYPE_CHECKING:
    from .auth import Principal
    from .state import AppState

# The field a key's max_tokens cap is written into when a request names none, by upstream path.
TOKEN_FIELD = {
    "/v1/chat/completions": "max_tokens", "/api/v0/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens", "/api/v0/completions": "max_tokens",
    "/v1/messages": "max_tokens", "/v1/responses": "max_output_tokens",
    "/api/v1/chat": "max_output_tokens",
}
# Streams that may carry lmgate's waiting line as reasoning_content (chat UIs show it).
FEEDBACK_ROUTES = frozenset({"/v1/chat/completions", "/api/v0/chat/completions"})


@dataclass
class Admission:
    """An admitted request: its place in line and what was decided on the way."""

    who: Principal
    ticket: Ticket
    body: bytes  # as it goes upstream (a token cap or a usage request may have changed it)
    hold: Hold | None  # its share of --max-waiting-bytes, given back when it starts
    stream: bool
    reasoning: bool  # tell the waiting line as reasoning_content chunks
    drop_usage: bool  # lmgate asked for the usage chunk; the client did not
    quota_key: ApiKey | None  # checked again when its turn comes
    eta_ms: int | None  # the wait estimated at arrival


def feedback_mode(headers: dict[bytes, bytes], who: Principal, default: str) -> str:
    """``X-Queue-Feedback`` over the key's ``feedback`` over ``--feedback``."""
    raw = headers.get(b"x-queue-feedback")
    if raw is not None:
        value = raw.decode("latin-1").strip().lower()
        if value not in FEEDBACK_MODES:
            raise BadRequest(f"X-Queue-Feedback must be one of {', '.join(FEEDBACK_MODES)}, got "
                             f"{value[:40]!r}", param="X-Queue-Feedback", code="invalid_header")
        return value
    if who.key is not None and who.key.feedback:
        return who.key.feedback
    return default


async def admit(st: AppState, rec: RequestRecord, headers: dict[bytes, bytes], receive: Receive, *,
                path: str, uid: str, rid: str,
                rewrite: Callable[[bytes], bytes] | None = None) -> Admission:
    """Admit one request to the line, or raise the ProxyError that refuses it. ``path`` is the
    upstream path (what the body is for); ``rec.route`` what it is counted under. ``rewrite``
    turns a body of another shape (the old queue API's) into the one sent upstream; it may
    refuse it with a ProxyError of its own."""
    who = st.auth.authenticate(headers, rec.client)
    rec.client = who.label
    if st.draining:
        raise ShuttingDown("lmgate is shutting down; try again shortly", retry_after_s=5)
    st.check_service()
    body, hold = await read_body(receive, headers, st.settings.max_body, st.waiting_bytes)
    try:
        return await _admit(st, rec, headers, who, body, hold, path=path, uid=uid, rid=rid,
                            rewrite=rewrite)
    except BaseException:
        if hold is not None:
            hold.release()
        raise


async def _admit(st: AppState, rec: RequestRecord, headers: dict[bytes, bytes], who: Principal,
                 body: bytes, hold: Hold | None, *, path: str, uid: str, rid: str,
                 rewrite: Callable[[bytes], bytes] | None) -> Admission:
    if rewrite is not None:
        body = rewrite(body)
    doc = parse_request(body)
    model = doc["model"]
    stream = doc.get("stream") is True
    rec.model, rec.stream = model, stream
    st.auth.check_model(who, model)
    await st.fleet.check_servable(model)
    reasoning = (stream and rec.route in FEEDBACK_ROUTES
                 and feedback_mode(headers, who, st.settings.feedback) == "reasoning")
    cap = st.auth.token_cap(who, doc, TOKEN_FIELD.get(path))
    body = apply_token_cap(body, doc, cap)
    key, drop_usage, quota_key = who.key, False, None
    if key is not None:
        rec.key = key.name
        if key.has_quota:
            await st.check_quota(key)
            body, drop_usage = ask_for_usage(body, doc, path)
            quota_key = key
    await st.auth.check_rate(who)
    ticket = Ticket(request_id=rid, uid=uid, model=model, identity=who.identity,
                    priority=key.priority if key is not None else 0, max_tokens=token_limit(doc, cap),
                    meta={"client": who.label, "stream": stream, "route": rec.route, "admin": who.admin})
    line = st.line
    try:
        await line.submit(ticket, max_queued=key.max_queued if key is not None else None)
    except KeyQueueFull:
        assert key is not None
        raise QueueFullError(f"key '{key.name}' already has {key.max_queued} requests waiting",
                             code="key_queue_full", retry_after_s=st.eta.retry_after_s(line.view)) from None
    except QueueFull:
        raise QueueFullError(f"the queue is full ({line.view.max_queue} requests waiting); try again "
                             "later", retry_after_s=st.eta.retry_after_s(line.view)) from None
    except GateClosed:
        raise ShuttingDown("lmgate is shutting down") from None
    st.metrics.label(model)  # admitted: claim a label slot, in arrival order
    rec.position = ticket.position_at_arrival
    eta_ms = st.eta.eta_ms(line.view, ticket) if ticket.position_at_arrival > 0 else None
    return Admission(who, ticket, body, hold, stream, reasoning, drop_usage, quota_key, eta_ms)
