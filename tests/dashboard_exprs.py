"""Extract the PromQL expressions of a Grafana dashboard, ready to send to Prometheus.

Grafana's built-in interval/range variables are replaced with fixed values the
way Grafana would render them, so every returned string is plain PromQL:

    $__rate_interval -> 1m     $__range -> 5m     $__interval -> 15s

The dashboard's own template variables (``templating.list``, e.g. ``$upstream``,
``$replica``) are replaced with what Grafana sends when "All" is selected: the
variable's ``allValue`` (``.*`` if it has none), or for a variable without "All" its
current value; a caller may pick other values (``dashboard_exprs(variables=...)``).

Standard library only, so any test (unit, integration, e2e) can import it::

    from tests.dashboard_exprs import dashboard_exprs
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Union

DEFAULT_DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "lmgate.json"

# Values used in place of Grafana's global variables.
GRAFANA_VARS: dict[str, str] = {
    "__rate_interval": "1m",
    "__rate_interval_ms": "60000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
    "__interval": "15s",
    "__interval_ms": "15000",
}

# $name, ${name}, ${name:format} and the deprecated [[name]] / [[name:format]]; the longest
# identifier wins (\w+ is greedy), so $__range_s is not mistaken for $__range followed by "_s".
# A name must start with a letter or "_": "$1" (a label_replace reference) is left alone.
_VAR_RE = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)(?::[^\]]*)?\]\]")

# What a template variable stands for when the dashboard does not say (no allValue).
ALL_VALUE = ".*"


def substitute_grafana_vars(expr: str, values: dict[str, str] | None = None,
                            variables: dict[str, str] | None = None) -> str:
    """Replace Grafana variables in *expr*: the global ``$__x`` ones from *values* (default
    ``GRAFANA_VARS``), the dashboard's own from *variables* (see ``template_values``).
    A variable in neither raises ValueError."""
    table = {**(GRAFANA_VARS if values is None else values), **(variables or {})}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in table:
            raise ValueError(f"unsupported Grafana variable ${name} in expr: {expr!r}")
        return table[name]

    return _VAR_RE.sub(repl, expr)


def template_values(dash: dict) -> dict[str, str]:
    """The dashboard's template variables, each as Grafana renders it with "All" selected
    (``allValue``, else ``ALL_VALUE``); a variable without "All" as its current value
    (the first one of a multi-value selection), else ``ALL_VALUE``."""
    out: dict[str, str] = {}
    for var in (dash.get("templating") or {}).get("list") or []:
        name = var.get("name")
        if not isinstance(name, str) or not name:
            continue
        if var.get("includeAll"):
            out[name] = var.get("allValue") or ALL_VALUE
            continue
        current = (var.get("current") or {}).get("value")
        if isinstance(current, list):
            current = current[0] if current else None
        out[name] = str(current) if current not in (None, "", "$__all") else ALL_VALUE
    return out


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """All panels, including those nested in (collapsed) row panels."""
    for panel in panels or []:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def load_dashboard(path: Union[str, Path, None] = None) -> dict:
    with open(path or DEFAULT_DASHBOARD, encoding="utf-8") as fh:
        dash = json.load(fh)
    # Accept both a bare dashboard and the API's {"dashboard": {...}} envelope.
    return dash.get("dashboard", dash) if isinstance(dash, dict) else dash


def dashboard_exprs(path: Union[str, Path, None] = None,
                    variables: dict[str, str] | None = None) -> list[str]:
    """Every target ``expr`` of every panel in dashboard *path*, Grafana variables (global and
    the dashboard's own) substituted. The dashboard's variables stand for "All" (see
    ``template_values``) unless *variables* gives another value, e.g.
    ``{"replica": "lmgate-1:1235"}`` for one replica selected.

    Order follows the dashboard (panel order, then target order); hidden targets are
    included. Targets without an expr are skipped; the deploy tests check that none are.
    """
    dash = load_dashboard(path)
    variables = {**template_values(dash), **(variables or {})}
    exprs: list[str] = []
    for panel in iter_panels(dash.get("panels", [])):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if not expr:
                continue
            exprs.append(substitute_grafana_vars(expr, variables=variables))
    return exprs


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    for e in dashboard_exprs(sys.argv[1] if len(sys.argv) > 1 else None):
        print(e)
