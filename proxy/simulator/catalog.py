"""The models a simulator serves: kinds, sizes, default load configs and the entries of
``/v1/models``, ``/api/v0/models`` and ``/api/v1/models``."""

from __future__ import annotations

import re
from typing import Any

DEFAULT_MODELS: tuple[str, ...] = (
    "qwen2.5-7b-instruct",
    "llama-3.2-3b-instruct",
    "text-embedding-nomic-embed-text-v1.5",
)
_KNOWN_META = {
    "qwen2.5-7b-instruct": ("lmstudio-community", "qwen2"),
    "llama-3.2-3b-instruct": ("hugging-quants", "llama"),
    "text-embedding-nomic-embed-text-v1.5": ("nomic-ai", "nomic-bert"),
}
# plausible Q4_K_M GGUF file sizes of the default models; others are guessed from their name
_KNOWN_SIZES = {
    "qwen2.5-7b-instruct": 4_683_074_240,
    "llama-3.2-3b-instruct": 2_019_377_696,
    "text-embedding-nomic-embed-text-v1.5": 84_106_624,
}
_BYTES_PER_PARAM = 0.6  # Q4_K_M: about 4.85 bits per weight
MAX_CONTEXT = 32768
_DEFAULT_CONTEXT = {"llm": 4096, "embedding": 2048}


def kind_of(model: str) -> str:
    return "embedding" if "embed" in model.lower() else "llm"


def _params_billions(model: str) -> float | None:
    """``7`` for ``qwen2.5-7b-instruct``, ``0.5`` for ``x-0.5b``; None if the name tells none."""
    for part in reversed(model.lower().split("-")):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)b", part)
        if match:
            return float(match.group(1))
    return None


def _guess_size(model: str) -> int:
    billions = _params_billions(model)
    if billions is not None:
        return int(billions * 1e9 * _BYTES_PER_PARAM)
    return 100_000_000 if kind_of(model) == "embedding" else 1_000_000_000


def size_of(model: str) -> int:
    """The model's file size in bytes: known for the default models, else guessed."""
    return _KNOWN_SIZES.get(model, _guess_size(model))


def _params_string(model: str) -> str | None:
    billions = _params_billions(model)
    if billions is None or kind_of(model) == "embedding":
        return None
    return f"{billions:g}B"


def _display_name(model: str) -> str:
    return " ".join(w.upper() if re.fullmatch(r"\d+(?:\.\d+)?[bm]", w) else w[:1].upper() + w[1:]
                    for w in model.split("-") if w)


def default_config(model: str, parallel: int) -> dict[str, Any]:
    """The load config of an instance nobody asked anything particular of."""
    if kind_of(model) == "embedding":
        return {"context_length": _DEFAULT_CONTEXT["embedding"]}
    return {"context_length": _DEFAULT_CONTEXT["llm"], "eval_batch_size": 512,
            "flash_attention": True, "offload_kv_cache_to_gpu": True, "parallel": parallel}


def v0_entry(model: str, loaded: bool) -> dict[str, Any]:
    """One entry of ``GET /api/v0/models``."""
    publisher, arch = _KNOWN_META.get(model, ("lmstudio-community", model.split("-")[0]))
    kind = "embeddings" if "embed" in model.lower() else "llm"
    return {"id": model, "object": "model", "type": kind, "publisher": publisher, "arch": arch,
            "compatibility_type": "gguf", "quantization": "Q4_K_M",
            "state": "loaded" if loaded else "not-loaded",
            "max_context_length": MAX_CONTEXT}


def v1_entry(model: str) -> dict[str, Any]:
    """One entry of the OpenAI-compatible ``GET /v1/models``."""
    return {"id": model, "object": "model", "owned_by": "organization_owner"}


def native_entry(model: str, size_bytes: int,
                 loaded_instances: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry of LM Studio 0.4's ``GET /api/v1/models``."""
    publisher, arch = _KNOWN_META.get(model, ("lmstudio-community", model.split("-")[0]))
    llm = kind_of(model) == "llm"
    entry: dict[str, Any] = {"type": kind_of(model), "publisher": publisher, "key": model,
                             "display_name": _display_name(model)}
    if llm:
        entry["architecture"] = arch
    entry.update({
        "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
        "size_bytes": size_bytes, "params_string": _params_string(model),
        "loaded_instances": loaded_instances,
        "max_context_length": MAX_CONTEXT, "format": "gguf"})
    if llm:
        entry["capabilities"] = {"vision": False, "trained_for_tool_use": True}
        entry["description"] = None
    return entry
