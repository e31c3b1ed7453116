"""LM Studio simulator for demos and tests.

Serves the OpenAI-compatible ``/v1`` API, LM Studio's ``/api/v0`` REST API and the model
management part of its ``/api/v1`` REST API (LM Studio 0.4+) with deterministic replies.

Models live in *instances*, as in LM Studio 0.4: each has an ``instance_id`` (the model key,
then ``key:2``, ``key:3`` ... for further instances of the same model), an origin (``jit``:
loaded because a request named the model; ``api``: ``POST /api/v1/models/load``), a config
(``context_length``, ``parallel`` ...) and its model's size in bytes.

* ``GET /api/v1/models`` lists every model with its ``loaded_instances``.
* ``POST /api/v1/models/load`` loads an instance (closed body schema, as in LM Studio: an
  unknown key is a 400), ``POST /api/v1/models/unload`` unloads one by ``instance_id``;
  generations running on an unloaded instance are cut (their streams end with an error).
* A chat/completions/embeddings request for a model with no instance loads it JIT and
  auto-evicts JIT-loaded instances only (never API-loaded ones): without a memory budget
  (``--memory-bytes``) at most one JIT model is kept, which reproduces LM Studio's
  "Only Keep Last JIT Loaded Model" (a request for another model unloads the current one,
  killing every generation still running on it); with a budget, least recently used JIT
  instances are evicted until the new model fits, and the request fails if API-loaded
  instances leave no room.  JIT instances unload after an idle TTL (``--jit-ttl``, or the
  request's ``ttl``).
* Each instance runs up to its ``parallel`` generations at once (LM Studio 0.4's "Max
  Concurrent Predictions", ``--max-concurrent``); instances run side by side.
* A chat request that offers ``tools`` gets a tool call, unless the turn already carries a
  tool's result (a ``tool`` message after the last user message): that is answered with text.

Run it with ``python -m proxy.simulator --port 1234``.  ``GET /sim/stats`` (generations,
loads, instances), ``GET /sim/requests`` (every request received, /sim/* excepted) and
``POST /sim/reset`` (clears both) are simulator-only introspection endpoints.

Modules: ``content`` (what the model says; pure), ``catalog`` (models, sizes, listing
entries), ``engine`` (instances, loading, JIT eviction, generations, stats), ``responses``
(JSON and SSE writers), ``http`` (the Starlette app), ``cli`` (``lmgate-sim``).
"""

from __future__ import annotations

from .catalog import DEFAULT_MODELS
from .cli import main
from .content import expected_reply, expected_tool_call, last_user_text
from .http import create_simulator_app

__all__ = ["DEFAULT_MODELS", "create_simulator_app", "expected_reply", "expected_tool_call",
           "last_user_text", "main"]
