"""What a newcomer meets first, with real processes: limits that fit together, the systemd
state directory, ``lmgate --check``, log lines that say what the client got, HTTP/1.0
clients, and the warning about a box anyone can reach around lmgate."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.hostile import Raw, assert_gate_free, chat, started, stream_open, wait_until
from tests.servers import ROOT, free_port, running_stack, start_lmgate, start_simulator

pytestmark = pytest.mark.timeout(120)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without lmgate's settings, and with a data directory of its own (the
    state database goes there by default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_") and k != "STATE_DIRECTORY"}
    private = tempfile.mkdtemp(prefix="lmgate-data-")
    return {**env, "PYTHONUNBUFFERED": "1", "XDG_DATA_HOME": private, **extra}


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


# -- 20: what the log says, and HTTP/1.0 clients -----------------------------------------------

def test_shutdown_logs_what_each_client_got(tmp_path: Path) -> None:
    """Regression: a waiting stream refused at shutdown was logged ``status=0
    outcome=rejected``, one cut off by it ``outcome=timeout``, and the drain said "1 requests
    waiting". Each line now says the status the client got and ``outcome=shutting_down``."""
    import signal

    with running_stack(tmp_path, "--shutdown-grace", "1", tokens_per_s=50, load_s=0) as (_, gate):
        running = stream_open(gate, chat("run", max_tokens=3000), headers={"x-request-id": "cut-off"})
        waiting = stream_open(gate, chat("wait", max_tokens=2), headers={"x-request-id": "refused"})
        try:
            assert started(running)
            assert waiting.headers["x-queue-position"] == "1"
            gate.signal(signal.SIGTERM)
            assert waiting.read_all(timeout=20) is not None and running.read_all(timeout=20) is not None
            assert gate.proc.wait(20) == 0
        finally:
            running.close()
            waiting.close()
        log = gate.output()
    assert "shutting down: 1 waiting request refused, 1 running request gets 1 s to finish" in log, log
    for rid in ("cut-off", "refused"):
        (line,) = [line for line in log.splitlines() if f"{rid} 127.0.0.1 " in line]
        assert "status=200 outcome=shutting_down" in line, line
    assert '"code": "shutting_down"' in waiting.body.decode()


def test_http_1_0_clients_get_a_stream_ended_by_close(tmp_path: Path) -> None:
    """Regression: an HTTP/1.0 client got ``Transfer-Encoding: chunked``, which HTTP/1.0 does
    not have; it read chunk sizes as text. Its stream is now delimited by closing."""
    import json

    with running_stack(tmp_path, tokens_per_s=0, load_s=0) as (_, gate):
        conn = Raw(gate.port)
        try:
            body = json.dumps({**chat("old client", max_tokens=3), "stream": True}).encode()
            conn.send(b"POST /v1/chat/completions HTTP/1.0\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body))
            assert conn.read_head() == 200
            assert "transfer-encoding" not in conn.headers and "content-length" not in conn.headers
            assert conn.wait_closed(timeout=20)
            conn.read_all(timeout=1)
        finally:
            conn.close()
        text = conn.body.decode()
        assert text.startswith(": queue_entered=0") and text.rstrip().endswith("data: [DONE]"), text
        assert "\r\n0\r\n" not in text
        plain = httpx.post(gate.url + "/v1/chat/completions", json=chat("new client", max_tokens=2), timeout=20)
        assert plain.status_code == 200


def test_check_validates_the_configuration_and_exits(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('upstream = "http://192.0.2.10:1234"\nmax_queue = 30\n'
                    '[[keys]]\nname = "a"\nkey = "sk-check-test-001"\ntokens_per_day = 10\n')
    result = lmgate("--check", "--config", str(good), env=clean_env(STATE_DIRECTORY=str(tmp_path / "s")))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert "configuration OK" in line and "192.0.2.10:1234" in line and "1 key" in line
    assert not (tmp_path / "s").exists()  # nothing opened or created
    bad = tmp_path / "bad.toml"
    bad.write_text("max_queue = -1\n")
    result = lmgate("--check", "--config", str(bad))
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "max_queue" in line


def test_readyz_names_every_box(tmp_path: Path) -> None:
    sims = [start_simulator(tmp_path, tokens_per_s=0, load_s=0) for _ in range(2)]
    try:
        gate = start_lmgate(tmp_path, sims[0].url, "--upstream", sims[1].url)
        try:
            doc = httpx.get(gate.url + "/readyz", timeout=5).json()
            assert all(f"127.0.0.1:{s.port}" in doc["upstream"] for s in sims), doc
        finally:
            gate.stop()
    finally:
        for sim in sims:
            sim.stop()


# -- 15: the demo shows the slots in force, and the README's first experiment shows a line -------

def test_the_demo_shows_the_slots_in_force_and_a_line_forms(tmp_path: Path) -> None:
    """Regression: each demo box ran 4 requests at once while the log said ``parallel 1``,
    the page ``parallel 2`` and the box panels ``running 4 / 1``; and the README's "a few
    requests from two terminals" never showed a line. The README's experiment (eight streams
    for the model only one box has) now shows one, and every number is the slots in force."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--demo", "--port", str(port)], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ok(url + "/readyz"), 30, "the demo to be ready", interval=0.1)
        body = {"model": "llama-3.2-3b-instruct", "stream": True, "max_tokens": 60,
                "messages": [{"role": "user", "content": "Tell me about queues"}]}
        # the first request loads the model; LM Studio then reports its slots
        assert httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60).status_code == 200
        views: list[dict] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                views.append(next(b for b in httpx.get(url + "/queue", timeout=5).json()["upstreams"]
                                  if b["name"] == "demo-b"))

        def one(_: int) -> int:
            with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.read()
                return int(r.headers["x-queue-position"])

        with ThreadPoolExecutor(9) as pool:
            watcher = pool.submit(watch)
            positions = list(pool.map(one, range(8)))
            done.set()
            watcher.result()
        assert max(positions) >= 1 and positions.count(0) == 4, positions  # a line formed
        busy = [(v["running"], v["parallel"]) for v in views if v["running"]]
        assert busy and all(running <= parallel == 4 for running, parallel in busy), busy
        assert (4, 4) in busy
        queue = httpx.get(url + "/queue", timeout=5).json()
        assert queue["parallel"] == sum(b["parallel"] for b in queue["upstreams"])
    finally:
        proc.send_signal(__import__("signal").SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert "parallel 1" not in output and "slots per model as each box reports them" in output
    assert "upstream demo-b is up (managed" in output


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
