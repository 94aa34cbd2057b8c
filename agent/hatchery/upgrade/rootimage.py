"""A live root's squashfs image (hatchery_lab.liveroot), read as upgrades read a root archive.

An image built with ``ROOT_LAYOUT=squashfs`` boots from an initrd whose first member is
``root.squashfs``, the whole root kept compressed; the rest of that initrd (its /init, busybox,
three modules) is the initrd's own and no part of the root. Upgrades compare and patch roots
path by path, so they read this image's files: it is copied into a private folder on /data
and mounted read-only (``nodev,nosuid,noexec``) by the node's own kernel, which reads the
same format at every boot, then walked. Only images that verify against the fleet's keys
reach this point (the store checks every artefact's sha256 against the signed manifest).

When the image lies uncompressed in a file (the initrd's first segment is a plain cpio, and
the store keeps the initrd as it was built), it is mounted where it lies instead
(``mounted_in_place``: a loop device over that byte range of the file): no 100 MB copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hatchery.cpio import Member
from hatchery.errors import HatcheryError

__all__ = ["ROOT_IMAGE", "RootImageError", "iter_tree", "mounted", "mounted_in_place"]

log = logging.getLogger(__name__)
ROOT_IMAGE = "root.squashfs"
MOUNT_OPTIONS = "loop,ro,nodev,nosuid,noexec"
CHUNK = 1 << 20


class RootImageError(HatcheryError):
    """The root image cannot be mounted or read; the message says why."""


@contextlib.contextmanager
def mounted(source: BinaryIO, size: int, scratch: Path | None = None) -> Iterator[Path]:
    """The next ``size`` bytes of ``source`` (a squashfs) mounted read-only in a private folder
    under ``scratch`` (default: the temporary folder), copied there a chunk at a time (never
    the whole 100 MB in memory); unmounted and removed afterwards, even when the caller stops
    early."""
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".root-image.") as tmp:
        os.chmod(tmp, 0o700)
        path, top = Path(tmp) / ROOT_IMAGE, Path(tmp) / "root"
        with path.open("wb") as out:
            remaining = size
            while remaining:
                chunk = source.read(min(remaining, CHUNK))
                if not chunk:
                    raise RootImageError(f"the root image is cut short ({size - remaining} of "
                                         f"{size} bytes)")  # fmt: skip
                out.write(chunk)
                remaining -= len(chunk)
        top.mkdir()
        with _mount(str(path), top, MOUNT_OPTIONS):
            yield top


@contextlib.contextmanager
def mounted_in_place(
    fd: int, offset: int, size: int, scratch: Path | None = None
) -> Iterator[Path]:
    """The ``size`` bytes at ``offset`` of the open file ``fd`` (a squashfs inside a plain
    cpio) mounted read-only in a private folder under ``scratch``, without copying them: a
    loop device over that range (``offset=``, ``sizelimit=``); the mount helper gets the
    file through an inherited descriptor, so no name is looked up again."""
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".root-image.") as tmp:
        os.chmod(tmp, 0o700)
        top = Path(tmp) / "root"
        top.mkdir()
        options = f"{MOUNT_OPTIONS},offset={offset},sizelimit={size}"
        with _mount(f"/proc/self/fd/{fd}", top, options, pass_fds=(fd,)):
            yield top


@contextlib.contextmanager
def _mount(source: str, top: Path, options: str, pass_fds: tuple[int, ...] = ()) -> Iterator[None]:
    argv = ["mount", "-t", "squashfs", "-o", options, source, str(top)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            pass_fds=pass_fds)  # fmt: skip
    if result.returncode != 0:
        raise RootImageError(f"cannot mount the root image: {result.stderr.strip()}")
    try:
        yield
    finally:
        done = subprocess.run(["umount", str(top)], capture_output=True, check=False)
        if done.returncode != 0:  # still busy: detach now, the kernel finishes later
            log.warning("root image at %s busy: detaching it lazily", top)
            subprocess.run(["umount", "-l", str(top)], capture_output=True, check=False)


def iter_tree(top: Path) -> Iterator[tuple[Member, bytes]]:
    """Every path under ``top`` (not ``top`` itself) as an archive member and its data (a
    file's content, a symlink's target), parents before children, in name order, as
    ``archive.iter_root`` gives them; hard links each get their data."""
    for folder, dirs, files in os.walk(top):
        dirs.sort()
        base = Path(folder)
        for name in sorted(dirs + files):
            path = base / name
            st = os.lstat(path)
            data = b""
            if stat.S_ISREG(st.st_mode):
                data = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                data = os.fsencode(os.readlink(path))
            if stat.S_ISLNK(st.st_mode) and name in dirs:
                dirs.remove(name)  # os.walk does not follow it; neither do we
            member = Member(
                path=path.relative_to(top).as_posix(), mode=st.st_mode, uid=st.st_uid,
                gid=st.st_gid, nlink=1, ino=st.st_ino, dev=(0, 0),
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), mtime=int(st.st_mtime),
                size=len(data),
            )  # fmt: skip
            yield member, data
