"""The team's chat page reads /v1/chat/completions line by line and switches its display on
the queue comments: "Queue position: N" while waiting, "Processing..." on the final
``: queue_position=0``. Driven here the same way, against a real lmgate and simulator."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from proxy.simulator import expected_reply
from tests.e2e.helpers import chat_body, queue, read_stream, wait_until
from tests.servers import Process, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    with running_stack(tmp_path_factory.mktemp("team"), "--log-level", "warning",
                       tokens_per_s=60, load_s=0.05) as pair:
        yield pair


def body(content: str, max_tokens: int = 8) -> dict:
    return chat_body(content, max_tokens, stream=True)


def read_lines(proc: Process, payload: dict) -> list[str]:
    return read_stream(proc, payload, timeout=30)[1]


def displays(lines: list[str]) -> tuple[list[str], str]:
    """What the chat page shows over time, and the text it assembles."""
    shown, text = [], ""
    for line in lines:
        if line.startswith(": queue_position="):
            pos = int(line.split("=", 1)[1])
            shown.append("Processing..." if pos == 0 else f"Queue position: {pos}")
        elif line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            text += delta.get("content") or ""
    return shown, text


def test_a_stream_that_starts_at_once_says_so_first(stack: tuple[Process, Process]) -> None:
    sim, gate = stack
    payload = body("no wait")
    through = read_lines(gate, payload)
    direct = read_lines(sim, payload)
    assert through[:4] == [": queue_entered=0", "", ": queue_position=0", ""]
    data = [line for line in through if line.startswith("data: ")]
    assert len(data) == len([line for line in direct if line.startswith("data: ")])
    assert displays(through) == (["Processing..."], expected_reply(payload))


def test_a_waiting_stream_reports_entry_position_changes_and_the_final_zero(stack: tuple[Process, Process]) -> None:
    _, gate = stack
    first = body("hold the gate", max_tokens=90)  # ~1.5 s
    results: dict[int, list[str]] = {}
    holder = threading.Thread(target=lambda: results.setdefault(0, read_lines(gate, first)))
    holder.start()
    # wait until the holder runs, then queue two behind it (the second runs ~2 s, long
    # enough for a position change to be reported: at most one a second)
    wait_until(lambda: queue(gate)["active"] == 1, 10, "the holder to run")
    second = threading.Thread(target=lambda: results.setdefault(1, read_lines(gate, body("second", 120))))
    second.start()
    wait_until(lambda: queue(gate)["depth"] == 1, 10, "the second to wait")
    third_payload = body("third")
    results[2] = read_lines(gate, third_payload)
    holder.join(30)
    second.join(30)
    lines = results[2]
    comments = [line for line in lines if line.startswith(":")]
    assert comments[0] == ": queue_entered=2" and comments[1] == ": queue_position=2"
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    last_comment_before_data = [line for line in lines[:first_data] if line.startswith(": queue_position")][-1]
    assert last_comment_before_data == ": queue_position=0"
    shown, text = displays(lines)
    assert shown[0] == "Queue position: 2" and "Queue position: 1" in shown and shown[-1] == "Processing..."
    assert text == expected_reply(third_payload)
    assert not any(line.startswith("id:") for line in lines)
