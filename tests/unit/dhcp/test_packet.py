"""The DHCP codec: golden packets captured from real clients, round trips, and clear errors."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hatchery.dhcp.packet import (
    BOOTP_MIN_SIZE,
    DecodeError,
    DhcpPacket,
    MessageType,
    Op,
    Opt,
    Option,
    describe,
    encapsulate,
    opt_ip,
    opt_str,
    opt_u8,
)

GOLDEN = Path(__file__).parent / "golden"
IP = ipaddress.IPv4Address


def golden(name: str) -> bytes:
    return bytes.fromhex((GOLDEN / f"{name}.hex").read_text().replace("\n", ""))


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.hex")))
def test_golden_packets_decode_to_their_checked_in_text(name: str) -> None:
    """Captured from udhcpc, QEMU's iPXE ROM and OVMF by the integration tests' servers."""
    packet = DhcpPacket.decode(golden(name))
    text = describe(packet) + "\n"
    expected = GOLDEN / f"{name}.txt"
    assert text == expected.read_text(), f"{name}: decoded form changed:\n{text}"


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.hex")))
def test_golden_packets_survive_a_round_trip(name: str) -> None:
    packet = DhcpPacket.decode(golden(name))
    assert DhcpPacket.decode(packet.encode()) == packet


def test_ipxe_bios_discover_says_what_ipxe_is() -> None:
    p = DhcpPacket.decode(golden("ipxe-bios-discover"))
    assert p.message_type == MessageType.DISCOVER
    assert p.mac == "52:54:00:5e:00:01"
    assert p.user_class == b"iPXE"  # raw, not RFC 3004 length-prefixed
    assert p.user_classes() == (b"iPXE",)
    assert p.client_arch == (0,)
    assert p.vendor_class is not None and p.vendor_class.startswith(b"PXEClient:Arch:00000")
    assert p.ipxe_options  # iPXE advertises its features in option 175


def test_ovmf_http_boot_discover() -> None:
    p = DhcpPacket.decode(golden("ovmf-httpclient-discover"))
    assert p.vendor_class is not None and p.vendor_class.startswith(b"HTTPClient")
    assert p.client_arch == (16,)
    assert p.broadcast


def test_udhcpc_request_carries_requested_ip_and_server_id() -> None:
    p = DhcpPacket.decode(golden("udhcpc-request"))
    assert p.message_type == MessageType.REQUEST
    assert p.requested_ip is not None and p.server_id is not None


def test_encode_pads_to_bootp_minimum_and_ends_with_end() -> None:
    p = DhcpPacket(Op.BOOTREPLY, 7, bytes(6), options=(opt_u8(Opt.MESSAGE_TYPE, 2),))
    raw = p.encode()
    assert len(raw) == BOOTP_MIN_SIZE
    assert raw[240:244] == bytes((53, 1, 2, 255))


def test_long_options_are_split_and_joined_again_rfc3396() -> None:
    long = b"x" * 600
    p = DhcpPacket(Op.BOOTREPLY, 1, bytes(6),
                   options=(opt_u8(Opt.MESSAGE_TYPE, 5), opt_str(Opt.BOOTFILE, long)))  # fmt: skip
    raw = p.encode()
    assert raw.count(bytes((67, 255))) == 2
    assert DhcpPacket.decode(raw).bootfile == long


def test_option_175_sub_options_round_trip() -> None:
    opt = encapsulate(Opt.IPXE, [Option(176, b"\x01"), Option(19, b"\x01")])
    p = DhcpPacket(Op.BOOTREPLY, 1, bytes(6), options=(opt_u8(Opt.MESSAGE_TYPE, 2), opt))
    q = DhcpPacket.decode(p.encode())
    assert q.ipxe_options == (Option(176, b"\x01"), Option(19, b"\x01"))


def test_overloaded_file_field_holds_options_rfc2132_9_3() -> None:
    base = DhcpPacket(Op.BOOTREQUEST, 1, bytes(6),
                      options=(opt_u8(Opt.MESSAGE_TYPE, 1), opt_u8(Opt.OVERLOAD, 1)))  # fmt: skip
    raw = bytearray(base.encode())
    raw[108:115] = bytes((12, 4)) + b"node" + bytes((255,))  # option 12 inside 'file'
    p = DhcpPacket.decode(bytes(raw))
    assert p.hostname == "node"
    assert p.file == b""


def _valid() -> bytearray:
    p = DhcpPacket(Op.BOOTREQUEST, 1, bytes.fromhex("525400000001"),
                   options=(opt_u8(Opt.MESSAGE_TYPE, 1),))  # fmt: skip
    return bytearray(p.encode())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:100], "shorter than a DHCP message"),
        (lambda b: b"\x03" + b[1:], "neither BOOTREQUEST nor BOOTREPLY"),
        (lambda b: b[:2] + b"\x00" + b[3:], "hardware address length 0"),
        (lambda b: b[:236] + b"\x00\x00\x00\x00" + b[240:], "magic cookie"),
        (lambda b: b[:240] + bytes((255,)), "no option 53"),
        (lambda b: b[:240] + bytes((53, 1, 9, 255)), "unknown message type 9"),
        (lambda b: b[:240] + bytes((53, 1, 1, 50, 3, 1, 2, 3, 255)), "option 50: length 3"),
        (lambda b: b[:240] + bytes((53, 1, 1, 12, 200, 65)), "runs past the end"),
        (lambda b: b[:240] + bytes((53, 1, 1, 93, 1, 0, 255)), "option 93: length 1"),
        (lambda b: b[:240] + bytes((53, 1, 1, 175, 3, 176, 5, 1, 255)), "sub-option 176"),
        (lambda b: b[:240] + bytes((53, 1, 1, 57, 2, 0, 10, 255)), "below 576"),
        (lambda b: b[:240] + bytes((53, 1, 1, 52, 1, 7, 255)), "overload"),
        (lambda b: b[:240] + bytes((53, 1, 1, 97, 17, 1)) + bytes(16) + b"\xff", "UUID type 1"),
    ],
)
def test_malformed_packets_get_a_clear_decode_error(mutate, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        DhcpPacket.decode(bytes(mutate(_valid())))


def test_missing_end_option_is_tolerated_at_a_boundary() -> None:
    raw = _valid()[:240] + bytes((53, 1, 1))
    assert DhcpPacket.decode(bytes(raw)).message_type == MessageType.DISCOVER


def test_rfc3004_user_class_is_parsed_as_a_list() -> None:
    p = DhcpPacket(Op.BOOTREQUEST, 1, bytes(6),
                   options=(opt_u8(Opt.MESSAGE_TYPE, 1),
                            Option(Opt.USER_CLASS, b"\x04iPXE\x03foo")))  # fmt: skip
    assert p.user_classes() == (b"iPXE", b"foo")


def test_ip_options_decode_to_addresses() -> None:
    p = DhcpPacket(Op.BOOTREPLY, 1, bytes(6),
                   options=(opt_u8(Opt.MESSAGE_TYPE, 5),
                            opt_ip(Opt.DNS, IP("192.0.2.1"), IP("192.0.2.2"))))  # fmt: skip
    assert DhcpPacket.decode(p.encode()).dns_servers == (IP("192.0.2.1"), IP("192.0.2.2"))
