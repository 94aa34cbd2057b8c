"""Synthetic PE32+ stubs for the UKI assembler's tests (x86-64 and arm64 alike), and reading
a section's bytes back out of an assembled image."""

from __future__ import annotations

import struct

from hatchery.boothttp import uki


def synthetic_stub(
    *,
    magic: int = 0x20B,
    machine: int = 0x8664,
    sections: int = 2,
    size_of_headers: int = 0x400,
    file_alignment: int = 0x200,
    section_alignment: int = 0x1000,
    trailer: bytes = b"",
    signed: bool = False,
) -> bytes:
    """A minimal PE32+ image: DOS header, PE signature, COFF and optional headers (16 data
    directories), ``sections`` sections of one FileAlignment block each, then ``trailer``."""
    lfanew = 0x40
    optional = bytearray(240)
    struct.pack_into("<H", optional, 0, magic)
    struct.pack_into("<II", optional, 32, section_alignment, file_alignment)
    struct.pack_into("<II", optional, 56, section_alignment * (sections + 1), size_of_headers)
    struct.pack_into("<H", optional, 68, 10)  # EFI application
    struct.pack_into("<I", optional, 108, 16)
    if signed:
        struct.pack_into("<II", optional, 112 + 8 * 4, 0x9000, 0x100)
    head = bytearray(size_of_headers)
    head[:2] = b"MZ"
    struct.pack_into("<I", head, 0x3C, lfanew)
    head[lfanew : lfanew + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", head, lfanew + 4, machine, sections, 0, 0, 0, 240, 0x206)
    head[lfanew + 24 : lfanew + 24 + 240] = optional
    table = lfanew + 24 + 240
    body = bytearray()
    for i in range(sections):
        raw = size_of_headers + i * file_alignment
        uki.SECTION_HEADER.pack_into(
            head,
            table + 40 * i,
            f".s{i}".encode(),
            100,
            section_alignment * (i + 1),
            file_alignment,
            raw,
            0,
            0,
            0,
            0,
            uki.DATA_READ,
        )
        body += bytes([i + 1]) * 100 + bytes(file_alignment - 100)
    return bytes(head + body + trailer)


def content(image: bytes, section: uki.Section) -> bytes:
    return image[section.raw_offset : section.raw_offset + section.virtual_size]
