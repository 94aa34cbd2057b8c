"""Small root images for upgrade tests: a cpio root, a folder of versions, unpacking, waiting.

Shared by the controller, reboot and live-patch tests (unit) and the live-upgrade test
(integration), so that no test module imports another.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

import zstandard

from hatchery.upgrade.archive import iter_root
from hatchery.upgrade.controller import Upgrader
from hatchery.upgrade.model import Phase
from hatchery_lab.cpio_writer import Entry, write_newc
from hatchery_lab.liveroot import write_index

RELEASE = "6.1.0-test-amd64"

AGENT_UNIT = b"""[Service]
ExecStart=/usr/bin/hatchery-agent run
X-Hatchery-Restart-On=/opt/hatchery/
"""
SSHD_UNIT = b"[Service]\nExecStart=/usr/sbin/sshd -D\n"


def root_image(version: str, kernel_release: str = RELEASE, extra: bytes = b"") -> bytes:
    entries = [
        Entry.directory("usr"), Entry.directory("usr/lib"), Entry.directory("usr/lib/modules"),
        Entry.directory(f"usr/lib/modules/{kernel_release}"),
        Entry.file(f"usr/lib/modules/{kernel_release}/modules.dep", b""),
        Entry.file("usr/lib/os-release", f"IMAGE_VERSION={version}\n".encode()),
        Entry.file("usr/lib/payload", b"payload " + version.encode() + extra),
    ]  # fmt: skip
    return write_newc(entries)


def image(version: str, **overrides: bytes | None) -> bytes:
    """A small node root of ``version`` for live-patch tests; ``overrides`` change or (None)
    drop files."""
    files: dict[str, bytes | None] = {
        "usr/lib/os-release": f"IMAGE_VERSION={version}\n".encode(),
        "usr/lib/systemd/system/hatchery-agent.service": AGENT_UNIT,
        "usr/lib/systemd/system/ssh.service": SSHD_UNIT,
        "usr/sbin/sshd": b"sshd v1",
        "opt/hatchery/venv/lib/agent.py": b"print('v1')",
        "etc/motd": b"welcome",
        "etc/obsolete.conf": b"old",
        "var/log/dpkg.log": b"build log",
    }
    files.update(overrides)
    entries = [Entry.directory(d) for d in ("etc", "opt", "opt/hatchery", "opt/hatchery/venv",
               "opt/hatchery/venv/lib", "usr", "usr/bin", "usr/lib", "usr/lib/systemd",
               "usr/lib/systemd/system", "usr/sbin", "var", "var/log", "var/lib")]  # fmt: skip
    entries.append(Entry.symlink("usr/bin/hatchery-agent", "/opt/hatchery/venv/bin/agent"))
    entries.append(Entry.symlink("var/lib/hatchery", "/data/var/lib/hatchery"))
    entries += [Entry.file(p, data) for p, data in sorted(files.items()) if data is not None]
    return write_newc(entries)


class DirImages:
    """A small real ImageSource: artefacts as built (root zstd-compressed) in a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.current: str | None = None

    def add(self, version: str, root: bytes, kernel: bytes = b"kernel-1") -> None:
        d = self.folder / version
        d.mkdir(parents=True)
        (d / "initrd").write_bytes(zstandard.ZstdCompressor().compress(root))
        (d / "kernel").write_bytes(kernel)

    def has(self, version: str) -> bool:
        return (self.folder / version).is_dir()

    def verify(self, version: str) -> None:
        """Nothing is signed here (tests of re-verification use the real store)."""

    def open_artefact(self, version: str, role: str) -> AbstractContextManager[BinaryIO]:
        return (self.folder / version / role).open("rb")

    def checked_file(self, version: str, role: str) -> Path | None:
        return self.folder / version / role

    def artefact_digest(self, version: str, role: str) -> str | None:
        return hashlib.sha256((self.folder / version / role).read_bytes()).hexdigest()

    def set_current(self, version: str) -> None:
        self.current = version


def unpack(archive: bytes, root: Path) -> None:
    for member, data in iter_root(io.BytesIO(archive)):
        path = root / member.path
        if stat.S_ISDIR(member.mode):
            path.mkdir(exist_ok=True)
        elif stat.S_ISLNK(member.mode):
            os.symlink(data.decode(), path)
        else:
            path.write_bytes(data)
            path.chmod(stat.S_IMODE(member.mode))


def live_root(
    archive: bytes, indexed: bool = False, edit: Callable[[Path], None] | None = None
) -> bytes:
    """The same root in the live layout (hatchery_lab.liveroot): a squashfs image of it made
    by the real mksquashfs, alone in a plain cpio, followed by a zstd-compressed cpio of the
    initrd's own members (not the root's);
    ``indexed``: with its root index written as the build writes it, then ``edit`` (a broken
    image). Needs root (owners kept) and mksquashfs; callers skip without them."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        unpack(archive, tree)
        if indexed:
            write_index(tree)
        if edit is not None:
            edit(tree)
        image = Path(tmp) / "root.squashfs"
        subprocess.run(["mksquashfs", str(tree), str(image), "-comp", "zstd", "-noappend",
                        "-no-xattrs", "-quiet", "-no-progress"], check=True)  # fmt: skip
        rest = write_newc([
            Entry.file("init", b"#!/bin/busybox sh\n", 0o755), Entry.directory("bin"),
            Entry.file("bin/busybox", b"not the root's"), Entry.directory("usr"),
            Entry.file("usr/not-in-the-root", b"the initrd's own"),
        ])  # fmt: skip
        return live_initrd(image.read_bytes(), rest)


def live_initrd(image: bytes, rest: bytes) -> bytes:
    """The live initrd's framing (hatchery_lab.liveroot): ``image`` as ``root.squashfs`` alone
    in a plain cpio, then ``rest`` (the initrd's own members, a cpio) zstd-compressed."""
    plain = write_newc([Entry.file("root.squashfs", image, 0o400)])
    return plain + bytes(-len(plain) % 4) + zstandard.ZstdCompressor().compress(rest)


def can_mount_squashfs() -> str | None:
    """Why live roots cannot be read here (None: they can): mounting needs root and tools."""
    if os.geteuid() != 0:
        return "mounting a root image needs root"
    if shutil.which("mksquashfs") is None:
        return "mksquashfs is not installed (package squashfs-tools)"
    return None


async def wait_done(upgrader: Upgrader) -> None:
    for _ in range(100):
        if upgrader.status.state is not Phase.RUNNING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("upgrade did not finish")
