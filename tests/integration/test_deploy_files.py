"""Static checks of the deployment files (Dockerfile, compose, Prometheus, Grafana, systemd,
and the replicated stack in deploy/replicas: Valkey, two lmgate replicas, HAProxy).

No network and no Docker daemon needed. Optional tools are used when present:
``docker compose`` (``config -q`` works without a daemon), ``promtool`` (config and
PromQL syntax), ``haproxy`` (``-c``: config check), ``systemd-analyze`` (unit file); each
such test skips otherwise, except the promtool and haproxy ones, which fail instead when
``CI=true`` (CI installs Prometheus and HAProxy, not Docker).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.dashboard_exprs import dashboard_exprs, iter_panels, substitute_grafana_vars
from tests.servers import require_program

yaml = pytest.importorskip("yaml")  # PyYAML: part of the test extra

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DS_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "dashboards" / "lmgate.yml"
DASHBOARDS_DIR = DEPLOY / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS_DIR / "lmgate.json"
SYSTEMD_UNIT = DEPLOY / "systemd" / "lmgate.service"
WINDOWS_README = DEPLOY / "windows" / "README.md"
DEPLOY_README = DEPLOY / "README.md"

REPLICAS = DEPLOY / "replicas"
R_COMPOSE = REPLICAS / "docker-compose.yml"
R_HAPROXY = REPLICAS / "haproxy.cfg"
R_PROM_CONFIG = REPLICAS / "prometheus.yml"
R_LMGATE_TOML = REPLICAS / "lmgate.toml"
R_README = REPLICAS / "README.md"
REPLICA_SERVICES = ("lmgate-1", "lmgate-2")

DATASOURCE_UID = "lmgate-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}


def _require_tool(name: str, hint: str) -> str:
    return require_program(name, package=hint.rsplit(" ", 1)[-1])


def _yaml(path: Path):
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict:
    data = _yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as fh:
        return json.load(fh)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _volume_targets(service: dict) -> dict[str, str]:
    """host/source path -> container path for short- and long-syntax volumes."""
    out = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
        else:
            out[str(vol.get("source"))] = str(vol.get("target"))
    return out


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


# --------------------------------------------------------------------------- compose


def test_compose_has_three_services(compose):
    assert {"lmgate", "prometheus", "grafana"} <= set(compose["services"])


def test_compose_images_are_pinned(compose):
    assert_images_pinned(compose)


def assert_images_pinned(compose: dict) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image")
        if image is None:
            assert "build" in svc, f"service {name} has neither image nor build"
            continue
        if "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        assert ":" in last, f"service {name}: image {image!r} has no tag"
        tag = last.split(":", 1)[1]
        assert tag and tag != "latest", f"service {name}: image {image!r} is not pinned"
        if "build" not in svc:
            # third-party images: a version-looking tag, not a moving one
            assert re.search(r"\d+\.\d+", tag), f"service {name}: tag {tag!r} is not a version"


def test_compose_lmgate_service(compose):
    svc = compose["services"]["lmgate"]
    build = svc["build"]
    context = build if isinstance(build, str) else build["context"]
    assert (DEPLOY / context).resolve() == ROOT
    assert any(str(p).strip('"') in ("1235:1235", "0.0.0.0:1235:1235") for p in svc["ports"])
    env = _env(svc)
    assert "host.docker.internal:1234" in env["LMGATE_UPSTREAM"]
    assert "host.docker.internal:host-gateway" in svc["extra_hosts"]
    assert svc.get("restart") == "unless-stopped"
    # a healthcheck here, or the Dockerfile's
    has_dockerfile_hc = any(w == "HEALTHCHECK" for w, _ in _dockerfile_instructions())
    hc = svc.get("healthcheck")
    assert hc or has_dockerfile_hc
    if hc:
        assert not hc.get("disable")
        assert "/healthz" in json.dumps(hc["test"])
    # a named volume on the image's state dir: jobs and quotas outlive the container
    state = [v for v in svc.get("volumes", []) if str(v).endswith(":/var/lib/lmgate")]
    assert state and str(state[0]).split(":")[0] in compose.get("volumes", {}), svc.get("volumes")


def test_compose_prometheus_service(compose):
    svc = compose["services"]["prometheus"]
    assert any(str(p).strip('"').endswith("9090:9090") for p in svc["ports"])
    mounts = _volume_targets(svc)
    assert "./prometheus/prometheus.yml" in mounts
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()
    target = mounts["./prometheus/prometheus.yml"]
    cmd = svc.get("command")
    if cmd:  # a custom command must still point at the mounted file
        assert f"--config.file={target}" in (cmd if isinstance(cmd, str) else " ".join(cmd))
    else:
        assert target == "/etc/prometheus/prometheus.yml"


def test_compose_grafana_service(compose):
    svc = compose["services"]["grafana"]
    assert any(str(p).strip('"').endswith("3000:3000") for p in svc["ports"])
    env = _env(svc)
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "").lower() == "true"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    assert env.get("GF_SECURITY_ADMIN_PASSWORD")
    mounts = _volume_targets(svc)
    assert mounts.get("./grafana/provisioning") == "/etc/grafana/provisioning"
    assert "./grafana/dashboards" in mounts
    for src in ("./grafana/provisioning", "./grafana/dashboards"):
        assert (DEPLOY / src).is_dir()


def test_dashboard_provider_points_at_mounted_folder(compose):
    mounts = _volume_targets(compose["services"]["grafana"])
    data = _yaml(DASH_PROVISIONING)
    assert data["apiVersion"] == 1
    providers = data["providers"]
    assert len(providers) >= 1
    file_providers = [p for p in providers if p.get("type", "file") == "file"]
    assert any(p["options"]["path"].rstrip("/") == mounts["./grafana/dashboards"].rstrip("/")
               for p in file_providers)
    home = _env(compose["services"]["grafana"]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home.startswith(mounts["./grafana/dashboards"].rstrip("/") + "/")
        assert (DASHBOARDS_DIR / Path(home).name).is_file()


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")  # standalone v2 binary; v1 lacks the `name:` key
    if legacy:
        probe = subprocess.run([legacy, "version", "--short"], capture_output=True, text=True,
                               timeout=60)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return [legacy]
    return None


def test_docker_compose_config_validates():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("docker compose CLI not available")
    proc = subprocess.run(cli + ["-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_config_scrapes_lmgate():
    cfg = _yaml(PROM_CONFIG)
    assert cfg["global"]["scrape_interval"] == "15s"
    jobs = [j for j in cfg["scrape_configs"]
            if any("lmgate:1235" in t for sc in j.get("static_configs", []) for t in sc["targets"])]
    assert len(jobs) == 1
    job = jobs[0]
    assert job.get("scrape_interval") == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # with [[keys]], /metrics needs a key: the scrape carries one, from a file beside the config
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "lmgate-metrics.key"}
    assert (PROM_CONFIG.parent / "lmgate-metrics.key").read_text().strip()


def test_compose_gives_prometheus_its_metrics_key(compose):
    mounts = [v.split(":") for v in compose["services"]["prometheus"]["volumes"]]
    assert ["./prometheus/lmgate-metrics.key", "/etc/prometheus/lmgate-metrics.key", "ro"] in mounts


def test_promtool_check_config():
    promtool = _require_tool("promtool", "apt-get install prometheus")
    proc = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_parses_dashboard_exprs(tmp_path):
    """Every dashboard expr is valid PromQL (checked as recording rules, offline)."""
    _promtool_check_exprs(tmp_path, dashboard_exprs(DASHBOARD))


def _promtool_check_exprs(tmp_path: Path, exprs: list[str]) -> None:
    promtool = _require_tool("promtool", "apt-get install prometheus")
    rules = {"groups": [{"name": "lmgate_dashboard", "rules": [
        {"record": f"lmgate_dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- Grafana


def test_datasource_provisioning():
    data = _yaml(DS_PROVISIONING)
    assert data["apiVersion"] == 1
    (ds,) = [d for d in data["datasources"] if d["name"] == "Prometheus"]
    assert ds["uid"] == DATASOURCE_UID
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    assert ds["isDefault"] is True


def test_dashboard_metadata(dashboard):
    assert dashboard["uid"] == "lmgate"
    assert dashboard["title"] == "lmgate"
    assert dashboard["refresh"] == "5s"
    assert dashboard["time"] == {"from": "now-30m", "to": "now"}
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_dashboard_uids_unique():
    uids = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        dash = json.loads(path.read_text(encoding="utf-8"))
        uids.append(dash["uid"])
        panel_uids = [p["uid"] for p in iter_panels(dash["panels"]) if "uid" in p]
        assert len(panel_uids) == len(set(panel_uids)), path
    assert len(uids) == len(set(uids))


def test_dashboard_panels(dashboard):
    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    data_panels = [p for p in panels if p.get("type") != "row"]
    assert len(data_panels) >= 12
    for p in data_panels:
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "text"}, p["title"]
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p.get("gridPos"), p["title"]
        targets = p.get("targets") or []
        assert targets, p["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), p["title"]
            assert "legendFormat" in t, p["title"]
            assert t.get("datasource", DATASOURCE) == DATASOURCE, p["title"]


def test_dashboard_has_only_provisioned_datasource(dashboard):
    """No other datasource reference anywhere (e.g. ${DS_PROMETHEUS} from an export)."""
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "datasource" in node:
                refs.append(node["datasource"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    assert refs and all(r == DATASOURCE for r in refs), refs
    assert "${DS_" not in json.dumps(dashboard)


def test_dashboard_covers_metric_families():
    text = "\n".join(dashboard_exprs(DASHBOARD))
    for metric in [
        "lmgate_queue_depth", "lmgate_requests_active", "lmgate_loaded_model",
        "lmgate_queue_wait_seconds_bucket", "lmgate_time_to_first_token_seconds_bucket",
        "lmgate_completion_tokens_total", "lmgate_prompt_tokens_total", "lmgate_requests_total",
        "lmgate_rejections_total", "lmgate_upstream_up", "lmgate_model_switches_total",
        "lmgate_request_duration_seconds_bucket", "lmgate_max_queue", "lmgate_parallel",
    ]:
        assert re.search(rf"\b{metric}\b", text), metric


def test_dashboard_exprs_helper():
    exprs = dashboard_exprs(DASHBOARD)
    with open(DASHBOARD, encoding="utf-8") as fh:
        raw = [t["expr"] for p in iter_panels(json.load(fh)["panels"]) for t in p.get("targets", [])]
    assert len(exprs) == len(raw)
    assert any("[$__rate_interval]" in e for e in raw)
    for e in exprs:
        assert "$" not in e, e
        assert e.count("(") == e.count(")") and e.count("[") == e.count("]"), e
    assert ("histogram_quantile(0.95, sum by (le) "
            "(rate(lmgate_queue_wait_seconds_bucket{instance=~\".*\"}[1m])))") in exprs
    # one replica picked instead of All
    one = dashboard_exprs(DASHBOARD, variables={"replica": "lmgate-1:1235"})
    assert len(one) == len(exprs)
    assert ('sum(lmgate_queue_depth{instance=~"lmgate-1:1235"})') in one
    assert substitute_grafana_vars("rate(x[$__rate_interval]) + increase(y[${__range}])"
                                   " + z[$__interval] + $__range_s") == \
        "rate(x[1m]) + increase(y[5m]) + z[15s] + 300"
    with pytest.raises(ValueError):
        substitute_grafana_vars("rate(x[$__unknown])")


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile():
    ins = _dockerfile_instructions()
    words = [w for w, _ in ins]
    from_ = [rest for w, rest in ins if w == "FROM"]
    assert from_ and re.match(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]+)?$", from_[-1].split()[0]), from_
    users = [rest for w, rest in ins if w == "USER"]
    assert users, "Dockerfile needs a USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    # the runtime user is set after the last RUN, so the container does not run as root
    assert max(i for i, w in enumerate(words) if w == "USER") > max(
        i for i, w in enumerate(words) if w == "RUN")
    assert any(w == "EXPOSE" and "1235" in rest.split() for w, rest in ins)
    hc = [rest for w, rest in ins if w == "HEALTHCHECK"]
    assert hc and "127.0.0.1:1235/healthz" in hc[-1] and "urllib" in hc[-1]
    assert any(w == "ENV" and re.search(r"LMGATE_HOST=0\.0\.0\.0", rest) for w, rest in ins)
    assert ("ENTRYPOINT", '["lmgate"]') in ins
    copied = " ".join(rest for w, rest in ins if w == "COPY")
    for item in ("pyproject.toml", "README.md", "proxy/"):
        assert item in copied, item
    assert any(w == "RUN" and "pip install --no-cache-dir ." in rest for w, rest in ins)
    # the state dir (jobs, quotas) is the user's and a volume, so it outlives the container
    assert any(w == "ENV" and "LMGATE_STATE_DIR=/var/lib/lmgate" in rest for w, rest in ins)
    assert any(w == "VOLUME" and "/var/lib/lmgate" in rest for w, rest in ins)
    assert any(w == "RUN" and re.search(r"install -d -o 10001 -g 10001 .*/var/lib/lmgate", rest)
               for w, rest in ins)


def test_dockerignore_keeps_build_inputs():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert ".git" in patterns
    for needed in ("pyproject.toml", "README.md", "proxy", "proxy/"):
        assert needed not in patterns
    assert not any(p in ("*", "**") for p in patterns)


# --------------------------------------------------------------------------- systemd / docs


def test_systemd_unit():
    text = SYSTEMD_UNIT.read_text(encoding="utf-8")
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, _, v = line.partition("=")
            settings.setdefault(k.strip(), v.strip())
    assert settings["ExecStart"] == "/opt/lmgate/venv/bin/lmgate --config /etc/lmgate/lmgate.toml"
    assert settings["Restart"] == "on-failure"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings.get("DynamicUser") == "yes" or settings.get("User") not in (None, "root")
    assert settings["WantedBy"] == "multi-user.target"
    assert text.startswith("#")  # install instructions header


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze not available")
    unit = tmp_path / "lmgate.service"
    # the real binary is not installed here: verify everything else
    unit.write_text(SYSTEMD_UNIT.read_text(encoding="utf-8").replace(
        "/opt/lmgate/venv/bin/lmgate", shutil.which("true") or "/bin/true"), encoding="utf-8")
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "lmgate.service" not in proc.stderr + proc.stdout:
        pytest.skip(f"systemd-analyze unusable here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_windows_readme():
    text = WINDOWS_README.read_text(encoding="utf-8")
    for needle in ("-m venv", "schtasks /Create", "/SC ONLOGON", "nssm install lmgate",
                   "New-NetFirewallRule", "1235", "lms server start", "Developer"):
        assert needle in text, needle


def test_deploy_readme():
    text = DEPLOY_README.read_text(encoding="utf-8")
    for needle in ("docker compose up -d --build", ":1235", ":9090", ":3000", "LMGATE_UPSTREAM",
                   "lmgate"):
        assert needle in text, needle


# --------------------------------------------------------------------------- Grafana: replicas

LMGATE_SELECTOR = re.compile(r"\b(lmgate_[a-z0-9_]+)\b(\{[^}]*\})?")
REPLICA_MATCHER = 'instance=~"$replica"'


def _replica_variable(dashboard: dict) -> dict:
    found = [v for v in dashboard["templating"]["list"] if v.get("name") == "replica"]
    assert len(found) == 1, [v.get("name") for v in dashboard["templating"]["list"]]
    return found[0]


def test_dashboard_replica_variable(dashboard):
    var = _replica_variable(dashboard)
    assert var["type"] == "query"
    assert var["datasource"] == DATASOURCE
    assert re.fullmatch(r"label_values\(lmgate_\w+(\{[^}]*\})?, instance\)", var["query"]), var["query"]
    assert var.get("definition", var["query"]) == var["query"]
    assert var["includeAll"] is True and var["multi"] is True
    # "All" is the default, and what it sends matches every series: the one lmgate of the
    # single-instance stack (instance "lmgate:1235"), each replica, and a series without the label
    assert var["current"]["value"] in ("$__all", ["$__all"])
    assert var["current"]["text"] in ("All", ["All"])
    all_value = var.get("allValue") or ".*"
    for instance in ("lmgate:1235", "lmgate-1:1235", "lmgate-2:1235", "127.0.0.1:41235", ""):
        assert re.fullmatch(all_value, instance), (all_value, instance)


def test_dashboard_queries_select_the_replica(dashboard):
    """Every lmgate series a panel reads is narrowed by the Replica selector."""
    checked = 0
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets") or []:
            for m in LMGATE_SELECTOR.finditer(target["expr"]):
                metric, matchers = m.group(1), m.group(2) or ""
                assert REPLICA_MATCHER in matchers, (panel["title"], metric, target["expr"])
                checked += 1
    assert checked >= 25


def test_dashboard_keeps_the_upstream_selector(dashboard):
    """Panels on per-box series still follow the Upstream selector as well."""
    per_box = ("lmgate_loaded_model", "lmgate_upstream_up", "lmgate_parallel",
               "lmgate_model_switches_total", "lmgate_requests_active", "lmgate_requests_total")
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets") or []:
            for m in LMGATE_SELECTOR.finditer(target["expr"]):
                if m.group(1) in per_box:
                    assert 'upstream=~"$upstream"' in (m.group(2) or ""), (panel["title"], target["expr"])


def test_dashboard_shows_replicas(dashboard):
    """The scheduler and the spread of requests over the replicas have panels of their own."""
    by_title = {p.get("title"): p for p in iter_panels(dashboard["panels"])}
    for title in ("Scheduler", "Requests by replica", "Active requests by replica"):
        assert title in by_title, title
        target = by_title[title]["targets"][0]
        assert "by (instance)" in target["expr"] and target["legendFormat"] == "{{instance}}", title
    assert "lmgate_queue_depth" in by_title["Scheduler"]["targets"][0]["expr"]


@pytest.mark.parametrize("replica", ["lmgate-1:1235", "(lmgate-1:1235|lmgate-2:1235)"])
def test_promtool_parses_dashboard_exprs_for_one_replica(tmp_path, replica):
    """With one replica (or two of them) picked instead of All, every expr is still PromQL."""
    exprs = dashboard_exprs(DASHBOARD, variables={"replica": replica})
    assert exprs and all(f'instance=~"{replica}"' in e for e in exprs if "lmgate_" in e)
    _promtool_check_exprs(tmp_path, exprs)


# --------------------------------------------------------------------------- replicas: helpers


def _duration_s(value: object) -> float:
    """A compose duration ("150s", "2m30s", "1h") or a number of seconds, in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {value!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _haproxy_time_s(value: str) -> float:
    """An HAProxy time ("900s", "15m", "5000" = ms), in seconds."""
    m = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert m, f"not an HAProxy time: {value!r}"
    scale = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    return int(m.group(1)) * scale[m.group(2)]


def _compose_default(value: str) -> str:
    """``${VAR:-default}`` as compose renders it with VAR unset."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


HAPROXY_SECTIONS = ("global", "defaults", "frontend", "backend", "listen", "resolvers", "peers",
                    "userlist", "mailers", "program", "http-errors", "ring", "cache")


def _haproxy_config(path: Path = R_HAPROXY) -> dict[tuple[str, str], list[list[str]]]:
    """(section kind, name) -> its lines, each split into words (quotes and comments handled)."""
    sections: dict[tuple[str, str], list[list[str]]] = {}
    current: list[list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        if not raw[0].isspace() and words[0] in HAPROXY_SECTIONS:
            key = (words[0], words[1] if len(words) > 1 else "")
            assert key not in sections, f"section {key} twice"
            current = sections[key] = []
            continue
        assert current is not None, f"line outside a section: {raw!r}"
        current.append(words)
    return sections


def _haproxy_setting(lines: list[list[str]], *prefix: str) -> list[list[str]]:
    """The lines of a section that start with the words *prefix*, each without them."""
    n = len(prefix)
    return [words[n:] for words in lines if tuple(words[:n]) == prefix]


@pytest.fixture(scope="module")
def replicas_compose() -> dict:
    data = _yaml(R_COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def haproxy_cfg() -> dict[tuple[str, str], list[list[str]]]:
    return _haproxy_config()


@pytest.fixture(scope="module")
def replica_settings():
    from proxy.config import load_settings

    return load_settings(["--config", str(R_LMGATE_TOML)], env={})


def _lb_frontend(haproxy_cfg) -> list[list[str]]:
    """The frontend clients reach: the one bound to port 1235."""
    frontends = [lines for (kind, _), lines in haproxy_cfg.items() if kind == "frontend"
                 and any(b and b[0].rsplit(":", 1)[-1] == "1235" for b in _haproxy_setting(lines, "bind"))]
    assert len(frontends) == 1, frontends
    return frontends[0]


def _lb_backend(haproxy_cfg) -> list[list[str]]:
    """The backend that frontend sends requests to."""
    (backend_name,) = _haproxy_setting(_lb_frontend(haproxy_cfg), "default_backend")
    return haproxy_cfg[("backend", backend_name[0])]


# --------------------------------------------------------------------------- replicas: compose


def test_replicas_compose_services(replicas_compose):
    services = replicas_compose["services"]
    assert {"valkey", *REPLICA_SERVICES, "haproxy", "prometheus", "grafana"} <= set(services)


def test_replicas_compose_images_are_pinned(replicas_compose, compose):
    assert_images_pinned(replicas_compose)
    services = replicas_compose["services"]
    assert re.fullmatch(r"valkey/valkey:8\.\d+\.\d+(-[\w.]+)?", services["valkey"]["image"])
    assert re.fullmatch(r"haproxy:3\.\d+\.\d+(-[\w.]+)?", services["haproxy"]["image"])
    # the same monitoring versions as the single-instance stack
    for name in ("prometheus", "grafana"):
        assert services[name]["image"] == compose["services"][name]["image"], name


def test_replicas_valkey_is_durable(replicas_compose):
    svc = replicas_compose["services"]["valkey"]
    cmd = svc["command"]
    words = cmd.split() if isinstance(cmd, str) else [str(w) for w in cmd]
    assert words[0] == "valkey-server"
    pairs = dict(zip(words[1::2], words[2::2]))
    assert pairs.get("--appendonly") == "yes" and pairs.get("--appendfsync") == "everysec", words
    # its data on a named volume, declared at the top level
    mounts = _volume_targets(svc)
    assert mounts.get("valkey-data") == "/data", mounts
    assert "valkey-data" in (replicas_compose.get("volumes") or {})
    hc = svc["healthcheck"]
    test = hc["test"] if isinstance(hc["test"], str) else " ".join(hc["test"])
    assert "valkey-cli" in test and "ping" in test, test
    assert not svc.get("ports"), "Valkey stays on the compose network"


def test_replicas_lmgate_services(replicas_compose):
    services = replicas_compose["services"]
    envs, mounts = [], []
    for name in REPLICA_SERVICES:
        svc = services[name]
        build = svc["build"]
        context = build if isinstance(build, str) else build["context"]
        assert (REPLICAS / context).resolve() == ROOT, name
        assert svc.get("restart") == "unless-stopped", name
        env = _env(svc)
        envs.append(env)
        # one group: every replica on the valkey service
        url = urlsplit(env["LMGATE_STATE_URL"])
        assert url.scheme == "redis" and url.hostname == "valkey" and url.port == 6379, url
        assert url.hostname in services
        assert _compose_default(env["LMGATE_UPSTREAM"]) == "http://host.docker.internal:1234"
        assert env["LMGATE_UPSTREAM"].startswith("${LMGATE_UPSTREAM")  # overridable, as in ../
        assert "host.docker.internal:host-gateway" in svc["extra_hosts"]
        # the same config file, read-only, where LMGATE_CONFIG points
        vols = [v.split(":") for v in svc["volumes"] if isinstance(v, str)]
        config = [v for v in vols if v[0] == "./lmgate.toml"]
        assert config == [["./lmgate.toml", env["LMGATE_CONFIG"], "ro"]], vols
        mounts.append(config)
        # a stop lasts longer than the grace lmgate gives its requests
        grace = float(env["LMGATE_SHUTDOWN_GRACE"])
        assert grace >= 60, "a rolling restart should let running generations finish"
        assert _duration_s(svc["stop_grace_period"]) > grace, name
        dep = svc["depends_on"]
        assert isinstance(dep, dict) and dep["valkey"]["condition"] == "service_healthy", dep
        # clients reach the replicas through the load balancer only
        assert not svc.get("ports"), name
        has_dockerfile_hc = any(w == "HEALTHCHECK" for w, _ in _dockerfile_instructions())
        hc = svc.get("healthcheck")
        assert hc or has_dockerfile_hc, name
        if hc:
            assert not hc.get("disable") and "/healthz" in json.dumps(hc["test"]), name
    assert envs[0] == envs[1] and mounts[0] == mounts[1], "replicas must run with the same settings"
    assert R_LMGATE_TOML.is_file()


def test_replicas_haproxy_service(replicas_compose):
    svc = replicas_compose["services"]["haproxy"]
    assert _volume_targets(svc).get("./haproxy.cfg") == "/usr/local/etc/haproxy/haproxy.cfg"
    assert any(str(p).strip('"') in ("1235:1235", "0.0.0.0:1235:1235") for p in svc["ports"])
    dep = svc["depends_on"]
    assert set(REPLICA_SERVICES) <= set(dep if isinstance(dep, list) else dep.keys())
    # HAProxy stops gracefully on SIGUSR1 (SIGTERM would cut every stream at once), and
    # gives up on the last streams before Docker kills it
    assert svc.get("stop_signal", "SIGUSR1") == "SIGUSR1"
    (hard_stop,) = _haproxy_setting(_haproxy_config()[("global", "")], "hard-stop-after")
    assert _haproxy_time_s(hard_stop[0]) < _duration_s(svc["stop_grace_period"])


def test_replicas_prometheus_and_grafana_services(replicas_compose, compose):
    services = replicas_compose["services"]
    prom = services["prometheus"]
    mounts = _volume_targets(prom)
    assert mounts.get("./prometheus.yml") == "/etc/prometheus/prometheus.yml"
    assert mounts.get("./lmgate-metrics.key") == "/etc/prometheus/lmgate-metrics.key"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert any(str(p).strip('"').endswith("9090:9090") for p in prom["ports"])
    grafana = services["grafana"]
    g_mounts = _volume_targets(grafana)
    single = _volume_targets(compose["services"]["grafana"])
    # the single-instance stack's provisioning (datasource uid) and dashboards, mounted alike
    for src in ("provisioning", "dashboards"):
        (ours,) = [k for k, v in g_mounts.items() if v == single[f"./grafana/{src}"]]
        assert (REPLICAS / ours).resolve() == (DEPLOY / "grafana" / src).resolve(), ours
    assert _env(grafana) == _env(compose["services"]["grafana"])
    assert any(str(p).strip('"').endswith("3000:3000") for p in grafana["ports"])


def test_replicas_compose_network_is_trusted(replicas_compose, replica_settings):
    """lmgate believes HAProxy's X-Forwarded-For: the compose subnet is in trusted_proxies."""
    (cfg,) = replicas_compose["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(cfg["subnet"])
    trusted = [ipaddress.ip_network(t, strict=False) for t in replica_settings.trusted_proxies]
    assert any(subnet.subnet_of(t) for t in trusted if t.version == subnet.version), (subnet, trusted)
    assert subnet.is_private and subnet.prefixlen >= 16  # not "trust the world"


def test_replicas_docker_compose_config_validates():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("docker compose CLI not available")
    proc = subprocess.run(cli + ["-f", str(R_COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- replicas: HAProxy


def test_haproxy_http_mode_and_timeouts(haproxy_cfg, replica_settings):
    defaults = haproxy_cfg[("defaults", "")]
    assert ["http"] in _haproxy_setting(defaults, "mode")
    for name, section in (("client", _lb_frontend(haproxy_cfg)), ("server", _lb_backend(haproxy_cfg))):
        found = _haproxy_setting(section, "timeout", name) or _haproxy_setting(defaults, "timeout", name)
        assert found, f"timeout {name} not set"
        seconds = _haproxy_time_s(found[-1][0])
        # a request may wait its whole queue_timeout, then meet a box silent for read_timeout:
        # lmgate answers that, not HAProxy
        assert seconds >= 900, (name, seconds)
        assert seconds > replica_settings.queue_timeout + replica_settings.read_timeout, (name, seconds)


def test_haproxy_health_check_and_servers(haproxy_cfg, replicas_compose, replica_settings):
    backend = _lb_backend(haproxy_cfg)
    (balance,) = _haproxy_setting(backend, "balance")
    assert balance[0] in ("roundrobin", "leastconn"), balance
    assert ["GET", "/readyz"] in _haproxy_setting(backend, "option", "httpchk")
    assert ["status", "200"] in _haproxy_setting(backend, "http-check", "expect")
    defaults_server = [w for line in _haproxy_setting(backend, "default-server") for w in line]
    servers = _haproxy_setting(backend, "server")
    assert len(servers) == 2, servers
    addresses = {s[1] for s in servers}
    assert addresses == {f"{name}:{replica_settings.port}" for name in REPLICA_SERVICES}
    for name in REPLICA_SERVICES:
        assert name in replicas_compose["services"]
    for server in servers:
        words = server[2:] + defaults_server
        assert "check" in words, server  # the health check is on for every server
        # resolvable at run time, so the file also checks (and starts) before the names exist
        init = words[words.index("init-addr") + 1] if "init-addr" in words else ""
        assert "none" in init.split(","), server
    # a replica taken out keeps its running streams
    assert not _haproxy_setting(backend, "on-marked-down")


def test_haproxy_streams_and_client_addresses(haproxy_cfg):
    every_line = [words for lines in haproxy_cfg.values() for words in lines]
    # compression would hold SSE tokens back (and lmgate relays bytes as they come)
    assert not [w for w in every_line if w[0] == "compression" or w[:2] == ["filter", "compression"]]
    frontend = _lb_frontend(haproxy_cfg)
    backend = _lb_backend(haproxy_cfg)
    forwardfor = [s for section in (haproxy_cfg[("defaults", "")], frontend, backend)
                  for s in _haproxy_setting(section, "option", "forwardfor")]
    assert forwardfor and all("if-none" not in s for s in forwardfor), forwardfor
    # what the client claims is dropped before HAProxy adds the address it saw
    dropped = {w[0].lower() for w in _haproxy_setting(frontend, "http-request", "del-header")}
    assert {"x-forwarded-for", "forwarded"} <= dropped, dropped


def test_haproxy_check_config():
    """``haproxy -c`` accepts the file offline; its only warnings are the replicas' names,
    which resolve inside compose only."""
    # Debian installs it in /usr/sbin, which is not on every user's PATH
    haproxy = require_program("haproxy", "/usr/sbin/haproxy", package="haproxy")
    proc = subprocess.run([haproxy, "-c", "-f", str(R_HAPROXY)], capture_output=True, text=True,
                          timeout=60, cwd=REPLICAS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    warnings = [line for line in out.splitlines() if "[WARNING]" in line or "[ALERT]" in line]
    unexpected = [line for line in warnings if "could not resolve address" not in line]
    assert not unexpected, out


# --------------------------------------------------------------------------- replicas: Prometheus


def test_replicas_prometheus_config_scrapes_both_replicas():
    cfg = _yaml(R_PROM_CONFIG)
    jobs = [j for j in cfg["scrape_configs"]
            if any(t.startswith("lmgate-") for sc in j.get("static_configs", []) for t in sc["targets"])]
    assert len(jobs) == 1
    job = jobs[0]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == [f"{name}:1235" for name in REPLICA_SERVICES]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "lmgate-metrics.key"}
    assert (R_PROM_CONFIG.parent / "lmgate-metrics.key").read_text().strip()
    # the same job name as the single-instance stack: the dashboard works on both
    assert job["job_name"] == "lmgate"


def test_replicas_promtool_check_config():
    promtool = _require_tool("promtool", "apt-get install prometheus")
    proc = subprocess.run([promtool, "check", "config", str(R_PROM_CONFIG)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- replicas: lmgate.toml


def test_replicas_lmgate_toml_loads(replica_settings):
    s = replica_settings
    assert s.keys == ()  # keys stay commented out: the file publishes no secret
    assert s.port == 1235
    assert s.trusted_proxies


def test_replicas_lmgate_toml_with_the_compose_environment(replicas_compose):
    """The file with the environment the compose file gives a replica (its state URL aside,
    which the loader may not know yet) is what a replica starts with."""
    from proxy.config import load_settings

    env = {k: _compose_default(v) for k, v in _env(replicas_compose["services"]["lmgate-1"]).items()
           if k not in ("LMGATE_STATE_URL", "LMGATE_CONFIG")}
    s = load_settings(["--config", str(R_LMGATE_TOML)], env=env)
    assert s.upstream == "http://host.docker.internal:1234"
    assert s.shutdown_grace == float(env["LMGATE_SHUTDOWN_GRACE"])
    assert s.host == "0.0.0.0"


def test_replicas_lmgate_toml_publishes_no_secret():
    from proxy.config import EXAMPLE_SECRETS

    text = R_LMGATE_TOML.read_text(encoding="utf-8")
    live = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert not [line for line in live if re.match(r"\s*key\s*=", line)], live
    printed = set(re.findall(r'(?<![\w])key\s*=\s*"([^"<]+)"', text))
    assert printed <= set(EXAMPLE_SECRETS), printed
    key_file = (REPLICAS / "lmgate-metrics.key").read_text(encoding="utf-8").strip()
    assert key_file in EXAMPLE_SECRETS  # a placeholder lmgate refuses: the user sets their own
    assert "key_sha256" in text


# --------------------------------------------------------------------------- replicas: README


def test_replicas_readme():
    text = R_README.read_text(encoding="utf-8")
    for needle in ("docker compose up -d --build", "docker compose restart lmgate-1", "lmgate-2",
                   "--appendonly yes", "--appendfsync everysec", "appendfsync everysec",
                   "lmgate --migrate-quotas", "lmgate.sqlite3", "usage(key, period, tokens)",
                   "d:YYYY-MM-DD", "m:YYYY-MM", "/readyz", "state_unavailable", "config_mismatch",
                   "trusted_proxies", "Replica", "Scheduler", "LMGATE_SHUTDOWN_GRACE",
                   "stop_grace_period", ":1235", ":9090", ":3000"):
        assert needle in text, needle
