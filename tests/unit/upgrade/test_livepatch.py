"""Live patch on a real directory tree standing in for the running root."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hatchery.upgrade.archive import index_root, iter_root
from hatchery.upgrade.livepatch import LivePatch, LivePatchError, units_to_restart
from hatchery_lab.cpio_writer import Entry, write_newc
from tests.support.upgrade_roots import image, unpack


class FailAt:
    """An ``Interrupt`` that fails the patch at one step of one phase."""

    def __init__(self, phase: str, step: int) -> None:
        self.at = (phase, step)

    def __call__(self, phase: str, step: int) -> None:
        if (phase, step) == self.at:
            raise LivePatchError(f"injected failure at {phase} step {step}")


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    unpack(image("v1"), root)
    (root / "etc/motd").write_bytes(b"welcome to node-7")  # a local change the images agree on
    (root / "etc/local.conf").write_bytes(b"node only")  # not in any image
    (root / "var/log/dpkg.log").write_bytes(b"runtime log")
    return root


def test_three_way_patch(node: Path) -> None:
    v2 = image("v2", **{"usr/sbin/sshd": b"sshd v2", "etc/obsolete.conf": None,
                       "etc/new.conf": b"fresh", "var/log/dpkg.log": b"v2 build log"})  # fmt: skip
    patch = LivePatch(node, index_root(io.BytesIO(image("v1"))))
    plan = patch.stage(io.BytesIO(v2))
    assert plan.changed_paths == {"usr/lib/os-release", "usr/sbin/sshd", "etc/new.conf",
                                  "etc/obsolete.conf"}  # fmt: skip
    assert (node / "usr/sbin/sshd").read_bytes() == b"sshd v1", "staging changed a live file"
    patch.apply(plan)
    patch.commit()
    assert (node / "usr/sbin/sshd").read_bytes() == b"sshd v2"
    assert (node / "usr/lib/os-release").read_text() == "IMAGE_VERSION=v2\n"
    assert (node / "etc/new.conf").read_bytes() == b"fresh"
    assert not (node / "etc/obsolete.conf").exists()
    assert (node / "etc/motd").read_bytes() == b"welcome to node-7", "a local change was lost"
    assert (node / "etc/local.conf").read_bytes() == b"node only"
    assert (node / "var/log/dpkg.log").read_bytes() == b"runtime log"
    assert os.readlink(node / "var/lib/hatchery") == "/data/var/lib/hatchery"
    leftovers = [p for p in node.rglob("*") if ".hatchery-" in p.name]
    assert leftovers == []
    assert units_to_restart(node, plan.changed_paths) == ["ssh.service"]


def test_agent_change_restarts_the_agent_last(node: Path) -> None:
    v2 = image("v2", **{"opt/hatchery/venv/lib/agent.py": b"print('v2')",
                       "usr/sbin/sshd": b"sshd v2"})  # fmt: skip
    patch = LivePatch(node, index_root(io.BytesIO(image("v1"))))
    plan = patch.stage(io.BytesIO(v2))
    patch.apply(plan)
    assert units_to_restart(node, plan.changed_paths) == ["ssh.service", "hatchery-agent.service"]


def test_a_changed_drop_in_restarts_its_unit(node: Path) -> None:
    """A drop-in added, changed or removed restarts the unit it belongs to, wherever the unit
    file itself lives (an nftables update bringing one restarts nftables.service); a
    template's, every running instance of it (``systemctl try-restart`` takes the glob)."""
    changed = {"usr/lib/systemd/system/nftables.service.d/50-site.conf",
               "etc/systemd/system/ssh.service.d/override.conf",
               "usr/lib/systemd/system/getty@.service.d/gone.conf",
               "usr/lib/systemd/system/not-a-unit.d/x.conf",
               "usr/lib/systemd/system-preset/50-x.preset"}  # fmt: skip
    assert units_to_restart(node, changed) == [
        "getty@*.service", "nftables.service", "ssh.service"]  # fmt: skip


def test_same_image_is_a_no_op(node: Path) -> None:
    patch = LivePatch(node, index_root(io.BytesIO(image("v1"))))
    plan = patch.stage(io.BytesIO(image("v1")))
    assert plan.changes == [] and plan.summary() == "no changes"


def test_failure_half_way_restores_everything(node: Path) -> None:
    before = {p: p.read_bytes() for p in node.rglob("*") if p.is_file() and not p.is_symlink()}
    v2 = image("v2", **{"usr/sbin/sshd": b"sshd v2", "etc/obsolete.conf": None,
                       "etc/new.conf": b"fresh"})  # fmt: skip
    patch = LivePatch(node, index_root(io.BytesIO(image("v1"))))
    plan = patch.stage(io.BytesIO(v2))
    with pytest.raises(LivePatchError, match="injected"):
        patch.apply(plan, interrupt=FailAt("apply", 3))
    after = {p: p.read_bytes() for p in node.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before
    assert [p for p in node.rglob("*") if ".hatchery-" in p.name] == []


def test_persistent_paths_are_never_touched(node: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "etc/hatchery").mkdir(parents=True)
    (data / "etc/hatchery/agent.yaml").write_text("mine")
    os.symlink("/data/etc/hatchery", node / "etc/hatchery")
    v2 = image("v2", **{"etc/hatchery/agent.yaml": b"image default"})
    patch = LivePatch(node, index_root(io.BytesIO(image("v1"))))
    plan = patch.stage(io.BytesIO(v2))
    assert "etc/hatchery/agent.yaml" not in plan.changed_paths
    assert (data / "etc/hatchery/agent.yaml").read_text() == "mine"


def test_unknown_current_image_patches_without_deleting(node: Path) -> None:
    v2 = image("v2", **{"usr/sbin/sshd": b"sshd v2", "etc/obsolete.conf": None})
    patch = LivePatch(node, current=None)
    plan = patch.stage(io.BytesIO(v2))
    patch.apply(plan)
    assert (node / "usr/sbin/sshd").read_bytes() == b"sshd v2"
    assert (node / "etc/obsolete.conf").exists()


def test_file_to_directory_needs_a_reboot(node: Path) -> None:
    v2 = write_newc([Entry.directory("etc"), Entry.directory("etc/motd"),
                     Entry.file("etc/motd/part", b"x")])  # fmt: skip
    patch = LivePatch(node, index_root(io.BytesIO(image("v1"))))
    with pytest.raises(LivePatchError, match="reboot"):
        patch.stage(io.BytesIO(v2))
    assert [p for p in node.rglob("*") if ".hatchery-" in p.name] == []


def test_hard_links_get_their_data(tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    """GNU cpio writes a hard-link group with the data on its last member only."""
    cpio = require_tool("cpio")
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/python3.11").write_bytes(b"interpreter")
    os.link(tree / "bin/python3.11", tree / "bin/python3")
    (tree / "bin/other").write_bytes(b"other")
    listing = "bin\nbin/python3\nbin/python3.11\nbin/other\n"
    archive = subprocess.run([cpio, "-o", "-H", "newc", "--quiet"], input=listing.encode(),
                             cwd=tree, capture_output=True, check=True).stdout  # fmt: skip
    got = {m.path: d for m, d in iter_root(io.BytesIO(archive)) if stat.S_ISREG(m.mode)}
    assert got == {"bin/python3": b"interpreter", "bin/python3.11": b"interpreter",
                   "bin/other": b"other"}  # fmt: skip
