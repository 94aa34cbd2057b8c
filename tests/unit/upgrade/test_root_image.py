"""Upgrades reading a live root (hatchery_lab.liveroot): the root kept as a squashfs image,
first member of the initrd, mounted read-only by the host's kernel while it is read. The
same three-way live patch as mkosi's cpio layout, across layouts too, and nothing left
mounted afterwards."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import zstandard

from hatchery.upgrade.archive import ArchiveError, has_modules, index_root, iter_root, open_root
from hatchery.upgrade.fingerprint import of_member
from hatchery.upgrade.livepatch import LivePatch
from hatchery.upgrade.rootimage import RootImageError
from hatchery_lab.cpio_writer import Entry, write_newc
from tests.conftest import missing
from tests.support.upgrade_roots import (
    RELEASE,
    can_mount_squashfs,
    image,
    live_root,
    root_image,
    unpack,
)


@pytest.fixture(autouse=True)
def _mountable() -> None:
    reason = can_mount_squashfs()
    if reason is not None:
        missing(reason)


def mounts_under(folder: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(folder) in line]


def test_the_live_root_reads_as_the_same_root(tmp_path: Path) -> None:
    plain = image("v1")
    live = live_root(plain)
    assert index_root(io.BytesIO(live), tmp_path) == index_root(io.BytesIO(plain), tmp_path)
    paths = {m.path for m, _ in iter_root(io.BytesIO(live), tmp_path)}
    assert "usr/sbin/sshd" in paths
    assert not {"init", "bin/busybox", "usr/not-in-the-root", "root.squashfs"} & paths
    # compressed as the store keeps it, and nothing left behind in the scratch folder
    stored = zstandard.ZstdCompressor().compress(live)
    assert index_root(open_root(io.BytesIO(stored)), tmp_path)["etc/motd"].is_file
    assert mounts_under(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_stopping_early_unmounts(tmp_path: Path) -> None:
    members = iter_root(io.BytesIO(live_root(image("v1"))), tmp_path)
    first, _ = next(members)
    assert first.path == "etc" and mounts_under(tmp_path) != []
    members.close()
    assert mounts_under(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_has_modules_looks_inside_the_image(tmp_path: Path) -> None:
    live = zstandard.ZstdCompressor().compress(live_root(root_image("v1")))
    assert has_modules(io.BytesIO(live), RELEASE, tmp_path)
    assert not has_modules(io.BytesIO(live), "6.12.0-other-amd64", tmp_path)


@pytest.mark.parametrize("running_live", [False, True], ids=["cpio-to-live", "live-to-live"])
def test_live_patch_onto_a_live_root(tmp_path: Path, running_live: bool) -> None:
    """The node runs v1 (either layout) and patches to v2 built as a live root."""
    node = tmp_path / "root"
    node.mkdir()
    unpack(image("v1"), node)
    (node / "etc/motd").write_bytes(b"welcome to node-7")
    v1 = live_root(image("v1")) if running_live else image("v1")
    v2 = live_root(image("v2", **{"usr/sbin/sshd": b"sshd v2", "etc/obsolete.conf": None}))
    patch = LivePatch(node, index_root(io.BytesIO(v1), tmp_path / "scratch"))
    plan = patch.stage(io.BytesIO(v2), scratch=tmp_path / "scratch")
    assert plan.changed_paths == {"usr/lib/os-release", "usr/sbin/sshd", "etc/obsolete.conf"}
    patch.apply(plan)
    patch.commit()
    assert (node / "usr/sbin/sshd").read_bytes() == b"sshd v2"
    assert not (node / "etc/obsolete.conf").exists()
    assert (node / "etc/motd").read_bytes() == b"welcome to node-7"
    assert not (node / "bin").exists() and not (node / "init").exists()
    assert mounts_under(tmp_path) == []


def test_a_broken_image_is_refused_with_a_reason(tmp_path: Path) -> None:
    broken = write_newc([Entry.file("root.squashfs", b"hsqs" + bytes(4000), 0o400)])
    with pytest.raises(RootImageError, match="cannot mount the root image"):
        index_root(io.BytesIO(broken), tmp_path)
    with pytest.raises(ArchiveError, match="cannot mount the root image"):
        has_modules(io.BytesIO(broken), RELEASE, tmp_path)
    assert mounts_under(tmp_path) == [] and list(tmp_path.iterdir()) == []
    # a cpio root may hold a file of that name anywhere but first: it is just a file
    plain = write_newc([Entry.directory("etc"), Entry.file("root.squashfs", b"data")])
    got = {m.path: of_member(m, d).kind for m, d in iter_root(io.BytesIO(plain), tmp_path)}
    assert got == {"etc": "dir", "root.squashfs": "file"}
