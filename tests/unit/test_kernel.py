from __future__ import annotations

import gzip
import lzma

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from hatchery.qemu.kernel import ELF_MAGIC, KernelError, extract_vmlinux

FAKE_ELF = ELF_MAGIC + b"\x02\x01\x01" + bytes(range(256)) * 64


@pytest.mark.parametrize(
    "compress",
    [
        lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
        lambda b: zstandard.ZstdCompressor().compress(b),
        gzip.compress,
    ],
    ids=["xz", "zstd", "gzip"],
)
def test_extracts_the_elf_behind_setup_code(compress) -> None:
    setup_code = b"MZ" + b"\x00" * 510 + b"HdrS" + b"\xfd7zXZ\x00garbage" + b"\x90" * 4000
    bzimage = setup_code + compress(FAKE_ELF) + b"\x00" * 100
    assert extract_vmlinux(bzimage) == FAKE_ELF


def test_an_elf_is_returned_as_is() -> None:
    assert extract_vmlinux(FAKE_ELF) == FAKE_ELF


@given(st.binary(max_size=4096))
def test_garbage_is_refused_cleanly(blob: bytes) -> None:
    if blob.startswith(ELF_MAGIC):
        return
    with pytest.raises(KernelError):
        extract_vmlinux(blob)
