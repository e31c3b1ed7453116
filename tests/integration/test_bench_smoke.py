"""The benchmark harness runs end to end at a tiny size (``python -m bench.run --smoke``).

Only completeness and correctness are asserted here, never timing: speed is measured by the
bench itself, on a quiet machine, not in tests.
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

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("a_sequential", "b_stream", "c_paced", "d_handoff", "e_scale", "g_two_boxes")
HOP_SCENARIOS = ("a_sequential", "b_stream", "c_paced")  # also run through the plain aiohttp hop
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)], cwd=ROOT,
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
        tail = output.decode(errors="replace")[-4000:]
        pytest.fail(f"bench --smoke did not finish in {RUN_TIMEOUT_S} s:\n{tail}")
    text = output.decode(errors="replace")
    assert out.exists(), f"no results file; output:\n{text[-4000:]}"
    return proc.returncode, text, json.loads(out.read_text())


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_smoke_completes(smoke: tuple[int, str, dict[str, Any]]) -> None:
    code, text, doc = smoke
    assert code == 0, text[-4000:]
    assert "results:" in text
    assert doc["meta"]["mode"] == "smoke"
    for name in SCENARIOS:
        assert name in doc["scenarios"], name
        assert not doc["scenarios"][name].get("error"), doc["scenarios"][name]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_smoke_reports_numbers_for_every_target(smoke: tuple[int, str, dict[str, Any]]) -> None:
    _, _, doc = smoke
    rows = doc["targets"]
    hop_ran = doc["meta"]["aiohttp"]  # the plain hop needs aiohttp (the bench extra)
    assert {row["scenario"] for row in rows} >= {*SCENARIOS, "f_cpu"}
    for row in rows:
        if row["target"] is not None and (hop_ran or row["versus"] != "hop"):
            assert isinstance(row["value"], (int, float)), row
            assert row["result"] in ("pass", "FAIL"), row
    s = doc["scenarios"]
    for side in ("direct", "lmgate"):
        assert s["a_sequential"]["summary"][side]["p50_ms"] > 0
        assert s["b_stream"]["summary"][side]["relay_chunks_per_s"] > 0
        assert s["c_paced"]["summary"][side]["p99"] > 0
        assert s["c_paced"]["summary"][side]["first_token_p50"] > 0
        assert s["d_handoff"]["summary"][side]["n"] > 0
    assert s["e_scale"]["summary"]["rss_waiting_mb"] > 0
    assert s["e_scale"]["summary"]["queue_get_ms"]["n"] > 0
    g = s["g_two_boxes"]["summary"]
    for side in ("direct", "one_box", "two_boxes", "direct_seq", "one_box_seq", "two_boxes_seq"):
        assert g[side]["p50_ms"] > 0 and g[side]["ttfb_p50_ms"] > 0, (side, g[side])
    for side in ("one_box", "two_boxes", "one_box_seq", "two_boxes_seq"):
        assert g[side]["lmgate_cpu_ms_per_request"] >= 0, (side, g[side])  # CPU ticks: 0 at this size


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_smoke_covers_the_plain_hop(smoke: tuple[int, str, dict[str, Any]]) -> None:
    """(a)-(c) run through the plain hop too, in the same rounds, and (f) reports its CPU."""
    pytest.importorskip("aiohttp")
    _, text, doc = smoke
    s = doc["scenarios"]
    assert "plain_hop" in doc["meta"]["pids"]
    for name in HOP_SCENARIOS:
        sides = [x["side"] for x in s[name]["rounds"]]
        assert sides.count("hop") == sides.count("direct") == sides.count("lmgate") > 0, (name, sides)
        assert sides[:3] != sides[3:6], (name, sides)  # the order rotates from round to round
    assert s["a_sequential"]["summary"]["hop"]["p50_ms"] > 0
    assert s["a_sequential"]["summary"]["hop_cpu_ms_per_request"] >= 0  # CPU ticks: 0 at this size
    assert s["b_stream"]["summary"]["hop"]["relay_chunks_per_s"] > 0
    assert s["c_paced"]["summary"]["hop"]["p99"] > 0 and s["c_paced"]["summary"]["hop"]["first_token_p50"] > 0
    # the hop passes the bytes through untouched (the baseline must be a faithful proxy)
    assert s["a_sequential"]["checks"]["hop_bodies_identical"]
    assert s["b_stream"]["checks"]["hop_bytes_identical"] and s["c_paced"]["checks"]["hop_bytes_identical"]
    versus = {row["metric"]: row for row in doc["targets"] if row["versus"] == "hop"}
    row = versus["latency p50 added: lmgate vs hop"]
    assert isinstance(row["hop"], float) and isinstance(row["lmgate"], float), row
    assert row["result"] in ("pass", "FAIL"), row
    assert "lmgate vs hop" in text


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_smoke_correctness(smoke: tuple[int, str, dict[str, Any]]) -> None:
    _, _, doc = smoke
    s = doc["scenarios"]
    scale = s["e_scale"]["checks"]
    assert s["e_scale"]["clients"] == 100
    assert scale["served_in_order"], s["e_scale"]
    assert scale["entered_in_order"] and scale["every_client_entered"], s["e_scale"]
    assert scale["every_client_position_update"], s["e_scale"]
    assert scale["every_client_served"] and scale["canary_never_served"], s["e_scale"]
    # the bytes of a stream received directly and through lmgate are the same
    assert s["b_stream"]["checks"]["bytes_identical"] and s["b_stream"]["checks"]["stream_bytes"] > 0
    assert s["b_stream"]["checks"]["complete"]
    assert s["c_paced"]["checks"]["bytes_identical"] and s["c_paced"]["checks"]["complete"]
    assert s["a_sequential"]["checks"]["bodies_identical"] and s["a_sequential"]["checks"]["all_200"]
    d = s["d_handoff"]["checks"]
    assert d["all_200"] and d["queued"] and d["serialised"], s["d_handoff"]
    # two boxes behind one line: every answer says which box (X-Upstream), and both served a share
    g = s["g_two_boxes"]
    assert g["checks"]["all_200"] and g["checks"]["bodies_identical"], g["summary"]
    assert g["checks"]["x_upstream_on_every_answer"], g["summary"]
    assert g["checks"]["both_boxes_served"], g["summary"]["two_boxes"]["boxes"]
    assert set(g["summary"]["two_boxes"]["boxes"]) == {"a", "b"}, g["summary"]["two_boxes"]["boxes"]
    assert all(doc["checks"].values()), [k for k, v in doc["checks"].items() if not v]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_smoke_stops_its_servers(smoke: tuple[int, str, dict[str, Any]]) -> None:
    _, _, doc = smoke
    for role, pid in doc["meta"]["pids"].items():
        port = str(doc["meta"]["ports"][role])
        try:
            proc = psutil.Process(pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE and port in proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        assert not alive, f"{role} (pid {pid}, port {port}) still running"


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_bench_floor_smoke_measures_every_side_and_checks_their_bytes(tmp_path: Path) -> None:
    """``python -m bench.floor --smoke``: direct, the plain hop, the bare stack and lmgate each
    answer byte for byte as the upstream does, and every added figure is a number."""
    pytest.importorskip("aiohttp")
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, "-m", "bench.floor", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    doc = json.loads(out.read_text())
    assert doc["checks"] and all(doc["checks"].values()), doc["checks"]
    assert set(doc["checks"]) == {f"{side}_{kind}_identical" for side in ("hop", "bare", "lmgate")
                                  for kind in ("plain", "stream")}
    for name in ("plain", "first"):
        row = doc["results"][name]
        assert row["direct_p50_ms"] > 0 and row["n"] > 0
        for side in ("hop", "bare", "lmgate"):
            assert isinstance(row[f"{side}_added_p50_ms"], float), (name, side, row)
