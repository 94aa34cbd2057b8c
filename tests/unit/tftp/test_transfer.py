"""The transfer state machine and option negotiation, driven by hand: no sockets."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from hatchery.tftp.packet import ACK, DATA, ERROR, OACK, ErrorCode, Packet, decode
from hatchery.tftp.transfer import (
    BytesSource,
    FileSource,
    ReadTransfer,
    State,
    negotiate,
    to_netascii,
)


def _negotiate(options: tuple[tuple[str, str], ...], size: int = 1000, **kw: int):
    limits = {"max_blksize": 65464, "max_windowsize": 64} | kw
    return negotiate(options, size=size, default_timeout=1.0, **limits)


def test_negotiate_accepts_valid_options() -> None:
    got = _negotiate(
        (("blksize", "1468"), ("tsize", "0"), ("timeout", "3"), ("windowsize", "16")), size=4242
    )
    assert (got.blksize, got.windowsize, got.timeout) == (1468, 16, 3.0)
    assert got.oack == (
        ("blksize", "1468"),
        ("tsize", "4242"),
        ("timeout", "3"),
        ("windowsize", "16"),
    )


def test_negotiate_clamps_to_server_limits() -> None:
    got = _negotiate(
        (("blksize", "65464"), ("windowsize", "65535")), max_blksize=1468, max_windowsize=8
    )
    assert got.oack == (("blksize", "1468"), ("windowsize", "8"))


@pytest.mark.parametrize(
    "option",
    [
        ("blksize", "7"),
        ("blksize", "65465"),
        ("blksize", "+512"),
        ("blksize", " 512"),
        ("blksize", "1_024"),
        ("timeout", "0"),
        ("timeout", "256"),
        ("windowsize", "0"),
        ("windowsize", "65536"),
        ("tsize", "-1"),
        ("utimeout", "1000"),
        ("multicast", ""),
    ],
)
def test_negotiate_leaves_out_invalid_and_unknown_options(option: tuple[str, str]) -> None:
    got = _negotiate((option,))
    assert got.oack == ()
    assert (got.blksize, got.windowsize, got.timeout) == (512, 1, 1.0)


class Client:
    """Records what the machine sends; decodes it."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    def __call__(self, packet: bytes) -> None:
        self.raw.append(bytes(packet))

    def take(self) -> list[object]:
        out = [decode(p) for p in self.raw]
        self.raw.clear()
        return out


def _machine(data: bytes, **kw: object) -> tuple[ReadTransfer, Client]:
    client = Client()
    machine = ReadTransfer(BytesSource(data), client, **kw)
    machine.start(0.0)
    return machine, client


def _ack(machine: ReadTransfer, block: int, now: float = 0.0) -> None:
    machine.on_datagram(ACK(block & 0xFFFF).encode(), now)


def test_lock_step_without_options() -> None:
    data = os.urandom(1300)
    machine, client = _machine(data)
    assert client.take() == [DATA(1, data[:512])]
    _ack(machine, 1)
    assert client.take() == [DATA(2, data[512:1024])]
    _ack(machine, 2)
    assert client.take() == [DATA(3, data[1024:])]
    assert machine.state is State.SENDING
    _ack(machine, 3)
    assert machine.state is State.DONE and client.take() == []


def test_file_of_whole_blocks_ends_with_an_empty_block() -> None:
    machine, client = _machine(b"a" * 1024)
    _ack(machine, 1)
    _ack(machine, 2)
    assert [p for p in client.take() if isinstance(p, DATA)][-1] == DATA(3, b"")
    _ack(machine, 3)
    assert machine.finished


def test_empty_file_is_one_empty_block() -> None:
    machine, client = _machine(b"")
    assert client.take() == [DATA(1, b"")]
    _ack(machine, 1)
    assert machine.state is State.DONE


def test_oack_waits_for_ack_zero() -> None:
    machine, client = _machine(b"x" * 20, blksize=8, oack=(("blksize", "8"),))
    assert client.take() == [OACK((("blksize", "8"),))]
    _ack(machine, 1)  # not the ACK of the OACK: ignored
    assert client.take() == []
    _ack(machine, 0)
    assert client.take() == [DATA(1, b"x" * 8)]


def test_client_error_ends_the_transfer_silently() -> None:
    machine, client = _machine(b"x" * 20, blksize=8, oack=(("blksize", "8"),))
    client.take()
    machine.on_datagram(ERROR(ErrorCode.OPTION_REFUSED, "no").encode(), 0.0)
    assert machine.state is State.FAILED and client.take() == []


def test_unexpected_packet_is_an_illegal_operation() -> None:
    machine, client = _machine(b"x" * 2000)
    client.take()
    machine.on_datagram(DATA(1, b"hi").encode(), 0.0)
    assert machine.state is State.FAILED
    reply = client.take()
    assert len(reply) == 1 and isinstance(reply[0], ERROR)
    assert reply[0].code == ErrorCode.ILLEGAL_OPERATION


def test_garbage_is_ignored() -> None:
    machine, client = _machine(b"x" * 2000)
    client.take()
    for junk in (b"", b"\x00", b"\x00\x04\x00", b"\x00\x04\x00\x01\x02", b"\x00\x09abc"):
        machine.on_datagram(junk, 0.0)
    assert machine.state is State.SENDING and client.take() == []


def test_duplicate_ack_in_lock_step_does_not_resend() -> None:
    """RFC 1123 4.2.3.1: answering duplicate ACKs is the Sorcerer's Apprentice bug."""
    machine, client = _machine(b"x" * 2000)
    _ack(machine, 1)
    client.take()
    _ack(machine, 1)
    _ack(machine, 0)
    assert client.take() == []


def test_timeouts_retransmit_then_give_up() -> None:
    machine, client = _machine(b"x" * 2000, timeout=2.0, retries=2)
    first = client.take()
    assert machine.deadline == 2.0
    machine.on_timeout(2.0)
    assert client.take() == first and machine.deadline == 4.0
    machine.on_timeout(4.0)
    assert client.take() == first
    machine.on_timeout(6.0)
    assert machine.state is State.FAILED and client.take() == []
    assert machine.error == "no answer after 2 retransmissions"


def test_timeout_retransmits_the_oack() -> None:
    machine, client = _machine(b"x", oack=(("tsize", "1"),))
    first = client.take()
    machine.on_timeout(1.0)
    assert client.take() == first


def test_ack_moves_the_deadline() -> None:
    machine, _ = _machine(b"x" * 2000, timeout=5.0)
    _ack(machine, 1, now=3.0)
    assert machine.deadline == 8.0


def test_window_sends_windowsize_blocks() -> None:
    data = bytes(range(256)) * 4  # 1024 bytes: 128 blocks of 8, then an empty one
    machine, client = _machine(data, blksize=8, windowsize=4)
    assert [p.block for p in client.take()] == [1, 2, 3, 4]
    _ack(machine, 4)
    assert [p.block for p in client.take()] == [5, 6, 7, 8]


def test_window_ack_inside_the_window_resumes_after_it() -> None:
    """RFC 7440 section 4: the receiver acknowledges the last block it got in order."""
    machine, client = _machine(b"y" * 100, blksize=8, windowsize=4)
    client.take()
    _ack(machine, 2)
    assert [p.block for p in client.take()] == [3, 4, 5, 6]


def test_window_duplicate_ack_resends_once() -> None:
    machine, client = _machine(b"y" * 100, blksize=8, windowsize=4)
    _ack(machine, 4)
    client.take()
    _ack(machine, 4)  # "nothing after 4 arrived"
    assert [p.block for p in client.take()] == [5, 6, 7, 8]
    _ack(machine, 4)
    assert client.take() == []


def test_last_window_is_short() -> None:
    machine, client = _machine(b"z" * 20, blksize=8, windowsize=8)
    packets = client.take()
    assert [(p.block, len(p.data)) for p in packets] == [(1, 8), (2, 8), (3, 4)]
    _ack(machine, 3)
    assert machine.state is State.DONE


def test_batches_carry_the_same_packets() -> None:
    """With a batch sender (UDP GSO), a window is one buffer of equal-sized segments."""
    data = os.urandom(5000)
    batches: list[tuple[bytes, int]] = []
    client = Client()
    machine = ReadTransfer(
        BytesSource(data),
        client,
        send_batch=lambda buf, seg: batches.append((bytes(buf), seg)),
        blksize=1000,
        windowsize=16,
    )
    machine.start(0.0)
    assert client.raw == [] and len(batches) == 1
    buf, segment = batches[0]
    assert segment == 1004
    packets = [decode(buf[i : i + segment]) for i in range(0, len(buf), segment)]
    expected = [DATA(b, data[(b - 1) * 1000 : b * 1000]) for b in range(1, 7)]
    assert packets == expected


def test_batches_split_at_the_kernel_limit() -> None:
    sizes: list[int] = []
    machine = ReadTransfer(
        BytesSource(bytes(200_000)),
        lambda p: None,
        send_batch=lambda buf, seg: sizes.append(len(buf) // seg),
        blksize=1468,
        windowsize=64,
    )
    machine.start(0.0)
    assert sizes == [44, 20]  # 44 * 1472 bytes fit in 64 KiB


def test_lock_step_sends_singly_even_with_a_batch_sender() -> None:
    client = Client()
    batches: list[object] = []
    machine = ReadTransfer(BytesSource(b"q" * 600), client, send_batch=lambda *a: batches.append(a))
    machine.start(0.0)
    assert batches == [] and client.take() == [DATA(1, b"q" * 512)]


def _receive(data: bytes, blksize: int, window: int, loss: float, seed: int) -> bytes:
    """A receiver following RFC 7440: takes blocks in order, ACKs window ends and gaps."""
    rng = random.Random(seed)
    inbox: list[bytes] = []
    machine = ReadTransfer(
        BytesSource(data), inbox.append, blksize=blksize, windowsize=window, retries=1000
    )
    now = 0.0
    machine.start(now)
    got = bytearray()
    expected = 1
    while not machine.finished:
        packets, inbox[:] = list(inbox), []
        if not packets:
            now = machine.deadline
            machine.on_timeout(now)
            continue
        in_window = 0
        for raw in packets:
            if rng.random() < loss:
                continue
            block, payload = struct.unpack("!H", raw[2:4])[0], raw[4:]
            if block != expected & 0xFFFF:
                _ack(machine, expected - 1, now)  # a gap: ask again from here
                break
            got += payload
            expected += 1
            in_window += 1
            if len(payload) < blksize or in_window == window:
                _ack(machine, expected - 1, now)
                in_window = 0
    return bytes(got)


@pytest.mark.parametrize(("window", "loss"), [(1, 0.0), (1, 0.2), (8, 0.0), (8, 0.1), (64, 0.05)])
def test_simulated_client_gets_every_byte(window: int, loss: float) -> None:
    data = os.urandom(20_000)
    assert _receive(data, 64, window, loss, seed=window) == data


def test_block_numbers_roll_over_to_zero() -> None:
    """70 000 blocks of 8 bytes: the 16-bit block number wraps past 65535 to 0."""
    data = os.urandom(8 * 70_000 + 3)
    sent: list[bytes] = []
    machine = ReadTransfer(BytesSource(data), sent.append, blksize=8)
    machine.start(0.0)
    blocks = []
    while not machine.finished:
        packet = sent.pop()
        block = struct.unpack("!H", packet[2:4])[0]
        blocks.append(block)
        _ack(machine, block)
    assert machine.state is State.DONE
    assert blocks[65534:65537] == [65535, 0, 1]
    assert len(blocks) == 70_001


def test_windowed_transfer_across_the_wrap() -> None:
    data = os.urandom(8 * 66_000)
    assert _receive(data, 8, 16, 0.01, seed=7) == data


def test_netascii() -> None:
    assert to_netascii(b"a\nb\rc\r\n") == b"a\r\nb\r\0c\r\0\r\n"


def test_file_source_reads_by_offset(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(10_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    source = FileSource(fd, len(data), chunk=4096)
    try:
        assert bytes(source.read(5000, 100)) == data[5000:5100]
        assert bytes(source.read(100, 8000)) == data[100:8100]  # larger than a chunk
        assert bytes(source.read(9990, 10)) == data[9990:]
    finally:
        source.close()
    assert source.fd == -1


def test_a_file_that_shrinks_aborts_the_transfer(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 5000)
    fd = os.open(path, os.O_RDONLY)
    client = Client()
    machine = ReadTransfer(FileSource(fd, 5000, chunk=512), client)
    machine.start(0.0)
    os.truncate(path, 600)
    _ack(machine, 1)
    _ack(machine, 2)
    packets = client.take()
    assert isinstance(packets[-1], ERROR) and "shrank" in packets[-1].message
    assert machine.state is State.FAILED
    os.close(fd)


@pytest.mark.parametrize("size", [0, 1000, 44 * 1468, 44 * 1468 + 5, 200_000, 3 * 1468 * 64])
def test_batches_from_a_file_are_read_in_place(tmp_path: Path, size: int) -> None:
    """From a file, each batch's payloads are read straight into the packet buffer
    (``preadv``): the same datagrams as built one by one, the short last block and an empty
    one (a size that is a multiple of blksize) included, window after window."""
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    got: list[Packet] = []

    def batch(buf: memoryview, segment: int) -> None:
        raw = bytes(buf)
        got.extend(decode(raw[i : i + segment]) for i in range(0, len(raw), segment))

    client = Client()
    machine = ReadTransfer(FileSource(fd, size), client, send_batch=batch, blksize=1468,
                           windowsize=64)  # fmt: skip
    machine.start(0.0)
    while machine.state is State.SENDING:
        _ack(machine, machine.sent)
    os.close(fd)
    blocks = size // 1468 + 1
    expected = [DATA(b & 0xFFFF, data[(b - 1) * 1468 : b * 1468]) for b in range(1, blocks + 1)]
    sent = got + client.take()  # a one-block window goes out singly
    assert sent == expected and machine.state is State.DONE


@pytest.mark.parametrize("windowsize", [16, 64])
def test_window_hot_path_matches_on_ack(tmp_path: Path, windowsize: int) -> None:
    """Windowed from a file, the next window's first batch is built while the client reads
    this one: sending it on ACK ``release_on`` and then calling ``released`` (the server's
    hot path) gives the very datagrams ``on_ack`` gives, whatever mix of the two drives the
    transfer, gaps included. It is never armed for the last window's ACK, nor after a
    failure."""
    size = 7 * windowsize * 1468 + 99
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    blocks = range(1, size // 1468 + 2)
    expected = [DATA(b & 0xFFFF, data[(b - 1) * 1468 : b * 1468]) for b in blocks]

    def run(hot_every: int, gap_at: int = -1) -> tuple[list[Packet], ReadTransfer]:
        got: list[Packet] = []

        def batch(buf: memoryview, segment: int) -> None:
            raw = bytes(buf)
            got.extend(decode(raw[i : i + segment]) for i in range(0, len(raw), segment))

        client = Client()
        fd = os.open(path, os.O_RDONLY)
        machine = ReadTransfer(FileSource(fd, size), client, send_batch=batch, blksize=1468,
                               windowsize=windowsize)  # fmt: skip
        machine.start(0.0)
        turn = 0
        while machine.state is State.SENDING:
            got += client.take()
            turn += 1
            if turn == gap_at:  # the client lost the window's second half: ACK its middle
                _ack(machine, machine.sent - windowsize // 2)
            elif machine.release_on >= 0 and turn % hot_every == 0:
                assert machine.release_on == machine.sent & 0xFFFF
                batch(memoryview(machine.next_packet), 1472)
                machine.released(1.0)
                assert machine.acked < machine.sent and machine.deadline == 1.0 + machine.timeout
            else:
                _ack(machine, machine.sent)
        got += client.take()
        os.close(fd)
        return got, machine

    for hot_every, gap_at in ((1, -1), (2, -1), (10**9, -1), (1, 3)):
        got, machine = run(hot_every, gap_at)
        assert machine.state is State.DONE
        assert machine.release_on == -1  # the last window's ACK ended it, nothing armed
        if gap_at < 0:
            assert got == expected, (hot_every, gap_at)
        else:  # the gap resent the window's second half once: every block, in order, once more
            assert sorted(set(got), key=expected.index) == expected
    in_memory, _ = _machine(data[:30000], windowsize=16, send_batch=lambda b, s: None)
    assert in_memory.release_on == -1  # not from a file: nothing is built ahead
    fd = os.open(path, os.O_RDONLY)
    machine = ReadTransfer(FileSource(fd, size), Client(), send_batch=lambda b, s: None,
                           blksize=1468, windowsize=windowsize)  # fmt: skip
    machine.start(0.0)
    assert machine.release_on == windowsize  # window 1 is out, window 2's first batch built
    machine.abort(ErrorCode.NOT_DEFINED, "stop")
    assert machine.release_on == -1
    os.close(fd)


def test_lock_step_hot_path_matches_on_ack() -> None:
    """``release_on``/``next_packet``/``released`` (the server sends before the bookkeeping)
    give the same packets and the same end as ``on_ack``; they are never armed for the ACK
    of the last block, nor after the transfer failed."""
    data = os.urandom(512 * 5 + 7)
    machine, client = _machine(data)
    sent = client.take()
    _ack(machine, 1)  # the ordinary path arms the hot one
    sent += client.take()
    while machine.release_on >= 0:
        assert machine.release_on == machine.sent & 0xFFFF
        sent.append(decode(machine.next_packet))
        machine.released(1.0)
        assert machine.deadline == 1.0 + machine.timeout and machine.acked == machine.sent - 1
    assert machine.sent == machine.last_block and machine.state is State.SENDING
    _ack(machine, machine.sent)
    assert machine.state is State.DONE
    assert sent == [DATA(b, data[(b - 1) * 512 : b * 512]) for b in range(1, 7)]
    failed, _ = _machine(data)
    _ack(failed, 1)
    assert failed.release_on == 2  # block 2 is out: its ACK releases block 3
    failed.abort(ErrorCode.NOT_DEFINED, "stop")
    assert failed.release_on == -1
