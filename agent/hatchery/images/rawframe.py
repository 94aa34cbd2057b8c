"""Content stored as is, shown to a peer as a zstd file made of raw blocks.

The store keeps content that is already compressed (a bzImage, a squashfs root inside the
initrd) as it is: recompressing it gains nothing and costs a copy on every read. A peer whose
agent predates that still asks for every object as zstd (``GET /v1/objects/<sha256>``) and
resumes a cut download with a byte range of that zstd file. So such an object is served as a
zstd frame (RFC 8878) that only frames the content: a fixed header, then the content cut
into raw blocks of at most 128 KiB, each behind its 3-byte block header. The frame is a pure
function of the content's size, so any byte range of it maps to known header bytes and known
spans of the stored file: ``pieces`` lists them, and nothing is compressed or buffered.

The frame names its content size and a 128 KiB window (a raw block references nothing), so a
decoder never needs a window the size of the object; it carries no checksum (that would need
the whole content before its last byte): the reader checks the content's sha256 anyway.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = struct.pack("<I", 0xFD2FB528)
#: Frame header descriptor: an 8-byte content size (flag 3), not single-segment, no
#: checksum, no dictionary. Then the window descriptor: exponent 7, mantissa 0 = 2**17 bytes.
HEADER_DESCRIPTOR = 0b1100_0000
WINDOW_DESCRIPTOR = 7 << 3
BLOCK = 128 * 1024
BLOCK_HEADER = 3
RAW_BLOCK = 0


def frame_header(size: int) -> bytes:
    return MAGIC + bytes((HEADER_DESCRIPTOR, WINDOW_DESCRIPTOR)) + struct.pack("<Q", size)


HEADER_SIZE = len(frame_header(0))


def block_header(length: int, last: bool) -> bytes:
    value = (length << 3) | (RAW_BLOCK << 1) | int(last)
    return struct.pack("<I", value)[:BLOCK_HEADER]


def blocks(size: int) -> int:
    """How many blocks frame ``size`` bytes (an empty content is one empty last block)."""
    return max(1, -(-size // BLOCK))


def framed_size(size: int) -> int:
    """The length of the zstd file that frames ``size`` bytes of content."""
    return HEADER_SIZE + BLOCK_HEADER * blocks(size) + size


@dataclass(frozen=True, slots=True)
class Span:
    """``count`` bytes of the content from ``offset``."""

    offset: int
    count: int


def pieces(size: int, start: int, end: int) -> Iterator[bytes | Span]:
    """Bytes ``start`` to ``end`` (exclusive) of the frame of ``size`` bytes of content, in
    order: header bytes as ``bytes``, content as ``Span``. ``0 <= start <= end <=
    framed_size(size)`` or ``ValueError``."""
    total = framed_size(size)
    if not 0 <= start <= end <= total:
        raise ValueError(f"range {start}-{end} is outside a frame of {total} bytes")
    if start == end:
        return
    header = frame_header(size)
    if start < HEADER_SIZE:
        yield header[start : min(end, HEADER_SIZE)]
    count = blocks(size)
    # Block i starts at HEADER_SIZE + i * (BLOCK_HEADER + BLOCK) in the frame.
    stride = BLOCK_HEADER + BLOCK
    first = max(0, (start - HEADER_SIZE) // stride)
    for index in range(first, count):
        at = HEADER_SIZE + index * stride
        if at >= end:
            break
        content = index * BLOCK
        length = min(BLOCK, size - content)
        head = block_header(length, index == count - 1)
        lo, hi = max(start, at), min(end, at + BLOCK_HEADER)
        if lo < hi:
            yield head[lo - at : hi - at]
        body = at + BLOCK_HEADER
        lo, hi = max(start, body), min(end, body + length)
        if lo < hi:
            yield Span(content + lo - body, hi - lo)
