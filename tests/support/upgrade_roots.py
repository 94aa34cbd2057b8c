"""Small root images for upgrade tests: a cpio root, a folder of versions, unpacking, waiting.

Shared by the controller, reboot and live-patch tests (unit) and the live-upgrade test
(integration), so that no test module imports another.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

import zstandard

from hatchery.upgrade.archive import iter_root
from hatchery.upgrade.controller import Upgrader
from hatchery.upgrade.model import Phase
from hatchery_lab.cpio_writer import Entry, write_newc

RELEASE = "6.1.0-test-amd64"


def root_image(version: str, kernel_release: str = RELEASE, extra: bytes = b"") -> bytes:
    entries = [
        Entry.directory("usr"), Entry.directory("usr/lib"), Entry.directory("usr/lib/modules"),
        Entry.directory(f"usr/lib/modules/{kernel_release}"),
        Entry.file(f"usr/lib/modules/{kernel_release}/modules.dep", b""),
        Entry.file("usr/lib/os-release", f"IMAGE_VERSION={version}\n".encode()),
        Entry.file("usr/lib/payload", b"payload " + version.encode() + extra),
    ]  # fmt: skip
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


async def wait_done(upgrader: Upgrader) -> None:
    for _ in range(100):
        if upgrader.status.state is not Phase.RUNNING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("upgrade did not finish")
