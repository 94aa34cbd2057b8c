"""The TFTP codec: exact bytes of each packet type, round trips, and clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.tftp.packet import (
    ACK,
    DATA,
    ERROR,
    OACK,
    RRQ,
    WRQ,
    ErrorCode,
    PacketError,
    decode,
)


def test_rrq_bytes_with_options() -> None:
    raw = b"\x00\x01pxelinux.0\x00octet\x00blksize\x001468\x00tsize\x000\x00"
    packet = decode(raw)
    assert packet == RRQ("pxelinux.0", "octet", (("blksize", "1468"), ("tsize", "0")))
    assert isinstance(packet, RRQ)
    assert packet.encode() == raw
    assert packet.option("tsize") == "0"
    assert packet.option("windowsize") is None


def test_request_mode_and_option_names_are_case_insensitive() -> None:
    packet = decode(b"\x00\x01File\x00OcTeT\x00BlkSize\x00512\x00")
    assert packet == RRQ("File", "octet", (("blksize", "512"),))  # the filename keeps its case


def test_wrq_decodes_as_wrq() -> None:
    assert decode(b"\x00\x02up\x00netascii\x00") == WRQ("up", "netascii")
    assert WRQ.decode(WRQ("up", "octet").encode()) == WRQ("up", "octet")


def test_data_ack_error_oack_bytes() -> None:
    assert DATA(1, b"abc").encode() == b"\x00\x03\x00\x01abc"
    assert decode(b"\x00\x03\xff\xff") == DATA(65535, b"")
    assert ACK(258).encode() == b"\x00\x04\x01\x02"
    assert decode(b"\x00\x04\x00\x00") == ACK(0)
    assert ERROR(ErrorCode.FILE_NOT_FOUND, "nope").encode() == b"\x00\x05\x00\x01nope\x00"
    assert decode(b"\x00\x05\x00\x08\x00") == ERROR(8, "")
    assert OACK((("blksize", "1468"),)).encode() == b"\x00\x06blksize\x001468\x00"
    assert decode(b"\x00\x06") == OACK(())


def test_error_message_bytes_never_fail() -> None:
    packet = decode(b"\x00\x05\x00\x00\xff\xfe\x00")
    assert isinstance(packet, ERROR) and packet.code == 0


def test_class_decode_checks_the_type() -> None:
    assert ACK.decode(b"\x00\x04\x00\x07") == ACK(7)
    with pytest.raises(PacketError, match="expected RRQ, got ACK"):
        RRQ.decode(b"\x00\x04\x00\x07")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "shorter than an opcode"),
        (b"\x00", "shorter than an opcode"),
        (b"\x00\x09", "unknown opcode 9"),
        (b"\x00\x00abc", "unknown opcode 0"),
        (b"\x00\x01file\x00octet", "does not end in a NUL"),
        (b"\x00\x01file\x00", "without a mode"),
        (b"\x00\x01\x00octet\x00", "empty filename"),
        (b"\x00\x01file\x00\x00", "empty mode"),
        (b"\x00\x01f\x00octet\x00blksize\x00", "option without a value"),
        (b"\x00\x01f\x00octet\x00a\x001\x00A\x002\x00", "given twice"),
        (b"\x00\x01f\x00octet\x00\x001\x00", "empty option name"),
        (b"\x00\x01\xff\x00octet\x00", "filename is not UTF-8"),
        (b"\x00\x01f\x00oct\xe9t\x00", "mode is not ASCII"),
        (b"\x00\x03\x00", "DATA without a block number"),
        (b"\x00\x03\x00\x01" + b"x" * 65465, "exceeds 65464"),
        (b"\x00\x04\x00", "ACK is 3 bytes"),
        (b"\x00\x04\x00\x01\x00", "ACK is 5 bytes"),
        (b"\x00\x05\x00\x01", "without a NUL-terminated message"),
        (b"\x00\x05\x00\x01oops", "without a NUL-terminated message"),
        (b"\x00\x05\x00\x01a\x00b\x00", "contains a NUL"),
        (b"\x00\x06blksize\x00512", "OACK does not end in a NUL"),
    ],
)
def test_garbage_is_a_clear_packet_error(raw: bytes, why: str) -> None:
    with pytest.raises(PacketError, match=why):
        decode(raw)


@pytest.mark.parametrize(
    "packet",
    [
        RRQ("a\0b", "octet"),
        RRQ("", "octet"),
        RRQ("f", "oct\u00e9t"),
        ACK(65536),
        DATA(-1, b""),
        DATA(1, b"x" * 65465),
        ERROR(70000, "x"),
        OACK((("blk\0size", "1"),)),
    ],
)
def test_encode_refuses_what_cannot_be_sent(packet: RRQ | ACK | DATA | ERROR | OACK) -> None:
    with pytest.raises(PacketError):
        packet.encode()


def test_packets_are_frozen_and_slotted() -> None:
    packet = ACK(1)
    with pytest.raises(AttributeError):
        packet.block = 2  # type: ignore[misc]
    assert not hasattr(packet, "__dict__")


_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), min_size=1)
_ascii = st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=20)
_value = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=10)
_options = st.lists(
    st.tuples(_ascii.map(str.lower), _value), max_size=4, unique_by=lambda o: o[0]
).map(tuple)
_message = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]))
_u16 = st.integers(0, 0xFFFF)
packets = st.one_of(
    st.builds(RRQ, _text, _ascii.map(str.lower), _options),
    st.builds(WRQ, _text, _ascii.map(str.lower), _options),
    st.builds(DATA, _u16, st.binary(max_size=2048)),
    st.builds(ACK, _u16),
    st.builds(ERROR, _u16, _message),
    st.builds(OACK, _options),
)


@settings(max_examples=500, deadline=None)
@given(packets)
def test_round_trip(packet: RRQ | WRQ | DATA | ACK | ERROR | OACK) -> None:
    assert decode(packet.encode()) == packet
