"""Hypothesis over the TFTP decoder, the server's request handling and a running transfer:
whatever arrives, no exception escapes (the decoder raises only ``PacketError``) and garbage
gets no reply.

10 000 examples per test under CI (``CI=true``), fewer on a developer's machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.tftp.packet import PacketError, decode
from hatchery.tftp.server import TftpLimits, TftpServer
from hatchery.tftp.transfer import BytesSource, ReadTransfer, State
from tests.conftest import FUZZ_EXAMPLES

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _garbage(data: bytes) -> bool:
    try:
        decode(data)
    except PacketError:
        return True
    return False


# Near-misses reach deeper than random bytes: a real opcode, then NUL-separated fields.
_field = st.one_of(
    st.sampled_from([b"f", b"missing", b"file.bin", b"../etc/passwd", b"/etc/passwd", b"dir"]),
    st.sampled_from([b"octet", b"netascii", b"mail", b"OCTET"]),
    st.sampled_from([b"blksize", b"tsize", b"timeout", b"windowsize", b"utimeout"]),
    st.sampled_from([b"0", b"7", b"8", b"512", b"1468", b"65464", b"65465", b"99999999999"]),
    st.binary(max_size=12),
)
_structured = st.builds(
    lambda op, fields, tail: struct.pack("!H", op) + b"\0".join(fields) + tail,
    st.integers(0, 8),
    st.lists(_field, max_size=8),
    st.sampled_from([b"", b"\0", b"\0\0"]),
)
datagrams = st.one_of(st.binary(max_size=600), _structured)


@FUZZ
@given(datagrams)
def test_decoder_raises_only_packet_error(data: bytes) -> None:
    try:
        packet = decode(data)
    except PacketError:
        return
    assert packet.encode() is not None


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def __call__(self, data: bytes, addr: object) -> None:
        self.sent.append((bytes(data), addr))


@pytest.fixture(scope="module")
def running_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TftpServer, tuple[str, int]]]:
    """A started server (its loop idle between examples) over a small root, and a client
    address that is ours (a bound socket nobody reads), so transfers send nowhere else."""
    root = tmp_path_factory.mktemp("root")
    (root / "f").write_bytes(b"x" * 3000)
    (root / "file.bin").write_bytes(os.urandom(100))
    (root / "dir").mkdir()
    limits = TftpLimits(requests_per_second=1e9, request_burst=10**9, max_transfers=10**6)
    server = TftpServer(root, "127.0.0.1", 0, limits)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.start())
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    yield server, client.getsockname()
    client.close()
    loop.run_until_complete(server.stop())
    loop.close()


@FUZZ
@given(datagrams)
def test_server_request_handling(
    running_server: tuple[TftpServer, tuple[str, int]], data: bytes
) -> None:
    server, client = running_server
    sent = Recorder()
    server.handle_request(data, client, sent)
    if _garbage(data):
        assert sent.sent == []
    for packet, addr in sent.sent:
        assert addr == client
        decode(packet)  # whatever we send is well-formed
    # Transfers a valid request opened: their first packet is out; close them for the next.
    for port in list(server._transfers.values()):
        port.close()
    assert server.active_transfers == 0


_acks = st.integers(0, 0xFFFF).map(lambda block: struct.pack("!HH", 4, block))


@FUZZ
@given(
    st.sampled_from([(512, 1, False), (8, 4, True), (1468, 16, True), (512, 1, True)]),
    st.integers(0, 5000),
    st.lists(st.one_of(datagrams, _acks), max_size=8),
)
def test_transfer_handles_any_datagram(
    shape: tuple[int, int, bool], size: int, incoming: list[bytes]
) -> None:
    blksize, window, oack = shape
    sent: list[bytes] = []
    machine = ReadTransfer(
        BytesSource(bytes(size)),
        sent.append,
        blksize=blksize,
        windowsize=window,
        oack=(("blksize", str(blksize)),) if oack else (),
    )
    machine.start(0.0)
    for now, data in enumerate(incoming, 1):
        before = len(sent)
        machine.on_datagram(data, float(now))
        if _garbage(data):
            assert len(sent) == before
        assert machine.acked <= machine.sent <= machine.last_block
    for packet in sent:
        decode(packet)
    assert machine.state in State
