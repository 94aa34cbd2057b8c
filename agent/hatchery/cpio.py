"""Reading the ``newc`` cpio format, the one the Linux kernel unpacks as an initramfs.

The reader streams members of an image's root archive for live patching, refusing names that
would leave the tree. The agent never writes cpio; the writer the tests and the lab use to
make small initramfs images is ``hatchery_lab.cpio_writer``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"  # newc, "new ASCII" format
TRAILER = "TRAILER!!!"


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


def next_member(stream: BinaryIO, *, one_archive: bool = False) -> Member | None:
    """The next member's header, ``stream`` left at its data: ``Member.size`` bytes, then
    padding to a multiple of four (``read_data`` or ``skip_data`` reads past both). Trailers
    and the zero padding between concatenated archives (as in an initrd) are skipped; None at
    the end. ``one_archive``: None at the first trailer instead, ``stream`` left just after
    it (what follows may be another archive, compressed).
    """
    while True:
        first = stream.read(1)
        while first == b"\0":  # zero padding after a trailer, before a concatenated archive
            first = stream.read(1)
        if not first:
            return None
        head = first + _read_exact(stream, 5)
        if head != MAGIC:
            raise CpioError(f"bad cpio magic {head!r}")
        fields = _read_exact(stream, 104)
        try:
            values = [int(fields[i : i + 8], 16) for i in range(0, 104, 8)]
        except ValueError:
            raise CpioError("bad cpio header") from None
        ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, namesize, _ = values
        if namesize == 0 or namesize > 4096 or size > 1 << 34:
            raise CpioError("implausible cpio header")
        name = _read_exact(stream, namesize)[:-1].decode("utf-8", "surrogateescape")
        _read_exact(stream, -(110 + namesize) % 4)
        if name == TRAILER:
            skip_data(stream, size)
            if one_archive:
                return None
            continue
        return Member(safe_path(name), mode, uid, gid, nlink, ino, (dmaj, dmin), (rmaj, rmin),
                      mtime, size)  # fmt: skip


def skip_data(stream: BinaryIO, size: int) -> None:
    """Read past a member's data (``size`` bytes) and its padding."""
    remaining = size + (-size % 4)
    while remaining:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            raise CpioError("archive truncated")
        remaining -= len(chunk)


def read_data(stream: BinaryIO, member: Member) -> bytes:
    """A member's data, after ``next_member``; the stream is left at the next header."""
    data = _read_exact(stream, member.size)
    _read_exact(stream, -member.size % 4)
    return data


def iter_newc(stream: BinaryIO) -> Iterator[tuple[Member, bytes]]:
    """Each member and its data (file contents or symlink target), until the end: several
    newc archives may be concatenated (as in an initrd)."""
    while (member := next_member(stream)) is not None:
        data = read_data(stream, member)
        if member.path:
            yield member, data
