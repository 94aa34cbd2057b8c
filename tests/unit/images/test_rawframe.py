"""The zstd frame of raw blocks (``hatchery.images.rawframe``) that shows an object kept as is
to an older peer: the real zstd tool and the zstandard library decode it to the content, and
every byte range of it, as ``pieces`` gives it, is that range of the whole frame."""

from __future__ import annotations

import io
import os
import random
import subprocess

import pytest
import zstandard

from hatchery.images import rawframe

SIZES = (0, 1, rawframe.BLOCK - 1, rawframe.BLOCK, rawframe.BLOCK + 1, 3 * rawframe.BLOCK + 7,
         1_000_003)  # fmt: skip


def frame(data: bytes, start: int = 0, end: int | None = None) -> bytes:
    end = rawframe.framed_size(len(data)) if end is None else end
    out = bytearray()
    for piece in rawframe.pieces(len(data), start, end):
        if isinstance(piece, bytes):
            out += piece
        else:
            assert 0 <= piece.offset and piece.offset + piece.count <= len(data)
            out += data[piece.offset : piece.offset + piece.count]
    return bytes(out)


@pytest.mark.parametrize("size", SIZES)
def test_the_frame_decodes_to_the_content(size: int) -> None:
    data = os.urandom(size)
    whole = frame(data)
    assert len(whole) == rawframe.framed_size(size)
    assert zstandard.frame_content_size(whole) == size
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(whole)) as reader:
        assert reader.read() == data
    decoded = subprocess.run(["zstd", "-dc"], input=whole, capture_output=True, check=True)
    assert decoded.stdout == data


def test_any_range_is_that_range_of_the_whole_frame() -> None:
    rng = random.Random(20261203)
    for _ in range(40):
        data = rng.randbytes(rng.choice((0, 5, rng.randrange(1, 600_000))))
        whole = frame(data)
        for _ in range(25):
            start = rng.randrange(len(whole) + 1)
            end = rng.randrange(start, len(whole) + 1)
            assert frame(data, start, end) == whole[start:end], (len(data), start, end)


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (0, 10**9)])
def test_a_range_outside_the_frame_is_refused(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        list(rawframe.pieces(1000, start, end))
