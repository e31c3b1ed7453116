"""One admission path: the old queue API (``/queue/add``) and the OpenAI routes give the same
answer for the same fault, because they share admission; and an old-API job, served by the
same upstream call as every request, goes to another box when its box refuses it."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.simulator import expected_reply
from tests.e2e.hostile import Raw, started, stream_open, wait_until
from tests.servers import Process, free_port, start_simulator

pytestmark = pytest.mark.timeout(90)

MODEL = "qwen2.5-7b-instruct"
OTHER = "llama-3.2-3b-instruct"
KEYS = {"user": "sk-one-user-0001", "narrow": "sk-one-narrow-02", "capped": "sk-one-capped-03",
        "spent": "sk-one-spent-004", "slow": "sk-one-slow-0005", "one": "sk-one-queued-06",
        "scraper": "sk-one-scrape-07"}
CONFIG = f"""
[[keys]]
name = "user"
key = "{KEYS['user']}"
[[keys]]
name = "narrow"
key = "{KEYS['narrow']}"
models = ["llama*"]
[[keys]]
name = "capped"
key = "{KEYS['capped']}"
max_tokens = 10
[[keys]]
name = "spent"
key = "{KEYS['spent']}"
tokens_per_day = 1
[[keys]]
name = "slow"
key = "{KEYS['slow']}"
rpm = 1
[[keys]]
name = "one"
key = "{KEYS['one']}"
max_queued = 1
[[keys]]
name = "scraper"
key = "{KEYS['scraper']}"
role = "metrics"
"""


def bearer(name: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"} if name else {}


def chat(content: str = "hi", model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def both(c: httpx.Client, gate: Process, who: str | None, body: dict[str, Any],
         headers: dict[str, str] | None = None) -> tuple[httpx.Response, httpx.Response]:
    """The same request on /v1/chat/completions and on /queue/add."""
    h = {**bearer(who), **(headers or {})}
    v1 = c.post(gate.url + "/v1/chat/completions", json=body, headers=h)
    old = c.post(gate.url + "/queue/add", json={"client_id": "parity", **body}, headers=h)
    return v1, old


def test_the_same_fault_gets_the_same_status_on_both_apis(tmp_path: Path) -> None:
    """Regression: the old API had its own copy of admission and checked in another order
    (a quota key asking for a model outside its allowlist got 429 there, 403 on /v1)."""
    config = tmp_path / "keys.toml"
    config.write_text(CONFIG)
    sim = start_simulator(tmp_path, tokens_per_s=50, load_s=0, extra=["--preload", MODEL])
    try:
        gate = Process(["-m", "proxy", "--upstream", sim.url, "--port", str(port := free_port()),
                        "--config", str(config), "--state-dir", str(tmp_path / "state"),
                        "--max-body", "4096", "--load-mode", "managed", "--parallel", "1"], port,
                       tmp_path / "gate.log",
                       "/healthz")
        try:
            with httpx.Client(timeout=20) as c:
                # the spent key uses its one token
                assert c.post(gate.url + "/v1/chat/completions", json=chat("spend", max_tokens=2),
                              headers=bearer("spent")).status_code == 200
                assert c.post(gate.url + "/v1/chat/completions", json=chat("one", max_tokens=1),
                              headers=bearer("slow")).status_code == 200
                faults = {
                    "no key": (None, chat(), None),
                    "wrong key": (None, chat(), {"authorization": "Bearer sk-not-a-key-0000"}),
                    "model outside the allowlist": ("narrow", chat(model=MODEL), None),
                    "a model no box lists": ("user", chat(model="no-such-model"), None),
                    "over the token cap": ("capped", chat(max_tokens=500), None),
                    "quota used up": ("spent", chat(max_tokens=2), None),
                    "rpm": ("slow", chat(max_tokens=1), None),
                    "a metrics key": ("scraper", chat(), None),
                    "body over --max-body": ("user", chat("x" * 5000), None),
                    "quota key and model outside": ("spent", chat(model="no-such-model"), None),
                }
                for name, (who, body, headers) in faults.items():
                    v1, old = both(c, gate, who, body, headers)
                    assert v1.status_code >= 400, (name, v1.text)
                    assert "error" in old.json(), (name, old.status_code, old.text)
                    assert (old.status_code, old.json()["error"]["code"]) == \
                        (v1.status_code, v1.json()["error"]["code"]), (name, v1.text, old.text)

                # a key's max_queued: one request of its own waits already, on either API
                holder = stream_open(gate, chat("hold", max_tokens=2000), headers=bearer("user"))
                try:
                    assert started(holder)
                    waiting = Raw(gate.port)
                    waiting.request("POST", "/v1/chat/completions", chat("wait", max_tokens=1),
                                    bearer("one"))
                    wait_until(lambda: c.get(gate.url + "/queue").json()["depth"] == 1, 10, "one waiting")
                    v1, old = both(c, gate, "one", chat(max_tokens=1))
                    assert v1.status_code == old.status_code == 429
                    assert v1.json()["error"]["code"] == old.json()["error"]["code"] == "key_queue_full"
                    waiting.close()
                finally:
                    holder.close()
                # and the old server's own contract stays: a body it would refuse is a 422
                bad = c.post(gate.url + "/queue/add", json={"model": MODEL, "messages": []},
                             headers=bearer("user"))
                assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "client_id"]
            assert not [r for r in httpx.get(sim.url + "/sim/requests").json()["requests"]
                        if r["path"] == "/v1/chat/completions" and r.get("model") == "no-such-model"]
        finally:
            gate.stop()
    finally:
        sim.stop()


def test_an_old_api_job_goes_to_another_box_when_its_box_refuses(tmp_path: Path) -> None:
    """Regression: the old API had no reroute: a job whose box refused the connection failed,
    where the same request on /v1 ran on the next box."""
    sims = [start_simulator(tmp_path, tokens_per_s=100, load_s=0, extra=["--loaded", MODEL])
            for _ in range(2)]
    port = free_port()
    gate = Process(["-m", "proxy", "--port", str(port), "--upstream", sims[0].url, "--upstream", sims[1].url,
                    "--probe-interval", "30", "--load-mode", "jit"], port, tmp_path / "gate.log", "/healthz")
    try:
        with httpx.Client(timeout=20) as c:
            wait_until(lambda: all(b["up"] for b in c.get(gate.url + "/queue").json()["upstreams"]),
                       10, "both boxes up")
            first = c.post(gate.url + "/v1/chat/completions", json=chat("warm", max_tokens=2))
            assert first.headers["x-upstream"] == f"127.0.0.1:{sims[0].port}"
            sims[0].proc.send_signal(signal.SIGKILL)  # the first box goes away without a word
            sims[0].proc.wait(10)
            body = chat("rerouted job", max_tokens=4)
            job = c.post(gate.url + "/queue/add", json={"client_id": "reroute", **body}).json()["request_id"]

            def done() -> dict[str, Any] | None:
                record = c.get(f"{gate.url}/request/{job}").json()
                return record if record["status"] in ("complete", "error") else None

            record = wait_until(done, 20, "the job to finish")
            assert record["status"] == "complete", record
            assert record["result"] == expected_reply({"model": MODEL, **body})
            boxes = {b["name"]: b for b in c.get(gate.url + "/queue").json()["upstreams"]}
            assert boxes[f"127.0.0.1:{sims[0].port}"]["up"] is False
        log = gate.output()
        assert f"upstream 127.0.0.1:{sims[0].port} is not answering" in log
    finally:
        gate.stop()
        for sim in sims:
            sim.stop()
        time.sleep(0)
