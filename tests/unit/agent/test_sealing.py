"""Sealed seeds: only the key that asked opens them, and nothing else passes for one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.sealing import MAGIC, OVERHEAD, SealError, SeedKey, public_key, seal

PLAIN = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI...\n" * 8


def test_the_key_that_asked_opens_it_and_no_other() -> None:
    mine, other = SeedKey(), SeedKey()
    sealed = seal(PLAIN, public_key(mine.public))
    assert mine.open(sealed) == PLAIN
    assert len(sealed) == len(PLAIN) + OVERHEAD and sealed.startswith(MAGIC)
    assert b"PRIVATE KEY" not in sealed
    with pytest.raises(SealError, match="does not open with this machine's key"):
        other.open(sealed)
    assert seal(PLAIN, public_key(mine.public)) != sealed  # a fresh ephemeral key each time


def test_every_changed_byte_is_refused() -> None:
    key = SeedKey()
    sealed = seal(b"seed", public_key(key.public))
    for i in range(len(sealed)):
        bent = bytearray(sealed)
        bent[i] ^= 0x01
        with pytest.raises(SealError):
            key.open(bytes(bent))


def test_keys_that_are_not_keys() -> None:
    for raw in (b"", b"\x01" * 31, b"\x01" * 33):
        with pytest.raises(SealError, match="a public key is 32 bytes"):
            public_key(raw)
    with pytest.raises(SealError, match="unusable public key"):  # low order: all-zero secret
        seal(b"seed", public_key(bytes(32)))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_open_never_crashes_on_garbage(data: bytes) -> None:
    key = SeedKey()
    for candidate in (data, MAGIC + data):
        with pytest.raises(SealError):
            key.open(candidate)
