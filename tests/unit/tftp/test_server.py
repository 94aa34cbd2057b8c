"""The asyncio server in-process on loopback, spoken to by a small test client: requests,
refusals, limits, TIDs and retransmission. Real third-party clients are in
tests/integration/tftp."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hatchery import agent_main
from hatchery.tftp import server as server_module
from hatchery.tftp.cli import parse_listen
from hatchery.tftp.packet import ACK, DATA, ERROR, OACK, RRQ, WRQ, ErrorCode, Packet, decode
from hatchery.tftp.server import TftpLimits, TftpServer
from hatchery.tftp.transfer import to_netascii

pytestmark = pytest.mark.timeout(60)


class Client:
    """One UDP socket on loopback, async send/receive of TFTP packets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes | Packet, addr: tuple[str, int]) -> None:
        raw = data if isinstance(data, bytes) else data.encode()
        await self.loop.sock_sendto(self.sock, raw, addr)

    async def recv(self, timeout: float = 5.0) -> tuple[Packet, tuple[str, int]]:
        data, addr = await asyncio.wait_for(self.loop.sock_recvfrom(self.sock, 70000), timeout)
        return decode(data), addr

    async def silent(self, wait: float = 0.3) -> bool:
        try:
            await asyncio.wait_for(self.loop.sock_recvfrom(self.sock, 70000), wait)
        except TimeoutError:
            return True
        return False

    async def fetch(
        self, server: tuple[str, int], name: str, options: tuple[tuple[str, str], ...] = ()
    ) -> bytes:
        """A receiver as RFC 7440 describes it: ACKs window ends, and the last block it got
        in order when one goes missing; block numbers roll over."""
        opts = dict(options)
        blksize, window = int(opts.get("blksize", 512)), int(opts.get("windowsize", 1))
        await self.send(RRQ(name, "octet", options), server)
        packet, tid = await self.recv()
        if isinstance(packet, OACK):
            blksize = int(packet.option("blksize") or 512)
            window = int(packet.option("windowsize") or 1)
            await self.send(ACK(0), tid)
            packet, _ = await self.recv()
        got, expected, in_window, reported = bytearray(), 1, 0, -1
        while True:
            assert isinstance(packet, DATA), packet
            if packet.block != expected & 0xFFFF:
                if reported != expected - 1:
                    reported = expected - 1
                    await self.send(ACK(reported & 0xFFFF), tid)
                    in_window = 0
            else:
                got += packet.data
                expected += 1
                in_window += 1
                if len(packet.data) < blksize:
                    await self.send(ACK(packet.block), tid)
                    return bytes(got)
                if in_window == window:
                    await self.send(ACK(packet.block), tid)
                    in_window = 0
            packet, _ = await self.recv()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "small").write_bytes(b"hello tftp\n")
    (root / "big").write_bytes(os.urandom(300_000))
    (root / "text").write_bytes(b"line one\nline two\r\n")
    return root


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    yield c
    c.close()


def _server(root: Path, **limits: float) -> TftpServer:
    """Not started yet: ``async with`` starts and stops it."""
    return TftpServer(root, "127.0.0.1", 0, TftpLimits(**limits))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        (),
        (("blksize", "1468"), ("tsize", "0")),
        (("blksize", "1468"), ("windowsize", "16")),
        (("blksize", "8192"), ("windowsize", "64")),
        (("blksize", "65464"), ("windowsize", "4")),
    ],
)
async def test_fetch_is_bit_exact(root: Path, client: Client, options: tuple) -> None:  # type: ignore[type-arg]
    async with _server(root) as server:
        assert await client.fetch(server.address, "big", options) == (root / "big").read_bytes()
        await asyncio.sleep(0.05)
        assert server.active_transfers == 0


async def test_fetch_without_gso(
    root: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_GSO_SUPPORTED", False)
    async with _server(root) as server:
        data = await client.fetch(server.address, "big", (("windowsize", "16"),))
        assert data == (root / "big").read_bytes()


def _fetch_at_once(address: tuple[str, int], name: str) -> bytes:
    """A lock-step fetch in blocking calls, each block acknowledged the moment it arrives
    (as curl does): the ACKs come sooner than the server's spin gives up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(RRQ(name, "octet", (("blksize", "1468"),)).encode(), address)
        data, peer = sock.recvfrom(70000)
        assert isinstance(decode(data), OACK)
        sock.connect(peer)
        sock.send(ACK(0).encode())
        parts = []
        while True:
            packet = decode(sock.recv(70000))
            assert isinstance(packet, DATA)
            sock.send(ACK(packet.block).encode())
            parts.append(packet.data)
            if len(packet.data) < 1468:
                return b"".join(parts)


@pytest.mark.parametrize("cpus", [64, 0])  # cores to spare for spinning, faked: many, none
async def test_a_quick_client_is_served_by_spinning_or_not(
    root: Path, cpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a core to spare the transfer's thread polls for the ACK (``_spin_receive``);
    with none (every core has a transfer) it sleeps in recv. Both serve the file whole."""
    monkeypatch.setattr(server_module, "_CPUS", cpus)
    polls: list[int] = []  # what each poll got: a datagram's size, or -2 if none in time
    real_spin = server_module._spin_receive

    def spin(receive: Any, buf: bytearray) -> int:
        polls.append(real_spin(receive, buf))
        return polls[-1]

    monkeypatch.setattr(server_module, "_spin_receive", spin)
    async with _server(root) as server:
        data = await asyncio.to_thread(_fetch_at_once, server.address, "big")
        assert data == (root / "big").read_bytes()
    # Whether a poll catches an ACK depends on this machine's timing; that it polls at all
    # does not (the bench shows what it gains: docs/benchmarks.md, TFTP).
    assert bool(polls) == bool(cpus)


def test_spin_receive_returns_a_waiting_datagram_or_gives_up() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(("127.0.0.1", 0))
        buf = bytearray(100)
        started = time.perf_counter_ns()
        assert server_module._spin_receive(receiver.recv_into, buf) == -2  # nothing came
        waited = time.perf_counter_ns() - started
        assert waited >= server_module._SPIN_NS  # it gave up only once its budget was spent
        sender.sendto(b"\x00\x04\x00\x01", receiver.getsockname())
        assert server_module._spin_receive(receiver.recv_into, buf) == 4
        assert buf[:4] == b"\x00\x04\x00\x01"


async def test_oack_reports_tsize_and_transfer_comes_from_a_new_port(
    root: Path, client: Client
) -> None:
    async with _server(root) as server:
        await client.send(RRQ("big", "octet", (("tsize", "0"), ("foo", "bar"))), server.address)
        packet, tid = await client.recv()
        assert packet == OACK((("tsize", "300000"),))
        assert tid[1] != server.address[1]


async def test_write_requests_are_refused(root: Path, client: Client) -> None:
    async with _server(root) as server:
        await client.send(WRQ("upload", "octet"), server.address)
        packet, _ = await client.recv()
        assert isinstance(packet, ERROR) and packet.code == ErrorCode.ACCESS_VIOLATION
        assert not (root / "upload").exists()


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("missing", ErrorCode.FILE_NOT_FOUND),
        ("../etc/passwd", ErrorCode.ACCESS_VIOLATION),
        ("/etc/passwd", ErrorCode.ACCESS_VIOLATION),
    ],
)
async def test_refusals(root: Path, client: Client, name: str, code: ErrorCode) -> None:
    async with _server(root) as server:
        await client.send(RRQ(name, "octet"), server.address)
        packet, _ = await client.recv()
        assert isinstance(packet, ERROR) and packet.code == code


async def test_mail_mode_is_illegal(root: Path, client: Client) -> None:
    async with _server(root) as server:
        await client.send(RRQ("small", "mail"), server.address)
        packet, _ = await client.recv()
        assert isinstance(packet, ERROR) and packet.code == ErrorCode.ILLEGAL_OPERATION


async def test_netascii_is_converted(root: Path, client: Client) -> None:
    async with _server(root) as server:
        await client.send(RRQ("text", "netascii"), server.address)
        packet, tid = await client.recv()
        assert packet == DATA(1, to_netascii((root / "text").read_bytes()))
        await client.send(ACK(1), tid)


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x00",
        b"\x00\x01no-terminator",
        b"\xff\xff\xff",
        ACK(1).encode(),
        DATA(1, b"x").encode(),
        ERROR(0, "hi").encode(),
    ],
)
async def test_no_reply_to_garbage_or_stray_packets(
    root: Path, client: Client, junk: bytes
) -> None:
    async with _server(root) as server:
        await client.send(junk, server.address)
        assert await client.silent()


async def test_size_limit(root: Path, client: Client) -> None:
    async with _server(root, max_file_size=1000) as server:
        await client.send(RRQ("big", "octet"), server.address)
        packet, _ = await client.recv()
        assert isinstance(packet, ERROR) and "size limit" in packet.message


async def test_concurrency_limits(root: Path) -> None:
    async with _server(root, max_transfers=3, max_transfers_per_client=2) as server:
        clients = [Client() for _ in range(4)]
        try:
            for c in clients[:2]:  # two transfers from one address: fine
                await c.send(RRQ("big", "octet"), server.address)
                assert isinstance((await c.recv())[0], DATA)
            await clients[2].send(RRQ("big", "octet"), server.address)
            packet, _ = await clients[2].recv()
            assert isinstance(packet, ERROR) and "from this client" in packet.message
            # Neither client answered: both pending, neither holds a slot.
            assert (server.pending_transfers, server.active_transfers) == (2, 0)
        finally:
            for c in clients:
                c.close()


async def test_global_transfer_limit(root: Path) -> None:
    async with _server(root, max_transfers=1) as server:
        first, second = Client(), Client()
        try:
            await first.send(RRQ("big", "octet"), server.address)
            _, tid = await first.recv()
            await first.send(ACK(1), tid)  # the answer: now it holds the one slot
            await first.recv()
            assert server.active_transfers == 1
            await second.send(RRQ("big", "octet"), server.address)
            packet, _ = await second.recv()
            assert isinstance(packet, ERROR) and "busy" in packet.message
        finally:
            first.close()
            second.close()


async def test_request_flood_is_dropped(root: Path, client: Client) -> None:
    async with _server(root, requests_per_second=0.001, request_burst=3) as server:
        for _ in range(10):
            await client.send(RRQ("missing", "octet"), server.address)
        replies = 0
        while not await client.silent(0.3):
            replies += 1
        assert replies == 3


async def test_retransmitted_request_starts_no_second_transfer(root: Path, client: Client) -> None:
    async with _server(root) as server:
        await client.send(RRQ("big", "octet"), server.address)
        await client.send(RRQ("big", "octet"), server.address)
        await client.recv()
        assert await client.silent()
        assert server.pending_transfers == 1


async def test_foreign_tid_gets_error_5_and_the_transfer_goes_on(
    root: Path, client: Client
) -> None:
    async with _server(root) as server:
        await client.send(RRQ("small", "octet"), server.address)
        first, tid = await client.recv()
        stranger = Client()
        try:
            await stranger.send(ACK(1), tid)
            packet, _ = await stranger.recv()
            assert isinstance(packet, ERROR) and packet.code == ErrorCode.UNKNOWN_TID
        finally:
            stranger.close()
        assert server.pending_transfers == 1
        await client.send(ACK(1), tid)
        await asyncio.sleep(0.05)
        assert first == DATA(1, b"hello tftp\n")
        assert (server.pending_transfers, server.active_transfers) == (0, 0)


async def test_a_stranger_cannot_disturb_a_running_transfer(root: Path, client: Client) -> None:
    """Once the client answered, its transfer's socket is connected to it: a stranger's
    datagrams to that port (a forged ACK, an ERROR) never reach the transfer (the kernel
    drops them: ICMP port unreachable, as tftpd-hpa's connected sockets do) and the whole
    file still arrives, block by block, to the client alone."""
    data = (root / "big").read_bytes()
    async with _server(root) as server:
        await client.send(RRQ("big", "octet"), server.address)
        first, tid = await client.recv()
        await client.send(ACK(1), tid)  # answered: the transfer runs in its worker now
        second, _ = await client.recv()
        assert first == DATA(1, data[:512]) and second == DATA(2, data[512:1024])
        assert server.active_transfers == 1
        stranger = Client()
        try:
            await stranger.send(ACK(2), tid)
            await stranger.send(ERROR(ErrorCode.NOT_DEFINED, "stop"), tid)
            assert await stranger.silent()
        finally:
            stranger.close()
        got, block = bytearray(data[:1024]), 2
        while True:
            await client.send(ACK(block), tid)
            packet, source = await client.recv()
            assert isinstance(packet, DATA) and source == tid
            block += 1
            assert packet.block == block & 0xFFFF
            got += packet.data
            if len(packet.data) < 512:
                await client.send(ACK(block), tid)
                break
        assert bytes(got) == data


async def test_retransmits_on_timeout_then_gives_up(root: Path, client: Client) -> None:
    async with _server(root, timeout=0.1, retries=2) as server:
        await client.send(RRQ("small", "octet"), server.address)
        packets = [(await client.recv())[0] for _ in range(3)]
        assert packets == [DATA(1, b"hello tftp\n")] * 3
        assert await client.silent(0.4)
        assert server.active_transfers == 0


async def test_stray_traffic_does_not_postpone_retransmission(root: Path, client: Client) -> None:
    """Garbage every 50 ms, from a stranger (the transfer's connected socket never sees it)
    and from the client's own address and port (it does: only a real ACK of the block may
    restart the retransmission timer)."""
    async with _server(root, timeout=0.4) as server:
        await client.send(RRQ("small", "octet"), server.address)
        first, tid = await client.recv()
        stranger = Client()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            retransmit = asyncio.ensure_future(client.recv(timeout=3))
            while not retransmit.done():
                await stranger.send(b"\xff\xff", tid)
                await client.send(b"\xff\xff", tid)  # not an ACK: ignored, timer kept
                await client.send(ACK(0), tid)  # a stale ACK (before block 1): the same
                await asyncio.sleep(0.05)
            assert (await retransmit)[0] == first
            assert loop.time() - started < 0.7
        finally:
            stranger.close()


async def test_negotiated_timeout_is_used(root: Path, client: Client) -> None:
    async with _server(root, timeout=30) as server:
        await client.send(RRQ("small", "octet", (("timeout", "1"),)), server.address)
        oack, _ = await client.recv()
        assert oack == OACK((("timeout", "1"),))
        again, _ = await client.recv(timeout=3)  # not 30 s
        assert again == oack


async def test_stop_aborts_transfers(root: Path, client: Client) -> None:
    server = _server(root)
    await server.start()
    await client.send(RRQ("big", "octet"), server.address)
    _, tid = await client.recv()
    await client.send(ACK(1), tid)
    await client.recv()
    assert server.active_transfers == 1
    await server.stop()
    assert server.active_transfers == 0


async def test_unanswered_requests_hold_no_transfer_slot(root: Path) -> None:
    """Issue 14: forged RRQs (whose "client" never answers) held every transfer slot. A
    request takes a slot only once its client answers the first packet."""
    limits = {"max_transfers": 2, "max_transfers_per_client": 100}
    async with _server(root, **limits) as server:
        forged = [Client() for _ in range(6)]
        real = Client()
        try:
            for c in forged:
                await c.send(RRQ("big", "octet", (("timeout", "255"),)), server.address)
                assert isinstance((await c.recv())[0], DATA)  # 255 s declined: no OACK
            assert (server.pending_transfers, server.active_transfers) == (6, 0)
            assert await real.fetch(server.address, "big") == (root / "big").read_bytes()
        finally:
            for c in [*forged, real]:
                c.close()


async def test_a_pending_request_is_dropped_after_answer_wait(root: Path, client: Client) -> None:
    async with _server(root, timeout=0.1, retries=100, answer_wait=0.4) as server:
        await client.send(RRQ("big", "octet"), server.address)
        await client.recv()
        assert server.pending_transfers == 1
        await asyncio.sleep(0.7)
        assert server.pending_transfers == 0


async def test_pending_requests_are_capped(root: Path) -> None:
    async with _server(root, max_pending=2, max_transfers_per_client=100) as server:
        clients = [Client() for _ in range(3)]
        try:
            for c in clients:
                await c.send(RRQ("big", "octet"), server.address)
            packet, _ = await clients[2].recv()
            assert isinstance(packet, ERROR) and "busy" in packet.message
        finally:
            for c in clients:
                c.close()


async def test_a_long_timeout_option_is_not_acknowledged(root: Path, client: Client) -> None:
    """RFC 2349 allows 1..255 s and an OACK must echo the value; above the server's cap the
    option is declined, so the transfer keeps the server's own short timeout."""
    async with _server(root) as server:
        options = (("timeout", "255"), ("tsize", "0"))
        await client.send(RRQ("small", "octet", options), server.address)
        oack, _ = await client.recv()
        assert oack == OACK((("tsize", "11"),))
        await client.send(RRQ("text", "octet", (("timeout", "5"),)), server.address)
        assert (await client.recv())[0] == OACK((("timeout", "5"),))


async def test_refusals_are_summarised_not_logged_each(
    root: Path, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hatchery")
    async with _server(root, request_burst=1000) as server:
        for _ in range(100):
            await client.send(RRQ("missing", "octet"), server.address)
            await client.recv()
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1


async def test_start_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a directory"):
        await TftpServer(tmp_path / "nope", "127.0.0.1", 0).start()
    async with _server(tmp_path) as server:
        with pytest.raises(Exception, match="cannot listen for TFTP"):
            await TftpServer(tmp_path, "127.0.0.1", server.address[1]).start()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:6969") == ("127.0.0.1", 6969)
    assert parse_listen("[::1]:69") == ("::1", 69)
    for bad in ("6969", "host:", ":69", "h:99999", "h:x"):
        with pytest.raises(Exception, match="expected HOST:PORT"):
            parse_listen(bad)


def test_registered_as_serve_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert "tftp" in agent_main.SERVE_COMMANDS
    with pytest.raises(SystemExit):
        agent_main.main(["serve", "tftp", "--help"])
    assert "--root" in capsys.readouterr().out


async def test_ipv6(root: Path) -> None:
    probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    finally:
        probe.close()
    async with TftpServer(root, "::1", 0) as server:
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        client.bind(("::1", 0))
        client.settimeout(5)
        try:
            client.sendto(RRQ("small", "octet").encode(), server.address)
            loop = asyncio.get_running_loop()
            data, tid = await loop.run_in_executor(None, client.recvfrom, 1000)
            assert decode(data) == DATA(1, b"hello tftp\n")
            client.sendto(ACK(1).encode(), tid)
            await asyncio.sleep(0.1)
            assert server.active_transfers == 0
        finally:
            client.close()
