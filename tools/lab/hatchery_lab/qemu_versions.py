"""Two QEMU versions side by side: the host's (bookworm: 7.2) and the next one, unpacked by
``tools/fetch-qemu-next.sh`` (bookworm-backports: 10.0) into ``.cache/qemu-next``.

A live patch replaces ``/usr/bin/qemu-system-x86_64`` under running VMs. Tests and benchmarks
play that without touching the host: the agent's ``qemu.binary`` is a symlink that
``QemuSwitch`` re-points from one version to the other.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hatchery_lab import REPO

#: The launcher the fetch script writes: the unpacked binary with its own data files (-L).
QEMU_NEXT = REPO / ".cache" / "qemu-next" / "qemu-system-x86_64"


def host_qemu() -> str | None:
    return shutil.which("qemu-system-x86_64")


def next_qemu() -> str | None:
    """The unpacked next QEMU's launcher, if ``make qemu-next`` has run."""
    return str(QEMU_NEXT) if os.access(QEMU_NEXT, os.X_OK) else None


def _others_can_run(path: Path) -> bool:
    """Whether a user other than root can reach and run ``path``: every folder above it
    searchable by others, the file readable and executable by them."""
    resolved = path.resolve()
    folders_ok = all(os.stat(p).st_mode & stat.S_IXOTH for p in resolved.parents)
    mode = os.stat(resolved).st_mode
    return folders_ok and bool(mode & stat.S_IROTH) and bool(mode & stat.S_IXOTH)


@contextmanager
def runnable_next_qemu() -> Iterator[str | None]:
    """``next_qemu()`` where every VM's uid can run it (None: not fetched). QEMU is executed
    as the VM's user, and a checkout under a private folder (``git clone . "$(mktemp -d)/x"``:
    mode 0700) hides ``.cache`` from it; the unpacked tree (82 MB) is then copied into a
    ``searchable_folder`` for as long as it is used."""
    launcher = next_qemu()
    if launcher is None or _others_can_run(QEMU_NEXT):
        yield launcher
        return
    with searchable_folder("hatchery-qemu-next-") as folder:
        shutil.copytree(QEMU_NEXT.parent, folder / "qemu-next", symlinks=True)
        yield str(folder / "qemu-next" / QEMU_NEXT.name)


def version(binary: str) -> str:
    """``7.2.x`` or ``10.0.x``: what ``binary --version`` says."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out.stdout)
    if found is None:
        raise RuntimeError(f"{binary} --version says {out.stdout!r}")
    return found[1]


@dataclass
class QemuSwitch:
    """A path that stands for "the node's QEMU binary", re-pointable like a live patch."""

    path: Path

    def point_to(self, binary: str) -> None:
        """Atomically make ``path`` run ``binary`` (a new symlink renamed over the old)."""
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(binary)
        os.replace(tmp, self.path)

    @property
    def target(self) -> str:
        return os.readlink(self.path)


@contextmanager
def searchable_folder(prefix: str) -> Iterator[Path]:
    """A folder of its own under /tmp that every VM's uid can search (QEMU is executed as the
    VM's user: a test's own tmp_path is private to root); removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def qemu_switch(first: str) -> Iterator[QemuSwitch]:
    """A ``QemuSwitch`` pointing at ``first`` (in a ``searchable_folder``)."""
    with searchable_folder("hatchery-qemu-") as folder:
        switch = QemuSwitch(folder / "qemu-system-x86_64")
        switch.point_to(first)
        yield switch
