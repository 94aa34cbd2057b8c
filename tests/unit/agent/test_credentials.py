"""One lookup of a person's TLS files for both CLIs (``hatchery``, ``hatchery-rollout``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hatchery import pki
from hatchery.client import Credentials, config_dir
from hatchery.pki import PkiError
from hatchery_rollout.cli import _client, _parser
from hatchery_rollout.client import AgentClient


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("HATCHERY_CA", "HATCHERY_CERT", "HATCHERY_KEY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_default_is_dot_config(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home" / ".config" / "hatchery"
    assert config_dir() == home
    assert Credentials.from_env() == Credentials(
        home / "ca.pem", home / "client.pem", home / "client.key"
    )


def test_xdg_config_home_is_honoured_at_call_time(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert Credentials.from_env().cert == tmp_path / "xdg" / "hatchery" / "client.pem"
    env.setenv("XDG_CONFIG_HOME", "relative/dir")  # the XDG spec: relative paths are ignored
    assert config_dir() == tmp_path / "home" / ".config" / "hatchery"


def test_environment_then_flags_win(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    env.setenv("HATCHERY_CA", "/etc/fleet/ca.pem")
    found = Credentials.from_env(key=Path("/flag/me.key"))
    xdg = tmp_path / "xdg" / "hatchery"
    assert found == Credentials(Path("/etc/fleet/ca.pem"), xdg / "client.pem", Path("/flag/me.key"))


def test_the_rollout_finds_the_same_files(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """hatchery-rollout's flags feed the same lookup: with nothing given it loads the files
    from $XDG_CONFIG_HOME/hatchery, and when they are missing it says where it looked."""
    config = tmp_path / "xdg" / "hatchery"
    env.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    args = _parser().parse_args(["run", "--fleet", "f.yaml", "--version", "v2"])
    with pytest.raises(PkiError, match=str(config / "ca.pem")):
        _client(args)
    ca = pki.init_ca(tmp_path / "ca")
    pair = pki.issue(tmp_path / "ca", "rollout", tmp_path / "issued", groups=("admin",))
    config.mkdir(parents=True)
    shutil.copy(ca, config / "ca.pem")
    shutil.copy(pair.cert, config / "client.pem")
    shutil.copy(pair.key, config / "client.key")
    assert isinstance(_client(args), AgentClient)
