"""The old queue server's ``/queue/add`` body, checked the way it checked it.

The old server declared its body as a pydantic model, so it accepted what pydantic's lax
mode accepts (``"stream": "True"``, ``"max_tokens": "100"``, ``"temperature": 1``) and
refused the rest with 422 and a ``detail`` list. The team's scripts depend on both, so this
module reproduces that contract (not pydantic itself): field types, lenient coercion, the
old defaults, and errors shaped like ``{"detail": [{"type", "loc", "msg", "input"}]}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})
# What the old server sent upstream when a field was left out.
DEFAULTS: dict[str, Any] = {"temperature": 0.7, "top_p": 1.0, "frequency_penalty": 0.0,
                            "presence_penalty": 0.0, "stream": True}


class Invalid(ValueError):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg


def as_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise Invalid("string_type", "Input should be a valid string")


def as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, float) and v in (0.0, 1.0):
        return bool(v)
    if isinstance(v, str):
        word = v.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise Invalid("bool_parsing", "Input should be a valid boolean, unable to interpret input")


def as_int(v: Any) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise Invalid("int_parsing", "Input should be a valid integer")


def as_float(v: Any) -> float:
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise Invalid("float_parsing", "Input should be a valid number")


def list_of(item: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def check(v: Any) -> list[Any]:
        if not isinstance(v, list):
            raise Invalid("list_type", "Input should be a valid list")
        return [item(x) for x in v]
    return check


def as_dict(v: Any) -> dict[str, Any]:
    if isinstance(v, dict):
        return v
    raise Invalid("dict_type", "Input should be a valid dictionary")


def dict_of_float(v: Any) -> dict[str, float]:
    return {str(k): as_float(x) for k, x in as_dict(v).items()}


# name -> (converter, required); optional fields may also be null.
FIELDS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "client_id": (as_str, True),
    "messages": (list_of(as_dict), True),
    "model": (as_str, True),
    "temperature": (as_float, False),
    "max_tokens": (as_int, False),
    "top_p": (as_float, False),
    "top_k": (as_int, False),
    "frequency_penalty": (as_float, False),
    "presence_penalty": (as_float, False),
    "repeat_penalty": (as_float, False),
    "stop": (list_of(as_str), False),
    "logit_bias": (dict_of_float, False),
    "seed": (as_int, False),
    "stream": (as_bool, False),
    "tools": (list_of(as_dict), False),
    "tool_choice": (as_str, False),
    "user": (as_str, False),
}


def parse_add(raw: bytes) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the body with the old server's coercions and defaults applied, []) or
    (None, the 422 ``detail`` list)."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        pos = getattr(exc, "pos", 0)
        return None, [{"type": "json_invalid", "loc": ["body", pos], "msg": "JSON decode error",
                       "input": {}, "ctx": {"error": str(getattr(exc, "msg", exc))[:200]}}]
    if not isinstance(doc, dict):
        return None, [{"type": "model_attributes_type", "loc": ["body"],
                       "msg": "Input should be a valid dictionary or object to extract fields from",
                       "input": doc if isinstance(doc, (str, int, float, bool)) or doc is None else None}]
    errors: list[dict[str, Any]] = []
    out = dict(doc)
    for name, (convert, required) in FIELDS.items():
        if name not in doc:
            if required:
                errors.append({"type": "missing", "loc": ["body", name], "msg": "Field required",
                               "input": _shown(doc)})
            continue
        value = doc[name]
        if value is None and not required and name != "stream":
            continue
        try:
            out[name] = convert(value)
        except Invalid as exc:
            errors.append({"type": exc.kind, "loc": ["body", name], "msg": exc.msg, "input": _shown(value)})
    if errors:
        return None, errors
    for name, value in DEFAULTS.items():
        if out.get(name) is None:
            out[name] = value
    return out, []


def _shown(value: Any) -> Any:
    """The offending input as echoed in ``detail``, kept small."""
    text = json.dumps(value, default=str)
    return value if len(text) <= 200 else text[:200] + "..."
