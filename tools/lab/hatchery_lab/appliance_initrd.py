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
from pathlib import Path

import zstandard

from hatchery.cpio import iter_newc
from hatchery_lab.cpio_writer import Entry, write_newc

#: What only container VMs need (module doc); ``usr/lib/x86_64-linux-gnu`` holds nothing
#: else in the appliance (its busybox is static).
CONTAINER_ONLY = ("usr/bin/crun", "usr/lib/x86_64-linux-gnu", "usr/lib64", "lib64")
LEVEL = 19


def _container_only(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in CONTAINER_ONLY)


def write_lean(full: Path, lean: Path) -> int:
    """Write ``lean`` from ``full`` without ``CONTAINER_ONLY``; the members dropped."""
    kept: list[Entry] = []
    dropped = 0
    with full.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        for member, data in iter_newc(stream):
            if _container_only(member.path):
                dropped += 1
                continue
            if stat.S_ISREG(member.mode) and member.nlink > 1:
                raise ValueError(f"{member.path}: hard links are not carried over")
            kept.append(Entry(member.path, member.mode, data))
    lean.write_bytes(zstandard.ZstdCompressor(level=LEVEL).compress(write_newc(kept)))
    return dropped
