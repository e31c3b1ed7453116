"""Several boxes in the configuration: flags, environment, [[upstreams]], and their conflicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, box_name, load_settings


def names(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    return [b.name for b in load_settings(argv, env=env or {}).boxes()]


def test_one_upstream_is_one_box_named_host_port() -> None:
    s = load_settings([], env={})
    assert [(b.name, b.url) for b in s.boxes()] == [("localhost:1234", "http://localhost:1234")]
    assert s.upstream == "http://localhost:1234"


def test_repeated_flag_and_comma_separated_env() -> None:
    assert names(["--upstream", "http://a:1", "--upstream", "http://b:2"]) == ["a:1", "b:2"]
    assert names([], {"LMGATE_UPSTREAM": "http://a:1, http://b:2"}) == ["a:1", "b:2"]
    assert names(["--upstream", "http://a:1,http://b:2"]) == ["a:1", "b:2"]


def test_box_names_never_carry_credentials() -> None:
    assert box_name("http://user:secret@gpu1:1234/v1") == "gpu1:1234"
    assert box_name("https://gpu2") == "gpu2:443"
    assert box_name("http://[::1]:1234") == "[::1]:1234"


def test_upstreams_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[upstreams]]\nname = "gpu1"\nurl = "http://10.0.0.1:1234"\nkey = "tok-1"\n'
                    'parallel = 4\nmodels = ["qwen*"]\n\n[[upstreams]]\nurl = "http://10.0.0.2:1234"\n')
    s = load_settings(["--config", str(path)], env={})
    first, second = s.boxes()
    assert (first.name, first.key, first.parallel, first.models) == ("gpu1", "tok-1", 4, ("qwen*",))
    assert second.name == "10.0.0.2:1234" and second.key is None and second.parallel is None
    # the command line replaces the file's boxes
    assert names(["--config", str(path), "--upstream", "http://x:9"]) == ["x:9"]


@pytest.mark.parametrize("text, key", [
    ('upstream = "http://a:1"\n[[upstreams]]\nurl = "http://b:2"\n', "upstreams"),
    ('[[upstreams]]\nurl = "gpu1:1234"\n', "upstreams[0].url"),
    ('[[upstreams]]\nurl = "http://a:1"\nweight = 2\n', "upstreams[0].weight"),
    ('[[upstreams]]\nurl = "http://a:1"\nparallel = 0\n', "upstreams[0].parallel"),
    ('[[upstreams]]\nurl = "http://a:1"\n[[upstreams]]\nurl = "http://a:1"\n', "upstreams"),
    ('upstreams = "http://a:1"\n', "upstreams"),
])
def test_bad_upstreams_are_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(["--config", str(path)], env={})
    assert err.value.key == key


def test_duplicate_urls_on_the_command_line_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(["--upstream", "http://a:1", "--upstream", "http://a:1/v1"], env={})
    assert err.value.key == "upstream" and "a:1" in str(err.value)
