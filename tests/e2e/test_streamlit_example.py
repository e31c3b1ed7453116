"""The Streamlit example (examples/streamlit_chat.py) driven by Streamlit's AppTest against a
real lmgate in front of the simulator (both subprocesses).

AppTest runs the real script, ``st.write_stream`` included: it consumes the generator that
iterates the openai SDK stream and records the final markdown, so the assertions below see
what a browser would show once the reply has finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.simulator import DEFAULT_MODELS, expected_reply  # noqa: E402
from tests.e2e.helpers import queue, sdk, wait_idle
from tests.servers import Process, free_port

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest

APP = Path(__file__).resolve().parents[2] / "examples" / "streamlit_chat.py"
MODEL_A, MODEL_B, EMBED = DEFAULT_MODELS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def lmgate(shared_stack: Callable[..., tuple[Process, Process]]) -> Process:
    """One lmgate (and simulator) for the module; each test starts on an idle gate."""
    _, gate = shared_stack(tokens_per_s=50.0, load_s=0.1)
    wait_idle(gate)
    return gate


@pytest.fixture
def app(lmgate: Process, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("LMGATE_URL", lmgate.url + "/v1")
    monkeypatch.delenv("LMGATE_API_KEY", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def assistant_messages(at: AppTest) -> list:
    return [m for m in at.chat_message if m.name == "assistant"]


def occupy(lmgate: Process, model: str, started: threading.Event) -> threading.Thread:
    """A long streamed request on lmgate (about 1.5 s), so the app's request has to wait."""

    def run() -> None:
        body = {"model": model, "stream": True, "max_tokens": 75,
                "messages": [{"role": "user", "content": "blocker"}]}
        with lmgate.http.stream("POST", "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    started.set()  # the first event: it is running upstream now

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10), "the blocking request never started"
    return thread


def test_model_picker_lists_simulator_models(app):
    (picker,) = app.sidebar.selectbox
    assert picker.label == "Model"
    # the chat models LM Studio (the simulator) offers; the embedding model is left out
    assert list(picker.options) == [MODEL_A, MODEL_B]
    assert picker.value == MODEL_A
    assert len(app.chat_input) == 1
    assert not app.chat_message


def test_chat_waits_in_line_then_streams_the_reply(app, lmgate):
    app.sidebar.selectbox[0].select(MODEL_B).run()
    assert not app.exception

    # first turn: another request is running, so the app's request waits as number 1
    blocker = occupy(lmgate, MODEL_B, threading.Event())
    app.chat_input[0].set_value("hello from streamlit").run()
    blocker.join(30)
    assert not app.exception, [e.value for e in app.exception]
    sent = {"model": MODEL_B, "messages": [{"role": "user", "content": "hello from streamlit"}]}
    (answer,) = assistant_messages(app)
    assert answer.markdown[0].value == expected_reply(sent)
    assert "hello from streamlit" in answer.markdown[0].value
    caption = answer.caption[0].value
    assert "position at arrival: 1 in line" in caption, caption
    assert "estimated wait:" in caption and "first token after" in caption, caption
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    assert app.session_state["messages"][1]["content"] == expected_reply(sent)

    # second turn: nobody else in line; the whole history goes to lmgate
    app.chat_input[0].set_value("and again").run()
    assert not app.exception, [e.value for e in app.exception]
    sent["messages"] += [{"role": "assistant", "content": expected_reply(sent)},
                         {"role": "user", "content": "and again"}]
    answers = assistant_messages(app)
    assert [m.name for m in app.chat_message] == ["user", "assistant", "user", "assistant"]
    assert answers[0].markdown[0].value == app.session_state["messages"][1]["content"]  # re-rendered
    assert answers[1].markdown[0].value == expected_reply(sent)
    assert "position at arrival: 0" in answers[1].caption[0].value
    assert "first token after" in answers[1].caption[0].value


def test_unreachable_lmgate_shows_an_error(monkeypatch):
    monkeypatch.setenv("LMGATE_URL", f"http://127.0.0.1:{free_port()}/v1")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.sidebar.error and "cannot list models" in at.sidebar.error[0].value
    assert not at.chat_input  # st.stop() before the chat


def test_queue_headers_arrive_before_the_turn(lmgate):
    """What the app relies on to say "You are number N in line" while it waits (AppTest
    only shows the page after the run, when that notice has given way to the reply):
    ``with_raw_response.create(stream=True)`` returns with lmgate's queue headers while
    the request is still waiting."""
    client = sdk(lmgate, "x")
    blocker = occupy(lmgate, MODEL_A, threading.Event())
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_A, stream=True, messages=[{"role": "user", "content": "waiting"}])
    line = queue(lmgate)
    assert blocker.is_alive() and line["active"] == 1 and line["depth"] == 1, line
    assert raw.headers["x-queue-position"] == "1"
    eta = raw.headers.get("x-queue-eta-ms")  # present once lmgate has seen a request finish
    assert eta is None or int(eta) >= 0
    with raw.parse() as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    blocker.join(30)
    assert text == expected_reply({"model": MODEL_A, "messages": [{"role": "user", "content": "waiting"}]})
