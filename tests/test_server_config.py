"""The server's settings (aios/server/config.py): a TOML file, environment overrides,
and every kind of bad configuration as a ConfigError naming what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aios.config import CoreConfig
from aios.errors import (
    ConfigError,
)
from aios.server.config import ServerConfig, load_settings

TOML = """
[server]
port = 9123
data_dir = "{data}"
max_streams_per_agent = 2

[kernel]
policy = "fair"
syscall_timeout = 30

[kernel.quota]
tokens_per_minute = 1000

[[core]]
name = "small"
model = "fake"
slots = 2
batch_tokens = 64
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aios.toml"
    path.write_text(text.replace("{data}", str(tmp_path / "data")))
    return path


def test_load_settings_from_toml(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, TOML), env={})
    assert settings.server.port == 9123
    assert settings.server.data_path == tmp_path / "data"
    assert settings.server.max_streams_per_agent == 2
    assert settings.server.max_tokens == ServerConfig().max_tokens
    assert settings.kernel.policy == "fair" and settings.kernel.syscall_timeout == 30.0
    assert settings.kernel.quota.tokens_per_minute == 1000
    (core,) = settings.kernel.cores
    assert isinstance(core, CoreConfig)
    assert (core.name, core.model, core.slots, core.batch_tokens) == ("small", "fake", 2, 64)


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, TOML)
    env = {"AIOS_PORT": "9999", "AIOS_POLICY": "rr", "AIOS_MODEL": "other"}
    settings = load_settings(path, env=env)
    assert settings.server.port == 9999 and settings.kernel.policy == "rr"
    assert settings.kernel.cores[0].model == "other"  # type: ignore[union-attr]
    assert load_settings(env={"AIOS_CONFIG": str(path)}).server.port == 9123
    defaults = load_settings(env={})
    assert defaults.server.port == 8080 and defaults.kernel.cores[0].name == "default"


@pytest.mark.parametrize(
    ("text", "env", "mentions"),
    [
        ("[server]\nbogus = 1\n", {}, "bogus"),
        ("[nope]\n", {}, "nope"),
        ("[kernel]\nfrobs = 2\n", {}, "frobs"),
        ("[kernel.quota]\nper_hour = 2\n", {}, "per_hour"),
        ("[[core]]\nname = 'a'\nmodel = 'fake'\nsize = 3\n", {}, "size"),
        ("[server]\nport = '80'\n", {}, "port"),
        ("[server]\nport = true\n", {}, "port"),
        ("[server]\nport = 70000\n", {}, "port"),
        ("[server]\nmax_tokens = 1.5\n", {}, "max_tokens"),
        ("[kernel]\npolicy = 'lottery'\n", {}, "policy"),
        ("[kernel]\nsyscall_timeout = 'soon'\n", {}, "syscall_timeout"),
        ("[[core]]\nname = 'a'\nslots = '2'\n", {}, "slots"),
        ("[[core]]\ntype = 'quantum'\nname = 'a'\n", {}, "type"),
        ("core = 5\n", {}, "core"),
        ("server = 5\n", {}, "server"),
        ("this is not toml", {}, "TOML"),
        ("", {"AIOS_PORT": "eighty"}, "AIOS_PORT"),
    ],
)
def test_bad_config_is_a_config_error(
    tmp_path: Path, text: str, env: dict[str, str], mentions: str
) -> None:
    with pytest.raises(ConfigError, match=mentions):
        load_settings(write_config(tmp_path, text), env=env)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})
