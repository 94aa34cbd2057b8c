"""Upgrades reading a live root (hatchery_lab.liveroot): the root kept as a squashfs image,
first member of the initrd, mounted read-only by the host's kernel while it is read. The
same three-way live patch as mkosi's cpio layout, across layouts too, and nothing left
mounted afterwards."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.upgrade.archive import (
    ArchiveError,
    has_modules,
    index_root,
    iter_entries,
    iter_root,
    open_root,
)
from hatchery.upgrade.fingerprint import of_member
from hatchery.upgrade.livepatch import LivePatch
from hatchery.upgrade.rootimage import RootImageError
from hatchery.upgrade.rootindex import INDEX_PATH, RootIndexError, build_index, parse_index
from hatchery_lab.cpio_writer import Entry, write_newc
from tests.conftest import FUZZ_EXAMPLES, missing
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def test_a_live_initrd_in_a_file_is_mounted_where_it_lies(tmp_path: Path) -> None:
    """As the store keeps it (the file as built): the root image, alone in the initrd's plain
    first segment, is mounted over its byte range of the file; nothing is copied under the
    scratch folder, the root reads the same, a live patch from it is the same, and the loop
    device goes with the mount."""
    v1, v2 = live_root(image("v1"), indexed=True), live_root(image("v2", **{"etc/motd": b"hi"}))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(v2)
    scratch = tmp_path / "scratch"
    with initrd.open("rb") as f:
        entries = iter_entries(open_root(f), scratch)
        first = next(entries)
        [private] = scratch.iterdir()
        assert [p.name for p in private.iterdir()] == ["root"]  # no copy of the image beside
        attached = subprocess.run(["losetup", "-j", str(initrd)], capture_output=True, text=True)
        assert "offset" in attached.stdout and str(initrd) in attached.stdout, attached.stdout
        in_place = {e.path: e.fingerprint for e in [first, *entries]}
    assert in_place == index_root(io.BytesIO(v2), tmp_path / "copied")
    node = tmp_path / "root"
    node.mkdir()
    unpack(image("v1"), node)
    patch = LivePatch(node, index_root(io.BytesIO(v1), scratch))
    with initrd.open("rb") as f:
        plan = patch.stage(open_root(f), scratch=scratch)
    assert "etc/motd" in plan.changed_paths
    assert mounts_under(tmp_path) == [] and list(scratch.iterdir()) == []
    assert subprocess.run(["losetup", "-j", str(initrd)], capture_output=True,
                          text=True).stdout == ""  # fmt: skip


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


@pytest.mark.parametrize(
    ("running_live", "indexed"),
    [(False, False), (True, False), (True, True)],
    ids=["cpio-to-live", "live-to-live", "indexed-live-to-live"],
)
def test_live_patch_onto_a_live_root(tmp_path: Path, running_live: bool, indexed: bool) -> None:
    """The node runs v1 (either layout) and patches to v2 built as a live root."""
    node = tmp_path / "root"
    node.mkdir()
    unpack(image("v1"), node)
    (node / "etc/motd").write_bytes(b"welcome to node-7")
    v1 = live_root(image("v1"), indexed) if running_live else image("v1")
    changed = {"usr/sbin/sshd": b"sshd v2", "etc/obsolete.conf": None}
    v2 = live_root(image("v2", **changed), indexed)
    patch = LivePatch(node, index_root(io.BytesIO(v1), tmp_path / "scratch"))
    plan = patch.stage(io.BytesIO(v2), scratch=tmp_path / "scratch")
    expected = {"usr/lib/os-release", "usr/sbin/sshd", "etc/obsolete.conf"}
    # the index itself is a file of the root, patched like the rest (its content changed)
    assert plan.changed_paths - {INDEX_PATH, "usr/lib/hatchery"} == expected
    patch.apply(plan)
    patch.commit()
    assert (node / "usr/sbin/sshd").read_bytes() == b"sshd v2"
    assert not (node / "etc/obsolete.conf").exists()
    assert (node / "etc/motd").read_bytes() == b"welcome to node-7"
    assert not (node / "bin").exists() and not (node / "init").exists()
    assert mounts_under(tmp_path) == []


def test_the_index_gives_the_fingerprints_hashing_would(tmp_path: Path) -> None:
    live = live_root(image("v1"), indexed=True)
    hashed = {m.path: of_member(m, d) for m, d in iter_root(io.BytesIO(live), tmp_path)}
    assert index_root(io.BytesIO(live), tmp_path) == hashed
    assert INDEX_PATH in hashed and "usr/sbin/sshd" in hashed


def test_an_index_is_read_without_reading_the_root(tmp_path: Path) -> None:
    """Only the files asked for are read: a file the index lies about goes unnoticed until
    it is read, and then stops the patch before anything on the node changes."""

    def tamper(tree: Path) -> None:
        (tree / "usr/sbin/sshd").write_bytes(b"sshd, not as built")

    v1 = image("v1")
    v2 = live_root(image("v2", **{"usr/sbin/sshd": b"sshd v2"}), indexed=True, edit=tamper)
    assert index_root(io.BytesIO(v2), tmp_path)["usr/sbin/sshd"].digest == sha256(b"sshd v2")
    node = tmp_path / "root"
    node.mkdir()
    unpack(v1, node)
    patch = LivePatch(node, index_root(io.BytesIO(v1)))
    with pytest.raises(ArchiveError, match="not what the image's index says"):
        patch.stage(io.BytesIO(v2), scratch=tmp_path / "scratch")
    assert (node / "usr/sbin/sshd").read_bytes() == b"sshd v1"
    assert not list(node.rglob(".hatchery-new.*")) and mounts_under(tmp_path) == []


def test_an_index_cannot_reach_outside_the_image(tmp_path: Path) -> None:
    """An index naming a path through a symlink that leaves the image (here to the host's
    /etc) is refused when that path is read; nothing of the host's is ever read."""

    def escape(tree: Path) -> None:
        (tree / "usr/lib/hostetc").symlink_to("/etc")
        index = json.loads((tree / INDEX_PATH).read_text())
        index["paths"]["usr/lib/hostetc/hostname"] = ["file", 0o644, 0, 0, "0" * 64]
        (tree / INDEX_PATH).write_text(json.dumps(index))

    live = live_root(image("v1"), indexed=True, edit=escape)
    for entry in iter_entries(io.BytesIO(live), tmp_path):  # read while the image is mounted
        if entry.path == "usr/lib/hostetc/hostname":
            with pytest.raises(ArchiveError, match="leads outside"):
                entry.read()
            break
    else:
        raise AssertionError("the index's entry was not listed")


def test_an_index_outside_the_image_is_never_read(tmp_path: Path) -> None:
    """The index's own folder a symlink out of the image (to a folder of the host holding
    an index that would hide a change): refused, not read."""
    host_folder = tmp_path / "host"
    host_folder.mkdir()
    (host_folder / "root-index.json").write_bytes(b'{"format": 1, "paths": {}}')

    def escape(tree: Path) -> None:
        shutil.rmtree(tree / "usr/lib/hatchery")
        (tree / "usr/lib/hatchery").symlink_to(host_folder)

    live = live_root(image("v1"), indexed=True, edit=escape)
    with pytest.raises(ArchiveError, match="leads outside"):
        index_root(io.BytesIO(live), tmp_path / "scratch")
    assert mounts_under(tmp_path) == []


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "not JSON"),
        (b'{"format": 2, "paths": {}}', "not of format 1"),
        (b'{"format": 1}', "has no paths"),
        (b'{"format": 1, "paths": {"../etc/shadow": ["file", 420, 0, 0, ""]}}', "unsafe path"),
        (b'{"format": 1, "paths": {"etc//x": ["file", 420, 0, 0, ""]}}', "malformed"),
        (b'{"format": 1, "paths": {"etc": ["dir", 70000, 0, 0, ""]}}', "malformed"),
        (b'{"format": 1, "paths": {"etc": ["pipe", 493, 0, 0, ""]}}', "malformed"),
        (b'{"format": 1, "paths": {"etc": ["dir", true, 0, 0, ""]}}', "malformed"),
    ],
)
def test_a_malformed_index_is_refused(raw: bytes, why: str) -> None:
    with pytest.raises(RootIndexError, match=why):
        parse_index(raw)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=512) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
).map(lambda value: json.dumps({"format": 1, "paths": value}).encode()))  # fmt: skip
def test_fuzzed_indexes_parse_or_are_refused(raw: bytes) -> None:
    try:
        index = parse_index(raw)
    except RootIndexError:
        return
    assert build_index(index.items()) == build_index(
        parse_index(build_index(index.items())).items()
    )


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
