"""A small chat UI in front of lmgate, with the queue made visible.

    pip install streamlit openai
    LMGATE_URL=http://127.0.0.1:1235/v1 streamlit run examples/streamlit_chat.py

Settings (environment):
    LMGATE_URL       lmgate's OpenAI base URL       (default http://127.0.0.1:1235/v1)
    LMGATE_API_KEY   an lmgate key, if keys are set  (default "not-needed")

How the queue position is shown: when a streamed request has to wait, lmgate answers
at once with the response headers ``x-queue-position`` and ``x-queue-eta-ms`` and keeps
the stream open (with SSE comments) until the request's turn comes. The openai SDK hides
SSE comments, so this app reads the headers through ``with_raw_response`` -- they arrive
before the first token -- and only then iterates the stream.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import openai
import streamlit as st

BASE_URL = os.environ.get("LMGATE_URL", "http://127.0.0.1:1235/v1")
API_KEY = os.environ.get("LMGATE_API_KEY", "not-needed")


@st.cache_resource
def get_client(base_url: str, api_key: str) -> openai.OpenAI:
    # No retries: a 429 (queue full) should be shown, not silently repeated. A long read
    # timeout: waiting in line and model loading can take minutes.
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=900)


@st.cache_data(ttl=30, show_spinner=False)
def chat_models(base_url: str, api_key: str) -> list[str]:
    """Model ids lmgate (that is, LM Studio) offers, embedding models left out."""
    ids = [m.id for m in get_client(base_url, api_key).models.list()]
    chat = [i for i in ids if "embed" not in i.lower()]
    return chat or ids


def header_int(headers: Any, name: str) -> int | None:
    try:
        return int(headers.get(name))
    except (TypeError, ValueError):
        return None


def seconds(ms: int | None) -> str:
    return "?" if ms is None else f"{ms / 1000:.1f} s"


def wait_caption(info: dict[str, Any]) -> str:
    pos, eta, ttft = info.get("position"), info.get("eta_ms"), info.get("ttft_s")
    parts = []
    if pos is None:
        parts.append("queue position unknown (not served through lmgate?)")
    elif pos == 0:
        parts.append("position at arrival: 0 (served at once, no wait)")
    else:
        parts.append(f"position at arrival: {pos} in line")
        parts.append(f"estimated wait: {seconds(eta)}")
    if ttft is not None:
        parts.append(f"first token after {ttft:.1f} s")
    return " · ".join(parts)


def reply(client: openai.OpenAI, model: str, messages: list[dict[str, str]]) -> dict[str, Any] | None:
    """Stream one assistant reply into the current chat message; None if it failed."""
    notice = st.empty()
    info: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        # Returns as soon as lmgate sends the response headers: at once for a request
        # that has to wait, which is what lets us show the position before the turn comes.
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages,
                                                               stream=True)
    except openai.APIStatusError as exc:
        notice.error(f"lmgate refused the request ({exc.status_code}): {exc.message}")
        return None
    except openai.APIConnectionError:
        notice.error(f"cannot reach lmgate at {client.base_url}; is it running?")
        return None

    info["position"] = header_int(raw.headers, "x-queue-position")
    info["eta_ms"] = header_int(raw.headers, "x-queue-eta-ms")
    info["request_id"] = raw.headers.get("x-request-id")
    if info["position"]:
        notice.info(f"⏳ You are number {info['position']} in line "
                    f"(estimated wait {seconds(info['eta_ms'])}). The reply starts when it is your turn.")

    def tokens() -> Iterator[str]:
        with raw.parse() as stream:
            for chunk in stream:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if not text:
                    continue
                if "ttft_s" not in info:
                    info["ttft_s"] = time.monotonic() - t0
                    notice.empty()
                yield text

    try:
        text = st.write_stream(tokens())
    except openai.APIError as exc:  # e.g. an error event in the stream: timeout, shutdown
        notice.error(f"the reply broke off: {exc.message}")
        return None
    notice.empty()
    info["content"] = text if isinstance(text, str) else "".join(map(str, text))
    info["caption"] = wait_caption(info)
    st.caption(info["caption"])
    return info


def main() -> None:
    st.set_page_config(page_title="lmgate chat", page_icon="💬")
    st.title("💬 Chat through lmgate")
    client = get_client(BASE_URL, API_KEY)

    with st.sidebar:
        st.header("Settings")
        try:
            models = chat_models(BASE_URL, API_KEY)
        except openai.APIError as exc:
            st.error(f"cannot list models from {BASE_URL}: {exc.message}")
            st.stop()
        if not models:
            st.warning("LM Studio offers no models; download or load one first.")
            st.stop()
        model = st.selectbox("Model", models, key="model")
        if st.button("Clear chat"):
            st.session_state.messages = []
        st.caption(f"lmgate: {BASE_URL}")
        st.caption(f"Queue status page: {BASE_URL.rstrip('/').removesuffix('/v1')}/")

    if "messages" not in st.session_state:
        st.session_state.messages = []

    for msg in st.session_state.messages:
        with st.chat_message(msg["role"]):
            st.markdown(msg["content"])
            if msg.get("caption"):
                st.caption(msg["caption"])

    prompt = st.chat_input("Ask something")
    if not prompt:
        return
    st.session_state.messages.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    history = [{"role": m["role"], "content": m["content"]} for m in st.session_state.messages]
    with st.chat_message("assistant"):
        done = reply(client, model, history)
    if done is None:
        st.session_state.messages.pop()  # let the user send it again
        return
    st.session_state.messages.append({"role": "assistant", "content": done["content"],
                                      "caption": done["caption"], "model": model})


main()
