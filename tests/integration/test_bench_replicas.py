"""The replica-mode benchmark runs end to end at a tiny size (``python -m bench.replicas --smoke``).

Only completeness and correctness are asserted, never timing: the 2 ms target is measured by
the bench itself, on a quiet machine. Needs ``redis-server`` (or ``valkey-server``) on PATH:
skipped without it, a failure under CI (``CI=true``), which installs it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.servers import require_program

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 90
SIDES = ("direct", "single", "replica", "replicas_ab")
REPLICA_SIDES = ("replica", "replicas_ab")
SCENARIOS = ("sequential", "first_token", "concurrent", "redis")
# row key -> the sides that must have a figure
ROWS = {
    "latency_p50": SIDES, "latency_p99": SIDES, "first_token_p50": SIDES, "first_token_p99": SIDES,
    "latency_p50_added": SIDES[1:], "first_token_p50_added": SIDES[1:],
    "latency_p50_over_single": REPLICA_SIDES, "latency_p99_over_single": REPLICA_SIDES,
    "first_token_p50_over_single": REPLICA_SIDES, "first_token_p99_over_single": REPLICA_SIDES,
    "lmgate_cpu_per_request": SIDES[1:], "redis_cpu_per_request": REPLICA_SIDES,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any]]:
    require_program("redis-server", "valkey-server", package="redis-server")
    out = tmp_path_factory.mktemp("bench_replicas") / "replicas.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.replicas", "--smoke", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops its servers on SIGTERM
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"bench.replicas --smoke did not finish in {RUN_TIMEOUT_S} s:\n"
                    f"{output.decode(errors='replace')[-4000:]}")
    text = output.decode(errors="replace")
    assert out.exists(), f"no results file; output:\n{text[-4000:]}"
    return proc.returncode, text, json.loads(out.read_text())


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_replicas_smoke_completes(smoke: tuple[int, str, dict[str, Any]]) -> None:
    code, text, doc = smoke
    assert code == 0, text[-4000:]
    assert "results:" in text and "over single" in text
    assert doc["meta"]["mode"] == "smoke"
    assert not doc.get("error"), doc["error"]
    for name in SCENARIOS:
        assert name in doc["scenarios"], name
        assert not doc["scenarios"][name].get("error"), doc["scenarios"][name]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_replicas_smoke_reports_numbers(smoke: tuple[int, str, dict[str, Any]]) -> None:
    _, _, doc = smoke
    rows = {row["key"]: row for row in doc["rows"]}
    for key, sides in ROWS.items():
        assert key in rows, key
        for side in sides:
            assert isinstance(rows[key][side], (int, float)), (key, side, rows[key])
    for side in SIDES:
        assert rows["latency_p50"][side] > 0 and rows["first_token_p50"][side] > 0, side
    for key in ("latency_p50_over_single", "first_token_p50_over_single"):  # the 2 ms target
        assert rows[key]["target"] == "<= 2" and rows[key]["result"] in ("pass", "FAIL"), rows[key]
    # the sides were interleaved, their order rotating from round to round
    sides = [x["side"] for x in doc["scenarios"]["sequential"]["rounds"]]
    assert sorted(set(sides)) == sorted(SIDES) and sides[:4] != sides[4:8], sides
    probe = doc["scenarios"]["redis"]["summary"]
    assert probe["xadd_to_xread_wake"]["p50_ms"] > 0, probe


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_replicas_smoke_correctness(smoke: tuple[int, str, dict[str, Any]]) -> None:
    """Every answer 200 and the same on every side; concurrent clients on both replicas all
    served, each exactly once, one at a time (one line for the group)."""
    _, _, doc = smoke
    c = doc["scenarios"]["concurrent"]["summary"]
    assert c["sent"] == c["answered_200"] == c["complete"] == c["served_upstream"] > 0, c
    assert c["lost"] == 0 and c["duplicates"] == 0, c
    assert c["by_replica"]["a"] > 0 and c["by_replica"]["b"] > 0, c
    for name in ("sequential", "first_token", "concurrent"):
        assert doc["scenarios"][name]["checks"], name
    assert doc["checks"] and all(doc["checks"].values()), [k for k, v in doc["checks"].items() if not v]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_replicas_smoke_stops_its_servers(smoke: tuple[int, str, dict[str, Any]]) -> None:
    _, _, doc = smoke
    assert set(doc["meta"]["pids"]) == {"upstream", "redis", "single", "replica_a", "replica_b"}
    for role, pid in doc["meta"]["pids"].items():
        port = str(doc["meta"]["ports"][role])
        try:
            proc = psutil.Process(pid)
            # redis-server rewrites its title to "redis-server 127.0.0.1:<port>"
            alive = proc.status() != psutil.STATUS_ZOMBIE and port in " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        assert not alive, f"{role} (pid {pid}, port {port}) still running"
