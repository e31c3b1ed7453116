"""One box as lmgate talks to it: its httpx client (the lean transport for plain http), how
a request for it is built, how its failures map to ProxyErrors, and lmgate's own short
requests to it (probes, listings, loads). Whether the box is up is the fleet's business."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from .config import Settings, UpstreamSpec
from .errors import ProxyError, UpstreamTimeout, UpstreamUnavailable

try:  # httptools is installed with lmgate where wheels exist; without it httpx's own layer is used
    from .transport import LeanTransport, RawRequest, RawResponse
except ImportError:  # pragma: no cover
    LeanTransport = RawRequest = RawResponse = None  # type: ignore[assignment,misc]

log = logging.getLogger("lmgate")

# RFC 9110 section 7.6.1 plus the de-facto ones; never forwarded in either direction.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# The client's X-Request-ID stays with lmgate (some servers refuse an id that is not a UUID):
# the box gets lmgate's own internal id instead.
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-request-id"}
CLIENT_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
# lmgate sets its own id and queue headers; a box behind it (or another lmgate) must not
# put a second, different value beside them
LMGATE_HEADERS = frozenset({b"x-request-id", b"x-upstream", b"x-queue-position", b"x-queue-depth",
                            b"x-queue-wait-ms", b"x-queue-eta-ms"})
RESPONSE_DROP = HOP_BY_HOP | {b"server", b"date"} | LMGATE_HEADERS
PROBE_TIMEOUT_S = 2.0
URL_CACHE_SIZE = 256
ERROR_BODY_CAP = 64 * 1024


def base_url(upstream: str) -> str:
    """The server root, without credentials: a trailing /v1 (what people paste from their SDK
    config) is dropped, and ``user:password@`` is taken out (see ``basic_auth``)."""
    url = upstream.rstrip("/")
    if urlsplit(url).path.endswith("/v1"):
        url = url[: -len("/v1")]
    return redact(url)


def redact(url: str) -> str:
    """The URL as it may be shown anywhere (pages, logs): never with its credentials."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def basic_auth(url: str) -> bytes | None:
    """``Authorization`` value for a URL written as http://user:password@host, else None."""
    parts = urlsplit(url)
    if parts.username is None:
        return None
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return b"Basic " + base64.b64encode(pair)


def upstream_timeouts(settings: Settings) -> dict[str, float | None]:
    """The timeouts every request to a box gets (the httpx names)."""
    return {"connect": settings.connect_timeout, "read": settings.read_timeout,
            "write": settings.read_timeout, "pool": None}


class Upstream:
    """One box: its own connection pool, credentials and health."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None,
                 spec: UpstreamSpec | None = None) -> None:
        spec = spec or settings.boxes()[0]
        self.name = spec.name
        self.spec = spec
        self.base = base_url(spec.url)
        self.key = spec.key or settings.upstream_key
        self.auth_value = (b"Bearer " + self.key.encode()) if self.key else basic_auth(spec.url)
        self.strip_credentials = bool(settings.keys) or self.auth_value is not None
        self.lean: LeanTransport | None = None
        if transport is None and urlsplit(self.base).scheme == "http" and LeanTransport is not None:
            transport = self.lean = LeanTransport()
        timeout = httpx.Timeout(**upstream_timeouts(settings))
        self.timeouts = timeout.as_dict()
        self._urls: dict[tuple[str, bytes], httpx.URL] = {}
        base = httpx.URL(self.base)
        self._host, self._port, self._netloc = base.host, base.port or 80, base.netloc
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            trust_env=False,
        )
        self._own: asyncio.Event | None = None  # set while lmgate's own requests are in flight
        self._own_count = 0

    async def aclose(self) -> None:
        await self.client.aclose()

    def build(self, method: str, path: str, query: bytes, headers: Iterable[tuple[bytes, bytes]],
              body: bytes, request_id: str | None = None) -> httpx.Request | RawRequest:
        """The request for the box: the client's headers without hop-by-hop ones, its
        credentials (when lmgate has keys or the box its own) and its request id; lmgate's
        internal id (a UUID) as ``X-Request-ID`` when given. For the lean transport its head
        is written as bytes at once (what httpx would send: Host first, Content-Length for a
        body)."""
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            lname = name.lower()
            if lname in REQUEST_DROP:
                continue
            if self.strip_credentials and lname in CLIENT_CREDENTIALS:
                continue
            out.append((name, value))
        if self.auth_value is not None:
            out.append((b"authorization", self.auth_value))
        if request_id is not None:
            out.append((b"x-request-id", request_id.encode()))
        if self.lean is None:
            return httpx.Request(method, self._url(path, query), headers=out, content=body)
        parts = [method.encode(), b" ", self._url(path, query).raw_path, b" HTTP/1.1\r\nhost: ",
                 self._netloc, b"\r\n"]
        for name, value in out:
            parts += (name, b": ", value, b"\r\n")
        if body:
            parts += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        parts.append(b"\r\n")
        return RawRequest(method, self._host, self._port, b"".join(parts), body, self.timeouts)

    def _url(self, path: str, query: bytes) -> httpx.URL:
        """Parsed upstream URLs, cached: parsing one costs more than the rest of a request."""
        key = (path, query)
        url = self._urls.get(key)
        if url is None:
            url = httpx.URL(self.base + path + ("?" + query.decode("latin-1") if query else ""))
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.clear()
            self._urls[key] = url
        return url

    async def send(self, request: httpx.Request | RawRequest) -> httpx.Response | RawResponse:
        """Send and return a streaming response, mapping transport failures to ProxyErrors."""
        if self._own is not None:  # let lmgate's own short check finish first: never overlap
            await self._own.wait()
        try:
            if not isinstance(request, httpx.Request):
                # straight to the transport: no redirects, cookies or auth flow to run
                assert self.lean is not None
                response: httpx.Response | RawResponse = await self.lean.send(request)
            else:
                response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            err = map_error(exc)
            err.refused = True  # nothing reached the box: the request may go to another one
            raise err from exc
        except Exception as exc:
            err = map_error(exc)
            err.retry = False  # the request may have reached the box: never resent, by anyone
            raise err from exc
        return response

    async def own_get(self, path: str) -> httpx.Response:
        """One of lmgate's own checks (a probe, a model listing), with a short timeout."""
        return await self._own_request("GET", path, timeout=PROBE_TIMEOUT_S)

    async def own_post(self, path: str, body: dict[str, object], *, timeout: float) -> httpx.Response:
        """lmgate's own POST (a model load or unload in managed mode)."""
        return await self._own_request("POST", path, timeout=timeout, json=body)

    async def _own_request(self, method: str, path: str, *, timeout: float,
                           json: dict[str, object] | None = None) -> httpx.Response:
        """One of lmgate's own requests. The caller makes sure nothing of a client's runs on
        the box (or waits for this one); a request granted meanwhile waits in ``send`` until
        every own request in flight has its answer, so the two never overlap on the box."""
        own = self._own
        if own is None:
            self._own = own = asyncio.Event()
        self._own_count += 1
        try:
            headers = {"authorization": self.auth_value.decode()} if self.auth_value else {}
            return await self.client.request(method, self.base + path, json=json, timeout=timeout,
                                             headers=headers)
        finally:
            self._own_count -= 1
            if not self._own_count:
                self._own = None
                own.set()

    async def open_to_anyone(self) -> bool:
        """Does this box, on an address other machines can reach, answer a model listing
        without a token? (Asked once, at start, before anything else is sent to it.)"""
        host = urlsplit(self.base).hostname or ""
        if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
            return False
        try:
            r = await self.client.get(self.base + "/v1/models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def probe(self) -> bool:
        """Is the upstream answering at all? Short timeout, any answer below 500 counts."""
        try:
            r = await self.own_get("/v1/models")
        except httpx.HTTPError:
            return False
        return r.status_code < 500

    async def models_state(self, *, catalog: bool) -> tuple[set[str] | None, set[str] | None]:
        """What the box has loaded and (``catalog``) what it can serve, from as few of lmgate's
        own requests as it takes: LM Studio 0.4+ answers both in ``GET /api/v1/models``
        (loaded instances; every downloaded model's key); older ones in ``/api/v0/models``
        (``state``) and ``/v1/models`` (ids). None where the box cannot tell."""
        v1 = await self._own_json("/api/v1/models")
        if isinstance(v1, dict) and isinstance(v1.get("models"), list):
            return _loaded_v1(v1), _ids(v1["models"], "key") if catalog else None
        loaded = _loaded_v0(await self._own_json("/api/v0/models"))
        if not catalog:
            return loaded, None
        listing = await self._own_json("/v1/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        return loaded, _ids(data, "id") if isinstance(data, list) else None

    async def _own_json(self, path: str) -> object:
        """The JSON of a 200 answer to one of lmgate's own GETs; None otherwise."""
        try:
            r = await self.own_get(path)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None


def _ids(items: list[object], key: str) -> set[str]:
    return {str(m[key]) for m in items if isinstance(m, dict) and key in m}


def _loaded_v0(doc: object) -> set[str] | None:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    return {str(m["id"]) for m in data if isinstance(m, dict) and m.get("state") == "loaded" and "id" in m}


def _loaded_v1(doc: object) -> set[str] | None:
    # LM Studio 0.4: {"models": [{"key": ..., "loaded_instances": [...]}, ...]}
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        return None
    out: set[str] = set()
    for m in models:
        if isinstance(m, dict) and m.get("loaded_instances"):
            out.add(str(m.get("key") or m.get("id")))
    return out


def map_error(exc: BaseException) -> ProxyError:
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return UpstreamTimeout("the upstream stopped answering (read timeout); the model may still "
                               "be loading or the prompt is very long: raise --read-timeout")
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamUnavailable("cannot connect to the upstream LM Studio server; is it running?")
    if isinstance(exc, httpx.RemoteProtocolError) and "closed the connection" not in str(exc):
        return UpstreamUnavailable(f"the upstream sent a response lmgate cannot relay: {exc}")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return UpstreamUnavailable("the upstream closed the connection before the response was "
                                   "complete (did LM Studio stop or crash?)")
    return UpstreamUnavailable(f"upstream connection failed: {type(exc).__name__}")


async def read_capped(response: httpx.Response, cap: int = ERROR_BODY_CAP) -> bytes:
    """Up to ``cap`` bytes of a (usually error) response body; a broken stream ends it."""
    out = bytearray()
    try:
        async for chunk in response.aiter_raw():
            out += chunk
            if len(out) >= cap:
                break
    except httpx.HTTPError:
        pass
    return bytes(out[:cap])
