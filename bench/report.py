"""Targets, the results table, and the JSON document."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .context import DIRECT, LMGATE


@dataclass(frozen=True)
class Target:
    scenario: str
    metric: str
    direct: Callable[[dict[str, Any]], Any]
    lmgate: Callable[[dict[str, Any]], Any]
    value: Callable[[dict[str, Any]], Any]       # what is compared with the limit
    op: str                                       # "<=" or ">="
    limit: float | None                           # None: shown for information only
    unit: str = "ms"


def _g(*path: str) -> Callable[[dict[str, Any]], Any]:
    def get(doc: dict[str, Any]) -> Any:
        cur: Any = doc
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur
    return get


def _none(doc: dict[str, Any]) -> Any:
    return None


A, B, C, D, E = "a_sequential", "b_stream", "c_paced", "d_handoff", "e_scale"
TARGETS = [
    Target(A, "latency p50 (added)", _g(A, "summary", DIRECT, "p50_ms"), _g(A, "summary", LMGATE, "p50_ms"),
           _g(A, "summary", "added_p50_ms"), "<=", 0.6),
    Target(A, "latency p99 (added)", _g(A, "summary", DIRECT, "p99_ms"), _g(A, "summary", LMGATE, "p99_ms"),
           _g(A, "summary", "added_p99_ms"), "<=", 3.0),
    Target(B, "relay chunks/s (ratio)", _g(B, "summary", DIRECT, "relay_chunks_per_s"),
           _g(B, "summary", LMGATE, "relay_chunks_per_s"), _g(B, "summary", "relay_rate_ratio"), ">=", 0.9,
           "x"),
    Target(B, "end-to-end chunks/s (ratio)", _g(B, "summary", DIRECT, "e2e_chunks_per_s"),
           _g(B, "summary", LMGATE, "e2e_chunks_per_s"), _g(B, "summary", "e2e_rate_ratio"), ">=", None, "x"),
    Target(B, "first chunk (added)", _g(B, "summary", DIRECT, "first_chunk_ms"),
           _g(B, "summary", LMGATE, "first_chunk_ms"), _g(B, "summary", "first_chunk_added_ms"), "<=", 1.0),
    Target(B, "first chunk, 1-chunk stream (added)",
           _g(B, "summary", DIRECT, "first_chunk_1_chunk_stream_ms"),
           _g(B, "summary", LMGATE, "first_chunk_1_chunk_stream_ms"),
           _g(B, "summary", "first_chunk_1_chunk_stream_added_ms"), "<=", None),
    Target(C, "inter-chunk gap p99 (added)", _g(C, "summary", DIRECT, "p99"), _g(C, "summary", LMGATE, "p99"),
           _g(C, "summary", "gap_p99_added_ms"), "<=", 1.0),
    Target(C, "inter-chunk gap p50 (added)", _g(C, "summary", DIRECT, "p50"), _g(C, "summary", LMGATE, "p50"),
           _g(C, "summary", "gap_p50_added_ms"), "<=", None),
    Target(D, "handoff gap p50 (direct: client turnaround)", _g(D, "summary", DIRECT, "p50"),
           _g(D, "summary", LMGATE, "p50"), _g(D, "summary", LMGATE, "p50"), "<=", 1.0),
    Target(D, "handoff gap p99", _g(D, "summary", DIRECT, "p99"), _g(D, "summary", LMGATE, "p99"),
           _g(D, "summary", LMGATE, "p99"), "<=", None),
    Target(E, "RSS with all waiting", _none, _g(E, "summary", "rss_waiting_mb"),
           _g(E, "summary", "rss_waiting_mb"), "<=", 300.0, "MB"),
    Target(E, "GET /queue p99 while waiting", _none, _g(E, "summary", "queue_get_ms", "p99"),
           _g(E, "summary", "queue_get_ms", "p99"), "<=", 50.0),
    Target(E, "CPU while waiting (% of a core)", _none, _g(E, "summary", "cpu_waiting_pct_of_core"),
           _g(E, "summary", "cpu_waiting_pct_of_core"), "<=", None, "%"),
    Target(E, "admission per client", _none, _g(E, "summary", "admit_per_client_ms"),
           _g(E, "summary", "admit_per_client_ms"), "<=", None),
    Target(E, "drain: clients served per s", _none, _g(E, "summary", "served_per_s"),
           _g(E, "summary", "served_per_s"), ">=", None, "/s"),
    Target("f_cpu", "lmgate CPU per request", _none, _g(A, "summary", "lmgate_cpu_ms_per_request"),
           _g(A, "summary", "lmgate_cpu_ms_per_request"), "<=", 0.5),
    Target("f_cpu", "lmgate CPU per 1,000 chunks", _none, _g(B, "summary", "lmgate_cpu_ms_per_1000_chunks"),
           _g(B, "summary", "lmgate_cpu_ms_per_1000_chunks"), "<=", 10.0),
    Target("f_cpu", "client CPU per request (bench's own cost)",
           _g(A, "summary", "client_cpu_ms_per_request"), _none,
           _g(A, "summary", "client_cpu_ms_per_request"), "<=", None),
    Target("f_cpu", "fake upstream CPU per request", _g(A, "summary", "upstream_cpu_ms_per_request"), _none,
           _g(A, "summary", "upstream_cpu_ms_per_request"), "<=", None),
]


def evaluate(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        value = t.value(scenarios)
        if t.limit is None:
            verdict = "info"
        elif not isinstance(value, (int, float)):
            verdict = "n/a"
        elif t.op == "<=":
            verdict = "pass" if value <= t.limit else "FAIL"
        else:
            verdict = "pass" if value >= t.limit else "FAIL"
        rows.append({"scenario": t.scenario, "metric": t.metric, "unit": t.unit,
                     "direct": t.direct(scenarios), "lmgate": t.lmgate(scenarios), "value": value,
                     "target": None if t.limit is None else f"{t.op} {t.limit:g}", "result": verdict})
    return rows


def checks(scenarios: dict[str, Any]) -> dict[str, bool]:
    """Every correctness check of every scenario, flattened: ``scenario.check``."""
    out: dict[str, bool] = {}
    for name, doc in scenarios.items():
        if not isinstance(doc, dict):
            continue
        if doc.get("error"):
            out[f"{name}.ran"] = False
        for key, value in (doc.get("checks") or {}).items():
            if isinstance(value, bool):
                out[f"{name}.{key}"] = value
    return out


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "metric", "direct", "lmgate", "diff/ratio", "target", "result"]
    body = [[r["scenario"], r["metric"] + (f" [{r['unit']}]" if r["unit"] else ""), fmt(r["direct"]),
             fmt(r["lmgate"]),
             fmt(r["value"]) if r["direct"] is not None and r["lmgate"] is not None else "-",
             r["target"] or "-", r["result"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def checks_text(found: dict[str, bool]) -> str:
    bad = [k for k, v in found.items() if not v]
    if not bad:
        return f"correctness checks: all {len(found)} passed"
    return f"correctness checks: {len(bad)} of {len(found)} FAILED: " + ", ".join(bad)
