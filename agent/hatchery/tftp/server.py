"""The read-only TFTP server on asyncio: one listening socket, one ephemeral port per transfer.

RFC 1350 section 4: a request arrives on the well-known port; the server answers from a new
port (its TID) that carries the rest of the transfer, and packets from any other TID are
refused with error 5 without disturbing the transfer. Write requests are refused (error 2):
this server only hands out boot files.

Limits: concurrent transfers (in all and per client address), file size, and a token bucket
of requests per client address; requests over the bucket are dropped unanswered so a flood
costs nothing but the receive. A retransmitted RRQ for a transfer already under way is
ignored (the transfer retransmits by itself).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from hatchery.errors import HatcheryError
from hatchery.tftp.jail import Refused, open_in_root
from hatchery.tftp.packet import (
    ERROR,
    MAX_BLKSIZE,
    OP_ACK,
    RRQ,
    WRQ,
    ErrorCode,
    PacketError,
    decode,
)
from hatchery.tftp.transfer import (
    BytesSource,
    FileSource,
    Negotiated,
    ReadTransfer,
    Source,
    SourceError,
    State,
    negotiate,
    to_netascii,
)

log = logging.getLogger("hatchery.tftp")

Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)

_SOCKET_BUFFER = 1 << 20  # room for a whole window of large blocks
# UDP generic segmentation offload (Linux >= 4.18): send many datagrams in one sendmsg.
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_SUPPORTED = sys.platform == "linux"
_U16_NATIVE = struct.Struct("=H")
_RECEIVE_BUFFER = 65536  # anything a client sends a transfer port fits
_UNKNOWN_TID = ERROR(ErrorCode.UNKNOWN_TID, "unknown transfer ID").encode()


@dataclass(frozen=True, slots=True)
class TftpLimits:
    max_transfers: int = 64
    max_transfers_per_client: int = 8
    max_file_size: int = 4 << 30
    max_netascii_size: int = 16 << 20  # netascii files are converted in memory
    max_blksize: int = MAX_BLKSIZE
    max_windowsize: int = 64
    timeout: float = 1.0  # seconds before a retransmission, unless the client negotiates
    retries: int = 5
    requests_per_second: float = 20.0  # per client address, sustained
    request_burst: int = 40  # per client address, at once


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class _Flood:
    """Token buckets of requests per client address, bounded in memory."""

    _MAX_CLIENTS = 4096

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, host: str, now: float) -> bool:
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self._MAX_CLIENTS:
                self._prune(now)
            bucket = self._buckets[host] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate if self.rate > 0 else 0.0
        for host, bucket in list(self._buckets.items()):
            if now - bucket.stamp >= full:
                del self._buckets[host]
        if len(self._buckets) >= self._MAX_CLIENTS:  # a spoofed flood: forget them all
            self._buckets.clear()


class _ListenProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: TftpServer) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            self._server.handle_request(data, addr, transport.sendto)
        except Exception:  # a bug must not stop the server: log it, keep listening
            log.exception("TFTP request from %s failed", addr[0])

    def error_received(self, exc: Exception) -> None:
        log.debug("TFTP listening socket: %s", exc)


class _TransferPort:
    """One transfer's own socket (its TID): peer check, sends, timer and clean-up.

    Driven by ``loop.add_reader`` on a non-blocking socket rather than a datagram
    transport: asyncio's transport receives into a fresh 256 KiB buffer per datagram, which
    glibc serves with mmap/mremap/munmap -- three extra syscalls per ACK, a third of the
    lock-step budget. Here ACKs land in one preallocated buffer.
    """

    def __init__(
        self,
        server: TftpServer,
        sock: socket.socket,
        peer: Address,
        name: str,
        source: Source,
        settings: Negotiated,
    ) -> None:
        self._server = server
        self._sock = sock
        self._fd = sock.fileno()
        self.peer = peer
        self.name = name
        self._loop = server.loop
        # One receive buffer for all transfers: each datagram is consumed before the next.
        self._buf = server._receive_buffer
        self._view = memoryview(self._buf)
        self._queue: collections.deque[bytes] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._gso = _GSO_SUPPORTED
        self._gso_cmsg: list[tuple[int, int, bytes]] = []
        self._gso_segment = 0
        self._closed = False
        self._started = time.monotonic()
        self.machine = ReadTransfer(
            source,
            self._send,
            send_batch=self._send_batch,
            blksize=settings.blksize,
            windowsize=settings.windowsize,
            timeout=settings.timeout,
            retries=server.limits.retries,
            oack=settings.oack,
        )

    def open(self) -> None:
        self._loop.add_reader(self._fd, self._readable)
        self.machine.start(self._loop.time())
        self._settle()

    # -- receiving ---------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            size, addr = self._sock.recvfrom_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. an ICMP error queued on the socket
            log.debug("TFTP transfer of %s to %s: %s", self.name, self.peer[0], exc)
            return
        if addr != self.peer:
            self._stray(self._view[:size], addr)
            return
        machine = self.machine
        buf = self._buf
        if size == 4 and buf[1] == OP_ACK and buf[0] == 0:  # the hot path
            machine.on_ack((buf[2] << 8) | buf[3], self._loop.time())
        else:
            machine.on_datagram(self._view[:size], self._loop.time())
        if machine.finished or self._timer is None:
            self._settle()

    def _stray(self, data: memoryview, addr: Address) -> None:
        # RFC 1350 section 4: answer a foreign TID with error 5, leave the transfer alone.
        try:
            packet = decode(data)
        except PacketError:
            return
        if not isinstance(packet, ERROR):
            with contextlib.suppress(OSError):
                self._sock.sendto(_UNKNOWN_TID, addr)

    # -- sending -----------------------------------------------------------------------------

    def _send(self, packet: bytes | memoryview) -> None:
        if not self._queue:
            try:
                self._sock.sendto(packet, self.peer)
                return
            except BlockingIOError:
                self._loop.add_writer(self._fd, self._writable)
            except OSError as exc:  # as good as lost: the timeout retransmits
                log.debug("TFTP send to %s: %s", self.peer[0], exc)
                return
        self._queue.append(bytes(packet))

    def _writable(self) -> None:
        queue = self._queue
        while queue:
            try:
                self._sock.sendto(queue[0], self.peer)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("TFTP send to %s: %s", self.peer[0], exc)
            queue.popleft()
        self._loop.remove_writer(self._fd)

    def _send_batch(self, packets: memoryview, segment: int) -> None:
        """Datagrams of ``segment`` bytes laid end to end (the last may be shorter).

        With UDP GSO the kernel cuts them apart: one syscall for the lot. Without it (not
        Linux, no checksum offload, a block larger than the path MTU) or while sends are
        queued (order!), each goes out on its own.
        """
        if self._gso and not self._queue:
            if segment != self._gso_segment:
                self._gso_segment = segment
                self._gso_cmsg = [(_SOL_UDP, _UDP_SEGMENT, _U16_NATIVE.pack(segment))]
            try:
                self._sock.sendmsg([packets], self._gso_cmsg, 0, self.peer)
                return
            except BlockingIOError:
                pass  # the send buffer is full: queue them one by one
            except OSError as exc:
                log.debug("UDP GSO unavailable towards %s: %s", self.peer[0], exc)
                self._gso = False
        for start in range(0, len(packets), segment):
            self._send(packets[start : start + segment])

    # -- time and the end ----------------------------------------------------------------------

    def _settle(self) -> None:
        """Close when finished, else make sure a timer is armed for the machine's deadline."""
        if self.machine.finished:
            self.close()
        elif self._timer is None and not self._closed:
            self._timer = self._loop.call_at(self.machine.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        machine = self.machine
        now = self._loop.time()
        if not machine.finished and now >= machine.deadline:  # else an ACK moved it: sleep on
            machine.on_timeout(now)
        self._settle()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.remove_reader(self._fd)
        if self._queue:
            self._loop.remove_writer(self._fd)
            self._queue.clear()
        self._sock.close()
        self._server._forget(self)
        machine = self.machine
        machine.source.close()
        elapsed = time.monotonic() - self._started
        if machine.state is State.DONE:
            size = machine.source.size
            log.info(
                "sent %s to %s: %d bytes in %.2f s (%.1f MB/s)",
                self.name,
                self.peer[0],
                size,
                elapsed,
                size / elapsed / 1e6 if elapsed > 0 else 0.0,
            )
        else:
            why = machine.error or "stopped"
            log.info("transfer of %s to %s failed: %s", self.name, self.peer[0], why)


class TftpServer:
    """Serves the files below ``root`` read-only over TFTP on ``host``:``port``.

    ``await start()`` binds (port 0 picks a free one; see ``address``), ``await stop()``
    closes the listener and aborts transfers; also an async context manager.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        host: str = "0.0.0.0",
        port: int = 69,
        limits: TftpLimits | None = None,
    ) -> None:
        self.root = os.path.realpath(root)
        self.host = host
        self.port = port
        self.limits = limits or TftpLimits()
        self._flood = _Flood(self.limits.requests_per_second, self.limits.request_burst)
        self._listener: asyncio.DatagramTransport | None = None
        self._transfers: dict[tuple[Address, str], _TransferPort] = {}
        self._per_client: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receive_buffer = bytearray(_RECEIVE_BUFFER)
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            return self.host, self.port
        sockname = self._listener.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the TFTP server is not started")
        return self._loop

    @property
    def active_transfers(self) -> int:
        return len(self._transfers)

    async def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("the TFTP server is already started")
        if not Path(self.root).is_dir():
            raise HatcheryError(f"cannot serve TFTP: {self.root} is not a directory")
        loop = self._loop = asyncio.get_running_loop()
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise HatcheryError(
                f"cannot listen for TFTP on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        sock.setblocking(False)
        self._listener, _ = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(self), sock=sock
        )
        host, port = self.address
        log.info("TFTP serving %s on %s:%d", self.root, host, port)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for transfer in list(self._transfers.values()):
            transfer.close()

    async def __aenter__(self) -> TftpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests on the listening port ----------------------------------------------------

    def handle_request(self, data: bytes, addr: Address, sendto: Any) -> None:
        """One datagram on the listening port; answers (if at all) through ``sendto``."""
        host = str(addr[0])
        if not self._flood.allow(host, time.monotonic()):
            return
        try:
            packet = decode(data)
        except PacketError as exc:
            log.debug("ignoring garbage from %s: %s", host, exc)
            return
        if isinstance(packet, WRQ):
            self._refuse(sendto, addr, ErrorCode.ACCESS_VIOLATION, "this server is read-only")
        elif isinstance(packet, RRQ):
            try:
                self._read_request(packet, addr)
            except Refused as exc:
                log.info("refused %r to %s: %s", packet.filename, host, exc.message)
                self._refuse(sendto, addr, exc.code, exc.message)
        # Anything else on the listening port belongs to no transfer: dropped unanswered.

    @staticmethod
    def _refuse(sendto: Any, addr: Address, code: ErrorCode, message: str) -> None:
        sendto(ERROR(code, message).encode(), addr)

    def _read_request(self, request: RRQ, addr: Address) -> None:
        key = (addr, request.filename)
        if key in self._transfers:
            return  # a retransmitted RRQ: the transfer under way answers it
        if request.mode not in ("octet", "netascii"):
            raise Refused(ErrorCode.ILLEGAL_OPERATION, f"mode {request.mode!r} not supported")
        host = str(addr[0])
        limits = self.limits
        if len(self._transfers) >= limits.max_transfers:
            raise Refused(ErrorCode.NOT_DEFINED, "server busy: too many transfers")
        if self._per_client.get(host, 0) >= limits.max_transfers_per_client:
            raise Refused(ErrorCode.NOT_DEFINED, "too many transfers from this client")
        opened = open_in_root(self.root, request.filename)
        source: Source = FileSource(opened.fd, opened.size)
        try:
            if opened.size > limits.max_file_size:
                raise Refused(ErrorCode.NOT_DEFINED, "file exceeds the server's size limit")
            if request.mode == "netascii":
                if opened.size > limits.max_netascii_size:
                    raise Refused(ErrorCode.NOT_DEFINED, "file too large for netascii mode")
                try:
                    text = source.read(0, opened.size).tobytes() if opened.size else b""
                except SourceError as exc:
                    raise Refused(ErrorCode.NOT_DEFINED, str(exc)) from None
                source.close()
                source = BytesSource(to_netascii(text))
            settings = negotiate(
                request.options,
                size=source.size,
                max_blksize=limits.max_blksize,
                max_windowsize=limits.max_windowsize,
                default_timeout=limits.timeout,
            )
            sock = self._transfer_socket()
        except BaseException:
            source.close()
            raise
        port = _TransferPort(self, sock, addr, request.filename, source, settings)
        self._transfers[key] = port
        self._per_client[host] = self._per_client.get(host, 0) + 1
        log.info(
            "RRQ %s from %s:%d, %d bytes, blksize %d, windowsize %d",
            request.filename,
            host,
            addr[1],
            source.size,
            settings.blksize,
            settings.windowsize,
        )
        port.open()

    def _transfer_socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.bind((self.host, 0))  # the transfer's TID: a fresh ephemeral port
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise Refused(ErrorCode.NOT_DEFINED, f"cannot open a transfer port: {exc}") from exc
        return sock

    def _forget(self, port: _TransferPort) -> None:
        key = (port.peer, port.name)
        if self._transfers.get(key) is port:
            del self._transfers[key]
            host = str(port.peer[0])
            left = self._per_client.get(host, 1) - 1
            if left > 0:
                self._per_client[host] = left
            else:
                self._per_client.pop(host, None)
