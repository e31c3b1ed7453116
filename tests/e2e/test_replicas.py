"""Several lmgate replicas, one line (DESIGN.md section 11), end to end: real lmgate processes
sharing a real redis-server on 127.0.0.1, in front of a real simulator, driven by raw HTTP and
the openai SDK. One global order and positions whatever replica a client reached; never two
models at once on the box; the scheduler or a replica killed mid-stream (the line goes on, the
slot frees within --lease-ttl); rpm and quotas exact across replicas; Redis killed and back
(fail closed, then serving again); a replica whose configuration differs stays out."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.simulator import expected_reply
from tests.e2e.hostile import Raw, sse_data, started, stream_open, stream_text, wait_until
from tests.redis_server import RedisServer
from tests.servers import ROOT, Process, free_port, start_simulator

pytestmark = pytest.mark.timeout(120)

MODEL = "qwen2.5-7b-instruct"
OTHER = "llama-3.2-3b-instruct"
LEASE = "1.5"


def replica(tmp: Path, sim: Process, redis: RedisServer, *extra: str, config: Path | None = None,
            lease: str = LEASE, grace: str = "5") -> Process:
    port = free_port()
    args = ["-m", "proxy", "--upstream", sim.url, "--port", str(port), "--state-url", redis.url,
            "--lease-ttl", lease, "--parallel", "1", "--load-mode", "jit", "--log-level", "info",
            "--shutdown-grace", grace, *extra]
    if config is not None:
        args += ["--config", str(config)]
    return Process(args, port, tmp / f"replica-{port}.log", "/healthz")


def chat(text: str, tokens: int, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": tokens, "messages": [{"role": "user", "content": text}], **extra}


def queue(gate: Process, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return httpx.get(gate.url + "/queue", headers=headers or {}, timeout=5).json()


def ready(gate: Process) -> bool:
    return httpx.get(gate.url + "/readyz", timeout=5).status_code == 200


@contextlib.contextmanager
def group(tmp: Path, n: int = 2, *, tokens_per_s: float = 50, sim_extra: tuple[str, ...] = (),
          **replica_kwargs: Any) -> Iterator[tuple[RedisServer, Process, list[Process]]]:
    redis = RedisServer(tmp / "redis")
    redis.start()
    sim = start_simulator(tmp, tokens_per_s=tokens_per_s, load_s=0, extra=list(sim_extra))
    gates: list[Process] = []
    try:
        for _ in range(n):
            gates.append(replica(tmp, sim, redis, **replica_kwargs))
        wait_until(lambda: all(ready(g) for g in gates), 20, "every replica ready")
        yield redis, sim, gates
    finally:
        for g in gates:
            g.stop()
        sim.stop()
        redis.stop()


def scheduler(gates: list[Process]) -> Process:
    """The replica that holds the lease (it reports the line's depth)."""
    def find() -> Process | None:
        for g in gates:
            if g.proc.poll() is None and "lmgate_queue_depth" in httpx.get(g.url + "/metrics", timeout=5).text:
                return g
        return None
    return wait_until(find, 15, "a scheduler")


def generations(sim: Process, tag: str) -> list[dict[str, Any]]:
    log = httpx.get(sim.url + "/sim/stats", timeout=5).json()["log"]
    return sorted([g for g in log if tag in (g["user"] or "")], key=lambda g: g["started"])


# -- one line, whatever the door ------------------------------------------------------------------

def test_one_global_order_and_positions_across_replicas(tmp_path: Path) -> None:
    with group(tmp_path, 3) as (_, sim, gates):
        tag = f"order-{tmp_path.name[-6:]}"
        holder = stream_open(gates[0], chat(f"{tag} holder", 2000))
        waiting: list[Raw] = []
        try:
            assert started(holder)
            for i in range(6):  # arrivals alternate between the replicas
                conn = stream_open(gates[i % 3], chat(f"{tag} w{i}", 3))
                waiting.append(conn)
                assert conn.headers["x-queue-position"] == str(i + 1), (i, conn.headers)
                assert conn.headers["x-queue-depth"] == str(i + 1)
            # every replica shows the same line, in the same order
            views = [[e["position"] for e in queue(g)["waiting"]] for g in gates]
            assert views == [[1, 2, 3, 4, 5, 6]] * 3, views
            depths = {queue(g)["depth"] for g in gates}
            assert depths == {6}
            holder.close()
            for conn in waiting:
                assert conn.read_all(timeout=30)
                assert conn.complete
                lines = conn.lines()
                assert ": queue_position=0" in lines
        finally:
            for conn in [holder, *waiting]:
                conn.close()
        gens = generations(sim, tag)
        order = [g["user"].split()[-1] for g in gens if "holder" not in g["user"]]
        assert order == [f"w{i}" for i in range(6)], order
        for a, b in zip(gens, gens[1:]):  # --parallel 1 for the group: never two at once
            assert a["ended"] <= b["started"] + 1e-3, (a, b)
        for conn, i in zip(waiting, range(6)):
            assert stream_text(conn) == expected_reply(chat(f"{tag} w{i}", 3))


def test_a_model_switch_waits_for_every_replicas_requests(tmp_path: Path) -> None:
    """One model at a time on the box, whatever replica a request came through."""
    with group(tmp_path, 2, tokens_per_s=100) as (_, sim, gates):
        tag = f"switch-{tmp_path.name[-6:]}"
        bodies = [chat(f"{tag} {i}", 5, model=MODEL if i % 2 else OTHER) for i in range(8)]
        results: list[str] = []

        def one(i: int) -> None:
            with httpx.Client(timeout=60) as c:
                r = c.post(gates[i % 2].url + "/v1/chat/completions", json=bodies[i])
                results.append(r.json()["choices"][0]["message"]["content"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == sorted(expected_reply(b) for b in bodies)
        stats = httpx.get(sim.url + "/sim/stats", timeout=5).json()
        assert stats["killed"] == 0 and stats["cut_generations"] == 0, stats
        gens = generations(sim, tag)
        for a, b in zip(gens, gens[1:]):
            assert a["ended"] <= b["started"] + 1e-3 or a["model"] == b["model"], (a, b)


# -- replicas dying --------------------------------------------------------------------------------

def test_the_scheduler_killed_another_takes_over_and_the_line_goes_on(tmp_path: Path) -> None:
    with group(tmp_path, 2) as (_, sim, gates):
        lead = scheduler(gates)
        other = next(g for g in gates if g is not lead)
        tag = f"failover-{tmp_path.name[-6:]}"
        holder = stream_open(other, chat(f"{tag} holder", 60))  # about 1 s of generation
        waiting = stream_open(other, chat(f"{tag} after", 3))
        try:
            assert started(holder)
            assert waiting.headers["x-queue-position"] == "1"
            lead.proc.send_signal(signal.SIGKILL)
            lead.proc.wait(10)
            assert scheduler([other]) is other  # within --lease-ttl (1.5 s)
            assert holder.read_all(timeout=30) and holder.complete
            assert waiting.read_all(timeout=30) and waiting.complete
            assert stream_text(waiting) == expected_reply(chat(f"{tag} after", 3))
            # and new requests still go through the surviving replica
            with httpx.Client(timeout=30) as c:
                r = c.post(other.url + "/v1/chat/completions", json=chat(f"{tag} new", 3))
                assert r.status_code == 200 and r.headers["x-queue-position"] == "0"
        finally:
            holder.close()
            waiting.close()


def test_a_replica_killed_mid_stream_frees_its_slot_within_the_lease(tmp_path: Path) -> None:
    with group(tmp_path, 2) as (_, sim, gates):
        victim, survivor = gates
        tag = f"killed-{tmp_path.name[-6:]}"
        doomed = stream_open(victim, chat(f"{tag} doomed", 3000))  # a minute of generation
        try:
            assert started(doomed)
            waiting = stream_open(survivor, chat(f"{tag} next", 3))
            assert waiting.headers["x-queue-position"] == "1"
            victim.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            victim.proc.wait(10)
            assert waiting.read_all(timeout=30) and waiting.complete
            took = time.monotonic() - killed_at
            assert took < 10, took  # --lease-ttl 1.5 s, plus the scheduler's next look
            assert stream_text(waiting) == expected_reply(chat(f"{tag} next", 3))
            waiting.close()
            wait_until(lambda: queue(survivor)["active"] == 0 and queue(survivor)["depth"] == 0, 10,
                       "the line empty")
        finally:
            doomed.close()


# -- limits hold for the group ---------------------------------------------------------------------

GROUP_KEYS = """
[[keys]]
name = "admin"
key = "sk-group-admin-0001"
role = "admin"

[[keys]]
name = "paced"
key = "sk-group-paced-0002"
rpm = 3

[[keys]]
name = "metered"
key = "sk-group-meter-0003"
tokens_per_day = 60

[[keys]]
name = "queuer"
key = "sk-group-queue-0004"
max_queued = 2

[[keys]]
name = "streamer"
key = "sk-group-stream-0005"
tokens_per_day = 60
"""


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_rpm_and_quota_hold_for_the_group_not_per_replica(tmp_path: Path) -> None:
    """A key's rpm and its quota count every replica's requests: spreading them over the
    group gets no more than one process would allow."""
    config = tmp_path / "keys.toml"
    config.write_text(GROUP_KEYS)
    with group(tmp_path, 2, tokens_per_s=500, config=config) as (_, _sim, gates):
        with httpx.Client(timeout=30) as c:
            codes = []
            for i in range(5):  # alternating doors: 3 go through, then 429 on either
                r = c.post(gates[i % 2].url + "/v1/chat/completions", json=chat(f"rpm {i}", 2),
                           headers=bearer("sk-group-paced-0002"))
                codes.append((r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None))
            assert codes == [(200, None)] * 3 + [(429, "rate_limited")] * 2, codes

            used = 0
            refused_at = None
            for i in range(10):
                r = c.post(gates[i % 2].url + "/v1/chat/completions", json=chat(f"quota {i}", 10),
                           headers=bearer("sk-group-meter-0003"))
                if r.status_code != 200:
                    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
                    refused_at = i
                    break
                used += r.json()["usage"]["total_tokens"]
            assert refused_at is not None and used >= 60, (refused_at, used)
            # refused as soon as the group's count reached the limit: the request before
            # started below it
            assert used - r_last_total(c, gates, refused_at) < 60
            # both doors report the same count (the last one is in Redis a round trip after
            # its request ended), and both refuse now
            def day_counts() -> list[int]:
                return [c.get(g.url + "/usage", headers=bearer("sk-group-meter-0003")).json()["day"]["used"]
                        for g in gates]
            wait_until(lambda: day_counts() == [used, used], 10, f"both replicas to report {used}")
            other = gates[(refused_at + 1) % 2]
            r = c.post(other.url + "/v1/chat/completions", json=chat("quota again", 10),
                       headers=bearer("sk-group-meter-0003"))
            assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


def test_a_streamed_quota_is_spent_once_for_the_group(tmp_path: Path) -> None:
    """Streams on alternating replicas, each read to its ``[DONE]`` and the next sent at once
    (as an SDK does): the request after the one that reached the limit is refused, on either
    replica; none slips through before the count is in Redis."""
    config = tmp_path / "keys.toml"
    config.write_text(GROUP_KEYS)
    with group(tmp_path, 2, tokens_per_s=500, config=config) as (_, _sim, gates):
        with httpx.Client(timeout=30) as c:
            totals: list[int] = []
            for i in range(10):
                body = chat(f"streamed quota {i}", 10, stream=True, stream_options={"include_usage": True})
                with c.stream("POST", gates[i % 2].url + "/v1/chat/completions", json=body,
                              headers=bearer("sk-group-stream-0005")) as r:
                    if r.status_code != 200:
                        r.read()
                        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
                        break
                    lines = []
                    for line in r.iter_lines():
                        lines.append(line)
                        if line.strip() == "data: [DONE]":
                            break  # the client is done here; the rest of the response is not waited for
                usage = [d["usage"] for d in sse_data(lines) if isinstance(d, dict) and d.get("usage")]
                totals.append(int(usage[-1]["total_tokens"]))
            else:
                pytest.fail(f"never refused: {totals}")
            assert sum(totals[:-1]) < 60 <= sum(totals), totals


def test_max_queued_holds_for_the_group(tmp_path: Path) -> None:
    """A key's max_queued counts its waiting requests on every replica."""
    config = tmp_path / "keys.toml"
    config.write_text(GROUP_KEYS)
    with group(tmp_path, 2, config=config) as (_, _sim, gates):
        holder = stream_open(gates[0], chat("queued holder", 2000), headers=bearer("sk-group-admin-0001"))
        waiting: list[Raw] = []
        try:
            assert started(holder)
            for i in range(2):  # one waiting on each replica
                conn = stream_open(gates[i], chat(f"queued {i}", 2), headers=bearer("sk-group-queue-0004"))
                waiting.append(conn)
                assert conn.headers["x-queue-position"] == str(i + 1)
            for g in gates:
                r = httpx.post(g.url + "/v1/chat/completions", json=chat("one too many", 2),
                               headers=bearer("sk-group-queue-0004"), timeout=10)
                assert r.status_code == 429 and r.json()["error"]["code"] == "key_queue_full", r.text
        finally:
            for conn in [holder, *waiting]:
                conn.close()


def r_last_total(c: httpx.Client, gates: list[Process], refused_at: int) -> int:
    """The tokens of the last request that went through (what the same body costs again)."""
    body = chat(f"quota {refused_at - 1}", 10)
    r = c.post(gates[0].url + "/v1/chat/completions", json=body, headers=bearer("sk-group-admin-0001"))
    assert r.status_code == 200
    return int(r.json()["usage"]["total_tokens"])


# -- Redis away, configuration out of step, rolling restart ----------------------------------------

def refused(gate: Process) -> httpx.Response:
    return httpx.post(gate.url + "/v1/chat/completions", json=chat("while away", 2), timeout=10)


def test_redis_killed_fails_closed_then_serves_again(tmp_path: Path) -> None:
    """Without its shared state no replica serves (never a line of its own): 503
    state_unavailable with Retry-After 5, /readyz 503 with the reason; when Redis is back the
    group serves again by itself."""
    with group(tmp_path, 2) as (redis, _sim, gates):
        with httpx.Client(timeout=30) as c:
            for g in gates:
                assert c.post(g.url + "/v1/chat/completions", json=chat("before", 2)).status_code == 200
        redis.kill()
        for g in gates:
            r = wait_until(lambda g=g: (lambda r: r if r.status_code == 503 else None)(refused(g)), 10,
                           "503 without Redis")
            assert r.json()["error"]["code"] == "state_unavailable", r.text
            assert r.headers["retry-after"] == "5"
            probe = httpx.get(g.url + "/readyz", timeout=5)
            assert probe.status_code == 503 and probe.json()["reason"] == "state_unavailable", probe.text
        redis.start()  # same port, empty: the group starts its line afresh
        for g in gates:
            wait_until(lambda g=g: ready(g), 20, "ready again")
        with httpx.Client(timeout=30) as c:
            for i, g in enumerate(gates):
                r = c.post(g.url + "/v1/chat/completions", json=chat(f"after {i}", 3))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == expected_reply(chat(f"after {i}", 3))
        assert all(q["depth"] == 0 for q in (queue(g) for g in gates))


def test_a_running_stream_finishes_while_redis_is_briefly_away(tmp_path: Path) -> None:
    """Redis away for less than --lease-ttl: what runs finishes, new requests are refused at
    once; the slot is given back when Redis is reachable again."""
    with group(tmp_path, 2, lease="30") as (redis, sim, gates):
        tag = f"brief-{tmp_path.name[-6:]}"
        body = chat(f"{tag} running", 100)  # about 2 s at 50 tokens/s
        conn = stream_open(gates[0], body)
        try:
            assert started(conn)
            redis.kill()
            r = wait_until(lambda: (lambda r: r if r.status_code == 503 else None)(refused(gates[1])), 10,
                           "503 without Redis")
            assert r.json()["error"]["code"] == "state_unavailable"
            assert conn.read_all(timeout=30) and conn.complete
            assert stream_text(conn) == expected_reply(body)
        finally:
            conn.close()
        redis.start()
        wait_until(lambda: all(ready(g) for g in gates), 20, "ready again")
        with httpx.Client(timeout=30) as c:
            r = c.post(gates[1].url + "/v1/chat/completions", json=chat(f"{tag} after", 3))
            assert r.status_code == 200 and r.headers["x-queue-position"] == "0", r.text
        assert httpx.get(sim.url + "/sim/stats", timeout=5).json()["cut_generations"] == 0


def test_redis_away_longer_than_the_lease_cuts_what_runs(tmp_path: Path) -> None:
    """Away longer than --lease-ttl, a replica cannot know its slot is still its own: it cuts
    its running request (with an error event), so two replicas never hold one slot."""
    with group(tmp_path, 2) as (redis, _sim, gates):
        conn = stream_open(gates[0], chat("held too long", 3000))
        try:
            assert started(conn)
            redis.kill()
            assert conn.read_all(timeout=30) and conn.complete
            events = sse_data(conn.lines())
            assert any(isinstance(e, dict) and e.get("error", {}).get("code") == "state_unavailable"
                       for e in events), conn.lines()[-5:]
        finally:
            conn.close()


def test_a_replica_with_another_configuration_stays_out_until_it_matches(tmp_path: Path) -> None:
    with group(tmp_path, 1) as (redis, sim, gates):
        lead = gates[0]
        config = tmp_path / "odd.toml"
        config.write_text("max_queue = 7\n")
        odd = replica(tmp_path, sim, redis, config=config)
        try:
            def mismatch() -> httpx.Response | None:
                r = httpx.get(odd.url + "/readyz", timeout=5)
                return r if r.status_code == 503 and r.json().get("reason") == "config_mismatch" else None
            wait_until(mismatch, 15, "config_mismatch on /readyz")
            r = refused(odd)
            assert r.status_code == 503 and r.json()["error"]["code"] == "config_mismatch", r.text
            assert ready(lead)
            assert refused(lead).status_code == 200
            lines = [ln for ln in odd.output().splitlines() if "configuration differs" in ln]
            assert len(lines) == 1, lines
            config.write_text("")  # the same as the group's now: reload, and it serves
            odd.signal(signal.SIGHUP)
            wait_until(lambda: ready(odd), 15, "the replica back in service")
            assert refused(odd).status_code == 200
        finally:
            odd.stop()


def test_a_rolling_restart_fails_no_request(tmp_path: Path) -> None:
    """SIGTERM: /readyz 503 at once (the balancer stops sending), nothing new admitted, and
    what is connected to the replica, waiting included, is served as its turn comes."""
    with group(tmp_path, 2) as (_redis, _sim, gates):
        leaving, staying = gates
        tag = f"rolling-{tmp_path.name[-6:]}"
        first = chat(f"{tag} running", 60)  # about 1 s
        bodies = [chat(f"{tag} w{i}", 3) for i in range(3)]
        conns = [stream_open(leaving, first)]
        try:
            assert started(conns[0])
            conns.append(stream_open(leaving, bodies[0]))
            conns.append(stream_open(staying, bodies[1]))
            conns.append(stream_open(leaving, bodies[2]))
            assert [c.headers["x-queue-position"] for c in conns[1:]] == ["1", "2", "3"]
            leaving.signal(signal.SIGTERM)
            wait_until(lambda: httpx.get(leaving.url + "/readyz", timeout=5).json().get("reason") == "draining",
                       10, "/readyz draining")
            r = refused(leaving)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            for conn, body in zip(conns, [first, *bodies]):
                assert conn.read_all(timeout=30) and conn.complete
                assert stream_text(conn) == expected_reply(body)
            assert leaving.proc.wait(15) == 0
            assert refused(staying).status_code == 200
        finally:
            for conn in conns:
                conn.close()


def test_quota_counts_move_from_a_single_lmgate_to_the_group(tmp_path: Path) -> None:
    """``lmgate --migrate-quotas``: a single lmgate's counts carried into the group's Redis
    (refused while that lmgate still holds its file), and the replicas go on from them."""
    config = tmp_path / "keys.toml"
    config.write_text(GROUP_KEYS)
    state_dir = tmp_path / "single-state"
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    sim = start_simulator(tmp_path, tokens_per_s=500, load_s=0)
    try:
        port = free_port()
        single = Process(["-m", "proxy", "--upstream", sim.url, "--port", str(port), "--config", str(config),
                          "--state-dir", str(state_dir)], port, tmp_path / "single.log", "/healthz")
        try:
            r = httpx.post(single.url + "/v1/chat/completions", json=chat("carried over", 8),
                           headers=bearer("sk-group-meter-0003"), timeout=30)
            assert r.status_code == 200
            used = int(r.json()["usage"]["total_tokens"])
            migrate = [sys.executable, "-m", "proxy", "--migrate-quotas", str(state_dir),
                       "--state-url", redis.url, "--config", str(config)]
            held = subprocess.run(migrate, capture_output=True, text=True, timeout=30, cwd=ROOT)
            assert held.returncode == 2 and "cannot read the quota counts" in held.stderr, held
        finally:
            single.stop()
        done = subprocess.run(migrate, capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert "copied 2 token counts" in done.stdout, done.stdout  # this day and this month
        gate = replica(tmp_path, sim, redis, config=config)
        try:
            report = httpx.get(gate.url + "/usage", headers=bearer("sk-group-meter-0003"), timeout=10).json()
            assert report["day"]["used"] == used and report["month"]["used"] == used, report
        finally:
            gate.stop()
    finally:
        sim.stop()
        redis.stop()


# -- old-API jobs across the group -----------------------------------------------------------------

JOB_KEYS = """
[[keys]]
name = "amy"
key = "sk-group-amy-0001"

[[keys]]
name = "bob"
key = "sk-group-bob-0002"
"""


def job_add(c: httpx.Client, gate: Process, doc: dict[str, Any], key: str = "sk-group-amy-0001") -> str:
    r = c.post(gate.url + "/queue/add", json={"client_id": "page", **doc}, headers=bearer(key))
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def job_record(c: httpx.Client, gate: Process, job: str, key: str = "sk-group-amy-0001") -> dict[str, Any]:
    return c.get(f"{gate.url}/request/{job}", headers=bearer(key)).json()


def job_events(c: httpx.Client, gate: Process, job: str, key: str = "sk-group-amy-0001") -> list[dict[str, Any]]:
    with c.stream("GET", f"{gate.url}/stream/{job}", headers=bearer(key)) as resp:
        return [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]


def job_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["chunk"] for e in events if "chunk" in e)


def test_an_old_api_job_is_polled_and_streamed_on_any_replica(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text(JOB_KEYS)
    with group(tmp_path, 2, config=config) as (_, _sim, gates):
        a, b = gates
        holder = stream_open(a, chat("job holder", 60), headers=bearer("sk-group-bob-0002"))
        try:
            assert started(holder)
            doc = chat("a job for the group", 8)
            with httpx.Client(timeout=30) as c:
                job = job_add(c, a, doc)
                assert job_record(c, b, job)["status"] == "queued"
                # someone else's job is unknown, on every replica
                for g in gates:
                    assert job_record(c, g, job, "sk-group-bob-0002") == {"error": "Request ID not found"}
                events = job_events(c, b, job)  # read on the other replica, from the line to the end
                assert events[0] == {"position": 1}, events[:3]
                assert events[-1] == {"done": True}
                assert job_text(events) == expected_reply(doc)
                rec = job_record(c, b, job)
                if rec["status"] != "complete":
                    open("/tmp/flakedump.txt", "w").write(f"{job}\n{rec}\n--A--\n{a.output()}\n--B--\n{b.output()}\n")
                assert rec["status"] == "complete" and rec["result"] == expected_reply(doc), rec
                assert job_events(c, a, job)[-1] == {"done": True}  # and on its own
                for g in gates:  # the group's counters, whatever replica answers
                    status = c.get(g.url + "/queue/status").json()
                    assert status["stats"]["total_received"] == 1 and status["stats"]["total_processed"] == 1
                    assert status["tracked_requests"] == 1
        finally:
            holder.close()


def test_a_job_whose_replica_is_killed_runs_again_on_another(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text(JOB_KEYS)
    with group(tmp_path, 2, config=config) as (_, sim, gates):
        a, b = gates
        doc = chat("a job that outlives its replica", 150)  # about 3 s at 50 tokens/s
        with httpx.Client(timeout=60) as c:
            job = job_add(c, a, doc)
            wait_until(lambda: job_record(c, b, job)["status"] == "processing", 15, "the job to run")
            with c.stream("GET", f"{b.url}/stream/{job}", headers=bearer("sk-group-amy-0001")) as resp:
                lines = resp.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                assert "chunk" in first
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait(10)
                rest = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
            # the reader on the surviving replica is told, and can read the new run
            assert "another one runs it again" in rest[-1]["error"], rest[-1]
            rec = wait_until(lambda: (r := job_record(c, b, job))["status"] in ("complete", "error") and r,
                             40, "the job to finish on the survivor")
            assert rec["status"] == "complete" and rec["result"] == expected_reply(doc), (job, rec, a.output()[-3000:], b.output()[-3000:])
            events = job_events(c, b, job)
            assert events[-1] == {"done": True} and job_text(events) == expected_reply(doc)
        runs = [g for g in generations(sim, "outlives its replica")]
        assert len(runs) == 2  # the cut one, and the one that finished


def test_a_rolling_restart_hands_running_jobs_to_the_group(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text(JOB_KEYS)
    with group(tmp_path, 2, config=config, grace="1") as (_, _sim, gates):
        a, b = gates
        running, waiting = chat("a long job", 200), chat("a job behind it", 4)
        with httpx.Client(timeout=60) as c:
            first = job_add(c, a, running)
            wait_until(lambda: job_record(c, a, first)["status"] == "processing", 15, "the job to run")
            second = job_add(c, a, waiting)
            a.signal(signal.SIGTERM)
            assert a.proc.wait(20) == 0
            for job, doc in ((first, running), (second, waiting)):
                rec = wait_until(lambda job=job: (r := job_record(c, b, job))["status"] in ("complete", "error")
                                 and r, 40, "the job to finish on the other replica")
                assert rec["status"] == "complete" and rec["result"] == expected_reply(doc), rec
        assert "taken over from a replica that stopped" in b.output()
        # the replica that stops schedules no more from its first moment: it never takes back
        # the jobs it hands over (it would run them into its own shutdown)
        assert "no longer schedules the group's line" in a.output()
        assert "taken over" not in a.output() and "never retrieved" not in a.output(), a.output()


def test_a_frozen_redis_is_unavailable_too_and_nothing_hangs(tmp_path: Path) -> None:
    """Redis stopped (SIGSTOP: connections open, no answers): requests and old-API jobs get
    503 state_unavailable, none waits forever; when it goes on, so does the group."""
    with group(tmp_path, 2) as (redis, _sim, gates):
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            with httpx.Client(timeout=20) as c:
                for g in gates:
                    started_at = time.monotonic()
                    r = c.post(g.url + "/v1/chat/completions", json=chat("frozen", 2))
                    assert r.status_code == 503 and r.json()["error"]["code"] == "state_unavailable", r.text
                    assert time.monotonic() - started_at < 15
                    r = c.post(g.url + "/queue/add", json={"client_id": "page", **chat("frozen job", 2)})
                    assert r.status_code == 503 and r.json()["error"]["code"] == "state_unavailable", r.text
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: all(ready(g) for g in gates), 20, "ready again")
        with httpx.Client(timeout=30) as c:
            r = c.post(gates[0].url + "/v1/chat/completions", json=chat("thawed", 3))
            assert r.status_code == 200, r.text
