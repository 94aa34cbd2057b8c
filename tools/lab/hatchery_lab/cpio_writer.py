"""Writing the ``newc`` cpio format: small reproducible initramfs images for guests and tests.

Entries go out in the order given with fixed owners and times, so the same inputs give the
same bytes. The agent only reads cpio (``hatchery.cpio``); the writer lives in the lab.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from hatchery.cpio import MAGIC, TRAILER


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # relative, no leading slash: "bin/busybox"
    mode: int  # full st_mode, type bits included
    data: bytes = b""  # file contents, or the target of a symlink

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> Entry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(path, stat.S_IFCHR | perm, major.to_bytes(4, "big") + minor.to_bytes(4, "big"))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry, name: bytes, size: int, rdev: tuple[int, int]) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    return MAGIC + b"".join(b"%08x" % f for f in fields)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """Serialise ``entries`` into a complete newc archive (with its trailer)."""
    out = bytearray()
    ino = 0
    for entry in (*entries, Entry(TRAILER, 0)):
        ino += 1
        name = entry.path.lstrip("/").encode()
        rdev = (0, 0)
        body = entry.data
        if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
            rdev = (int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big"))
            body = b""
        header = _header(ino if entry.path != TRAILER else 0, entry, name, len(body), rdev)
        out += header + name + b"\0"
        out += _pad4(len(header) + len(name) + 1)
        out += body + _pad4(len(body))
    out += b"\0" * (-len(out) % 512)  # whole blocks, as cpio(1) writes them
    return bytes(out)
