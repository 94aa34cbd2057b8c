"""An image's root archive as upgrades read it: a newc cpio, zstd-compressed as built.

The image store keeps the initrd exactly as it was built; ``open_root`` gives the plain cpio
stream either way, ``iter_root`` the root's members with hard links resolved, ``index_root``
the fingerprint of every path (the current image, for the live patch's three-way comparison)
and ``has_modules`` whether a root can run a kernel.

Two layouts: mkosi's, where the cpio is the whole root; and the live root
(hatchery_lab.liveroot), whose first member is ``root.squashfs`` holding the whole root, read
by mounting it in a private folder under ``scratch`` (``rootimage``). The live initrd's
other members (its /init, busybox, modules) belong to the initrd, not the root.
"""

from __future__ import annotations

import io
import itertools
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from hatchery.cpio import CpioError, Member, iter_newc
from hatchery.errors import HatcheryError
from hatchery.upgrade.fingerprint import Fingerprint, of_member
from hatchery.upgrade.rootimage import ROOT_IMAGE, RootImageError, iter_tree, mounted

__all__ = ["ArchiveError", "has_modules", "index_root", "iter_root", "open_root"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveError(HatcheryError):
    """A root archive cannot be read: not a cpio, broken zstd, or an I/O error (the cause)."""


def open_root(stream: BinaryIO) -> BinaryIO:
    """The root archive as a plain cpio stream, whether it is stored zstd-compressed or not.

    Reads four bytes of ``stream`` to tell; the caller keeps owning (and closes) ``stream``.
    """
    head = stream.read(4)
    rest = io.BufferedReader(_Prepend(head, stream))
    if head == ZSTD_MAGIC:
        reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(rest)
        return reader
    return rest


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


def iter_root(stream: BinaryIO, scratch: Path | None = None) -> Iterator[tuple[Member, bytes]]:
    """Members of a (plain) root archive with hard links resolved: every path gets its data.

    In newc, the members of a hard-link group share an inode number and only the last one
    carries the data; the earlier ones are held back until it arrives. A live root's image
    is mounted under ``scratch`` (default: the temporary folder; the agent names a folder on
    /data, where the 100+ MB copy costs no RAM) while its paths are read.

    :raise CpioError: the stream is not a valid newc archive.
    :raise RootImageError: a live root's image cannot be mounted.
    """
    members = iter_newc(stream)
    first = next(members, None)
    if first is None:
        return
    if _is_root_image(first[0]):
        image = first[1]
        del first
        with mounted(image, scratch) as top:
            del image
            yield from iter_tree(top)
        return
    yield from _resolve_links(itertools.chain([first], members))


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

    :raise CpioError: the stream is not a valid newc archive.
    :raise RootImageError: a live root's image cannot be mounted.
    """
    return {m.path: of_member(m, data) for m, data in iter_root(stream, scratch)}


def has_modules(stream: BinaryIO, release: str, scratch: Path | None = None) -> bool:
    """Whether a root archive (compressed or not) holds modules for kernel ``release``.

    Stops reading at the first such path: a live patch needs the target's root to carry the
    running kernel's modules.

    :raise ArchiveError: the archive cannot be read.
    """
    modules = f"usr/lib/modules/{release}"
    try:
        members = iter_newc(open_root(stream))
        first = next(members, None)
        if first is not None and _is_root_image(first[0]):
            with mounted(first[1], scratch) as top:
                return (top / modules).is_dir()
        for member, _ in itertools.chain([first] if first else [], members):
            if member.path.startswith(modules + "/") or member.path == modules:
                return True
    except (CpioError, zstandard.ZstdError, OSError) as exc:
        raise ArchiveError(str(exc)) from exc
    except RootImageError as exc:
        raise ArchiveError(exc.message) from exc
    return False
