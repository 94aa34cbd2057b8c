"""A live patch cut short by a crash is finished or rolled back at the next start (issue 14).

The crash is real: a separate Python process stages and applies the patch to a real root
folder and SIGKILLs itself at one step (``Interrupt``, the live patch's failure point). Then
a new controller starts on the same root and state, as the restarted agent would: the root
is exactly the old image's or exactly the new one's, the status says which and why, and the
work folder is gone. On main the crash left ``.hatchery-livepatch/`` behind and a patch whose
``os-release`` was already swapped was reported ``done``.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hatchery.state import write_json
from hatchery.upgrade import model
from hatchery.upgrade.archive import index_root, open_root
from hatchery.upgrade.controller import Upgrader
from hatchery.upgrade.livepatch import BACKUP_DIR, LivePatch
from hatchery.upgrade.model import Mode, Phase
from hatchery_lab.cpio_writer import Entry, write_newc
from tests.support.upgrade_roots import RELEASE, DirImages, unpack, wait_done

Snapshot = dict[str, tuple[str, bytes, int]]


def root(version: str) -> bytes:
    """v1 and v2 differ in every way a patch can: changed files, a changed symlink, a file
    only v1 has (deleted), and a new directory with a new file (v2)."""
    entries = [Entry.directory(d) for d in ("usr", "usr/lib", "usr/lib/modules",
               f"usr/lib/modules/{RELEASE}", "usr/bin", "etc")]  # fmt: skip
    entries += [
        Entry.file(f"usr/lib/modules/{RELEASE}/modules.dep", b""),
        Entry.file("usr/lib/os-release", f"IMAGE_VERSION={version}\n".encode()),
        Entry.file("usr/bin/tool", f"tool {version}".encode(), perm=0o755),
        Entry.file("etc/tool.conf", f"conf {version}".encode()),
        Entry.file("usr/lib/same", b"the same in both"),
        Entry.symlink("usr/bin/current", f"tool-{version}"),
    ]
    if version == "v1":
        entries.append(Entry.file("usr/lib/old-only", b"gone in v2"))
    else:
        entries += [Entry.directory("usr/lib/new"), Entry.directory("usr/lib/new/deep"),
                    Entry.file("usr/lib/new/deep/file", b"new in v2")]  # fmt: skip
    return write_newc(entries)


def snapshot(folder: Path) -> Snapshot:
    """Every path with its kind, content (or link target) and file mode."""
    out: Snapshot = {}
    for path in sorted(folder.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(folder))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path).encode(), 0)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", b"", 0)
        else:
            out[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def unpacked(tmp_path: Path, version: str) -> Snapshot:
    folder = tmp_path / f"expected-{version}"
    folder.mkdir()
    unpack(root(version), folder)
    return snapshot(folder)


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, DirImages, Path]:
    node_root, state = tmp_path / "root", tmp_path / "state"
    node_root.mkdir()
    state.mkdir()
    unpack(root("v1"), node_root)
    images = DirImages(tmp_path / "images")
    images.add("v1", root("v1"))
    images.add("v2", root("v2"))
    return node_root, images, state


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from hatchery.upgrade.archive import index_root, open_root
    from hatchery.upgrade.livepatch import LivePatch

    root, current, target, phase, step = sys.argv[1:6]

    def crash(p: str, s: int) -> None:
        if (p, s) == (phase, int(step)):
            os.kill(os.getpid(), signal.SIGKILL)

    with open(current, "rb") as f:
        index = index_root(open_root(f))
    patch = LivePatch(Path(root), index)
    with open(target, "rb") as f:
        plan = patch.stage(open_root(f), interrupt=crash)
    patch.apply(plan, version="v2", interrupt=crash)
    sys.exit(3)  # the crash point was never reached
""")


def crash_at(node: tuple[Path, DirImages, Path], phase: str, step: int) -> None:
    """Start the patch to v2 as the controller does (status ``running`` first), in another
    process that is killed at ``step`` of ``phase``."""
    node_root, images, state = node
    write_json(state / "upgrade.json", model.running("v2", Mode.LIVE, time.time()).to_json())
    argv = [sys.executable, "-c", CHILD, str(node_root), str(images.folder / "v1" / "initrd"),
            str(images.folder / "v2" / "initrd"), phase, str(step)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (node_root / BACKUP_DIR).is_dir(), "the crash left no work folder: nothing tested"


def restart(node: tuple[Path, DirImages, Path]) -> Upgrader:
    node_root, images, state = node

    def version() -> str:
        return (node_root / "usr/lib/os-release").read_text().strip().split("=", 1)[1]

    return Upgrader(state, images, node_root, version=version, kernel_release=RELEASE)


def changes_in_plan(node: tuple[Path, DirImages, Path], tmp_path: Path) -> int:
    """How many steps the patch has (planned on a copy of the root)."""
    node_root, images, _ = node
    copy = tmp_path / "plan-copy"
    shutil.copytree(node_root, copy, symlinks=True)
    with (images.folder / "v1" / "initrd").open("rb") as f:
        index = index_root(open_root(f))
    patch = LivePatch(copy, index)
    with (images.folder / "v2" / "initrd").open("rb") as f:
        plan = patch.stage(open_root(f))
    patch.discard(plan)
    return len(plan.changes)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".hatchery-" in p.name]


def test_a_crash_at_any_swap_is_rolled_back_and_reported_failed(
    node: tuple[Path, DirImages, Path], tmp_path: Path
) -> None:
    node_root, _, _ = node
    old = unpacked(tmp_path, "v1")
    assert snapshot(node_root) == old
    steps = changes_in_plan(node, tmp_path)
    assert steps >= 7  # replaces, a symlink, a deletion, new directories and a new file
    for step in range(steps):
        crash_at(node, "apply", step)
        status = restart(node).status
        assert snapshot(node_root) == old, f"crash before swap {step}: not exactly v1"
        assert leftovers(node_root) == [], step
        assert status.state is Phase.FAILED, (step, status)
        assert status.target == "v2" and status.error is not None
        assert "rolled back" in status.error and "the node runs v1" in status.error, status.error


def test_a_crash_while_staging_changes_nothing(
    node: tuple[Path, DirImages, Path], tmp_path: Path
) -> None:
    node_root, _, _ = node
    old = unpacked(tmp_path, "v1")
    for step in (0, 3):
        crash_at(node, "stage", step)
        staged = list(node_root.rglob(".hatchery-new.*"))
        assert bool(staged) == (step > 0), staged
        status = restart(node).status
        assert snapshot(node_root) == old and leftovers(node_root) == []
        assert status.state is Phase.FAILED and status.error is not None
        assert "while staging" in status.error, status.error


def test_a_crash_after_the_last_swap_is_finished_and_reported_done(
    node: tuple[Path, DirImages, Path], tmp_path: Path
) -> None:
    node_root, images, _ = node
    crash_at(node, "apply", changes_in_plan(node, tmp_path))
    upgrader = restart(node)
    assert snapshot(node_root) == unpacked(tmp_path, "v2")
    assert leftovers(node_root) == []
    assert upgrader.status.state is Phase.DONE, upgrader.status
    assert upgrader.status.detail is not None and "finished it" in upgrader.status.detail
    assert images.current == "v2"
    # Settled once: the next start has nothing to recover and keeps the answer.
    assert restart(node).status == upgrader.status


async def test_after_a_recovery_the_next_patch_goes_through(
    node: tuple[Path, DirImages, Path], tmp_path: Path
) -> None:
    node_root, _, _ = node
    crash_at(node, "apply", 2)
    upgrader = restart(node)
    assert upgrader.status.state is Phase.FAILED
    code, _ = await upgrader.request("v2", Mode.LIVE)
    assert code == 202
    await wait_done(upgrader)
    assert upgrader.status.state is Phase.DONE, upgrader.status
    assert snapshot(node_root) == unpacked(tmp_path, "v2") and leftovers(node_root) == []
