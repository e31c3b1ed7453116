"""What the simulated model says: reply text, tool calls, embeddings and token counts.

Pure functions of a request body, so that tests can compute the exact reply in advance.
The reply echoes what the turn answers: the last user message, or, when the turn carries a
tool's result (a ``tool`` message after the last user message), that result, as a model
that was given the answer to its tool call would answer the user instead of calling again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

DEFAULT_MAX_TOKENS = 12
MAX_TOKENS_CAP = 4096
MAX_WORD_LEN = 65_536  # cap of the ``x_word_len`` body field (test knob: long filler words)
EMBEDDING_DIM = 8
_FILLER = "the quick brown fox jumps over the lazy dog".split()


def content_text(content: Any) -> str:
    """Text of a message ``content``: a string or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return " ".join(str(p) for p in prompt)
    return prompt if isinstance(prompt, str) else ""


def last_user_text(body: dict) -> str:
    """The last user message text (chat) or the prompt (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return content_text(msg.get("content"))
        return ""
    return prompt_text(body.get("prompt"))


def as_chat(native: dict) -> dict:
    """A body of LM Studio's native ``POST /api/v1/chat`` (``input``: a string or a list of
    messages, ``max_output_tokens``) as the chat body the rest of this module reads."""
    raw = native.get("input")
    if isinstance(raw, list):
        messages = [m for m in raw if isinstance(m, dict)]
    else:
        messages = [{"role": "user", "content": raw if isinstance(raw, str) else ""}]
    return {"model": native.get("model"), "messages": messages,
            "max_tokens": native.get("max_output_tokens")}


def tool_results(body: dict) -> list[str] | None:
    """Texts of the ``tool`` messages after the last user message, in order: the tool results
    this turn answers. None when there are none (the turn answers the user)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    results: list[str] = []
    for msg in reversed(messages):
        if not isinstance(msg, dict):
            continue
        if msg.get("role") == "user":
            break
        if msg.get("role") == "tool":
            results.append(content_text(msg.get("content")))
    return results[::-1] or None


def prompt_tokens(body: dict) -> int:
    """Word count of the whole prompt (all chat messages, or the prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(content_text(m.get("content")).split())
                   for m in messages if isinstance(m, dict))
    return len(prompt_text(body.get("prompt")).split())


def max_tokens(body: dict) -> int:
    value = body.get("max_tokens") or body.get("max_completion_tokens")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        value = DEFAULT_MAX_TOKENS
    return min(value, MAX_TOKENS_CAP)


def word_len(body: dict) -> int:
    """The ``x_word_len`` test knob: filler words padded to this many characters (0 = off),
    so that a stream can carry megabytes with few tokens."""
    value = body.get("x_word_len")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return 0
    return min(value, MAX_WORD_LEN)


def reply_words(body: dict) -> tuple[list[str], bool]:
    """Reply tokens and whether the echo had to be truncated."""
    results = tool_results(body)
    echoed = " ".join(results) if results is not None else last_user_text(body)
    words = [f"[{body.get('model', '')}]"] + echoed.split()
    limit = max_tokens(body)
    truncated = len(words) > limit
    width = word_len(body)
    i = 0
    while len(words) < limit:
        word = _FILLER[i % len(_FILLER)]
        words.append((word * (width // len(word) + 1))[:width] if width else word)
        i += 1
    return words[:limit], truncated


def expected_reply(body: dict) -> str:
    """Exact assistant text the simulator produces for a (chat) completion body: the model in
    brackets, then the words of the last user message (or of the tool results the turn
    answers), then filler up to ``max_tokens``."""
    return " ".join(reply_words(body)[0])


def chosen_tool(body: dict) -> str | None:
    """Name of the tool the simulator will call, or None for a text reply (no tools offered,
    ``tool_choice: "none"``, or the turn carries the result of a call already made)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if tool_results(body) is not None:
        return None
    names = [(t.get("function") or {}).get("name") or t.get("name") or "tool"
             for t in tools if isinstance(t, dict)]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        if wanted in names:
            return wanted
    return names[0] if names else None


def expected_tool_call(body: dict) -> dict[str, str]:
    """``{"name", "arguments"}`` of the tool call the simulator makes (arguments is JSON)."""
    name = chosen_tool(body) or ""
    return {"name": name, "arguments": json.dumps({"location": last_user_text(body)})}


def tool_call_id(body: dict, call: dict[str, str]) -> str:
    seed = f"{body.get('model')}|{call['name']}|{call['arguments']}".encode()
    return "call_" + hashlib.sha256(seed).hexdigest()[:24]


def embedding(model: str, text: str) -> list[float]:
    digest = hashlib.sha256(f"{model}|{text}".encode()).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest[:EMBEDDING_DIM]]
