"""The node seed: only files for /etc/hatchery and /etc/systemd/network, written safely."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hatchery import seed as seed_module
from hatchery.seed import SeedError, apply_seed, find_seed, run_seed_once


def tar(**files: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name.replace("__", "/"))
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_writes_allowed_files(tmp_path: Path) -> None:
    seed = tar(hatchery__agent__yaml=b"listen: 0.0.0.0:6976\n", hatchery__tls__agent__key=b"k",
               systemd__network__br0__netdev=b"[NetDev]\n")  # fmt: skip
    written = apply_seed(seed, tmp_path)
    assert len(written) == 3
    assert (tmp_path / "hatchery/tls/agent/key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "systemd/network/br0/netdev").read_bytes() == b"[NetDev]\n"


@pytest.mark.parametrize(
    "name", ["../../etc/shadow", "/etc/passwd", "passwd", "hatchery/../shadow", "ssh/sshd_config"]
)
def test_refuses_paths_outside(tmp_path: Path, name: str) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        info = tarfile.TarInfo(name)
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(SeedError):
        apply_seed(out.getvalue(), tmp_path / "etc")
    assert not (tmp_path / "etc").exists() or not any((tmp_path / "etc").rglob("*"))


def test_refuses_links_and_garbage(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        info = tarfile.TarInfo("hatchery/agent.yaml")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        t.addfile(info)
    with pytest.raises(SeedError, match="files only"):
        apply_seed(out.getvalue(), tmp_path)
    with pytest.raises(SeedError, match="not a tar"):
        apply_seed(b"\x00garbage" * 100, tmp_path)


def test_finds_the_firmware_config_first(tmp_path: Path) -> None:
    fw = tmp_path / "raw"
    fw.write_bytes(b"seed bytes")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 hatchery.seed=http://127.0.0.1:1/never\n")
    assert find_seed(cmdline, fw) == b"seed bytes"
    cmdline.write_text("console=ttyS0\n")
    assert find_seed(cmdline, tmp_path / "absent") is None
    cmdline.write_text("hatchery.seed=file:///etc/shadow\n")
    with pytest.raises(SeedError, match="http"):
        find_seed(cmdline, tmp_path / "absent")


def test_nested_seeds_are_private(tmp_path: Path) -> None:
    """The seeds of the nodes this node births hold their private keys: 0600 in a 0700
    folder, even when the folder was there, readable, before."""
    (tmp_path / "hatchery" / "seeds").mkdir(parents=True, mode=0o755)
    (tmp_path / "hatchery" / "seeds").chmod(0o755)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        info = tarfile.TarInfo("hatchery/seeds/52:54:00:de:00:0b.tar")
        info.size, info.mode = 13, 0o644
        t.addfile(info, io.BytesIO(b"a nested seed"))
    apply_seed(out.getvalue(), tmp_path)
    nested = tmp_path / "hatchery" / "seeds" / "52:54:00:de:00:0b.tar"
    assert nested.read_bytes() == b"a nested seed"
    assert nested.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "hatchery" / "seeds").stat().st_mode & 0o777 == 0o700


def test_the_last_seed_url_on_the_command_line_wins(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("hatchery.seed=http://10.0.0.1:8080/old hatchery.seed=ftp://x/new\n")
    with pytest.raises(SeedError, match="ftp://x/new"):
        find_seed(cmdline, tmp_path / "absent")


def test_the_seed_command_does_not_load_the_agents_stack() -> None:
    """``hatchery-agent seed`` by hand: on an emulated node each 0.1 s of imports on a host
    is a second, so it does not load the agent's stack."""
    probe = (
        "import sys\n"
        "from hatchery import agent_main\n"
        "from hatchery.seed import run_seed\n"
        "heavy = ('aiohttp', 'pyroute2', 'hatchery.agent', 'hatchery.api', 'hatchery.vms')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert result.stdout.strip() == "[]"


def test_the_agent_tries_the_seed_once_per_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A birth token answers once and the agent restarts (a crash, a live patch): the seed
    is tried once per boot. One that cannot be had is logged, and the agent goes on with the
    configuration it holds (a node rebooted by kexec keeps its first boot's spent token)."""
    calls: list[Path] = []

    def failing(etc: Path) -> int:
        calls.append(etc)
        raise SeedError("cannot fetch the seed from http://peer", hint="boot it again")

    monkeypatch.setattr(seed_module, "run_seed", failing)
    marker = tmp_path / "boot1" / "hatchery" / "seed-tried"
    run_seed_once(marker, tmp_path / "etc")
    run_seed_once(marker, tmp_path / "etc")
    assert calls == [tmp_path / "etc"] and marker.exists()
    assert "seed: cannot fetch the seed from http://peer (boot it again)" in caplog.text

    def applied(etc: Path) -> int:
        calls.append(etc)
        return 0

    monkeypatch.setattr(seed_module, "run_seed", applied)
    marker = tmp_path / "boot2" / "hatchery" / "seed-tried"  # the next boot: /run is new
    run_seed_once(marker, tmp_path / "etc")
    run_seed_once(marker, tmp_path / "etc")
    assert calls == [tmp_path / "etc"] * 2
