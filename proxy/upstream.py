"""The upstream side: one httpx client, request building, error mapping, probes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpx

from .config import Settings
from .errors import ProxyError, UpstreamTimeout, UpstreamUnavailable

try:  # httptools is installed with lmgate where wheels exist; without it httpx's own layer is used
    from .transport import LeanTransport
except ImportError:  # pragma: no cover
    LeanTransport = None  # type: ignore[assignment,misc]

log = logging.getLogger("lmgate")

# RFC 9110 section 7.6.1 plus the de-facto ones; never forwarded in either direction.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
CLIENT_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
RESPONSE_DROP = HOP_BY_HOP | {b"server", b"date"}
PROBE_TIMEOUT_S = 2.0
URL_CACHE_SIZE = 256
ERROR_BODY_CAP = 64 * 1024


def base_url(upstream: str) -> str:
    """The server root: a trailing /v1 (what people paste from their SDK config) is dropped."""
    url = upstream.rstrip("/")
    if urlsplit(url).path.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


class Upstream:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base = base_url(settings.upstream)
        self.key = settings.upstream_key
        self.strip_credentials = bool(settings.keys) or bool(settings.upstream_key)
        self.lean: LeanTransport | None = None
        if transport is None and urlsplit(self.base).scheme == "http" and LeanTransport is not None:
            transport = self.lean = LeanTransport()
        timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                                write=settings.read_timeout, pool=None)
        self.timeouts = timeout.as_dict()
        self._urls: dict[tuple[str, bytes], httpx.URL] = {}
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            trust_env=False,
        )
        self.up: bool | None = None
        self.last_probe = 0.0

    async def aclose(self) -> None:
        await self.client.aclose()

    def build(self, method: str, path: str, query: bytes, headers: Iterable[tuple[bytes, bytes]],
              body: bytes) -> httpx.Request:
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            lname = name.lower()
            if lname in REQUEST_DROP:
                continue
            if self.strip_credentials and lname in CLIENT_CREDENTIALS:
                continue
            out.append((name, value))
        if self.key:
            out.append((b"authorization", b"Bearer " + self.key.encode()))
        return httpx.Request(method, self._url(path, query), headers=out, content=body)

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

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send and return a streaming response, mapping transport failures to ProxyErrors."""
        try:
            if self.lean is not None:
                # straight to the transport: no redirects, cookies or auth flow to run
                request.extensions["timeout"] = self.timeouts
                response = await self.lean.handle_async_request(request)
            else:
                response = await self.client.send(request, stream=True)
        except Exception as exc:
            raise map_error(exc) from exc
        self.up = True
        return response

    def mark_failed(self) -> None:
        self.up = False

    async def probe(self) -> bool:
        """Is the upstream answering at all? Short timeout, any HTTP answer counts."""
        try:
            r = await self.client.get(self.base + "/v1/models", timeout=PROBE_TIMEOUT_S,
                                      headers=self._auth())
            self.up = r.status_code < 500
        except httpx.HTTPError:
            self.up = False
        self.last_probe = time.monotonic()
        return bool(self.up)

    async def loaded_models(self) -> set[str] | None:
        """Which models LM Studio reports as loaded; None if it cannot tell us."""
        for path, parse in (("/api/v1/models", _loaded_v1), ("/api/v0/models", _loaded_v0)):
            try:
                r = await self.client.get(self.base + path, timeout=PROBE_TIMEOUT_S, headers=self._auth())
                if r.status_code != 200:
                    continue
                found = parse(r.json())
            except (httpx.HTTPError, ValueError, TypeError, AttributeError, KeyError):
                continue
            if found is not None:
                return found
        return None

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"} if self.key else {}


def _loaded_v0(doc: object) -> set[str] | None:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    return {m["id"] for m in data if isinstance(m, dict) and m.get("state") == "loaded" and "id" in m}


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
