"""Byte-level pieces of quotas and chat-UI feedback: asking the upstream for usage, taking the
usage chunk back out of the stream, and the waiting-line chunks."""

from __future__ import annotations

import json
import re

import pytest

from proxy.auth import Principal
from proxy.config import ApiKey
from proxy.errors import BadRequest
from proxy.admission import feedback_mode
from proxy.errors import BadRequest
from proxy.inbound import ask_for_usage, parse_request, token_limit
from proxy.streaming import Usage, UsageMeter, UsageRemover, read_usage, reasoning_chunk, waiting_line

CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_ask_for_usage_inserts_bytes_and_keeps_the_rest() -> None:
    raw = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "caf\\u00e9"}]}'
    body, asked = ask_for_usage(raw, parse_request(raw), "/v1/chat/completions")
    assert asked
    assert body.endswith(raw[1:])  # the client's bytes follow, untouched
    assert json.loads(body)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("raw, route, expect_asked", [
    (b'{"model": "m", "stream": false}', "/v1/chat/completions", False),
    (b'{"model": "m", "stream": true}', "/v1/embeddings", False),
    (b'{"model": "m", "stream": true}', "/v1/responses", False),  # usage comes anyway
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}', "/v1/completions", False),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": false}, "max_tokens": 5}',
     "/v1/chat/completions", True),
    (b'{"model": "m", "stream": true, "stream_options": null, "max_tokens": 5}',
     "/v1/chat/completions", True),
])
def test_ask_for_usage_only_where_needed(raw: bytes, route: str, expect_asked: bool) -> None:
    body, asked = ask_for_usage(raw, parse_request(raw), route)
    assert asked is expect_asked
    if not asked:
        assert body == raw
    else:
        doc = json.loads(body)
        assert doc["stream_options"]["include_usage"] is True and doc["max_tokens"] == 5


def test_remover_takes_out_only_the_usage_chunk() -> None:
    remover = UsageRemover()
    out = remover.feed(CHUNK + CHUNK) + remover.feed(USAGE + DONE) + remover.flush()
    assert out == CHUNK + CHUNK + DONE
    assert remover.usage is not None and remover.usage.total == 5


def test_remover_recognises_a_usage_chunk_cut_anywhere() -> None:
    stream = CHUNK + USAGE + DONE
    for cut in range(1, len(stream)):
        remover = UsageRemover()
        out = remover.feed(stream[:cut]) + remover.feed(stream[cut:]) + remover.flush()
        assert out == CHUNK + DONE, cut
        assert remover.usage is not None and remover.usage.prompt == 3


def test_remover_keeps_content_chunks_that_mention_usage_and_crlf_events() -> None:
    talks = b'data: {"choices":[{"index":0,"delta":{"content":"\\"usage\\": none"}}]}\r\n\r\n'
    with_usage = b'data: {"choices":[{"index":0,"delta":{}}],"usage":{"total_tokens":9}}\n\n'
    remover = UsageRemover()
    out = remover.feed(talks + with_usage) + remover.flush()
    assert out == talks + with_usage  # not usage-only: the client sees it as the upstream sent it
    assert remover.usage is None


def test_remover_passes_whole_events_at_once() -> None:
    remover = UsageRemover()
    assert remover.feed(CHUNK) == CHUNK  # nothing held back when events arrive whole
    assert remover.feed(CHUNK[:10]) == b""
    assert remover.feed(CHUNK[10:]) == CHUNK


def test_read_usage_shapes() -> None:
    assert read_usage({"usage": {"prompt_tokens": 2, "completion_tokens": 3}}).total == 5
    assert read_usage({"type": "response.completed",
                       "response": {"usage": {"input_tokens": 4, "output_tokens": 6,
                                              "total_tokens": 10}}}).total == 10
    assert read_usage({"usage": None}) is None
    assert read_usage([1]) is None


def test_waiting_chunk_is_one_data_line_the_sdk_shape_reads() -> None:
    line = waiting_line(3, 40_400)
    assert line == "Waiting in line: #3, about 40 s\n"
    assert waiting_line(1, None) == "Waiting in line: #1\n"
    assert waiting_line(12, 600_000) == "Waiting in line: #12, about 10 min\n"
    raw = reasoning_chunk("lmgate-queue-x", "qwen", line)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2
    doc = json.loads(raw[6:])
    assert doc["object"] == "chat.completion.chunk" and doc["model"] == "qwen"
    choice = doc["choices"][0]
    assert choice["finish_reason"] is None and "content" not in choice["delta"]
    assert re.fullmatch(r"Waiting in line: #\d+(, about \d+ (s|min))?\n", choice["delta"]["reasoning_content"])


def test_feedback_mode_precedence() -> None:
    key = ApiKey(name="k", sha256="0" * 64, feedback="reasoning")
    keyed, plain = Principal("key:k", key), Principal("127.0.0.1")
    assert feedback_mode({}, plain, "comments") == "comments"
    assert feedback_mode({}, keyed, "comments") == "reasoning"
    assert feedback_mode({b"x-queue-feedback": b"Comments"}, keyed, "reasoning") == "comments"
    with pytest.raises(BadRequest) as err:
        feedback_mode({b"x-queue-feedback": b"loud"}, plain, "comments")
    assert err.value.param == "X-Queue-Feedback"


# -- counting tokens in every shape a route reports them ------------------------------------

def _feed_in_pieces(meter: UsageMeter, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        meter.feed(data[i:i + size])


NATIVE_STREAM = (
    b'event: chat.start\ndata: {"type":"chat.start","model_instance_id":"m"}\n\n'
    b'event: message.delta\ndata: {"type":"message.delta","content":"Hello"}\n\n'
    b'event: message.delta\ndata: {"type":"message.delta","content":" there"}\n\n'
    b'event: chat.end\ndata: {"type":"chat.end","result":{"model_instance_id":"m","output":'
    b'[{"type":"message","content":"Hello there"}],"stats":{"input_tokens":329,'
    b'"total_output_tokens":268,"reasoning_output_tokens":5,"tokens_per_second":43.7}}}\n\n'
)


@pytest.mark.parametrize("piece", [7, 64, 100_000])
def test_lm_studio_native_chat_stream_is_counted_from_chat_end_stats(piece: int) -> None:
    """Regression: /api/v1/chat reports tokens as stats.input_tokens / total_output_tokens,
    never as usage; a quota key using it was counted two content deltas."""
    meter = UsageMeter(sse=True)
    _feed_in_pieces(meter, NATIVE_STREAM, piece)
    assert meter.usage() == Usage(329, 268, 597)


def test_lm_studio_native_chat_answer_is_counted_from_stats() -> None:
    meter = UsageMeter(sse=False)
    meter.feed(b'{"model_instance_id":"m","output":[{"type":"message","content":"hi"}],'
               b'"stats":{"input_tokens":12,"total_output_tokens":30}}')
    assert meter.usage() == Usage(12, 30, 42)


def test_a_json_answer_over_4_mib_is_still_counted() -> None:
    """Regression: an embeddings batch over 4 MiB counted 0 tokens."""
    rows = ",".join('{"object":"embedding","index":%d,"embedding":[%s]}' % (i, ",".join(["0.125"] * 200))
                    for i in range(5000))
    body = ('{"object":"list","data":[%s],"model":"e","usage":{"prompt_tokens":5000,"total_tokens":5000}}'
            % rows).encode()
    assert len(body) > 5 * 1024 * 1024
    meter = UsageMeter(sse=False)
    _feed_in_pieces(meter, body, 65536)
    assert meter.usage() == Usage(5000, None, 5000)


def test_anthropic_message_stream_merges_input_and_output() -> None:
    meter = UsageMeter(sse=True)
    meter.feed(b'event: message_start\ndata: {"type":"message_start","message":{"id":"x","usage":'
               b'{"input_tokens":25,"output_tokens":1}}}\n\n')
    meter.feed(b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":'
               b'{"type":"text_delta","text":"Hi"}}\n\n')
    meter.feed(b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
               b'"usage":{"output_tokens":15}}\n\n')
    assert meter.usage() == Usage(25, 15, 40)


def test_responses_api_and_openai_usage_chunks() -> None:
    meter = UsageMeter(sse=True)
    meter.feed(b'data: {"type":"response.completed","response":{"usage":{"input_tokens":3,'
               b'"output_tokens":4,"total_tokens":7}}}\n\n')
    assert meter.usage() == Usage(3, 4, 7)
    meter = UsageMeter(sse=True)
    chunk = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
    _feed_in_pieces(meter, chunk + usage + b"data: [DONE]\n\n", 5)
    assert meter.usage() == Usage(9, 2, 11)


def test_a_stream_that_reports_nothing_counts_what_was_streamed() -> None:
    meter = UsageMeter(sse=True)
    for word in ("a", "b", "c"):
        meter.feed(b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % word.encode())
    assert meter.usage() == Usage(None, 3, 3, True)
    assert meter.deltas == 3


def test_text_that_mentions_usage_is_not_a_report() -> None:
    meter = UsageMeter(sse=True)
    meter.feed(b'data: {"choices":[{"delta":{"content":"the \\"usage\\": {} field"}}]}\n\n')
    assert meter.usage().approx


@pytest.mark.parametrize("options", [b'"x"', b"[]", b"true", b"1"])
def test_a_malformed_stream_options_is_refused_when_usage_must_be_counted(options: bytes) -> None:
    """Regression: ``stream_options: "x"`` (or [], true) was passed on as it was; the upstream
    then streamed no usage and the prompt of a quota key's request went uncounted."""
    raw = b'{"model": "m", "stream": true, "stream_options": ' + options + b"}"
    with pytest.raises(BadRequest) as info:
        ask_for_usage(raw, parse_request(raw), "/v1/chat/completions")
    assert info.value.param == "stream_options" and info.value.status == 400


def test_token_limit_is_the_smallest_limit_after_the_cap() -> None:
    assert token_limit({"max_tokens": 50, "max_completion_tokens": 20}) == 20
    assert token_limit({}, {"max_tokens": 64}) == 64
    assert token_limit({"max_tokens": 500}, {"max_tokens": 100}) == 100
    assert token_limit({"max_tokens": True}) is None and token_limit({}) is None
