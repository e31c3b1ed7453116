"""Prometheus metrics on an injected registry (never the global one).

Counters and histograms are updated when a request ends. Gauges that describe the gate
(queue depth, active requests, loaded model, switches) are read from the gate at scrape time
by a collector, so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .gate import Gate, Ticket

OTHER = "other"
WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TTFT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass
class RequestRecord:
    """What one request did; filled in as it goes, observed once when it ends."""

    request_id: str
    route: str
    client: str
    model: str = ""
    stream: bool = False
    status: int = 0
    outcome: str = "ok"
    position: int = -1
    wait_ms: float | None = None
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_approx: bool = False
    total_tokens: int | None = None
    quota_counted: int = 0  # tokens already counted against the key before the response ended
    key: str | None = None  # the API key's name, when keys are configured
    upstream: str = "none"  # the box it ran on
    reason: str | None = None


class ModelLabels:
    """Bounded label values: the first ``cap`` distinct models keep their names."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._seen: set[str] = set()

    def __call__(self, model: str) -> str:
        if not model:
            return "none"
        if model in self._seen:
            return model
        if len(self._seen) < self.cap:
            self._seen.add(model)
            return model
        return OTHER

    def peek(self, model: str) -> str:
        """The label for ``model`` without claiming a slot (for scrape-time readings)."""
        return model if model in self._seen else (OTHER if model else "none")


class GateCollector(Collector):
    def __init__(self, gate_fn: Callable[[], Gate], label: ModelLabels,
                 upstream_up: Callable[[], dict[str, bool | None]],
                 reports_depth: Callable[[], bool] = lambda: True,
                 counts: Callable[[Ticket], bool] | None = None) -> None:
        self.gate_fn = gate_fn
        self.label = label
        self.upstream_up = upstream_up
        self.reports_depth = reports_depth
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        gate = self.gate_fn()
        depth = GaugeMetricFamily("lmgate_queue_depth", "Requests waiting for their turn.", labels=["model"])
        active = GaugeMetricFamily("lmgate_requests_active", "Requests running upstream now.",
                                   labels=["model", "upstream"])
        loaded = GaugeMetricFamily("lmgate_loaded_model", "1 for the model(s) lmgate believes are "
                                   "loaded on each box.", labels=["model", "upstream"])
        folded: dict[str, int] = {}
        for model, n in gate.depth_by_model().items():
            key = self.label.peek(model)
            folded[key] = folded.get(key, 0) + n
        for model, n in (folded or {"none": 0}).items():
            depth.add_metric([model], n)
        running: dict[tuple[str, str], int] = {}
        for t in gate.running:
            if self.counts is None or self.counts(t):
                key = (self.label.peek(t.model), t.box or "")
                running[key] = running.get(key, 0) + 1
        for box in gate.boxes.values():
            if not any(b == box.name for _, b in running):
                running[("none", box.name)] = 0
            for model in sorted(box.loaded):
                loaded.add_metric([model, box.name], 1)  # names from the box itself: bounded
        for (model, box), n in running.items():
            active.add_metric([model, box], n)
        switches = CounterMetricFamily("lmgate_model_switches", "Times a request for another model "
                                       "started after the loaded one (a model swap), per box.",
                                       labels=["upstream"])
        parallel = GaugeMetricFamily("lmgate_parallel", "Slots per box: requests for one model "
                                     "that may run on it at once.", labels=["upstream"])
        slots = GaugeMetricFamily("lmgate_model_slots", "Slots in force for each loaded model "
                                  "on each box (LM Studio's reported parallel in managed mode, "
                                  "unless configured).", labels=["upstream", "model"])
        for box in gate.boxes.values():
            switches.add_metric([box.name], box.switches)
            parallel.add_metric([box.name], box.slots_in_force)
            for model in sorted(box.loaded):
                slots.add_metric([box.name, model], box.slots_for(model))
        up = GaugeMetricFamily("lmgate_upstream_up", "1 if the last check of or request to the box "
                               "succeeded, 0 if it failed.", labels=["upstream"])
        for name, state in self.upstream_up().items():
            up.add_metric([name], 1.0 if state else 0.0)
        if self.reports_depth():
            yield depth
        yield from (active, loaded, switches, parallel, slots, up)


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, max_models: int, max_queue: int) -> None:
        self.registry = registry
        self._children: dict[tuple[Any, ...], Any] = {}
        self.label = ModelLabels(max_models)
        self.key_label = ModelLabels(max_models)  # key names: bounded the same way
        Gauge("lmgate_max_queue", "Configured --max-queue.", registry=registry).set(max_queue)
        Gauge("lmgate_build_info", "lmgate version.", ["version"], registry=registry).labels(
            __version__).set(1)
        self.requests = Counter("lmgate_requests", "Requests by route, model and outcome (ok, "
                                "upstream_error, client_gone, rejected, timeout, shutting_down).",
                                ["route", "model", "outcome", "upstream"], registry=registry)
        self.rejections = Counter("lmgate_rejections", "Requests refused by lmgate, by reason.",
                                  ["reason"], registry=registry)
        self.prompt_tokens = Counter("lmgate_prompt_tokens", "Prompt tokens, from the upstream's "
                                     "usage when it reports one.", ["model"], registry=registry)
        self.completion_tokens = Counter("lmgate_completion_tokens", "Completion tokens: the "
                                         "upstream's usage when present, otherwise approximate "
                                         "(one per streamed content event).", ["model"],
                                         registry=registry)
        self.tokens = Counter("lmgate_tokens", "Tokens used (the upstream's total_tokens, or a "
                              "lower bound when it reports none), by API key ('none' without "
                              "keys); what token quotas count.", ["key"], registry=registry)
        self.model_load = Histogram("lmgate_model_load_seconds", "Loads lmgate made itself "
                                    "(managed mode), by box and model.", ["upstream", "model"],
                                    buckets=LOAD_BUCKETS, registry=registry)
        self.queue_wait = Histogram("lmgate_queue_wait_seconds", "Time from arrival to start.",
                                    ["model"], buckets=WAIT_BUCKETS, registry=registry)
        self.ttft = Histogram("lmgate_time_to_first_token_seconds", "Time from start upstream to "
                              "the first response byte.", ["model"], buckets=TTFT_BUCKETS,
                              registry=registry)
        self.duration = Histogram("lmgate_request_duration_seconds", "Time from arrival to the "
                                  "end of the response.", ["route", "model"],
                                  buckets=DURATION_BUCKETS, registry=registry)

    def attach_gate(self, gate_fn: Callable[[], Gate], upstream_up: Callable[[], dict[str, bool | None]],
                    *, reports_depth: Callable[[], bool] = lambda: True,
                    counts: Callable[[Ticket], bool] | None = None) -> None:
        """Gauges read from the line at scrape time. With replicas, ``reports_depth`` says
        whether this one reports the group's depth (the scheduler does) and ``counts`` which
        running requests are its own."""
        self.registry.register(GateCollector(gate_fn, self.label, upstream_up, reports_depth, counts))

    def observe(self, rec: RequestRecord) -> None:
        # a refused request never claims a label slot: junk model names cannot push real
        # ones into "other"
        if not rec.model:
            model = "none"
        elif rec.outcome == "rejected" or (rec.outcome == "shutting_down" and rec.reason):
            model = self.label.peek(rec.model)
        else:
            model = self.label(rec.model)
        child = self._child
        child(self.requests, rec.route, model, rec.outcome, rec.upstream).inc()
        if rec.outcome in ("rejected", "shutting_down") and rec.reason:
            child(self.rejections, rec.reason).inc()
        if rec.wait_ms is not None:
            child(self.queue_wait, model).observe(rec.wait_ms / 1000)
        if rec.ttft_ms is not None:
            child(self.ttft, model).observe(rec.ttft_ms / 1000)
        child(self.duration, rec.route, model).observe(rec.duration_ms / 1000)
        if rec.prompt_tokens:
            child(self.prompt_tokens, model).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            child(self.completion_tokens, model).inc(rec.completion_tokens)
        if rec.total_tokens:
            child(self.tokens, self.key_label(rec.key or "")).inc(rec.total_tokens)

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: the label values are bounded (models and
        keys fold into ``other``), so the children are too, and a request's metrics skip the
        library's checks and lock."""
        key = (id(metric), *values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found
