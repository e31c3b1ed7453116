"""Configuration and CLI details a user meets first: file encodings, published example
secrets, --demo with an upstream, overridden file values, URLs without a scheme, log lines,
the simulator's help."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import EXAMPLE_SECRETS, ConfigError, load_settings
from proxy.logs import JsonFormatter, setup

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "lmgate.example.toml"
TEXT = 'port = 1240\n# café, naïve: comments may hold any text\nupstream = "http://box:1234"\n'


def run_cli(*args: str, module: str = "proxy") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=30, env=env)


def config_error(*argv: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(list(argv), env=env or {})
    return info.value


# -- encodings ---------------------------------------------------------------------------
def test_utf8_with_or_without_a_byte_order_mark(tmp_path: Path) -> None:
    for name, data in (("plain.toml", TEXT.encode()), ("bom.toml", b"\xef\xbb\xbf" + TEXT.encode())):
        path = tmp_path / name
        path.write_bytes(data)
        s = load_settings(["--config", str(path)], env={})
        assert (s.port, s.upstream) == (1240, "http://box:1234")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "latin-1", "cp1252"])
def test_other_encodings_are_refused_with_the_fix(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "lmgate.toml"
    path.write_bytes(TEXT.encode(encoding))
    err = config_error("--config", str(path))
    assert err.key == "config" and "save the file as UTF-8" in str(err)
    if encoding.startswith("utf-16"):
        assert "UTF-16" in str(err)
    else:
        assert "line 2" in str(err)  # where the first non-UTF-8 byte is


def test_cli_utf16_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"
    path.write_bytes(TEXT.encode("utf-16"))
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


# -- published example secrets -----------------------------------------------------------
def published_secrets() -> set[str]:
    """Every client secret printed in the README or the deploy files."""
    found: set[str] = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "deploy").rglob("*.toml")),
                 *sorted((ROOT / "deploy").rglob("*.md")), *sorted((ROOT / "examples").rglob("*.md")),
                 *sorted((ROOT / "deploy").rglob("*.key"))]:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".key":  # a scraper's bearer key file: the secret alone
            found.add(text.strip())
            continue
        found.update(re.findall(r'(?<![\w])key\s*=\s*"([^"<]+)"', text))
        found.update(re.findall(r'api_key="(sk-[^"]+)"', text))
    return found


def test_every_published_secret_is_known() -> None:
    assert published_secrets() and published_secrets() <= set(EXAMPLE_SECRETS)


def test_the_example_file_starts_without_published_keys() -> None:
    s = load_settings(["--config", str(EXAMPLE)], env={})
    assert s.keys == ()


KEY_LINE = re.compile(r"# (\[\[keys\]\]|name =|key =|role =|models =|max_queued =|rpm =|max_tokens =|clamp)")


def uncommented_example(tmp_path: Path) -> Path:
    """The example file with its [[keys]] uncommented, as a hurried user would."""
    lines = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if KEY_LINE.match(line):
            line = line[2:]
        lines.append(line)
    path = tmp_path / "lmgate.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_published_secrets_are_refused(tmp_path: Path) -> None:
    err = config_error("--config", str(uncommented_example(tmp_path)))
    assert err.key == "keys[0].key" and "sk-alice-change-me" in str(err)
    digest = hashlib.sha256(b"sk-ops-change-me-too").hexdigest()
    path = tmp_path / "hashed.toml"
    path.write_text(f'[[keys]]\nname = "ops"\nkey_sha256 = "{digest}"\n', encoding="utf-8")
    assert config_error("--config", str(path)).key == "keys[0].key"
    path.write_text('[[keys]]\nname = "me"\nkey = "sk-my-own-secret-1"\n', encoding="utf-8")
    assert load_settings(["--config", str(path)], env={}).keys[0].name == "me"


def test_cli_refuses_the_uncommented_example(tmp_path: Path) -> None:
    result = run_cli("--config", str(uncommented_example(tmp_path)))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "example secret" in result.stderr


# -- --demo, overridden file values, URLs ------------------------------------------------
def test_demo_with_an_explicit_upstream_is_refused(tmp_path: Path) -> None:
    assert config_error("--demo", "--upstream", "http://box:1234").key == "demo"
    assert config_error("--demo", env={"LMGATE_UPSTREAM": "http://box:1234"}).key == "demo"
    path = tmp_path / "lmgate.toml"
    path.write_text('upstream = "http://box:1234"\n', encoding="utf-8")
    err = config_error("--demo", "--config", str(path))
    assert err.key == "demo" and "file" in str(err)
    assert load_settings(["--demo"], env={}).demo


def test_a_bad_file_value_is_refused_even_when_overridden(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"
    path.write_text('port = "abc"\n', encoding="utf-8")
    assert config_error("--config", str(path), "--port", "1240").key == "port"
    assert config_error("--config", str(path), env={"LMGATE_PORT": "1240"}).key == "port"
    path.write_text("port = 1236\n", encoding="utf-8")
    s = load_settings(["--config", str(path), "--port", "1240"], env={})
    assert s.port == 1240 and s.sources["port"] == "flag --port"


@pytest.mark.parametrize("given", ["localhost:1234", "192.168.1.20:1234", "gpu-box"])
def test_an_upstream_without_scheme_gets_a_hint(given: str) -> None:
    err = config_error("--upstream", given)
    assert err.key == "upstream" and f"did you mean http://{given}?" in str(err)


def test_an_upstream_with_another_scheme_gets_no_http_hint() -> None:
    assert "did you mean" not in str(config_error("--upstream", "ftp://box:1234"))


# -- log lines ---------------------------------------------------------------------------
def record(name: str, message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_json_lines_have_time_level_logger_and_message() -> None:
    doc = json.loads(JsonFormatter().format(record("uvicorn.error", "Started server process [1]")))
    assert doc["level"] == "INFO" and doc["logger"] == "uvicorn.error"
    assert doc["message"] == "Started server process [1]" and doc["time"].endswith("Z")


def test_access_lines_merge_their_fields() -> None:
    access = json.dumps({"request_id": "r1", "status": 200, "level": "spoofed"})
    doc = json.loads(JsonFormatter().format(record("lmgate.access", access)))
    assert doc["request_id"] == "r1" and doc["status"] == 200 and "message" not in doc
    assert doc["level"] == "INFO"  # the record's own fields win
    plain = json.loads(JsonFormatter().format(record("lmgate", '{"not": "merged"}')))
    assert plain["message"] == '{"not": "merged"}'


def test_exceptions_stay_inside_the_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("lmgate", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {n: logging.getLogger(n).level for n in ("httpx", "httpcore")})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_httpx_is_quiet_unless_debugging(root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup("info", "json")
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.WARNING
    logging.getLogger("httpx").info("HTTP Request: GET http://upstream/v1/models 200")
    logging.getLogger("lmgate.polish").info("still heard")
    lines = stream.getvalue().splitlines()
    assert [json.loads(x)["logger"] for x in lines] == ["lmgate.polish"]
    setup("debug", "text")
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.DEBUG


# -- the simulator's help ------------------------------------------------------------------
def test_every_simulator_flag_has_a_help_text() -> None:
    result = run_cli("--help", module="proxy.simulator")
    assert result.returncode == 0
    flags = re.findall(r"^  (--[\w-]+)", result.stdout, flags=re.M)
    assert set(flags) >= {"--host", "--port", "--tokens-per-s", "--load-time", "--models",
                          "--max-concurrent", "--loaded"}
    # ArgumentDefaultsHelpFormatter adds "(default: ...)" only to options that have a help text
    assert result.stdout.count("(default:") == len(flags)


def test_the_readme_table_lists_every_flag_with_its_env_and_default() -> None:
    """``--help`` and the README's configuration table come from different places; every
    option must be in the table, with its variable and the same default."""
    from proxy.config import OPTIONS

    rows: dict[str, list[str]] = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`--"):
            rows[cells[0].strip("`")] = cells
    for opt in OPTIONS:
        assert opt.flag in rows, f"{opt.flag} is missing from the README's configuration table"
        _, env, default, _meaning = rows[opt.flag][:4]
        assert env == f"`{opt.env}`", (opt.flag, env)
        if isinstance(opt.default, (int, float)) and not isinstance(opt.default, bool):
            number = default.strip("`").split("`")[0]
            assert float(number) == float(opt.default), (opt.flag, default, opt.default)
        elif opt.default in (None, (), False):
            assert default.split()[0] in ("none", "off", "the", "`$STATE_DIRECTORY`"), (opt.flag, default)
        else:
            assert default.startswith(f"`{opt.default}`"), (opt.flag, default, opt.default)
