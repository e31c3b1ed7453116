"""``lmgate-sim`` / ``python -m proxy.simulator``: flags, then uvicorn."""

from __future__ import annotations

import argparse
import re
from typing import Any

from .catalog import DEFAULT_MODELS
from .engine import DEFAULT_JIT_TTL_S
from .http import create_simulator_app

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _byte_count(text: str) -> int:
    """``4700000000``, ``4.7G``, ``8GiB`` ... as a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _per_model(convert):
    """An argparse type for ``model=value,model=value``."""
    def parse(text: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in _names(text):
            model, sep, value = item.rpartition("=")
            if not sep or not model.strip():
                raise argparse.ArgumentTypeError(f"expected model=value, got {item!r}")
            try:
                out[model.strip()] = convert(value.strip())
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise argparse.ArgumentTypeError(f"{item!r}: {exc}") from None
        return out
    return parse


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``lmgate-sim`` / ``python -m proxy.simulator``."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="lmgate-sim",
        description="LM Studio simulator: an OpenAI-compatible /v1, LM Studio /api/v0 and "
        "/api/v1 (models, load, unload) server with deterministic replies. Like LM Studio 0.4, a "
        "request for a model with no loaded instance loads it JIT and auto-evicts JIT-loaded "
        "instances only (killing their generations), and unloading an instance cuts the "
        "generations running on it. For demos and tests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=1234,
                        help="port to listen on (the one LM Studio uses by default)")
    parser.add_argument("--tokens-per-s", type=float, default=50.0,
                        help="generation speed per request, in tokens per second (0 = instant)")
    parser.add_argument("--load-time", type=float, default=0.3,
                        help="seconds a model takes to load (JIT or POST /api/v1/models/load)")
    parser.add_argument("--load-times", type=_per_model(float), default=None,
                        help="per-model load seconds overriding --load-time, e.g. "
                        "qwen2.5-7b-instruct=2.5,llama-3.2-3b-instruct=1")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated model ids the simulator serves")
    parser.add_argument("--model-sizes", type=_per_model(_byte_count), default=None,
                        help="per-model size in bytes (4700000000, 4.7G, 8GiB), e.g. "
                        "qwen2.5-7b-instruct=4700000000; others get a plausible size "
                        "guessed from the name")
    parser.add_argument("--memory-bytes", type=_byte_count, default=None,
                        help="memory budget for loaded instances (None: unlimited); a load "
                        "that does not fit is refused, JIT loads evict JIT instances to fit")
    parser.add_argument("--max-concurrent", type=int, default=4,
                        help="generations that run at once per loaded instance, like LM Studio "
                        "0.4's \"Max Concurrent Predictions\" (reported as config.parallel); "
                        "more wait inside the simulator")
    parser.add_argument("--loaded", default=None,
                        help="model already loaded (JIT) at start (None: nothing loaded)")
    parser.add_argument("--preload", type=_names, default=[],
                        help="comma-separated models loaded at start as through "
                        "POST /api/v1/models/load (never auto-evicted)")
    parser.add_argument("--fail-loads", type=_names, default=[],
                        help="comma-separated models whose loads fail (test knob)")
    parser.add_argument("--jit-ttl", type=float, default=DEFAULT_JIT_TTL_S,
                        help="idle seconds after which a JIT-loaded instance unloads, unless "
                        "the request that loaded it gave a ttl (0: never)")
    parser.add_argument("--accept-parallel", action="store_true",
                        help="accept a 'parallel' key in POST /api/v1/models/load bodies (LM "
                        "Studio's documented schema has none and rejects unknown keys)")
    args = parser.parse_args(argv)
    models = _names(args.models)
    named = [*(args.load_times or {}), *(args.model_sizes or {}), *args.preload, *args.fail_loads]
    unknown = sorted({m for m in named if m not in models})
    if unknown:
        parser.error(f"not among --models: {', '.join(unknown)}")
    try:
        app = create_simulator_app(models=models, tokens_per_s=args.tokens_per_s,
                                   load_s=args.load_time, max_concurrent=args.max_concurrent,
                                   loaded=args.loaded, load_times=args.load_times,
                                   sizes=args.model_sizes, memory_bytes=args.memory_bytes,
                                   fail_loads=args.fail_loads, preload=args.preload,
                                   jit_ttl_s=args.jit_ttl, accept_parallel=args.accept_parallel)
    except ValueError as exc:
        parser.error(str(exc))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
