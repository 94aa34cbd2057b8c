"""Hypothesis over the DHCPv6 decoder and the server's handling: whatever arrives, no
exception escapes (only ``DecodeError`` from the decoder), garbage gets no reply, and every
reply re-decodes and goes back to the link-local source on port 546.

10 000 examples per test under CI (``CI=true``), fewer on a developer's machine.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.dhcp.leases import BirthLeases6
from hatchery.dhcp6.packet import DecodeError, Dhcp6Packet, Opt, Option, duid_ll
from hatchery.dhcp6.responder import Boot6Config, Dhcp6Config, Responder6
from hatchery.dhcp6.server import Dhcp6Protocol
from tests.conftest import FUZZ_EXAMPLES

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
GOLDEN = [
    bytes.fromhex(p.read_text().replace("\n", ""))
    for p in sorted((Path(__file__).parent / "golden").glob("*.hex"))
]
IP6 = ipaddress.IPv6Address
SOURCE = ("fe80::5054:ff:fe12:3456", 546, 0, 2)
SERVER = duid_ll("52:54:00:00:00:01")


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int, int, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int, int, int]) -> None:
        self.sent.append((data, addr))


def make_protocol() -> tuple[Dhcp6Protocol, RecordingTransport]:
    births = BirthLeases6(IP6("fd00::100"), IP6("fd00::10f"))
    config = Dhcp6Config(SERVER, ipaddress.IPv6Network("fd00::/64"), 600, (IP6("fd00::53"),),
                         Boot6Config("http://[fd00::1]:8080"))  # fmt: skip
    protocol = Dhcp6Protocol(Responder6(config, births), clock=lambda: 1000.0)
    transport = RecordingTransport()
    protocol.transport = transport  # type: ignore[assignment]
    return protocol, transport


def check_replies(request: Dhcp6Packet, transport: RecordingTransport) -> None:
    for raw, dest in transport.sent:
        reply = Dhcp6Packet.decode(raw)
        assert reply.transaction_id == request.transaction_id
        assert reply.server_id == SERVER
        assert dest[:2] == (SOURCE[0], 546) and dest[3] == SOURCE[3]


@FUZZ
@given(st.binary(max_size=1600))
def test_random_bytes_never_escape_and_get_no_reply(data: bytes) -> None:
    protocol, transport = make_protocol()
    try:
        request = Dhcp6Packet.decode(data)
    except DecodeError:
        protocol.datagram_received(data, SOURCE)
        assert transport.sent == [] and protocol.malformed == 1
        return
    protocol.datagram_received(data, SOURCE)
    assert protocol.failed == 0
    check_replies(request, transport)


option = st.one_of(
    st.tuples(st.sampled_from([o.value for o in Opt]), st.binary(max_size=40)),
    st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=8)),
    # well-formed IA_NAs with (maybe malformed) addresses inside
    st.tuples(st.just(3), st.builds(
        lambda head, addr, rest: head + struct.pack("!HH", 5, len(addr + rest)) + addr + rest,
        st.binary(min_size=12, max_size=12), st.binary(min_size=16, max_size=16),
        st.binary(max_size=12),
    )),
)  # fmt: skip


@FUZZ
@given(
    st.integers(1, 13), st.integers(0, 0xFFFFFF), st.lists(option, max_size=10),
    st.sampled_from([b"", duid_ll("52:54:00:aa:bb:cc")]), st.booleans(),
)  # fmt: skip
def test_structured_messages_decode_or_fail_cleanly_and_replies_re_decode(
    kind: int, xid: int, options: list[tuple[int, bytes]], duid: bytes, ours: bool
) -> None:
    body = [(1, duid)] if duid else []
    if ours:
        body.append((2, SERVER))
    body += options
    data = bytes((kind,)) + xid.to_bytes(3, "big")
    data += b"".join(struct.pack("!HH", c, len(d)) + d for c, d in body)
    protocol, transport = make_protocol()
    try:
        request = Dhcp6Packet.decode(data)
    except DecodeError:
        protocol.datagram_received(data, SOURCE)
        assert transport.sent == []
        return
    protocol.datagram_received(data, SOURCE)
    assert protocol.failed == 0, "the responder raised on a message the decoder accepted"
    check_replies(request, transport)


@FUZZ
@given(st.sampled_from(GOLDEN), st.lists(st.tuples(st.integers(0, 299), st.integers(0, 255)),
                                         min_size=1, max_size=8))  # fmt: skip
def test_mutated_real_packets_never_escape(base: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    protocol, transport = make_protocol()
    try:
        request: Dhcp6Packet | None = Dhcp6Packet.decode(bytes(data))
    except DecodeError:
        request = None
    protocol.datagram_received(bytes(data), SOURCE)
    assert protocol.failed == 0
    if request is not None:
        check_replies(request, transport)


def test_only_link_local_sources_are_answered() -> None:
    """RFC 8415 13.1: clients send from their link-local address; a global source is
    routed or forged, and gets nothing."""
    protocol, transport = make_protocol()
    solicit = next(g for g in GOLDEN if g[0] == 1)
    protocol.datagram_received(solicit, ("fd00::77", 546, 0, 2))
    protocol.datagram_received(solicit, ("::ffff:10.0.0.1", 546, 0, 2))
    assert transport.sent == []
    protocol.datagram_received(solicit, SOURCE)
    assert len(transport.sent) == 1


async def test_a_reply_that_commits_a_lease_waits_for_it_on_disk(tmp_path: Path) -> None:
    """As for DHCPv4: a client is told an address only once the lease is written; if the
    write fails, no reply (the client retries) and the failure is counted."""
    import asyncio

    solicit = Dhcp6Packet.decode(next(g for g in GOLDEN if g[0] == 1))
    rapid = Dhcp6Packet(solicit.msg_type, solicit.transaction_id,
                        (*solicit.options, Option(Opt.RAPID_COMMIT, b"")))  # fmt: skip
    path = tmp_path / "leases.json"
    (tmp_path / "file").write_text("a file, not a folder")
    for target, answered in ((path, True), (tmp_path / "file" / "leases.json", False)):
        births = BirthLeases6(IP6("fd00::100"), IP6("fd00::10f"), path)
        births.path = target  # where the write will go
        config = Dhcp6Config(SERVER, ipaddress.IPv6Network("fd00::/64"))
        protocol = Dhcp6Protocol(Responder6(config, births), clock=lambda: 1000.0)
        transport = RecordingTransport()
        protocol.transport = transport  # type: ignore[assignment]
        protocol.datagram_received(rapid.encode(), SOURCE)
        assert transport.sent == []  # not before the write
        for _ in range(100):
            await asyncio.sleep(0.01)
            if transport.sent or protocol.unsaved:
                break
        assert bool(transport.sent) is answered
        assert path.exists() if answered else protocol.unsaved == 1
