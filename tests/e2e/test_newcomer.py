"""What a newcomer meets first, with real processes: limits that fit together, the systemd
state directory, ``lmgate --check``, log lines that say what the client got, HTTP/1.0
clients, and the warning about a box anyone can reach around lmgate."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.hostile import Raw, assert_gate_free, chat, started, stream_open, wait_until
from tests.servers import ROOT, free_port, running_stack, start_lmgate, start_simulator

pytestmark = pytest.mark.timeout(120)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_") and k != "STATE_DIRECTORY"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def lmgate(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env or clean_env())


# -- 18: --max-queue and --max-connections fit together ---------------------------------------

def test_a_long_queue_gets_the_connections_it_needs(tmp_path: Path) -> None:
    """Regression: ``--max-queue 1500`` alone let waiters past 1,000 get 503
    too_many_connections (the connection cap's default). The cap now rises to
    max_queue + 200, with one log line; 1,100 waiting streams all get their place."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4000), hard))
    with running_stack(tmp_path, "--max-queue", "1500", "--log-level", "info", tokens_per_s=100,
                       load_s=0) as (_, gate):
        assert "max_connections raised from 1000 to 1700" in gate.output()
        holder = stream_open(gate, chat("hold", max_tokens=3000))
        waiting: list[Raw] = []
        try:
            assert started(holder)
            for i in range(1100):
                conn = Raw(gate.port)
                conn.request("POST", "/v1/chat/completions", {**chat(f"w{i}", max_tokens=1), "stream": True})
                waiting.append(conn)
            for conn in (waiting[0], waiting[999], waiting[-1]):
                assert conn.read_head(timeout=30) == 200, conn.raw[:300]
                assert int(conn.headers["x-queue-position"]) >= 1
            wait_until(lambda: httpx.get(gate.url + "/queue?limit=0", timeout=10).json()["depth"] == 1100,
                       60, "1,100 requests waiting")
        finally:
            for conn in [holder, *waiting]:
                conn.close()
        assert_gate_free(gate, timeout=60)


def test_both_limits_given_and_not_fitting_is_one_line_and_exit_2() -> None:
    result = lmgate("--max-queue", "1500", "--max-connections", "1000", "--port", str(free_port()))
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "max_queue" in line and "max_connections" in line


# -- 19: systemd's StateDirectory= ------------------------------------------------------------

def test_the_quota_database_goes_to_the_systemd_state_directory(tmp_path: Path) -> None:
    """Regression: the shipped unit (DynamicUser, ProtectHome) sets $STATE_DIRECTORY; lmgate
    ignored it and could not open its database under a home directory."""
    state = tmp_path / "var-lib-lmgate"
    config = tmp_path / "quota.toml"
    config.write_text('[[keys]]\nname = "q"\nkey = "sk-quota-state-01"\ntokens_per_day = 1000\n')
    sim = start_simulator(tmp_path, tokens_per_s=0, load_s=0)
    try:
        gate = start_lmgate(tmp_path, sim.url, "--config", str(config),
                            env={"STATE_DIRECTORY": str(state), "HOME": str(tmp_path / "no-home")})
        try:
            resp = httpx.post(gate.url + "/v1/chat/completions", json=chat("count", max_tokens=2),
                              headers={"authorization": "Bearer sk-quota-state-01"}, timeout=20)
            assert resp.status_code == 200
        finally:
            gate.stop()
        assert (state / "lmgate.sqlite3").is_file()
        assert not (tmp_path / "no-home").exists()
    finally:
        sim.stop()
