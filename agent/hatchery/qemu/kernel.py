"""Cut the uncompressed ``vmlinux`` ELF out of a compressed bzImage.

Under TCG an uncompressed ELF kernel boots through its PVH entry point in ~2 s where the
bzImage needs ~5 s, most of it spent decompressing inside the guest. Appliance VMs therefore
boot from ``vmlinux`` when they can; this module makes one from any Debian ``vmlinuz``.
"""

from __future__ import annotations

import gzip
import lzma
import zlib
from pathlib import Path

import zstandard

from hatchery.errors import HatcheryError

ELF_MAGIC = b"\x7fELF"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_MAX_VMLINUX = 512 * 1024 * 1024


class KernelError(HatcheryError):
    """The file is not a kernel we can unpack."""


def _try_xz(blob: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob, _MAX_VMLINUX)


def _try_zstd(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(blob)


def _try_gzip(blob: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob, _MAX_VMLINUX)


_CODECS = ((_XZ_MAGIC, _try_xz), (_ZSTD_MAGIC, _try_zstd), (_GZIP_MAGIC, _try_gzip))


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside ``bzimage`` (or ``bzimage`` itself if already an ELF).

    Every occurrence of each compressor's magic is tried in order, because the setup code
    in front of the payload may contain the same bytes by chance.
    """
    if bzimage.startswith(ELF_MAGIC):
        return bzimage
    for magic, decompress in _CODECS:
        start = bzimage.find(magic)
        while start != -1:
            try:
                out = decompress(bzimage[start:])
            except (lzma.LZMAError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile, EOFError):
                out = b""
            if out.startswith(ELF_MAGIC):
                return out
            start = bzimage.find(magic, start + 1)
    raise KernelError("no compressed ELF kernel found in the image (not a bzImage?)")


def write_vmlinux(bzimage_path: Path, out_path: Path) -> Path:
    """Unpack ``bzimage_path`` into ``out_path`` (atomically) and return it."""
    elf = extract_vmlinux(bzimage_path.read_bytes())
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(elf)
    tmp.replace(out_path)
    return out_path
