"""Hypothesis over the DHCP decoder and the server's handling: whatever arrives, no exception
escapes (only ``DecodeError`` from the decoder), and garbage gets no reply.

10 000 examples per test under CI (``CI=true``), fewer on a developer's machine.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.dhcp.leases import BirthLeases, Lease, StaticLeases
from hatchery.dhcp.packet import MAGIC_COOKIE, DecodeError, DhcpPacket
from hatchery.dhcp.responder import BootConfig, DhcpConfig, Responder, destination
from hatchery.dhcp.server import DhcpProtocol
from tests.conftest import FUZZ_EXAMPLES

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
GOLDEN = [
    bytes.fromhex(p.read_text().replace("\n", ""))
    for p in sorted((Path(__file__).parent / "golden").glob("*.hex"))
]
IP = ipaddress.IPv4Address


class RecordingTransport:
    """The one transport method the protocol uses, recording what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def make_protocol() -> tuple[DhcpProtocol, RecordingTransport]:
    server = IP("10.9.0.1")
    config = DhcpConfig(server, ipaddress.IPv4Network("10.9.0.0/24"), server, (server,), None,
                        600, BootConfig("http://10.9.0.1:8080"))  # fmt: skip
    static = StaticLeases({"52:54:00:5e:00:01": Lease("52:54:00:5e:00:01", IP("10.9.0.7"))})
    births = BirthLeases(IP("10.9.0.100"), IP("10.9.0.120"))
    protocol = DhcpProtocol(Responder(config, static, births), clock=lambda: 1000.0)
    transport = RecordingTransport()
    protocol.transport = transport  # type: ignore[assignment]
    return protocol, transport


def header(op: int = 1, hlen: int = 6) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=236 - 3, max_size=236 - 3).map(
        lambda rest: bytes((op, 1, hlen)) + rest
    )


options_area = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(
                [1, 3, 6, 12, 28, 50, 51, 52, 53, 54, 55, 57, 60, 61, 77, 93, 94, 97, 175, 0, 255]
            ),  # fmt: skip
            st.binary(max_size=24),
        ),
        st.tuples(st.integers(0, 255), st.binary(max_size=8)),
    ),
    max_size=12,
).map(lambda opts: b"".join(bytes((c, len(d))) + d for c, d in opts))


@FUZZ
@given(st.binary(max_size=1500))
def test_random_bytes_never_escape_and_get_no_reply(data: bytes) -> None:
    protocol, transport = make_protocol()
    try:
        DhcpPacket.decode(data)
    except DecodeError:
        protocol.datagram_received(data, ("10.9.0.50", 68))
        assert transport.sent == [] and protocol.malformed == 1
        return
    protocol.datagram_received(data, ("10.9.0.50", 68))
    assert protocol.failed == 0


@FUZZ
@given(header(), options_area, st.sampled_from([b"", bytes((53, 1, 1)), bytes((53, 1, 3))]))
def test_structured_packets_decode_or_fail_cleanly_and_replies_re_decode(
    head: bytes, options: bytes, message_type: bytes
) -> None:
    data = head + MAGIC_COOKIE + message_type + options
    protocol, transport = make_protocol()
    try:
        packet = DhcpPacket.decode(data)
    except DecodeError:
        protocol.datagram_received(data, ("0.0.0.0", 68))
        assert transport.sent == []
        return
    protocol.datagram_received(data, ("0.0.0.0", 68))
    assert protocol.failed == 0, "the responder raised on a packet the decoder accepted"
    for raw, _ in transport.sent:
        reply = DhcpPacket.decode(raw)
        assert reply.xid == packet.xid
        destination(packet, reply)


@FUZZ
@given(st.sampled_from(GOLDEN), st.lists(st.tuples(st.integers(0, 1499), st.integers(0, 255)),
                                         min_size=1, max_size=8))  # fmt: skip
def test_mutated_real_packets_never_escape(base: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    protocol, _ = make_protocol()
    try:
        DhcpPacket.decode(bytes(data))
    except DecodeError:
        pass
    protocol.datagram_received(bytes(data), ("0.0.0.0", 68))
    assert protocol.failed == 0
