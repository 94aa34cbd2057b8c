"""The appliance's two initrds, cut from the one root mkosi builds, compressed with LZ4.

``appliance-vm.container.cpio.lz4`` is mkosi's root: busybox, the init scripts and crun
with the libraries it links (container VMs, docs/appliance.md). ``appliance-vm.cpio.lz4`` is
the same root without crun and its libraries: what every other appliance VM boots. Measured
side by side under TCG (10 interleaved boots each), the container runtime in the initrd cost
0.16 s before ``/init`` (the kernel unpacks 8.6 MB instead of 2.6 MB), so appliances that run
no container do not carry it.

**LZ4, not zstd**: under TCG the kernel's unpacking is emulated code, and zstd's decoder is
the slower one. The lean root as zstd (1.0 MB) reached the lease 0.13 s later than as LZ4
(1.3 MB), and an uncompressed cpio (2.6 MB) was no faster than LZ4 (7 interleaved boots
each, docs/appliance.md). The kernel's unpacker reads LZ4's *legacy* frame (``lz4 -l``).

The archives keep mkosi's member order; owners and times are fixed by ``cpio_writer`` and
``lz4`` is deterministic, so they are as reproducible as their input.
"""

from __future__ import annotations

import io
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from hatchery.cpio import Member, iter_newc
from hatchery.upgrade.archive import open_root
from hatchery_lab.cpio_writer import Entry, write_newc

#: What only container VMs need (module doc); ``usr/lib/x86_64-linux-gnu`` holds nothing
#: else in the appliance (its busybox is static).
CONTAINER_ONLY = ("usr/bin/crun", "usr/lib/x86_64-linux-gnu", "usr/lib64", "lib64")
#: The legacy LZ4 frame's magic number, little-endian: what the kernel's unpacker reads.
LZ4_LEGACY_MAGIC = bytes.fromhex("02214c18")


def _container_only(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in CONTAINER_ONLY)


def lz4_legacy(data: bytes) -> bytes:
    """``data`` in LZ4's legacy frame, high compression (the Debian ``lz4`` tool)."""
    done = subprocess.run(["lz4", "-l", "-9", "-q", "-c"], input=data, capture_output=True,
                          check=True)  # fmt: skip
    return done.stdout


def members(initrd: Path) -> Iterator[tuple[Member, bytes]]:
    """Each member of an initrd (LZ4 legacy, zstd or plain newc cpio) and its data, in order."""
    with initrd.open("rb") as raw:
        if raw.read(4) == LZ4_LEGACY_MAGIC:
            plain = subprocess.run(["lz4", "-d", "-q", "-c", str(initrd)], capture_output=True,
                                   check=True).stdout  # fmt: skip
            yield from iter_newc(io.BytesIO(plain))
            return
        raw.seek(0)
        yield from iter_newc(open_root(raw))


def read_member(initrd: Path, name: str) -> bytes:
    """The content of ``name`` (e.g. ``usr/bin/busybox``) in an appliance initrd."""
    for member, data in members(initrd):
        if member.path == name:
            return data
    raise FileNotFoundError(f"{name} is not in {initrd}")


def write_initrds(root: Path, container: Path, lean: Path) -> int:
    """From mkosi's ``root`` cpio, write the ``container`` initrd (all of it) and the ``lean``
    one (without ``CONTAINER_ONLY``), both LZ4; the number of members left out of ``lean``."""
    everything: list[Entry] = []
    for member, data in members(root):
        if stat.S_ISREG(member.mode) and member.nlink > 1:
            raise ValueError(f"{member.path}: hard links are not carried over")
        everything.append(Entry(member.path, member.mode, data))
    kept = [e for e in everything if not _container_only(e.path)]
    dropped = len(everything) - len(kept)
    container.write_bytes(lz4_legacy(write_newc(everything)))
    lean.write_bytes(lz4_legacy(write_newc(kept)))
    return dropped
