"""An image's root archive as upgrades read it: a newc cpio, zstd-compressed as built.

The image store keeps the initrd exactly as it was built; ``open_root`` gives the plain cpio
stream either way, ``iter_entries`` the root's paths (each with its fingerprint, its content
read only when asked), ``index_root`` the fingerprint of every path (the current image, for
the live patch's three-way comparison) and ``has_modules`` whether a root can run a kernel.

Two layouts: mkosi's, where the cpio is the whole root; and the live root
(hatchery_lab.liveroot), whose first member is ``root.squashfs`` holding the whole root, read
by mounting it in a private folder under ``scratch`` (``rootimage``). The live initrd's
other members (its /init, busybox, modules) belong to the initrd, not the root. A live root
built with its index (``rootindex``) is compared without reading its files: only those
asked for are read, each checked against its fingerprint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from hatchery.cpio import CpioError, Member, iter_newc, next_member, read_data
from hatchery.errors import HatcheryError
from hatchery.upgrade.fingerprint import Fingerprint, of_member
from hatchery.upgrade.rootimage import (
    ROOT_IMAGE,
    RootImageError,
    iter_tree,
    mounted,
    mounted_in_place,
)
from hatchery.upgrade.rootindex import INDEX_PATH, parse_index

__all__ = ["ArchiveError", "RootEntry", "check_readable", "has_modules", "index_root",
           "iter_entries", "iter_root", "open_root", "root_image_range"]  # fmt: skip

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveError(HatcheryError):
    """A root archive cannot be read: not a cpio, broken zstd, or an I/O error (the cause)."""


def open_root(stream: BinaryIO) -> BinaryIO:
    """The root archive as a plain cpio stream, whether it is stored zstd-compressed or not.

    Reads four bytes of ``stream`` to tell; the caller keeps owning (and closes) ``stream``.
    A plain archive in a file (seekable, with a descriptor) is that file itself, rewound: a
    live root's image in it is then mounted where it lies (``_layout``).
    """
    rest: BinaryIO
    if _is_file(stream):
        start = stream.tell()
        head = stream.read(4)
        stream.seek(start)
        rest = stream
    else:
        head = stream.read(4)
        rest = io.BufferedReader(_Prepend(head, stream))
    if head == ZSTD_MAGIC:
        reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(rest)
        return reader
    return rest


def _is_file(stream: BinaryIO) -> bool:
    """Whether ``stream`` is a real file: seekable, with a descriptor."""
    try:
        stream.fileno()
        return stream.seekable()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is the first two
        return False


class _Prepend(io.RawIOBase):
    """``head`` (already read from ``stream``) followed by the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass(frozen=True, slots=True)
class RootEntry:
    """One path of a root: what it is, and what it holds (a file's content, a symlink's
    target, b"" for the rest) read only when asked: while ``iter_entries`` is on that path
    (a live root's image is unmounted when the iteration ends)."""

    path: str
    fingerprint: Fingerprint
    read: Callable[[], bytes]


def iter_entries(stream: BinaryIO, scratch: Path | None = None) -> Iterator[RootEntry]:
    """Every path of a (plain) root archive, parents before children.

    A live root's image is copied to and mounted under ``scratch`` (default: the temporary
    folder; the agent names a folder on /data, where the 100 MB copy costs no RAM) while its
    paths are read; with its index, a file is read only by ``RootEntry.read`` and must match
    its fingerprint there (``ArchiveError`` otherwise).

    :raise CpioError: the stream is not a valid newc archive.
    :raise RootImageError: a live root's image cannot be mounted.
    :raise RootIndexError: a live root's index is malformed.
    """
    with _layout(stream, scratch) as found:
        if isinstance(found, Path):
            yield from _image_entries(found)
            return
        for member, content in found:
            yield RootEntry(member.path, of_member(member, content), _holding(content))


def iter_root(stream: BinaryIO, scratch: Path | None = None) -> Iterator[tuple[Member, bytes]]:
    """Members of a (plain) root archive with hard links resolved, every path with its data:
    a whole root as files to unpack (tests, tools). Comparing roots: ``iter_entries``.

    :raise CpioError, RootImageError: as ``iter_entries``.
    """
    with _layout(stream, scratch) as found:
        yield from iter_tree(found) if isinstance(found, Path) else found


@contextlib.contextmanager
def _layout(
    stream: BinaryIO, scratch: Path | None
) -> Iterator[Path | Iterator[tuple[Member, bytes]]]:
    """The root of an archive in either layout: a live root's image mounted (its top folder),
    or mkosi's cpio as members with hard links resolved."""
    first = next_member(stream)
    if first is not None and _is_root_image(first):
        if _is_file(stream):  # uncompressed in a file: mounted where it lies
            with mounted_in_place(stream.fileno(), stream.tell(), first.size, scratch) as top:
                yield top
            return
        with mounted(stream, first.size, scratch) as top:
            yield top
        return
    head = [] if first is None else [(first, read_data(stream, first))]
    yield _resolve_links(itertools.chain([m for m in head if m[0].path], iter_newc(stream)))


def _holding(content: bytes) -> Callable[[], bytes]:
    return lambda: content


def _image_entries(top: Path) -> Iterator[RootEntry]:
    """A mounted live root's paths: from its index when it has one, else by reading it all."""
    real_top = os.path.realpath(top)
    try:
        fd = _open_inside(real_top, INDEX_PATH)
    except (FileNotFoundError, NotADirectoryError):
        fd = None
    if fd is None:
        for member, data in iter_tree(top):
            yield RootEntry(member.path, of_member(member, data), _holding(data))
        return
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        raw = f.read()
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"/{INDEX_PATH} in the root image is not a file")
    index = parse_index(raw)
    index[INDEX_PATH] = Fingerprint("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                    hashlib.sha256(raw).hexdigest())  # fmt: skip
    for path in sorted(index):
        read = functools.partial(_read_checked, real_top, path, index[path])
        yield RootEntry(path, index[path], read)


def _open_inside(top: str, path: str) -> int:
    """A read-only descriptor of ``path`` in the tree at ``top`` (a real path): refused if a
    symlink on the way leads out of it, or if ``path`` itself is one.

    :raise ArchiveError: it leads outside; :raise OSError: it cannot be opened.
    """
    parent = os.path.realpath(os.path.dirname(os.path.join(top, path)))
    if os.path.commonpath([parent, top]) != top:
        raise ArchiveError(f"/{path} in the root image leads outside it")
    return os.open(os.path.join(parent, os.path.basename(path)), os.O_RDONLY | os.O_NOFOLLOW)


def _read_checked(top: str, path: str, wanted: Fingerprint) -> bytes:
    """What a live root's ``path`` holds, checked against its index entry ``wanted``: the
    image must be what its index says, and nothing outside the image is ever read."""
    if wanted.kind == "symlink":
        return os.fsencode(wanted.digest)
    if wanted.kind != "file":
        return b""
    try:
        fd = _open_inside(top, path)
    except OSError as exc:
        raise ArchiveError(f"/{path} is in the image's index but cannot be read: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    found = Fingerprint("file" if stat.S_ISREG(st.st_mode) else "other",
                        stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        hashlib.sha256(data).hexdigest())  # fmt: skip
    if found != wanted:
        raise ArchiveError(f"/{path} in the root image is not what the image's index says",
                           hint="the image is broken: rebuild it")  # fmt: skip
    return data


def root_image_range(initrd: BinaryIO) -> tuple[int, int] | None:
    """Where a live initrd file holds its root image: (offset, size) in bytes; None for
    another layout (mkosi's cpio, a compressed initrd) or what is no cpio at all. Publishing
    to a node that runs this very image leaves that range out (``images.running_root``)."""
    try:
        if initrd.read(4) == ZSTD_MAGIC:
            return None
        initrd.seek(0)
        member = next_member(initrd, one_archive=True)
    except (CpioError, OSError):
        return None
    if member is None or not _is_root_image(member):
        return None
    return initrd.tell(), member.size


def _is_root_image(member: Member) -> bool:
    """Whether an initrd's first member makes it the live layout's."""
    return member.path == ROOT_IMAGE and stat.S_ISREG(member.mode)


def _resolve_links(
    members: Iterator[tuple[Member, bytes]],
) -> Iterator[tuple[Member, bytes]]:
    pending: dict[tuple[int, int, int], list[Member]] = {}
    for member, data in members:
        if stat.S_ISREG(member.mode) and member.nlink > 1:
            key = (member.dev[0], member.dev[1], member.ino)
            group = pending.setdefault(key, [])
            group.append(member)
            if member.size == 0 and len(group) < member.nlink:
                continue
            for linked in pending.pop(key):
                yield linked, data
        else:
            yield member, data
    for group in pending.values():  # a group whose data never came: empty files
        for member in group:
            yield member, b""


def index_root(stream: BinaryIO, scratch: Path | None = None) -> dict[str, Fingerprint]:
    """Fingerprints of every path of a (plain) root archive.

    :raise CpioError, RootImageError, RootIndexError: as ``iter_entries``.
    """
    return {entry.path: entry.fingerprint for entry in iter_entries(stream, scratch)}


def check_readable(stream: BinaryIO) -> None:
    """Raise ``ArchiveError`` unless a root archive (compressed or not) starts with a valid
    member: a quick refusal of what is not a root at all, reading a few bytes.

    :raise ArchiveError: the archive cannot be read.
    """
    try:
        if next_member(open_root(stream)) is None:
            raise ArchiveError("the root archive is empty")
    except (CpioError, zstandard.ZstdError, OSError) as exc:
        raise ArchiveError(str(exc)) from exc


def has_modules(stream: BinaryIO, release: str, scratch: Path | None = None) -> bool:
    """Whether a root archive (compressed or not) holds modules for kernel ``release``.

    Stops reading at the first such path: a live patch needs the target's root to carry the
    running kernel's modules.

    :raise ArchiveError: the archive cannot be read.
    """
    modules = f"usr/lib/modules/{release}"
    try:
        with _layout(open_root(stream), scratch) as found:
            if isinstance(found, Path):
                return (found / modules).is_dir()
            for member, _ in found:
                if member.path.startswith(modules + "/") or member.path == modules:
                    return True
    except (CpioError, zstandard.ZstdError, OSError) as exc:
        raise ArchiveError(str(exc)) from exc
    except RootImageError as exc:
        raise ArchiveError(exc.message) from exc
    return False
