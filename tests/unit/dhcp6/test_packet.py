"""The DHCPv6 codec: golden packets captured from real clients (ISC dhclient, dhcpcd, OVMF,
iPXE) by the integration tests' server, round trips, and clear errors."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hatchery.dhcp6.packet import (
    DecodeError,
    Dhcp6Packet,
    IaAddress,
    IaNa,
    MessageType,
    Opt,
    Option,
    Status,
    describe,
    duid_ll,
    duid_mac,
    opt_status,
)

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> bytes:
    return bytes.fromhex((GOLDEN / f"{name}.hex").read_text().replace("\n", ""))


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.hex")))
def test_golden_packets_decode_to_their_checked_in_text(name: str) -> None:
    text = describe(Dhcp6Packet.decode(golden(name))) + "\n"
    assert text == (GOLDEN / f"{name}.txt").read_text(), f"{name}: decoded form changed:\n{text}"


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.hex")))
def test_golden_packets_survive_a_round_trip(name: str) -> None:
    packet = Dhcp6Packet.decode(golden(name))
    assert packet.encode() == golden(name)
    assert Dhcp6Packet.decode(packet.encode()) == packet


def test_dhclient_request_says_what_it_wants() -> None:
    p = Dhcp6Packet.decode(golden("dhclient-request"))
    assert p.msg_type == MessageType.REQUEST
    assert duid_mac(p.client_id or b"") == "ae:9d:76:c6:6f:fa"  # DUID-LLT
    assert p.server_id == duid_ll("1a:02:f0:85:f0:2d")
    (ia,) = p.ia_na
    assert ia.iaid == 0x76C66FFA
    assert [a.address for a in ia.addresses] == [ipaddress.IPv6Address("fd42:0:0:1::100")]
    assert p.requested_options == (23, 24, 39, 31) and p.elapsed == 0


def test_ovmf_solicit_is_an_http_boot_client() -> None:
    p = Dhcp6Packet.decode(golden("ovmf-solicit"))
    assert p.msg_type == MessageType.SOLICIT
    assert p.client_arch == (16,)  # x64 UEFI HTTP (RFC 5970 3.3)
    assert Opt.BOOTFILE_URL in p.requested_options
    vendor = p.vendor_class
    assert vendor is not None and vendor[1][0].startswith(b"HTTPClient")


def test_what_the_server_sends_round_trips() -> None:
    address = IaAddress(ipaddress.IPv6Address("fd00::5"), 100, 200, (opt_status(Status.SUCCESS),))
    reply = Dhcp6Packet(MessageType.REPLY, 0xABCDEF, (
        Option(Opt.SERVERID, duid_ll("52:54:00:00:00:01")),
        IaNa(7, 50, 80, (address.encode(),)).encode(),
        Option(Opt.BOOTFILE_URL, b"http://[fd00::1]:8080/ipxe/ipxe.efi"),
    ))  # fmt: skip
    back = Dhcp6Packet.decode(reply.encode())
    assert back == reply
    assert back.ia_na[0].addresses == (address,)
    assert back.ia_na[0].addresses[0].options and back.boot_file_url is not None
    assert "STATUS_CODE SUCCESS" in describe(back)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01\x00\x00", "shorter than the 4-byte header"),
        (b"\x0c" + bytes(40), "not a client/server message"),  # Relay-forward
        (b"\x00\x00\x00\x00", "not a client/server message"),
        (b"\x01\x00\x00\x01\x00\x01\x00\x05ab", "overruns"),
        (b"\x01\x00\x00\x01\x00\x01", "truncated option header"),
        (b"\x01\x00\x00\x01\x00\x01\x00\x01a", "option 1: length 1"),  # DUID too short
        (b"\x01\x00\x00\x01\x00\x01\x00\x84" + bytes(132), "option 1: length 132"),
        (b"\x01\x00\x00\x01\x00\x03\x00\x04abcd", "option 3: length 4"),  # IA_NA too short
        (b"\x01\x00\x00\x01\x00\x05\x00\x18" + bytes(24), "IAADDR outside an IA"),
        (b"\x01\x00\x00\x01\x00\x08\x00\x01a", "option 8: length 1"),
        (b"\x01\x00\x00\x01\x00\x06\x00\x03abc", "not a multiple of 2"),
        (b"\x01\x00\x00\x01\x00\x0e\x00\x01a", "option 14: length 1"),
        (b"\x01\x00\x00\x01\x00\x0f\x00\x03\x00\x05a", "overruns the option"),
        (b"\x01\x00\x00\x01\x00\x10\x00\x02ab", "option 16: length 2"),
        (b"\x01\x00\x00\x01" + b"\x00\x63\x00\x00" * 65, "more than 64 options"),
        (b"\x01" + bytes(1600), "longer than 1500"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        Dhcp6Packet.decode(data)


def test_an_ia_inside_an_ia_is_refused() -> None:
    inner = IaNa(1).encode()
    outer = IaNa(2, options=(inner,)).encode()
    with pytest.raises(DecodeError, match="IA_NA inside another option"):
        Dhcp6Packet.decode(Dhcp6Packet(MessageType.SOLICIT, 1, (outer,)).encode())


def test_duid_mac_reads_only_ethernet_llt_and_ll() -> None:
    assert duid_mac(duid_ll("52:54:00:aa:bb:cc")) == "52:54:00:aa:bb:cc"
    assert duid_mac(bytes.fromhex("000100010000000052540000aabb")) == "52:54:00:00:aa:bb"
    assert duid_mac(bytes.fromhex("0004") + bytes(16)) is None  # DUID-UUID
    assert duid_mac(bytes.fromhex("0003000652540000aabb")) is None  # not Ethernet
    assert duid_mac(b"\x00") is None
