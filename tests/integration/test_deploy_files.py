"""Static checks of the deployment files (Dockerfile, compose, Prometheus, Grafana, systemd).

No network and no Docker daemon needed. Optional tools are used when present:
``docker compose`` (``config -q`` works without a daemon), ``promtool`` (config and
PromQL syntax), ``systemd-analyze`` (unit file); each such test skips otherwise, except
the promtool ones, which fail instead when ``CI=true`` (CI installs Prometheus, not Docker).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

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
    promtool = _require_tool("promtool", "apt-get install prometheus")
    rules = {"groups": [{"name": "lmgate_dashboard", "rules": [
        {"record": f"lmgate_dashboard:expr_{i}", "expr": e}
        for i, e in enumerate(dashboard_exprs(DASHBOARD))]}]}
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
            "(rate(lmgate_queue_wait_seconds_bucket[1m])))") in exprs
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
