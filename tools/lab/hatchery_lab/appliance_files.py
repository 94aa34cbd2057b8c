"""Files out of the appliance's initrd (a zstd newc cpio), read without unpacking it."""

from __future__ import annotations

from pathlib import Path

import zstandard

from hatchery.cpio import iter_newc


def read_member(initrd: Path, name: str) -> bytes:
    """The content of ``name`` (e.g. ``usr/bin/busybox``) in the appliance's initrd."""
    with initrd.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        for member, data in iter_newc(stream):
            if member.path == name:
                return data
    raise FileNotFoundError(f"{name} is not in {initrd}")
