"""Small statistics helpers (no numpy): percentiles, medians, rounding for the report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return pct(vals, 50) if vals else None


def summary_ms(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    return {"n": len(values_ms), "p50": r(pct(values_ms, 50)), "p90": r(pct(values_ms, 90)),
            "p99": r(pct(values_ms, 99)), "max": r(max(values_ms) if values_ms else None),
            "mean": r(sum(values_ms) / len(values_ms) if values_ms else None)}


def r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else r(a - b)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else r(a / b)
