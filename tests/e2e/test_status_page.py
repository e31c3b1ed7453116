"""The status page at ``GET /`` rendered by a real headless Chromium: against real lmgate and
simulator processes, the JavaScript must fetch ``queue`` and draw the waiting line; against a
small fake lmgate with fixed answers (``FakeGate``), it must show requests' priorities, a panel
per upstream server when there are several, and, when a key is given, that key's usage (an
admin's: every key's), and show none of these where the server has none to give.

Needs the ``chromium`` binary; without it the tests skip, except under CI (``CI=true``), where
they fail. Screenshots are left in ``test-artifacts/status-page.png``,
``test-artifacts/status-page-usage.png`` and ``test-artifacts/status-page-upstreams.png`` for
people to look at."""

from __future__ import annotations

import re
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.e2e.helpers import MODEL, queue, wait_until
from tests.servers import ROOT, Process, free_port, require_program, running_stack

# 5 tokens/s and 40 tokens: each request holds the gate for about 8 s, so the line of three
# stays put while Chromium starts, loads the page and runs its first poll.
TOKENS_PER_S = 5.0
MAX_TOKENS = 40
ARTIFACT = ROOT / "test-artifacts" / "status-page.png"
USAGE_ARTIFACT = ROOT / "test-artifacts" / "status-page-usage.png"
UPSTREAMS_ARTIFACT = ROOT / "test-artifacts" / "status-page-upstreams.png"
STATUS_HTML = ROOT / "proxy" / "status.html"


@pytest.fixture
def chromium() -> str:
    """The Chromium binary; requested before ``servers`` so a missing one skips at once."""
    return require_program("chromium", "chromium-browser", package="chromium")


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--virtual-time-budget=3000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


class StatusDom(HTMLParser):
    """Pulls out what the test checks: the text of ``#depth`` and ``#rpm`` and the rows of
    ``#waiting``."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = ""
        self.rpm = ""
        self.rows: list[tuple[str | None, list[str]]] = []
        self._in_depth = False
        self._in_rpm = False
        self._in_waiting = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id") == "depth":
            self._in_depth = True
        elif a.get("id") == "rpm":
            self._in_rpm = True
        elif tag == "table" and a.get("id") == "waiting":
            self._in_waiting = True
        elif self._in_waiting and tag == "tr" and "data-position" in a:
            self.rows.append((a["data-position"], []))
        elif self._in_waiting and tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._in_depth = self._in_rpm = False
        elif tag == "table":
            self._in_waiting = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_depth:
            self.depth += data
        if self._in_rpm:
            self.rpm += data
        if self._cell is not None:
            self._cell.append(data)


class Streamer(threading.Thread):
    """One streaming chat completion through lmgate, read until done or until ``stop`` is set.

    While a request waits lmgate sends SSE comments (position changes, keepalives), and while
    it runs the simulator sends tokens, so the loop sees ``stop`` soon; leaving the ``with``
    block closes the connection, which cancels the request in lmgate."""

    def __init__(self, gate: Process, n: int, stop: threading.Event) -> None:
        super().__init__(name=f"streamer-{n}", daemon=True)
        self.gate, self.n, self.stop = gate, n, stop
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": f"status page request {self.n}"}]}
        try:
            with self.gate.http.stream("POST", "/v1/chat/completions", json=body,
                                       timeout=httpx.Timeout(60.0, connect=5.0)) as res:
                self.status = res.status_code
                for _ in res.iter_raw():
                    if self.stop.is_set():
                        break
        except Exception as exc:  # noqa: BLE001 - reported by the test, never raised in a thread
            self.error = exc


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Process, Process]]:
    with running_stack(tmp_path, "--shutdown-grace", "2", tokens_per_s=TOKENS_PER_S, load_s=0.2) as pair:
        yield pair


def wait_for_depth(gate: Process, depth: int, timeout_s: float = 10.0) -> dict:
    def reached() -> dict | None:
        snapshot = queue(gate)
        return snapshot if snapshot["depth"] == depth and snapshot["active"] == 1 else None
    return wait_until(reached, timeout_s, f"one request running and {depth} waiting", interval=0.05)


def number(text: str) -> float:
    """A number shown on the page; NaN for a placeholder such as "–"."""
    try:
        return float(text.strip())
    except ValueError:
        return float("nan")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_status_page_shows_waiting_line(chromium: str, servers: tuple[Process, Process],
                                        tmp_path: Path) -> None:
    _, gate = servers
    # One short request first: lmgate learns a service time (so the line shows estimates) and
    # its history holds a finished request, which the page must show from its first load.
    warm = gate.http.post("/v1/chat/completions", timeout=30, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "warm up"}]})
    assert warm.status_code == 200, warm.text
    failed = gate.http.post("/v1/chat/completions", timeout=30, json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "fails"}]})
    assert failed.status_code == 404  # a failed request once froze the throughput at "–"
    stop = threading.Event()
    streamers = [Streamer(gate, n, stop) for n in range(4)]
    try:
        streamers[0].start()
        wait_for_depth(gate, 0)  # the first one is running before the others arrive
        for s in streamers[1:]:
            s.start()
        snapshot = wait_for_depth(gate, 3)
        assert [w["position"] for w in snapshot["waiting"]] == [1, 2, 3]

        dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", gate.url + "/").stdout
        page = StatusDom()
        page.feed(dom)
        assert page.depth.strip() == "3", f"#depth is {page.depth!r}; DOM:\n{dom[:4000]}"
        assert [pos for pos, _ in page.rows] == ["1", "2", "3"], f"DOM:\n{dom[:4000]}"
        for pos, cells in page.rows:
            assert cells[0] == pos and cells[1] == MODEL, cells
            assert cells[3].startswith("~") and cells[3].endswith(("s", "min")), cells  # ETA
        assert "ETA (est.)" in dom
        # throughput over the last minute from the server's history: the warm-up counts at once
        assert number(page.rpm) > 0, f"#rpm is {page.rpm!r}; DOM:\n{dom[:4000]}"
        assert MODEL in dom

        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.unlink(missing_ok=True)
        run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={ARTIFACT}",
                     "--window-size=1280,900", gate.url + "/")
        assert ARTIFACT.is_file(), "chromium wrote no screenshot"
        assert png_size(ARTIFACT) == (1280, 900)
        assert 10_000 < ARTIFACT.stat().st_size < 10_000_000
    finally:
        stop.set()
        for s in streamers:
            if s.ident is not None:  # started
                s.join(30)
    assert not any(s.is_alive() for s in streamers), "a streaming request did not end"
    for s in streamers:
        assert s.error is None, f"{s.name}: {s.error!r}"
        assert s.status == 200, f"{s.name}: HTTP {s.status}"


# --- priorities and usage, against a fake lmgate ---------------------------------------------
# The server side of both may be newer than this test: the fake answers with the shapes the page
# is written against, so the page is checked on its own.

NASTY_KEY = '<img src=x onerror="document.title=1">'
ALICE_USAGE: dict[str, Any] = {
    "key": "alice",
    "day": {"used": 1200, "limit": 5000, "resets_at": "2026-11-23T00:00:00Z"},
    "month": {"used": 8000, "limit": None, "resets_at": "2026-12-01T00:00:00Z"},
}
ADMIN_USAGE: dict[str, Any] = {"keys": [
    ALICE_USAGE,
    {"key": "bob",
     "day": {"used": 5200, "limit": 5000, "resets_at": "2026-11-23T00:00:00Z"},
     "month": {"used": 30000, "limit": 100000, "resets_at": "2026-12-01T00:00:00Z"}},
    {"key": NASTY_KEY,
     "day": {"used": 0, "limit": None, "resets_at": "2026-11-23T00:00:00Z"},
     "month": {"used": 0, "limit": None, "resets_at": "2026-12-01T00:00:00Z"}},
]}
# key -> (status, body) of GET /usage; any other key, or none, gets 401
USAGE_ANSWERS: dict[str, tuple[int, Any]] = {
    "alice-key": (200, ALICE_USAGE),
    "admin-key": (200, ADMIN_USAGE),
    "old-key": (404, {"error": {"message": "unknown path GET /usage", "type": "not_found_error"}}),
}


def queue_snapshot(*, priorities: bool) -> dict[str, Any]:
    """``GET /queue`` as lmgate answers it: one request running, two waiting; with
    ``priorities`` the first in line has priority 5 (it started ahead of the other)."""
    def ticket(position: int, priority: int, **extra: Any) -> dict[str, Any]:
        return {"request_id": None, "id": None, "model": MODEL, "position": position,
                "position_at_arrival": position, "waited_s": 2.5, "stream": True, "mine": False,
                "priority": priority, **extra}
    return {
        "object": "queue", "depth": 2, "active": 1, "parallel": 1, "max_queue": 100,
        "policy": "fifo", "max_skips": 0, "loaded_models": [MODEL], "model_switches": 0,
        "upstream_up": True, "draining": False, "uptime_s": 120.0,
        "totals": {"served": 7, "failed": 0, "rejected": 0, "completion_tokens": 900},
        "running": [ticket(0, 0, state="running", running_s=3.0)],
        "waiting": [ticket(1, 5 if priorities else 0, state="waiting", eta_ms=6000,
                           request_id="vip-1", id="u-vip-1", mine=True),
                    ticket(2, 0, state="waiting", eta_ms=12000)],
        "waiting_listed": 2,
    }


class FakeGate:
    """A uvicorn server in a thread on 127.0.0.1 that serves ``proxy/status.html`` at ``/`` and
    fixed JSON at ``/queue``, ``/queue/history`` and ``/usage``. ``usage_calls`` records the
    Authorization header of every ``/usage`` request."""

    def __init__(self) -> None:
        self.queue = queue_snapshot(priorities=True)
        self.usage_calls: list[str | None] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[
            Route("/", self._page), Route("/queue", self._queue),
            Route("/queue/history", self._history), Route("/usage", self._usage)])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="fake-lmgate", daemon=True)

    async def _page(self, request: Request) -> Response:
        return HTMLResponse(STATUS_HTML.read_bytes(), headers={"cache-control": "no-cache"})

    async def _queue(self, request: Request) -> Response:
        return JSONResponse(self.queue)

    async def _history(self, request: Request) -> Response:
        return JSONResponse({"now": time.time(), "samples": []})

    async def _usage(self, request: Request) -> Response:
        auth = request.headers.get("authorization")
        self.usage_calls.append(auth)
        key = auth[len("Bearer "):] if auth and auth.startswith("Bearer ") else None
        status, body = USAGE_ANSWERS.get(key or "", (401, {"error": {
            "message": "a valid API key is required", "type": "authentication_error"}}))
        return JSONResponse(body, status_code=status)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake lmgate did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def fake_gate() -> Iterator[FakeGate]:
    gate = FakeGate()
    gate.start()
    try:
        yield gate
    finally:
        gate.stop()


VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
             "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.walk()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and (cls is None or cls in (n.attrs.get("class") or "").split())]

    def by_id(self, ident: str) -> Node:
        for n in self.walk():
            if n.attrs.get("id") == ident:
                return n
        raise AssertionError(f"no element with id {ident!r}")

    def shown(self) -> bool:
        """Neither it nor an ancestor has the ``hidden`` attribute."""
        node: Node | None = self
        while node is not None:
            if "hidden" in node.attrs:
                return False
            node = node.parent
        return True

    def cells(self) -> list[str]:
        return [" ".join(td.text().split()) for td in self.find_all("td")]


class Dom(HTMLParser):
    """The page Chromium dumped, as a tree of ``Node``."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.root = self._cur = Node("#document", {}, None)
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), self._cur)
        self._cur.children.append(node)
        if tag not in VOID_TAGS:
            self._cur = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._cur.children.append(Node(tag, dict(attrs), self._cur))

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self._cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self._cur = node.parent

    def handle_data(self, data: str) -> None:
        self._cur.children.append(data)


def render(chromium: str, profile: Path, url: str) -> tuple[Node, str]:
    dom = run_chromium(chromium, profile, "--dump-dom", url).stdout
    return Dom(dom).root, dom


def table_rows(root: Node, table_id: str) -> list[Node]:
    return [tr for tr in root.by_id(table_id).find_all("tr") if tr.parent and tr.parent.tag == "tbody"]


def shown_headers(root: Node, table_id: str) -> list[str]:
    return [th.text().strip() for th in root.by_id(table_id).find_all("th") if th.shown()]


def amount(used: str, limit: str | None = None) -> re.Pattern[str]:
    """``1,200 / 5,000`` in any locale's digit grouping (``1200``, ``1.200``, ``1 200``)."""
    def num(n: str) -> str:
        return r"\D?".join(re.escape(d) for d in n) if len(n) < 4 else \
            re.escape(n[:-3]) + r"\D?" + re.escape(n[-3:])
    return re.compile(num(used) + (r" / " + num(limit) if limit else r" · no limit"))


def assert_no_error(root: Node, dom: str) -> None:
    body = root.find_all("body")[0]
    assert "failing" not in (body.attrs.get("class") or ""), f"the page shows an error:\n{dom[:3000]}"
    assert root.by_id("error").text().strip() == ""
    assert root.by_id("depth").text().strip() == "2", dom[:3000]  # the queue was drawn


def test_status_page_shows_priorities_and_the_keys_usage(chromium: str, fake_gate: FakeGate,
                                                         tmp_path: Path) -> None:
    root, dom = render(chromium, tmp_path / "profile-alice", fake_gate.url + "/?key=alice-key")
    assert_no_error(root, dom)
    # priorities: a column, and the first in line marked P5
    assert shown_headers(root, "waiting") == ["#", "Priority", "Model", "Waited", "ETA (est.)",
                                              "Who", "Request ID"], dom[:4000]
    assert "Priority" in shown_headers(root, "running")
    rows = table_rows(root, "waiting")
    assert [tr.attrs.get("data-position") for tr in rows] == ["1", "2"]
    first, second = rows[0].cells(), rows[1].cells()
    assert first[:3] == ["1", "P5", MODEL] and second[:3] == ["2", "P0", MODEL], (first, second)
    assert [c.text() for c in rows[0].find_all("span", "prio")] == ["P5"]
    assert table_rows(root, "running")[0].cells()[:2] == ["P0", MODEL]
    # usage: the page asked with the key as a bearer token and drew both periods
    assert fake_gate.usage_calls and set(fake_gate.usage_calls) == {"Bearer alice-key"}
    panel = root.by_id("usage")
    assert panel.shown(), f"no usage panel:\n{dom[:4000]}"
    assert "alice" in root.by_id("usage-who").text()
    periods = {n.attrs["data-period"]: n for n in panel.find_all("div", "period")}
    assert list(periods) == ["day", "month"]
    day, month = periods["day"], periods["month"]
    assert (day.attrs["data-used"], day.attrs["data-limit"]) == ("1200", "5000")
    assert (month.attrs["data-used"], month.attrs["data-limit"]) == ("8000", "")
    assert "Today" in day.text() and amount("1200", "5000").search(day.text()), day.text()
    assert "24 % used" in day.text()
    bars = day.find_all("div", "bar")
    assert len(bars) == 1 and bars[0].attrs.get("aria-valuenow") == "24"
    assert re.search(r"width:\s*24(\.0+)?%", bars[0].find_all("i")[0].attrs.get("style") or "")
    assert "This month" in month.text() and amount("8000").search(month.text()), month.text()
    assert not month.find_all("div", "bar")  # no limit, no bar
    for p in (day, month):
        assert "resets at " in p.text(), p.text()
    assert not root.by_id("usage-all").shown()

    USAGE_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    USAGE_ARTIFACT.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={USAGE_ARTIFACT}",
                 "--window-size=1280,1100", fake_gate.url + "/?key=alice-key")
    assert USAGE_ARTIFACT.is_file() and png_size(USAGE_ARTIFACT) == (1280, 1100)


def test_status_page_shows_every_keys_usage_to_an_admin(chromium: str, fake_gate: FakeGate,
                                                        tmp_path: Path) -> None:
    root, dom = render(chromium, tmp_path / "profile-admin", fake_gate.url + "/?key=admin-key")
    assert_no_error(root, dom)
    assert root.by_id("usage").shown() and root.by_id("usage-all").shown(), dom[:4000]
    assert not root.by_id("usage-mine").shown()
    assert "3 keys" in root.by_id("usage-who").text()
    assert shown_headers(root, "usage-keys") == ["Key", "Today", "This month"]
    rows = {tr.attrs.get("data-key"): tr.cells() for tr in table_rows(root, "usage-keys")}
    assert list(rows) == ["alice", "bob", NASTY_KEY]
    assert amount("1200", "5000").search(rows["alice"][1]) and amount("8000").search(rows["alice"][2])
    assert amount("5200", "5000").search(rows["bob"][1]), rows["bob"]
    # the key name from the server is text, never markup
    assert rows[NASTY_KEY][0] == NASTY_KEY
    assert not root.find_all("img"), "a key name from the server became an element"
    bob = next(tr for tr in table_rows(root, "usage-keys") if tr.attrs.get("data-key") == "bob")
    assert [b.attrs.get("class") for b in bob.find_all("div", "bar")] == ["bar mini over",
                                                                          "bar mini"]
    resets = root.by_id("usage-resets").text()
    assert "Today resets at " in resets and "This month resets at " in resets, resets


@pytest.mark.parametrize("key", [None, "old-key", "wrong-key"])
def test_status_page_without_priorities_or_usage_looks_as_before(
        chromium: str, fake_gate: FakeGate, tmp_path: Path, key: str | None) -> None:
    """No priority anywhere in line: no column. No key: the page never asks for usage. A key
    that an older lmgate (404) or this one (401) turns away: no panel and no error either."""
    fake_gate.queue = queue_snapshot(priorities=False)
    url = fake_gate.url + "/" + (f"?key={key}" if key else "")
    root, dom = render(chromium, tmp_path / "profile", url)
    assert_no_error(root, dom)
    assert shown_headers(root, "waiting") == ["#", "Model", "Waited", "ETA (est.)", "Who",
                                              "Request ID"], dom[:4000]
    assert "Priority" not in shown_headers(root, "running")
    rows = table_rows(root, "waiting")
    assert [tr.cells()[:2] for tr in rows] == [["1", MODEL], ["2", MODEL]]
    assert not root.find_all("span", "prio")
    assert not root.by_id("usage").shown(), dom[:4000]
    assert fake_gate.usage_calls == ([] if key is None else [f"Bearer {key}"])
    assert "upstreams" not in fake_gate.queue
    assert not root.by_id("boxes").shown() and not root.by_id("box-list").find_all("div", "box")
    assert "Upstream" not in shown_headers(root, "running")


# --- several upstream servers, against a fake lmgate -------------------------------------------

NASTY_GLOB = '<img src=x onerror="document.title=2">*'
GPU1 = {"name": "gpu1:1234", "url": "http://gpu1:1234", "up": True, "removed": True,
        "loaded_models": [MODEL], "running": 2, "parallel": 4, "models": ["qwen*", NASTY_GLOB],
        "catalog": 12, "switches": 3}
GPU2 = {"name": "gpu2:1234", "url": "http://gpu2:1234", "up": False, "removed": False,
        "loaded_models": [], "running": 0, "parallel": 1, "models": [], "catalog": None,
        "switches": 0}


def with_upstreams(snapshot: dict[str, Any], boxes: list[dict[str, Any]]) -> dict[str, Any]:
    """``snapshot`` as an lmgate with ``boxes`` answers it: every box listed, the running
    requests on the first box and the waiting ones on none yet."""
    snapshot = {**snapshot, "upstreams": boxes}
    first = boxes[0]["name"] if boxes else None
    snapshot["running"] = [{**r, "upstream": first} for r in snapshot["running"]]
    snapshot["waiting"] = [{**w, "upstream": None} for w in snapshot["waiting"]]
    return snapshot


def box_panels(root: Node) -> dict[str, Node]:
    return {n.attrs["data-upstream"] or "": n for n in root.by_id("box-list").find_all("div", "box")
            if n.shown()}


def badges(panel: Node) -> list[str]:
    return [" ".join(c.text().split()) for c in panel.find_all("span", "chip")
            if c.parent is not None and "head" in (c.parent.attrs.get("class") or "").split()]


def test_status_page_shows_a_panel_per_upstream(chromium: str, fake_gate: FakeGate,
                                                 tmp_path: Path) -> None:
    fake_gate.queue = with_upstreams(queue_snapshot(priorities=False), [GPU1, GPU2])
    root, dom = render(chromium, tmp_path / "profile", fake_gate.url + "/")
    assert_no_error(root, dom)
    assert root.by_id("boxes").shown(), f"no upstream panels:\n{dom[:4000]}"
    assert "1 of 2 up" in root.by_id("boxes-count").text()
    panels = box_panels(root)
    assert list(panels) == ["gpu1:1234", "gpu2:1234"], dom[:4000]
    gpu1, gpu2 = panels["gpu1:1234"], panels["gpu2:1234"]
    # gpu1: up, taken out by a reload and finishing its two requests, half of its four slots
    assert badges(gpu1) == ["up", "removed — finishing"], badges(gpu1)
    assert "removed" in (gpu1.attrs.get("class") or "").split()
    assert [c.text() for c in gpu1.find_all("div", "models")[0].find_all("span", "chip")] == [MODEL]
    assert [b.text() for b in gpu1.find_all("b", "running")] == ["2 / 4"]
    bars = gpu1.find_all("div", "bar")
    assert len(bars) == 1 and bars[0].attrs.get("aria-valuenow") == "50", bars
    assert re.search(r"width:\s*50(\.0+)?%", bars[0].find_all("i")[0].attrs.get("style") or "")
    text = " ".join(gpu1.text().split())
    assert "model switches: 3" in text and "12 models listed" in text, text
    assert [c.text() for c in gpu1.find_all("code")] == ["qwen*", NASTY_GLOB]
    assert [n.attrs.get("title") for n in gpu1.find_all("span", "name")] == ["http://gpu1:1234"]
    # gpu2: down, nothing loaded, one slot free, no catalog and no model globs
    assert badges(gpu2) == ["down"], badges(gpu2)
    assert [c.attrs.get("class") for c in gpu2.find_all("span", "chip")] == ["chip down"]
    assert "removed" not in (gpu2.attrs.get("class") or "").split()
    assert [b.text() for b in gpu2.find_all("b", "running")] == ["0 / 1"]
    text = " ".join(gpu2.text().split())
    assert "no model loaded" in text and "model switches: 0" in text, text
    assert "models listed" not in text and not gpu2.find_all("code"), text
    # the running table says where each request runs; the waiting line is as it was
    assert shown_headers(root, "running") == ["Model", "Upstream", "Running", "Stream",
                                              "Request ID", "Who"], dom[:4000]
    assert [tr.cells()[:2] for tr in table_rows(root, "running")] == [[MODEL, "gpu1:1234"]]
    assert shown_headers(root, "waiting") == ["#", "Model", "Waited", "ETA (est.)", "Who",
                                              "Request ID"]
    # strings from the server are text, never markup; the header chip still says "upstream up"
    assert not root.find_all("img"), "a string from the server became an element"
    assert root.by_id("upstream").text().strip() == "upstream up"

    UPSTREAMS_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    UPSTREAMS_ARTIFACT.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={UPSTREAMS_ARTIFACT}",
                 "--window-size=1280,1000", fake_gate.url + "/")
    assert UPSTREAMS_ARTIFACT.is_file() and png_size(UPSTREAMS_ARTIFACT) == (1280, 1000)


@pytest.mark.parametrize("boxes", [None, [], [{**GPU2, "name": "localhost:1234", "up": True}]],
                         ids=["absent", "empty", "one"])
def test_status_page_with_one_upstream_shows_no_panels(chromium: str, fake_gate: FakeGate,
                                                       tmp_path: Path,
                                                       boxes: list[dict[str, Any]] | None) -> None:
    """An lmgate without ``upstreams`` (older), or with one box: the page as it always was."""
    snapshot = queue_snapshot(priorities=False)
    fake_gate.queue = snapshot if boxes is None else with_upstreams(snapshot, boxes)
    root, dom = render(chromium, tmp_path / "profile", fake_gate.url + "/")
    assert_no_error(root, dom)
    assert not root.by_id("boxes").shown(), dom[:4000]
    assert not box_panels(root) and not root.by_id("box-list").find_all("div", "box")
    assert shown_headers(root, "running") == ["Model", "Running", "Stream", "Request ID", "Who"]
    assert [len(tr.find_all("td")) for tr in table_rows(root, "running")] == [5]
    assert root.by_id("upstream").text().strip() == "upstream up"
