"""Targets, the results table, and the JSON document."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .context import DIRECT, HOP, LMGATE


def _none(doc: dict[str, Any]) -> Any:
    return None


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
    hop: Callable[[dict[str, Any]], Any] = _none  # the plain hop's figure
    versus: str = DIRECT                          # what *value* compares lmgate with: direct or hop


def _g(*path: str) -> Callable[[dict[str, Any]], Any]:
    def get(doc: dict[str, Any]) -> Any:
        cur: Any = doc
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur
    return get


A, B, C, D, E = "a_sequential", "b_stream", "c_paced", "d_handoff", "e_scale"
G = "g_two_boxes"


def _added(side: str, key: str, what: str, limit: float | None, base: str = DIRECT,
           label: str = G) -> Target:
    """(g): a latency figure of one side next to its direct baseline, compared as a difference."""
    return Target(label, what, _g(G, "summary", base, key), _g(G, "summary", side, key),
                  _g(G, "summary", side, "added_" + key), "<=", limit)


def _cpu_row(side: str, label: str, limit: float | None = None) -> Target:
    return Target(label, "lmgate CPU per request", _none, _g(G, "summary", side, "lmgate_cpu_ms_per_request"),
                  _g(G, "summary", side, "lmgate_cpu_ms_per_request"), "<=", limit)


def _info_row(side: str | None, key: str, what: str, label: str, unit: str = "") -> Target:
    get = _g(G, "summary", side, key) if side else _g(G, "summary", key)
    return Target(label, what, _none, get, _none, "<=", None, unit)


def _boxes_rows() -> list[Target]:
    """(g): two boxes with 2 connections (the targets), then one box under the same load, then
    one connection (the load of (a)) through the two-box lmgate and through the one-box one."""
    two, one, two_seq, one_seq = "two_boxes", "one_box", "two_boxes_seq", "one_box_seq"
    g1, g2s, g1s = "g_one_box", "g_two_boxes_seq", "g_one_box_seq"
    return [
        _added(two, "p50_ms", "latency p50 (added)", 0.6),
        _added(two, "p99_ms", "latency p99 (added)", None),
        _added(two, "ttfb_p50_ms", "first byte p50 (added)", None),
        _added(two, "ttfb_p99_ms", "first byte p99 (added)", None),
        _cpu_row(two, G, 0.5),
        _info_row(two, "lmgate_busy_pct", "lmgate busy (% of a core)", G, "%"),
        _info_row(None, "split", "requests served by box a / box b", G),
        _info_row(two, "waited", "requests that waited in line", G),
        _added(one, "p50_ms", "latency p50 (added)", None, label=g1),
        _added(one, "p99_ms", "latency p99 (added)", None, label=g1),
        _added(one, "ttfb_p50_ms", "first byte p50 (added)", None, label=g1),
        _cpu_row(one, g1),
        _info_row(one, "lmgate_busy_pct", "lmgate busy (% of a core)", g1, "%"),
        _added(two_seq, "p50_ms", "latency p50 (added)", None, base="direct_seq", label=g2s),
        _added(two_seq, "p99_ms", "latency p99 (added)", None, base="direct_seq", label=g2s),
        _added(two_seq, "ttfb_p50_ms", "first byte p50 (added)", None, base="direct_seq", label=g2s),
        _cpu_row(two_seq, g2s),
        _added(one_seq, "p50_ms", "latency p50 (added)", None, base="direct_seq", label=g1s),
        _added(one_seq, "p99_ms", "latency p99 (added)", None, base="direct_seq", label=g1s),
        _added(one_seq, "ttfb_p50_ms", "first byte p50 (added)", None, base="direct_seq", label=g1s),
        _cpu_row(one_seq, g1s),
        # no lmgate: what a second upstream process alone does to the same load
        _added("direct_both", "p50_ms", "latency p50, a connection per box (vs direct)", None,
               label="g_direct_both"),
        _added("direct_both", "p99_ms", "latency p99, a connection per box (vs direct)", None,
               label="g_direct_both"),
    ]


def _sides(scenario: str, key: str, what: str, op: str, limit: float | None, unit: str = "ms",
           value: str | None = None) -> Target:
    """A figure of every side; *value* (default ``added_<key>``) compares lmgate with direct."""
    return Target(scenario, what, _g(scenario, "summary", DIRECT, key), _g(scenario, "summary", LMGATE, key),
                  _g(scenario, "summary", value or f"added_{key}"), op, limit, unit,
                  hop=_g(scenario, "summary", HOP, key))


def _vs_hop(scenario: str, key: str, what: str, limit: float | None = None, unit: str = "ms",
            op: str = "<=") -> Target:
    """lmgate's figure next to the plain hop's (``<key>`` and ``hop_<key>``), compared by ``vs_hop_<key>``."""
    return Target(scenario, what + ": lmgate vs hop", _none, _g(scenario, "summary", key),
                  _g(scenario, "summary", "vs_hop_" + key), op, limit, unit,
                  hop=_g(scenario, "summary", "hop_" + key), versus=HOP)


def _cpu_rows(scenario: str, per: str, what: str, limit: float) -> list[Target]:
    """(f): lmgate's CPU per unit of work (the target, the hop's figure beside it), then the two
    compared."""
    lm, hop = _g(scenario, "summary", f"lmgate_cpu_ms_{per}"), _g(scenario, "summary", f"hop_cpu_ms_{per}")
    versus = _g(scenario, "summary", f"vs_hop_cpu_ms_{per}")
    return [Target("f_cpu", f"lmgate CPU {what}", _none, lm, lm, "<=", limit, hop=hop),
            Target("f_cpu", f"CPU {what}: lmgate vs hop", _none, lm, versus, "<=", None, hop=hop, versus=HOP)]


TARGETS = [
    _sides(A, "p50_ms", "latency p50 (added)", "<=", 0.5),
    _vs_hop(A, "added_p50_ms", "latency p50 added", 0.0),
    _sides(A, "p99_ms", "latency p99 (added)", "<=", 3.0),
    _vs_hop(A, "added_p99_ms", "latency p99 added"),
    _sides(B, "relay_chunks_per_s", "relay chunks/s (ratio)", ">=", 0.9, "x", "relay_rate_ratio"),
    _vs_hop(B, "relay_rate_ratio", "relay chunks/s ratio", unit="x", op=">="),
    _sides(B, "e2e_chunks_per_s", "end-to-end chunks/s (ratio)", ">=", None, "x", "e2e_rate_ratio"),
    _sides(B, "first_chunk_ms", "first chunk (added)", "<=", 1.0, value="first_chunk_added_ms"),
    _vs_hop(B, "first_chunk_added_ms", "first chunk added"),
    _sides(B, "first_chunk_1_chunk_stream_ms", "first chunk, 1-chunk stream (added)", "<=", None,
           value="first_chunk_1_chunk_stream_added_ms"),
    _sides(C, "first_token_p50", "first token p50 (added)", "<=", 0.5, value="first_token_p50_added_ms"),
    _vs_hop(C, "first_token_p50_added_ms", "first token p50 added"),
    _sides(C, "first_token_p99", "first token p99 (added)", "<=", 2.0, value="first_token_p99_added_ms"),
    _vs_hop(C, "first_token_p99_added_ms", "first token p99 added"),
    _sides(C, "p99", "inter-chunk gap p99 (added)", "<=", 1.0, value="gap_p99_added_ms"),
    _vs_hop(C, "gap_p99_added_ms", "inter-chunk gap p99 added"),
    _sides(C, "p50", "inter-chunk gap p50 (added)", "<=", None, value="gap_p50_added_ms"),
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
    *_boxes_rows(),
    *_cpu_rows(A, "per_request", "per request", 0.4),
    *_cpu_rows(B, "per_1000_chunks", "per 1,000 chunks", 10.0),
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
                     "direct": t.direct(scenarios), "hop": t.hop(scenarios), "lmgate": t.lmgate(scenarios),
                     "value": value, "versus": t.versus,
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
    head = ["scenario", "metric", "direct", "hop", "lmgate", "diff/ratio", "target", "result"]
    body = [[r["scenario"], r["metric"] + (f" [{r['unit']}]" if r["unit"] else ""), fmt(r["direct"]),
             fmt(r.get("hop")), fmt(r["lmgate"]),
             fmt(r["value"]) if r[r.get("versus", DIRECT)] is not None and r["lmgate"] is not None else "-",
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
