"""The appliance's two initrds, cut from the one root mkosi builds.

``appliance-vm.container.cpio.zst`` is mkosi's root as built: busybox, the init scripts and
crun with the libraries it links (container VMs, docs/appliance.md).
``appliance-vm.cpio.zst`` is the same root without crun and its libraries: what every other
appliance VM boots. Measured side by side under TCG (10 interleaved boots each), the
container runtime in the initrd cost 0.16 s before ``/init`` (0.90 s against 0.73 s: the
kernel unpacks 8.6 MB instead of 2.6 MB), so appliances that run no container do not carry it.

The lean archive keeps mkosi's member order; owners and times are fixed by
``cpio_writer``, so it is as reproducible as its input.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import zstandard

from hatchery.cpio import Member, iter_newc
from hatchery.upgrade.archive import open_root
from hatchery_lab.cpio_writer import Entry, write_newc

#: What only container VMs need (module doc); ``usr/lib/x86_64-linux-gnu`` holds nothing
#: else in the appliance (its busybox is static).
CONTAINER_ONLY = ("usr/bin/crun", "usr/lib/x86_64-linux-gnu", "usr/lib64", "lib64")
LEVEL = 19


def _container_only(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in CONTAINER_ONLY)


def members(initrd: Path) -> Iterator[tuple[Member, bytes]]:
    """Each member of an initrd (zstd or plain newc cpio) and its data, in order."""
    with initrd.open("rb") as raw:
        yield from iter_newc(open_root(raw))


def read_member(initrd: Path, name: str) -> bytes:
    """The content of ``name`` (e.g. ``usr/bin/busybox``) in an appliance initrd."""
    for member, data in members(initrd):
        if member.path == name:
            return data
    raise FileNotFoundError(f"{name} is not in {initrd}")


def write_lean(full: Path, lean: Path) -> int:
    """Write ``lean`` from ``full`` without ``CONTAINER_ONLY``; the members dropped."""
    kept: list[Entry] = []
    dropped = 0
    for member, data in members(full):
        if _container_only(member.path):
            dropped += 1
            continue
        if stat.S_ISREG(member.mode) and member.nlink > 1:
            raise ValueError(f"{member.path}: hard links are not carried over")
        kept.append(Entry(member.path, member.mode, data))
    lean.write_bytes(zstandard.ZstdCompressor(level=LEVEL).compress(write_newc(kept)))
    return dropped
