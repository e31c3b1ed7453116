"""End to end against a real Prometheus: it scrapes a real lmgate (in front of the simulator)
while traffic runs, and every PromQL expr of the Grafana dashboard is evaluated by it.

Needs the ``prometheus`` binary (Debian: ``apt-get install prometheus``). Without it the
test skips, except under CI (``CI=true``), where it fails. ``promtool check config`` of
``deploy/prometheus/prometheus.yml`` is covered by tests/integration/test_deploy_files.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.simulator import DEFAULT_MODELS, expected_reply  # noqa: E402
from tests.dashboard_exprs import dashboard_exprs
from tests.e2e.helpers import bearer, sdk, wait_until
from tests.servers import Process, free_port, plain_client, require_program, start_lmgate, start_simulator

MODEL_A, MODEL_B, EMBED = DEFAULT_MODELS
USER_KEY = "sk-team-prom-0001"
METRICS_KEY = "sk-scraper-prom-0002"  # lmgate's /metrics needs it once keys are configured
MIN_SCRAPES = 2  # scrapes (1 s apart) that must see the traffic before its last wave
TRAFFIC_MAX_S = 20.0
CORE_METRICS = ("lmgate_queue_depth", "lmgate_queue_wait_seconds", "lmgate_time_to_first_token_seconds",
                "lmgate_completion_tokens_total", "lmgate_requests_total")

pytestmark = pytest.mark.timeout(90)


def _prometheus_binary() -> str:
    return require_program("prometheus", package="prometheus")


class Prometheus:
    """A Prometheus server subprocess on a free loopback port, stopped by PID."""

    def __init__(self, binary: str, tmp: Path, scrape_target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        (tmp / "lmgate-metrics.key").write_text(METRICS_KEY + "\n", encoding="utf-8")
        config.write_text(  # the scrape is authorised as deploy/prometheus/prometheus.yml does it
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: lmgate\n"
            "    metrics_path: /metrics\n"
            "    authorization:\n"
            "      type: Bearer\n"
            "      credentials_file: lmgate-metrics.key\n"
            "    static_configs:\n"
            f"      - targets: ['{scrape_target}']\n",
            encoding="utf-8")
        self.log_path = tmp / "prometheus.log"
        self._log = self.log_path.open("wb")
        self._terminated = False
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp)
        self.http = plain_client(5, base_url=self.url)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}):\n{self.output()}")
            try:
                return self.http.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False
        try:
            wait_until(ready, timeout_s, "prometheus to be ready", interval=0.1)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}:\n{self.output()}") from None

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = self.http.get("/api/v1/query", params=params)
        return {"http_status": r.status_code, **r.json()}

    def vector(self, expr: str, at: float | None = None) -> list[float]:
        doc = self.query(expr, at)
        assert doc["status"] == "success", (expr, doc)
        return [float(s["value"][1]) for s in doc["data"]["result"]]

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting; ``stop`` waits for it."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.terminate()

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Process, Process, Prometheus]]:
    binary = _prometheus_binary()
    started: list[Any] = []
    try:
        sim = start_simulator(tmp_path, tokens_per_s=200.0, load_s=0.05)
        started.append(sim)
        keys = tmp_path / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "team"\nkey = "{USER_KEY}"\n'
                        f'[[keys]]\nname = "prometheus"\nkey = "{METRICS_KEY}"\nrole = "metrics"\n')
        lmgate = start_lmgate(tmp_path, sim.url, "--config", str(keys))
        started.append(lmgate)
        prom = Prometheus(binary, tmp_path, f"127.0.0.1:{lmgate.port}")
        started.append(prom)
        prom.wait_ready()
        yield sim, lmgate, prom
    finally:  # side by side: each asked to stop, then each waited for
        for proc in reversed(started):
            proc.terminate()
        for proc in reversed(started):
            proc.stop()


def one_wave(client: openai.OpenAI, gate: Process, wave: int) -> None:
    """Concurrent chats on two models (queueing, model switches), streaming and not,
    an embedding and two bad requests; checks every answer."""

    def plain(model: str, i: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": f"wave {wave} plain {i}"}]}
        resp = client.chat.completions.create(**body)
        assert resp.choices[0].message.content == expected_reply(body)

    def streamed(model: str, i: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": f"wave {wave} stream {i}"}]}
        stream = client.chat.completions.create(**body, stream=True,
                                                stream_options={"include_usage": True})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == expected_reply(body)

    def embed() -> None:
        resp = client.embeddings.create(model=EMBED, input=f"wave {wave}")
        assert len(resp.data) == 1 and resp.data[0].embedding

    def bad() -> None:
        key = bearer(USER_KEY)
        r = gate.http.post("/v1/chat/completions", content=b"{oops",
                           headers={"content-type": "application/json", **key})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = gate.http.post("/v1/chat/completions", json={"messages": []}, headers=key)
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_model"

    jobs: list[Callable[[], None]] = []
    for i in range(2):
        jobs += [lambda i=i: plain(MODEL_A, i), lambda i=i: streamed(MODEL_B, i),
                 lambda i=i: streamed(MODEL_A, i + 10), lambda i=i: plain(MODEL_B, i + 10)]
    jobs += [embed, bad]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result(30)


def lmgate_metric(gate: Process, name: str) -> float:
    """The sum of one metric's samples, read straight from lmgate's /metrics."""
    total = 0.0
    resp = gate.http.get("/metrics", headers=bearer(METRICS_KEY))
    assert resp.status_code == 200, resp.text
    for line in resp.text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_dashboard_exprs_against_real_prometheus(stack):
    _sim, lmgate, prom = stack

    # Traffic in waves from the start: Prometheus only begins scraping a few seconds after
    # it is ready (its discovery manager batches target updates), so the waves overlap that
    # wait and go on until several scrapes saw the traffic moving, plus one more wave: every
    # rate(...[1m]) window then holds 2+ samples with increases between them.
    client = sdk(lmgate, USER_KEY)
    started = time.monotonic()
    saw_queue = threading.Event()
    stop_watch = threading.Event()

    def watch_queue() -> None:  # proof (from lmgate itself) that requests really queued
        while not stop_watch.is_set():
            if lmgate_metric(lmgate, "lmgate_queue_depth") > 0:
                saw_queue.set()
                return
            time.sleep(0.02)

    def scrapes_with_traffic() -> float:
        return max(prom.vector("min(count_over_time(lmgate_completion_tokens_total[1m]))") or [0.0])

    watcher = threading.Thread(target=watch_queue, daemon=True)
    watcher.start()
    waves = 0
    try:
        while waves < 2 or scrapes_with_traffic() < MIN_SCRAPES:
            assert time.monotonic() - started < TRAFFIC_MAX_S, (
                f"Prometheus saw too little in {TRAFFIC_MAX_S} s ({waves} waves):\n{prom.output()}")
            one_wave(client, lmgate, waves)
            waves += 1
        one_wave(client, lmgate, waves)
        waves += 1
    finally:
        stop_watch.set()
        watcher.join(5)
    assert saw_queue.is_set(), "no request ever waited in the queue"
    assert prom.vector('up{job="lmgate"}') == [1.0]

    # wait for a scrape that saw all of it
    served = float(waves * 11)  # per wave: 8 chats, 1 embedding, 2 bad requests
    wait_until(lambda: lmgate_metric(lmgate, "lmgate_requests_total") == served, 5,
               "lmgate to count every request", interval=0.1)
    wait_until(lambda: prom.vector("sum(lmgate_requests_total)") == [served], 15,
               "a scrape after the traffic", interval=0.1)
    at = time.time()
    samples = prom.vector("min(count_over_time(lmgate_requests_total[1m]))", at)
    assert samples and samples[0] >= MIN_SCRAPES + 1, samples

    exprs = dashboard_exprs()
    assert exprs
    failures = []
    results: dict[str, list[dict[str, Any]]] = {}
    for expr in exprs:
        doc = prom.query(expr, at)
        if doc.get("status") != "success":
            failures.append((expr, doc.get("error")))
            continue
        results[expr] = doc["data"]["result"]
    assert not failures, "exprs Prometheus rejects:\n" + json.dumps(failures, indent=1)

    core = {metric: [e for e in exprs if metric in e] for metric in CORE_METRICS}
    for metric, found in core.items():
        assert found, f"the dashboard has no panel on {metric}"
        for expr in found:
            values = [float(s["value"][1]) for s in results[expr]]
            assert values, f"no data for {expr!r}"
            if "histogram_quantile" in expr:
                assert all(math.isfinite(v) and v >= 0 for v in values), (expr, values)
            elif "rate(" in expr:
                assert sum(values) > 0, (expr, values)

    # a few cross-checks of what Prometheus saw (queried directly: independent of panel text)
    def by_label(expr: str, label: str) -> dict[str, float]:
        doc = prom.query(expr, at)
        assert doc["status"] == "success", doc
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in doc["data"]["result"]}

    by_outcome = by_label("sum by (outcome) (rate(lmgate_requests_total[1m]))", "outcome")
    assert by_outcome.get("ok", 0) > 0 and by_outcome.get("rejected", 0) > 0, by_outcome
    by_reason = by_label("sum by (reason) (increase(lmgate_rejections_total[1m]))", "reason")
    assert {"invalid_json", "missing_model"} <= set(by_reason), by_reason
    by_model = by_label("sum by (model) (rate(lmgate_completion_tokens_total[1m]))", "model")
    assert by_model.get(MODEL_A, 0) > 0 and by_model.get(MODEL_B, 0) > 0, by_model
    assert prom.vector("sum(lmgate_completion_tokens_total)", at) == [
        lmgate_metric(lmgate, "lmgate_completion_tokens_total")]
    assert prom.vector("max_over_time(sum(lmgate_requests_active)[1m:1s])", at)[0] >= 1
    assert prom.vector("sum(increase(lmgate_model_switches_total[5m]))", at)[0] > 0
    assert prom.vector("lmgate_upstream_up", at) == [1.0]
