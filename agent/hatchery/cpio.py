"""The ``newc`` cpio format, the one the Linux kernel unpacks as an initramfs.

The writer puts entries in the order given with fixed owners and times, so the same inputs
give the same bytes (reproducible test initramfs images). The reader streams members of an
image's root archive for live patching, refusing names that would leave the tree.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


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
    return _MAGIC + b"".join(b"%08x" % f for f in fields)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """Serialise ``entries`` into a complete newc archive (with its trailer)."""
    out = bytearray()
    ino = 0
    for entry in (*entries, Entry(_TRAILER, 0)):
        ino += 1
        name = entry.path.lstrip("/").encode()
        rdev = (0, 0)
        body = entry.data
        if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
            rdev = (int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big"))
            body = b""
        header = _header(ino if entry.path != _TRAILER else 0, entry, name, len(body), rdev)
        out += header + name + b"\0"
        out += _pad4(len(header) + len(name) + 1)
        out += body + _pad4(len(body))
    out += b"\0" * (-len(out) % 512)  # whole blocks, as cpio(1) writes them
    return bytes(out)


# --- reading ------------------------------------------------------------------------------


class CpioError(ValueError):
    """The archive is malformed."""


@dataclass(frozen=True, slots=True)
class Member:
    path: str  # normalised, relative, never absolute, never with ".."
    mode: int
    uid: int
    gid: int
    nlink: int
    ino: int
    dev: tuple[int, int]
    rdev: tuple[int, int]
    mtime: int
    size: int


def safe_path(name: str) -> str:
    """An archive name as a relative path that cannot leave the tree it is unpacked into."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise CpioError(f"unsafe path in archive: {name!r}")
    return "/".join(parts)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise CpioError("archive truncated")
        data += chunk
    return bytes(data)


def iter_newc(stream: BinaryIO) -> Iterator[tuple[Member, bytes]]:
    """Each member and its data (file contents or symlink target), until the trailer.

    Several newc archives may be concatenated (as in an initrd); reading continues past a
    trailer while more magic follows, skipping the zero padding in between.
    """
    offset = 0
    while True:
        first = stream.read(1)
        while first == b"\0":  # zero padding after a trailer, before a concatenated archive
            offset += 1
            first = stream.read(1)
        if not first:
            return
        head = first + _read_exact(stream, 5)
        if head != _MAGIC:
            raise CpioError(f"bad cpio magic {head!r} near offset {offset}")
        fields = _read_exact(stream, 104)
        try:
            values = [int(fields[i : i + 8], 16) for i in range(0, 104, 8)]
        except ValueError as exc:
            raise CpioError(f"bad cpio header near offset {offset}") from exc
        ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, namesize, _ = values
        if namesize == 0 or namesize > 4096 or size > 1 << 34:
            raise CpioError(f"implausible cpio header near offset {offset}")
        name = _read_exact(stream, namesize)[:-1].decode("utf-8", "surrogateescape")
        consumed = 110 + namesize
        _read_exact(stream, -consumed % 4)
        data = _read_exact(stream, size)
        _read_exact(stream, -size % 4)
        offset += consumed + (-consumed % 4) + size + (-size % 4)
        if name == _TRAILER:
            continue
        member = Member(safe_path(name), mode, uid, gid, nlink, ino, (dmaj, dmin),
                        (rmaj, rmin), mtime, size)  # fmt: skip
        if member.path:
            yield member, data
