"""Settings: one frozen value, loaded from flags > LMGATE_* env > TOML file > defaults.

Every option is declared once in ``OPTIONS``; the CLI, the environment and the TOML file
all read from that table, so they cannot drift apart. Bad configuration raises ConfigError
naming the offending key; the CLI turns it into exit status 2 and one line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .identity import parse_networks

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MIB = 1024 * 1024
FEEDBACK_MODES = ("comments", "reasoning")
ROLES = ("user", "admin", "metrics")
UTF8_BOM = b"\xef\xbb\xbf"


class ConfigError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Option:
    name: str  # settings field and TOML key; the flag is --name-with-dashes
    kind: type  # str, int, float, bool, list
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "LMGATE_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("upstream", str, "http://localhost:1234", "LM Studio (or any OpenAI-compatible) base URL; "
           "repeat the flag (or separate with commas) for several boxes behind one line"),
    Option("host", str, "127.0.0.1", "address to listen on (0.0.0.0 for the whole network)"),
    Option("port", int, 1235, "port to listen on", minimum=0, maximum=65535),
    Option("max_queue", int, 100, "requests that may wait at once; more get 429", minimum=0),
    Option("queue_timeout", float, 600.0, "seconds a request may wait for its turn; then 503", minimum=0),
    Option("max_body", int, 32 * MIB, "largest request body in bytes; larger gets 413", minimum=1),
    Option("parallel", int, 1, "requests for the same model that may run upstream at once", minimum=1),
    Option("max_skips", int, 0, "times a waiting request may be overtaken by requests for the "
           "loaded model (0 = strict FIFO)", minimum=0),
    Option("policy", str, "fifo", "who goes next: fifo (arrival order) or fair (round robin "
           "between keys/clients)", choices=("fifo", "fair")),
    Option("read_timeout", float, 600.0, "seconds the upstream may stay silent (model loading, "
           "long prompts) before 504", minimum=0.001),
    Option("connect_timeout", float, 5.0, "seconds to connect to the upstream before 502", minimum=0.001),
    Option("shutdown_grace", float, 30.0, "seconds running requests get to finish on SIGTERM", minimum=0),
    Option("upstream_key", str, None, "bearer token sent to the upstream (LM Studio 0.4+ auth)"),
    Option("cors_origins", list, (), "comma-separated origins allowed to call from a browser"),
    Option("max_models", int, 50, "distinct model names tracked in metrics; the rest are 'other'",
           minimum=1),
    Option("result_ttl", float, 600.0, "seconds finished /queue/add results are kept", minimum=0),
    Option("stream_open_timeout", float, 120.0, "seconds a started /queue/add job may generate "
           "with no sign of its owner (no /stream open, no /request poll) before it is cancelled",
           minimum=0.001),
    Option("trusted_proxies", list, (), "comma-separated IPs/CIDRs of reverse proxies whose "
           "X-Forwarded-For / Forwarded headers name the client (default: none, headers ignored)"),
    Option("client_write_timeout", float, 30.0, "seconds a client may leave lmgate's writes "
           "unread before it is treated as gone (its slot freed)", minimum=0.001),
    Option("client_read_timeout", float, 60.0, "seconds a client has to send a request head, "
           "and then its body; slower gets 408 and the connection closed", minimum=0.001),
    Option("max_connections", int, 1000, "open client connections; more get 503 and are closed",
           minimum=1),
    Option("max_waiting_bytes", int, 64 * MIB, "request body bytes held for waiting requests; "
           "more get 429", minimum=1),
    Option("max_kept_results", int, 1000, "finished /queue/add results kept; the oldest go first",
           minimum=0),
    Option("max_kept_bytes", int, 64 * MIB, "bytes of finished /queue/add results kept; the "
           "oldest go first", minimum=0),
    Option("probe_interval", float, 15.0, "seconds between upstream checks while no request "
           "runs on it", minimum=0.05),
    Option("load_mode", str, "auto", "who loads models: managed (lmgate, through LM Studio's REST "
           "API v1), jit (LM Studio, on first use), or auto (managed where the box has that API)",
           choices=("auto", "managed", "jit")),
    Option("max_loaded", int, 1, "models lmgate keeps loaded per box in managed mode; the least "
           "recently used idle one is unloaded for another", minimum=1),
    Option("max_loaded_bytes", int, None, "bytes of models (their size_bytes) lmgate keeps loaded "
           "per box in managed mode (default: no limit)", minimum=1),
    Option("feedback", str, "comments", "how a waiting stream is told its place: comments "
           "(SSE comments only) or reasoning (also reasoning_content chunks that chat UIs show)",
           choices=FEEDBACK_MODES),
    Option("max_priority_wait", float, 60.0, "seconds after which a waiting request is no "
           "longer overtaken by later arrivals of a higher priority", minimum=0),
    Option("state_dir", str, None, "directory of lmgate's database (token quotas); default: "
           "the OS's per-user data directory + lmgate"),
    Option("state_url", str, None, "Redis or Valkey URL (redis://, rediss://, unix://) that makes this "
           "process one replica of a group sharing one line, its limits and quotas"),
    Option("lease_ttl", float, 3.0, "seconds after which a silent replica (or scheduler) loses its "
           "place in the group (replicas only)", minimum=0.5),
    Option("log_level", str, "info", "debug, info, warning or error",
           choices=("debug", "info", "warning", "error", "critical")),
    Option("log_format", str, "text", "every log line as text, or json (one object per line)",
           choices=("text", "json")),
    Option("demo", bool, False, "run two built-in LM Studio simulators as the upstream boxes (no LM Studio needed)"),
)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}
TABLE_KEYS = ("keys", "groups", "upstreams", "models")
# Fields of LM Studio's POST /api/v1/models/load that [[models]] may set; nothing else is sent.
LOAD_FIELDS: dict[str, type] = {"context_length": int, "eval_batch_size": int, "flash_attention": bool,
                                "num_experts": int, "offload_kv_cache_to_gpu": bool}
MODEL_FIELDS = {"name", "parallel", "ttl", *LOAD_FIELDS}
UPSTREAM_FIELDS = {"name", "url", "key", "parallel", "models", "max_loaded", "max_loaded_bytes"}
KEY_FIELDS = {"name", "key", "key_sha256", "models", "max_queued", "rpm", "max_tokens", "role",
              "clamp_max_tokens", "priority", "feedback", "tokens_per_day", "tokens_per_month"}


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    models: tuple[str, ...] = ()
    max_queued: int | None = None
    rpm: int | None = None
    max_tokens: int | None = None
    clamp_max_tokens: bool = False
    role: str = "user"
    priority: int = 0
    feedback: str | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def scraper(self) -> bool:
        """A key for a metrics scraper: reads /metrics, sends no requests to a model."""
        return self.role == "metrics"

    @property
    def has_quota(self) -> bool:
        return self.tokens_per_day is not None or self.tokens_per_month is not None


@dataclass(frozen=True)
class UpstreamSpec:
    """One LM Studio box. ``key`` is its bearer token (else ``--upstream-key``); ``parallel``
    its slots (else ``--parallel``); ``models`` globs of the models it may serve (empty: any
    that it lists)."""

    name: str
    url: str
    key: str | None = None
    parallel: int | None = None
    models: tuple[str, ...] = ()
    max_loaded: int | None = None
    max_loaded_bytes: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """``[[models]]``: how lmgate loads a model (managed mode). ``load`` holds the fields passed
    to LM Studio's load call; ``parallel`` is lmgate's slot count for it; ``ttl`` unloads it
    after that many idle seconds."""

    name: str
    parallel: int | None = None
    ttl: float | None = None
    load: tuple[tuple[str, Any], ...] = ()


def box_name(url: str) -> str:
    """A box given as a URL is called ``host:port`` (never with its credentials)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Settings:
    upstream: str = "http://localhost:1234"
    host: str = "127.0.0.1"
    port: int = 1235
    max_queue: int = 100
    queue_timeout: float = 600.0
    max_body: int = 32 * MIB
    parallel: int = 1
    max_skips: int = 0
    policy: str = "fifo"
    read_timeout: float = 600.0
    connect_timeout: float = 5.0
    shutdown_grace: float = 30.0
    upstream_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_models: int = 50
    result_ttl: float = 600.0
    stream_open_timeout: float = 120.0
    trusted_proxies: tuple[str, ...] = ()
    client_write_timeout: float = 30.0
    client_read_timeout: float = 60.0
    max_connections: int = 1000
    max_waiting_bytes: int = 64 * MIB
    max_kept_results: int = 1000
    max_kept_bytes: int = 64 * MIB
    probe_interval: float = 15.0
    feedback: str = "comments"
    max_priority_wait: float = 60.0
    state_dir: str | None = None
    state_url: str | None = None
    lease_ttl: float = 3.0
    log_level: str = "info"
    log_format: str = "text"
    demo: bool = False
    keys: tuple[ApiKey, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    upstreams: tuple[UpstreamSpec, ...] = ()  # every box; empty: the one ``upstream``
    models: tuple[ModelSpec, ...] = ()
    load_mode: str = "auto"
    max_loaded: int = 1
    max_loaded_bytes: int | None = None
    config: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def boxes(self) -> tuple[UpstreamSpec, ...]:
        """Every upstream box: the configured ones, else the one ``upstream``."""
        if self.upstreams:
            return self.upstreams
        return (UpstreamSpec(name=box_name(self.upstream), url=self.upstream),)


def _convert(opt: Option, value: Any, source: str) -> Any:
    """Turn a raw value (a string from a flag/env, or a TOML value) into the option's type."""
    key = opt.name
    from_text = isinstance(value, str) and source != "file"
    try:
        if opt.kind is bool:
            if isinstance(value, bool):
                out: Any = value
            elif from_text and value.strip().lower() in ("1", "true", "yes", "on"):
                out = True
            elif from_text and value.strip().lower() in ("0", "false", "no", "off", ""):
                out = False
            else:
                raise ValueError
        elif opt.kind is int:
            if isinstance(value, bool) or not (isinstance(value, int) or from_text):
                raise ValueError
            out = int(value)
        elif opt.kind is float:
            if isinstance(value, bool) or not (isinstance(value, (int, float)) or from_text):
                raise ValueError
            out = float(value)
        elif opt.kind is list:
            if from_text:
                out = tuple(v.strip() for v in value.split(",") if v.strip())
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                out = tuple(value)
            else:
                raise ValueError
        else:
            if not isinstance(value, str):
                raise ValueError
            out = value
    except ValueError:
        want = {bool: "true or false", int: "an integer", float: "a number",
                list: "a list of strings", str: "a string"}[opt.kind]
        raise ConfigError(key, f"expected {want}, got {value!r} (from {source})") from None
    if opt.choices and out not in opt.choices:
        raise ConfigError(key, f"must be one of {', '.join(opt.choices)}, got {out!r} (from {source})")
    if opt.minimum is not None and out < opt.minimum:
        raise ConfigError(key, f"must be >= {opt.minimum:g}, got {out!r} (from {source})")
    if opt.maximum is not None and out > opt.maximum:
        raise ConfigError(key, f"must be <= {opt.maximum:g}, got {out!r} (from {source})")
    return out


def _tables(raw: Any, table: str, fields: set[str], *, non_empty: bool = False,
            unknown_hint: str = "unknown key") -> Iterator[tuple[str, dict[str, Any]]]:
    """Each entry of an array of tables (``[[table]]``) with its place for error messages,
    after checking it is a table of known fields."""
    if not isinstance(raw, list) or (non_empty and not raw):
        raise ConfigError(table, f"must be {'a non-empty' if non_empty else 'an'} array of tables "
                          f"([[{table}]])")
    for i, entry in enumerate(raw):
        where = f"{table}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table")
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", unknown_hint)
        yield where, entry


def _positive_int(entry: dict[str, Any], where: str, name: str) -> int | None:
    value = entry.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}.{name}", "must be a positive integer")
    return value


def _parse_keys(raw: Any) -> tuple[ApiKey, ...]:
    out: list[ApiKey] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for where, entry in _tables(raw, "keys", KEY_FIELDS):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name", "required, a non-empty string")
        if name in seen_names:
            raise ConfigError(f"{where}.name", f"duplicate name {name!r}")
        seen_names.add(name)
        secret, digest = entry.get("key"), entry.get("key_sha256")
        if (secret is None) == (digest is None):
            raise ConfigError(f"{where}.key", "give exactly one of key or key_sha256")
        if secret is not None:
            if not isinstance(secret, str) or len(secret) < 8:
                raise ConfigError(f"{where}.key", "must be a string of at least 8 characters")
            digest = hashlib.sha256(secret.encode()).hexdigest()
        elif not (isinstance(digest, str) and len(digest) == 64
                  and all(c in "0123456789abcdefABCDEF" for c in digest)):
            raise ConfigError(f"{where}.key_sha256", "must be 64 hex digits")
        digest = digest.lower()
        if digest in seen_hashes:
            raise ConfigError(f"{where}.key", "the same key is configured twice")
        seen_hashes.add(digest)
        models = entry.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ConfigError(f"{where}.models", "must be a list of strings (globs)")
        limits = {lim: _positive_int(entry, where, lim)
                  for lim in ("max_queued", "rpm", "max_tokens", "tokens_per_day", "tokens_per_month")}
        role = entry.get("role", "user")
        if role not in ROLES:
            raise ConfigError(f"{where}.role", "must be 'user', 'admin' or 'metrics' (reads /metrics "
                              "only, for a Prometheus scraper)")
        clamp = entry.get("clamp_max_tokens", False)
        if not isinstance(clamp, bool):
            raise ConfigError(f"{where}.clamp_max_tokens", "must be true or false")
        priority = entry.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 1000:
            raise ConfigError(f"{where}.priority", "must be an integer from -1000 to 1000 "
                              "(higher starts first)")
        feedback = entry.get("feedback")
        if feedback is not None and feedback not in FEEDBACK_MODES:
            raise ConfigError(f"{where}.feedback", f"must be one of {', '.join(FEEDBACK_MODES)}")
        out.append(ApiKey(name=name, sha256=digest, models=tuple(models), role=role,
                          clamp_max_tokens=clamp, priority=priority, feedback=feedback, **limits))
    return tuple(out)


def _parse_upstreams(raw: Any) -> tuple[UpstreamSpec, ...]:
    out: list[UpstreamSpec] = []
    for where, entry in _tables(raw, "upstreams", UPSTREAM_FIELDS, non_empty=True):
        url = entry.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{where}.url", "required, an http(s) URL")
        try:
            check_upstream_url(url)
        except ConfigError as exc:
            raise ConfigError(f"{where}.url", str(exc).partition(": ")[2]) from None
        name = entry.get("name", box_name(url))
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name", "must be a non-empty string")
        key = entry.get("key")
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigError(f"{where}.key", "must be a non-empty string")
        models = entry.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ConfigError(f"{where}.models", "must be a list of strings (globs)")
        limits = {lim: _positive_int(entry, where, lim)
                  for lim in ("parallel", "max_loaded", "max_loaded_bytes")}
        out.append(UpstreamSpec(name=name.strip(), url=url, key=key, models=tuple(models), **limits))
    return _unique_boxes(out, "upstreams")


def _unique_boxes(specs: list[UpstreamSpec], where: str) -> tuple[UpstreamSpec, ...]:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(where, f"two boxes are called {spec.name!r}; give each its own name")
        seen.add(spec.name)
    return tuple(specs)


def _url_boxes(value: str) -> tuple[UpstreamSpec, ...]:
    """``--upstream`` / ``LMGATE_UPSTREAM`` / ``upstream``: one URL or several, comma-separated."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ConfigError("upstream", "must name at least one URL")
    for url in urls:
        check_upstream_url(url)
    return _unique_boxes([UpstreamSpec(name=box_name(u), url=u) for u in urls], "upstream")


def _parse_models(raw: Any) -> tuple[ModelSpec, ...]:
    out: list[ModelSpec] = []
    seen: set[str] = set()
    hint = f"unknown key (LM Studio's load call takes {', '.join(LOAD_FIELDS)}; lmgate's own: parallel, ttl)"
    for where, entry in _tables(raw, "models", MODEL_FIELDS, unknown_hint=hint):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name", "required, the model key")
        if name in seen:
            raise ConfigError(f"{where}.name", f"duplicate model {name!r}")
        seen.add(name)
        parallel, ttl = _positive_int(entry, where, "parallel"), entry.get("ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
            raise ConfigError(f"{where}.ttl", "must be a positive number of seconds")
        load: list[tuple[str, Any]] = []
        for field_name, kind in LOAD_FIELDS.items():
            if field_name not in entry:
                continue
            value = entry[field_name]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{where}.{field_name}", "must be a positive integer")
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{where}.{field_name}", "must be true or false")
            load.append((field_name, value))
        out.append(ModelSpec(name=name, parallel=parallel, ttl=None if ttl is None else float(ttl),
                             load=tuple(load)))
    return tuple(out)


def _parse_groups(raw: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(raw, list):
        raise ConfigError("groups", "must be an array of tables ([[groups]])")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) - {"models"}:
            raise ConfigError(f"groups[{i}]", "must be a table with only 'models'")
        models = entry.get("models")
        if not isinstance(models, list) or len(models) < 2 or not all(isinstance(m, str) for m in models):
            raise ConfigError(f"groups[{i}].models", "must list at least two model names")
        out.append(tuple(models))
    return tuple(out)


def read_file(path: str) -> dict[str, Any]:
    """Parse the TOML file. TOML is UTF-8, but Windows editors often add a byte-order mark
    (accepted) or save UTF-16 / a legacy code page (refused with the fix, not a traceback)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(_decode_utf8(path, data))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def _decode_utf8(path: str, data: bytes) -> str:
    """The file's text, without a UTF-8 byte-order mark; ConfigError for any other encoding.
    NUL bytes mean UTF-16 even without a mark (they decode as 'valid' UTF-8 otherwise)."""
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        found = "is saved as UTF-16"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            found = f"is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line})"
    raise ConfigError("config", f"{path} {found}; save the file as UTF-8 (e.g. in Notepad: "
                      "File > Save as > Encoding: UTF-8)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="lmgate",
        description="Share one LM Studio server safely: an OpenAI-compatible proxy that queues "
        "requests so concurrent users never unload each other's model. Every flag can also be "
        "set as LMGATE_<FLAG> in the environment or as <flag> in the TOML file given by --config "
        "(precedence: flag > environment > file > default).",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file with settings, [[keys]] and [[groups]] (env LMGATE_CONFIG)")
    for opt in OPTIONS:
        default = "" if opt.default in (None, ()) else f" (default: {_show(opt)})"
        if opt.kind is bool:
            parser.add_argument(opt.flag, action="store_const", const="true", default=None,
                                help=f"{opt.help}{default}; env {opt.env}")
        elif opt.name == "upstream":  # repeatable: several boxes
            parser.add_argument(opt.flag, metavar="URL", action="append", default=None,
                                help=f"{opt.help}{default}; env {opt.env}")
        else:
            parser.add_argument(opt.flag, metavar=opt.name.upper(), default=None,
                                help=f"{opt.help}{default}; env {opt.env}")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--check", action="store_true", help="check the configuration (flags, "
                        "environment, file) and exit: 0 and one line when it is valid, 2 and the "
                        "error otherwise; nothing is contacted or started")
    parser.add_argument("--migrate-quotas", metavar="FILE", default=None,
                        help="copy a single lmgate's token counts (its state database, or the "
                        "directory holding it) into the group's Redis of --state-url, then exit; "
                        "run it once, with that lmgate stopped")
    return parser


def _show(opt: Option) -> str:
    if opt.kind is int and opt.default >= MIB and opt.default % MIB == 0:
        return f"{opt.default} = {opt.default // MIB} MiB"
    return str(opt.default).lower() if opt.kind is bool else str(opt.default)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"lmgate: error: {message} (see lmgate --help)\n")
        raise SystemExit(2)


def load_settings(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge flags, environment and file into Settings; raise ConfigError on bad input."""
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config") or env.get("LMGATE_CONFIG") or None
    args.pop("version", None)
    args.pop("check", None)
    args.pop("migrate_quotas", None)
    if isinstance(args.get("upstream"), list):
        args["upstream"] = ",".join(args["upstream"])
    file_values: dict[str, Any] = read_file(config_path) if config_path else {}
    for key in file_values:
        if key not in OPTION_BY_NAME and key not in TABLE_KEYS:
            raise ConfigError(key, f"unknown key in {config_path}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        # A file value is checked even when a flag or env var overrides it: a broken file must
        # not lie in wait for the day the override is dropped.
        if opt.name in file_values:
            values[opt.name] = _convert(opt, file_values[opt.name], "file")
            sources[opt.name] = "file"
        raw, source = args.get(opt.name), "flag " + opt.flag
        if raw is None and opt.env in env:
            raw, source = env[opt.env], "env " + opt.env
        if raw is None:
            continue
        values[opt.name] = _convert(opt, raw, source)
        sources[opt.name] = source
    keys = _parse_keys(file_values["keys"]) if "keys" in file_values else ()
    groups = _parse_groups(file_values["groups"]) if "groups" in file_values else ()
    if "upstreams" in file_values and "upstream" in file_values:
        raise ConfigError("upstreams", f"{config_path} sets both upstream and [[upstreams]]; "
                          "keep one of the two")
    if "upstreams" in file_values and sources.get("upstream", "file") == "file":
        boxes = _parse_upstreams(file_values["upstreams"])
    else:
        if "upstreams" in file_values:
            _parse_upstreams(file_values["upstreams"])  # checked, though the flag replaces it
        boxes = _url_boxes(values.get("upstream", OPTION_BY_NAME["upstream"].default))
    values["upstream"] = boxes[0].url
    models = _parse_models(file_values["models"]) if "models" in file_values else ()
    settings = Settings(**values, keys=keys, groups=groups, upstreams=boxes, models=models,
                        config=config_path, sources=sources)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    for box in settings.upstreams:
        check_upstream_url(box.url)
    check_demo(settings)
    check_example_secrets(settings.keys)
    check_connection_room(settings)
    for origin in settings.cors_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError("cors_origins", f"{origin!r} is not an origin like http://host:port")
    if settings.state_url is not None and urlsplit(settings.state_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("state_url", f"must be a redis://, rediss:// or unix:// URL, got {settings.state_url!r}")
    try:
        parse_networks(settings.trusted_proxies)
    except ValueError as exc:
        raise ConfigError("trusted_proxies", str(exc)) from None


# -- checks that need more than one value, or knowledge of lmgate's own documentation --------
# Secrets printed in README.md and deploy/lmgate.example.toml: everyone has read them, so a
# key that uses one is no key at all (tests/unit/test_cli_polish.py keeps this list complete).
EXAMPLE_SECRETS = ("sk-alice-change-me", "sk-ops-change-me-too", "sk-metrics-change-me")
_EXAMPLE_DIGESTS = {hashlib.sha256(s.encode()).hexdigest(): s for s in EXAMPLE_SECRETS}


CONNECTION_HEADROOM = 200  # connections beyond the waiting line: running requests, pages, probes


def check_connection_room(settings: Settings) -> None:
    """Every waiting request holds a connection: a ``--max-queue`` that ``--max-connections``
    cannot hold is refused when both were chosen (``fit_connections`` raises the cap when only
    the queue was; a cap chosen alone is the user's to choose)."""
    given = settings.sources
    if "max_connections" in given and "max_queue" in given and settings.max_queue > settings.max_connections:
        raise ConfigError("max_queue", f"{settings.max_queue} requests may wait, but max_connections "
                          f"{settings.max_connections} lets only that many clients connect at all; "
                          f"raise max_connections to at least {settings.max_queue + CONNECTION_HEADROOM} "
                          "or leave it out")


def fit_connections(settings: Settings) -> tuple[Settings, str | None]:
    """A ``--max-queue`` beyond the default connection cap raises the cap to
    ``max_queue + 200``; the line to log says so (None when nothing changed)."""
    if "max_connections" in settings.sources or settings.max_queue <= settings.max_connections:
        return settings, None
    wanted = settings.max_queue + CONNECTION_HEADROOM
    return settings.with_(max_connections=wanted), (
        f"max_connections raised from {settings.max_connections} to {wanted} so that "
        f"max_queue {settings.max_queue} waiting requests fit")


def check_upstream_url(upstream: str) -> None:
    """An http(s) URL with a host. ``localhost:1234`` parses as scheme "localhost", so a
    missing scheme gets the likely fix spelled out."""
    url = urlsplit(upstream)
    if url.scheme in ("http", "https") and url.hostname:
        return
    hint = f"; did you mean http://{upstream}?" if upstream and "://" not in upstream else ""
    raise ConfigError("upstream", f"must be an http(s) URL, got {upstream!r}{hint}")


def check_demo(settings: Settings) -> None:
    """--demo replaces the upstream with the simulator; an explicit upstream as well would be
    ignored silently, so ask the user which one they meant."""
    source = settings.sources.get("upstream")
    if source is None and len(settings.upstreams) > 1:
        source = "[[upstreams]]"
    if settings.demo and source is not None:
        raise ConfigError("demo", f"--demo runs a simulated LM Studio as the upstream, but an "
                          f"upstream is also set (from {source}); drop one of the two")


def check_example_secrets(keys: Sequence[ApiKey]) -> None:
    """Refuse a key whose secret is one of the examples published in lmgate's documentation
    (compared by digest, so a ``key_sha256`` of an example is caught too)."""
    for i, key in enumerate(keys):
        secret = _EXAMPLE_DIGESTS.get(key.sha256)
        if secret is not None:
            raise ConfigError(f"keys[{i}].key", f"key {key.name!r} uses {secret!r}, an example "
                              "secret published in lmgate's documentation; make your own, e.g. "
                              "python -c \"import secrets; print('sk-' + secrets.token_urlsafe(24))\"")
