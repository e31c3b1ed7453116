"""Settings: precedence, types, validation, and the CLI's exit status 2 with one line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import OPTIONS, ConfigError, Settings, build_parser, load_settings


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "lmgate.toml"
    p.write_text(text)
    return str(p)


def test_defaults_match_the_design() -> None:
    s = load_settings([], env={})
    assert (s.upstream, s.host, s.port) == ("http://localhost:1234", "127.0.0.1", 1235)
    assert (s.max_queue, s.queue_timeout, s.max_body) == (100, 600.0, 32 * 1024 * 1024)
    assert (s.parallel, s.max_skips, s.policy, s.shutdown_grace) == (1, 0, "fifo", 30.0)
    assert s.keys == () and s.groups == ()


def test_settings_dataclass_and_options_agree() -> None:
    defaults = Settings()
    for opt in OPTIONS:
        assert getattr(defaults, opt.name) == (opt.default if opt.default != () else ()), opt.name


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'port = 2000\nmax_queue = 5\nhost = "0.0.0.0"\n')
    env = {"LMGATE_PORT": "3000", "LMGATE_MAX_QUEUE": "7"}
    s = load_settings(["--config", cfg, "--port", "4000"], env=env)
    assert s.port == 4000  # flag
    assert s.max_queue == 7  # env beats file
    assert s.host == "0.0.0.0"  # file beats default
    assert s.sources["port"] == "flag --port" and s.sources["max_queue"] == "env LMGATE_MAX_QUEUE"


def test_config_path_from_env(tmp_path: Path) -> None:
    cfg = write(tmp_path, "parallel = 4\n")
    assert load_settings([], env={"LMGATE_CONFIG": cfg}).parallel == 4


@pytest.mark.parametrize(
    ("argv", "env", "key"),
    [
        (["--max-queue", "-1"], {}, "max_queue"),
        (["--port", "abc"], {}, "port"),
        (["--port", "70000"], {}, "port"),
        ([], {"LMGATE_QUEUE_TIMEOUT": "soon"}, "queue_timeout"),
        (["--policy", "random"], {}, "policy"),
        (["--upstream", "localhost:1234"], {}, "upstream"),
        (["--parallel", "0"], {}, "parallel"),
        ([], {"LMGATE_DEMO": "maybe"}, "demo"),
        (["--cors-origins", "example.com"], {}, "cors_origins"),
    ],
)
def test_bad_values_name_the_key(argv: list[str], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(argv, env=env)
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n", "colour"),
        ('max_queue = "10"\n', "max_queue"),
        ("parallel = true\n", "parallel"),
        ("[[keys]]\nname = 'a'\n", "keys[0].key"),
        ("[[keys]]\nname = 'a'\nkey = 'short'\n", "keys[0].key"),
        ("[[keys]]\nname = 'a'\nkey = 'long-enough-key'\nrole = 'root'\n", "keys[0].role"),
        ("[[keys]]\nname = 'a'\nkey = 'long-enough-key'\nrpm = 0\n", "keys[0].rpm"),
        ("[[keys]]\nname = 'a'\nkey = 'long-enough-key'\nfoo = 1\n", "keys[0].foo"),
        ("[[keys]]\nname = 'a'\nkey_sha256 = 'xyz'\n", "keys[0].key_sha256"),
        ("[[groups]]\nmodels = ['one']\n", "groups[0].models"),
        ("max_queue = \n", "config"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", write(tmp_path, text)], env={})
    assert info.value.key == key


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(tmp_path / "missing.toml")], env={})
    assert info.value.key == "config"


def test_keys_and_groups(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-bob-secret").hexdigest()
    cfg = write(tmp_path, f"""
[[keys]]
name = "alice"
key = "sk-alice-test-secret"
models = ["qwen*"]
max_queued = 3
rpm = 30
max_tokens = 4096
[[keys]]
name = "bob"
key_sha256 = "{digest}"
role = "admin"
[[groups]]
models = ["embed", "chat"]
""")
    s = load_settings(["--config", cfg], env={})
    alice, bob = s.keys
    assert alice.sha256 == hashlib.sha256(b"sk-alice-test-secret").hexdigest()
    assert (alice.models, alice.max_queued, alice.rpm, alice.max_tokens) == (("qwen*",), 3, 30, 4096)
    assert bob.admin and bob.sha256 == digest
    assert s.groups == (("embed", "chat"),)


def test_lists_from_env_are_comma_separated() -> None:
    s = load_settings([], env={"LMGATE_CORS_ORIGINS": "http://a:1, http://b:2"})
    assert s.cors_origins == ("http://a:1", "http://b:2")


def test_help_mentions_every_flag_and_its_env() -> None:
    text = build_parser().format_help()
    for opt in OPTIONS:
        assert opt.flag in text and opt.env in text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_cli("--max-queue", "-5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_queue" in lines[0]
    result = run_cli("--config", write(tmp_path, "bogus_key = 1\n"))
    assert result.returncode == 2 and "bogus_key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_flag_exits_2_with_one_line() -> None:
    result = run_cli("--no-such-flag")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--no-such-flag" in result.stderr


def test_cli_help_and_version() -> None:
    result = run_cli("--help")
    assert result.returncode == 0 and "--queue-timeout" in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("lmgate ")


def test_example_config_loads_and_documents_every_option() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "lmgate.example.toml"
    s = load_settings(["--config", str(example)], env={})
    assert s.keys == ()  # documented but commented out: their secrets are published
    assert s.groups and s.max_queue == 100
    text = example.read_text()
    assert "# [[keys]]" in text and '# key = "sk-alice-change-me"' in text
    for opt in OPTIONS:
        assert f"{opt.name} =" in text, f"{opt.name} is not documented in the example config"


def test_a_port_out_of_range_in_the_file_is_refused_even_when_a_flag_overrides_it(tmp_path) -> None:
    """Regression: ``port = 99999`` in the file passed whenever --port overrode it."""
    path = tmp_path / "lmgate.toml"
    path.write_text("port = 99999\n")
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(path), "--port", "8080"], env={})
    assert info.value.key == "port" and "65535" in str(info.value)


def test_a_long_queue_raises_the_connection_cap_unless_both_were_chosen() -> None:
    from proxy.config import fit_connections

    s, note = fit_connections(load_settings(["--max-queue", "1500"], env={}))
    assert s.max_connections == 1700 and note is not None and "1700" in note
    s, note = fit_connections(load_settings(["--max-queue", "900"], env={}))
    assert s.max_connections == 1000 and note is None
    with pytest.raises(ConfigError) as info:
        load_settings(["--max-queue", "1500", "--max-connections", "1000"], env={})
    assert info.value.key == "max_queue" and "max_connections" in str(info.value)
    assert load_settings(["--max-queue", "1500", "--max-connections", "2000"], env={}).max_connections == 2000


def test_systemd_state_directory_is_the_default_state_dir(monkeypatch, tmp_path) -> None:
    """Regression: the shipped unit (DynamicUser, ProtectHome) gives lmgate /var/lib/lmgate
    through $STATE_DIRECTORY; lmgate looked in a home directory it may not write."""
    import sys

    from proxy.quota import default_state_dir

    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/lmgate:{tmp_path}/other")
    if sys.platform == "win32":
        pytest.skip("systemd only")
    assert default_state_dir() == tmp_path / "lmgate"
    monkeypatch.setenv("STATE_DIRECTORY", "relative/dir")
    assert default_state_dir() != tmp_path / "lmgate" and default_state_dir().is_absolute()
