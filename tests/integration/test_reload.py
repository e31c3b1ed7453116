"""Live reload in process: boxes added and removed under a held request, a bad file refused,
keys replaced. Every box points at the one scripted upstream server, under its own name."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from proxy.config import load_settings

from .harness import BoxServer, Upstream, chat_body, run, serve

BOX = '[[upstreams]]\nname = "{name}"\nurl = "{url}"\n'


def write(path: Path, url: str, *boxes: str, extra: str = "") -> None:
    path.write_text(extra + "".join(BOX.format(name=b, url=url) for b in boxes), encoding="utf-8")


async def until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async def loop() -> None:
        while not check():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(loop(), timeout)


def boxes(queue: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {b["name"]: b for b in queue["upstreams"]}


def test_reload_adds_and_removes_boxes_without_dropping_a_request(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"

    async def body() -> None:
        async with BoxServer(Upstream()) as box:
            write(path, box.url, "one")
            async with serve(load_settings(["--config", str(path)], env={}), box=box) as r:
                r.state.argv, r.state.environ = ["--config", str(path)], {}
                held = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold")))
                await r.upstream.wait_for_requests(1)
                assert r.state.gate.boxes["one"].running
                waiting = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body()))
                await r.wait_depth(1)

                write(path, box.url, "one", "two")
                answer = (await r.client.post("/admin/reload")).json()
                assert answer["added"] == ["two"] and answer["removing"] == []
                # the new box is checked, comes up, and takes the waiting request
                done = await asyncio.wait_for(waiting, 10)
                assert done.status_code == 200 and done.headers["x-upstream"] == "two"

                write(path, box.url, "two")
                answer = (await r.client.post("/admin/reload")).json()
                assert answer["removing"] == ["one"]
                view = boxes((await r.client.get("/queue")).json())
                assert view["one"]["removed"] and view["one"]["running"] == 1
                later = await r.client.post("/v1/chat/completions", json=chat_body())
                assert later.status_code == 200, later.text
                assert later.headers["x-upstream"] == "two"  # nothing new starts on a removed box
                r.upstream.release(0)
                first = await held
                assert first.status_code == 200 and first.headers["x-upstream"] == "one"
                await until(lambda: "one" not in r.state.gate.boxes)
                assert list(boxes((await r.client.get("/queue")).json())) == ["two"]
                await until(lambda: "one" not in r.state.upstreams)
                await r.assert_gate_free()
    run(body)


def test_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"

    async def body() -> None:
        async with BoxServer(Upstream()) as box:
            write(path, box.url, "one")
            async with serve(load_settings(["--config", str(path)], env={}), box=box) as r:
                r.state.argv, r.state.environ = ["--config", str(path)], {}
                path.write_text("[[upstreams]\nurl = ", encoding="utf-8")
                resp = await r.client.post("/admin/reload")
                assert resp.status_code == 400
                assert resp.json()["error"]["code"] == "invalid_config"
                assert list(r.state.upstreams) == ["one"]
                write(path, box.url, "one", extra='max_queue = -1\n')
                assert (await r.client.post("/admin/reload")).status_code == 400
                assert r.state.gate.max_queue == 100
                await r.assert_gate_free()
    run(body)


def test_reload_replaces_keys_and_needs_an_admin(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"
    keys = ('[[keys]]\nname = "root"\nkey = "sk-root-reload-01"\nrole = "admin"\n'
            '[[keys]]\nname = "amy"\nkey = "sk-amy-reload-0001"\n')

    async def body() -> None:
        async with BoxServer(Upstream()) as box:
            write(path, box.url, "one", extra=keys)
            async with serve(load_settings(["--config", str(path)], env={}), box=box) as r:
                r.state.argv, r.state.environ = ["--config", str(path)], {}
                amy = {"authorization": "Bearer sk-amy-reload-0001"}
                root = {"authorization": "Bearer sk-root-reload-01"}
                assert (await r.client.post("/admin/reload")).status_code == 401
                assert (await r.client.post("/admin/reload", headers=amy)).status_code == 403
                ok = await r.client.post("/v1/chat/completions", json=chat_body(), headers=amy)
                assert ok.status_code == 200
                write(path, box.url, "one", extra="max_queue = 7\n"
                      + keys.replace("sk-amy-reload-0001", "sk-amy-reload-0002"))
                answer = await r.client.post("/admin/reload", headers=root)
                assert answer.status_code == 200 and answer.json()["keys"] == 2
                old = await r.client.post("/v1/chat/completions", json=chat_body(), headers=amy)
                assert old.status_code == 401
                new = await r.client.post("/v1/chat/completions", json=chat_body(),
                                          headers={"authorization": "Bearer sk-amy-reload-0002"})
                assert new.status_code == 200
                assert r.state.gate.max_queue == 7
    run(body)


def test_without_a_config_file_there_is_nothing_to_reload() -> None:
    async def body() -> None:
        async with serve() as r:
            resp = await r.client.post("/admin/reload")
            assert resp.status_code == 400 and "without --config" in resp.json()["error"]["message"]
            assert isinstance(resp, httpx.Response)
    run(body)


def test_a_reload_that_removes_the_only_box_for_a_model_answers_its_waiters_at_once(tmp_path: Path) -> None:
    """Requests waiting for a model whose only box a reload took away get 404 model_not_found
    at once (the answer a new request gets), not a wait until the queue timeout; what runs
    on the removed box finishes."""
    path = tmp_path / "lmgate.toml"
    one = '[[upstreams]]\nname = "one"\nurl = "{url}"\nmodels = ["m1"]\n'
    two = '[[upstreams]]\nname = "two"\nurl = "{url}"\nmodels = ["m2"]\n'

    async def body() -> None:
        async with BoxServer(Upstream()) as box:
            path.write_text((one + two).format(url=box.url), encoding="utf-8")
            async with serve(load_settings(["--config", str(path)], env={}), box=box) as r:
                r.state.argv, r.state.environ = ["--config", str(path)], {}
                held = asyncio.create_task(r.client.post("/v1/chat/completions",
                                                         json=chat_body("m1", act="hold")))
                await r.upstream.wait_for_requests(1)
                waiting = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body("m1")))
                stream = asyncio.create_task(r.client.post("/v1/chat/completions",
                                                           json=chat_body("m1", stream=True)))
                await r.wait_depth(2)
                path.write_text(two.format(url=box.url), encoding="utf-8")
                answer = (await r.client.post("/admin/reload")).json()
                assert answer["removing"] == ["one"]
                plain = await asyncio.wait_for(waiting, 5)
                assert plain.status_code == 404 and plain.json()["error"]["code"] == "model_not_found"
                streamed = await asyncio.wait_for(stream, 5)
                assert streamed.status_code == 200  # its headers had left: the error comes as an event
                assert '"code": "model_not_found"' in streamed.text
                fresh = await r.client.post("/v1/chat/completions", json=chat_body("m1"))
                assert fresh.status_code == 404
                r.upstream.release(0)
                assert (await held).status_code == 200
                assert len(r.upstream.seen) == 1  # nothing of the stranded requests reached a box
    run(body)


def test_a_box_removed_and_added_back_while_busy_stays(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"

    async def body() -> None:
        async with BoxServer(Upstream()) as box:
            write(path, box.url, "one", "two")
            async with serve(load_settings(["--config", str(path)], env={}), box=box) as r:
                r.state.argv, r.state.environ = ["--config", str(path)], {}
                await until(lambda: all(b.up for b in r.state.gate.boxes.values()))
                held = asyncio.create_task(r.client.post("/v1/chat/completions", json=chat_body(act="hold")))
                await r.upstream.wait_for_requests(1)
                busy = next(b.name for b in r.state.gate.boxes.values() if b.running)
                write(path, box.url, *[b for b in ("one", "two") if b != busy])
                assert (await r.client.post("/admin/reload")).json()["removing"] == [busy]
                write(path, box.url, "one", "two")
                assert (await r.client.post("/admin/reload")).status_code == 200
                r.upstream.release(0)
                assert (await held).status_code == 200
                await r.assert_gate_free()
                assert busy in r.state.gate.boxes and not r.state.gate.boxes[busy].removed
                assert busy in r.state.upstreams
    run(body)


def test_reload_applies_upstream_timeouts_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"

    async def body() -> None:
        async with BoxServer(Upstream()) as box:
            write(path, box.url, "one", extra="read_timeout = 600\n")
            async with serve(load_settings(["--config", str(path)], env={}), box=box) as r:
                r.state.argv, r.state.environ = ["--config", str(path)], {}
                write(path, box.url, "one",
                      extra="read_timeout = 7\nload_mode = \"jit\"\npolicy = \"fair\"\n")
                answer = (await r.client.post("/admin/reload")).json()
                assert r.state.upstreams["one"].timeouts["read"] == 7
                assert set(answer["restart_needed"]) == {"load_mode", "policy"}
    run(body)


def test_every_setting_is_either_applied_by_a_reload_or_named_as_needing_a_restart() -> None:
    """A new setting must be placed in one of the two lists, so a reload never silently
    ignores a change."""
    import dataclasses

    from proxy.config import Settings
    from proxy.state import RELOADED, RESTART_ONLY

    fields = {f.name for f in dataclasses.fields(Settings)} - {"sources", "config", "demo", "upstream"}
    assert not set(RELOADED) & set(RESTART_ONLY)
    assert fields == set(RELOADED) | set(RESTART_ONLY), fields ^ (set(RELOADED) | set(RESTART_ONLY))
