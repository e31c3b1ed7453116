"""The status page at ``GET /`` rendered by a real headless Chromium against real lmgate and
simulator processes: the JavaScript must fetch ``queue`` and draw the waiting line.

Needs the ``chromium`` binary; without it the test skips, except under CI (``CI=true``), where
it fails. A screenshot is left in ``test-artifacts/status-page.png`` for people to look at."""

from __future__ import annotations

import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, Process, require_program, running_stack

MODEL = "qwen2.5-7b-instruct"
# 5 tokens/s and 40 tokens: each request holds the gate for about 8 s, so the line of three
# stays put while Chromium starts, loads the page and runs its first poll.
TOKENS_PER_S = 5.0
MAX_TOKENS = 40
ARTIFACT = ROOT / "test-artifacts" / "status-page.png"


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

    def __init__(self, url: str, n: int, stop: threading.Event) -> None:
        super().__init__(name=f"streamer-{n}", daemon=True)
        self.url, self.n, self.stop = url, n, stop
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": f"status page request {self.n}"}]}
        try:
            with httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0)) as client, \
                    client.stream("POST", self.url + "/v1/chat/completions", json=body) as res:
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


def wait_for_depth(url: str, depth: int, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    snapshot: dict = {}
    while time.monotonic() < deadline:
        snapshot = httpx.get(url + "/queue", timeout=2.0).json()
        if snapshot["depth"] == depth and snapshot["active"] == 1:
            return snapshot
        time.sleep(0.05)
    raise AssertionError(f"queue never reached depth {depth}; last snapshot: {snapshot}")


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
    warm = httpx.post(gate.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "warm up"}]})
    assert warm.status_code == 200, warm.text
    failed = httpx.post(gate.url + "/v1/chat/completions", timeout=30, json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "fails"}]})
    assert failed.status_code == 404  # a failed request once froze the throughput at "–"
    stop = threading.Event()
    streamers = [Streamer(gate.url, n, stop) for n in range(4)]
    try:
        streamers[0].start()
        wait_for_depth(gate.url, 0)  # the first one is running before the others arrive
        for s in streamers[1:]:
            s.start()
        snapshot = wait_for_depth(gate.url, 3)
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
