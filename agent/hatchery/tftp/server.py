"""The read-only TFTP server: an asyncio listening socket, one ephemeral port per transfer.

RFC 1350 section 4: a request arrives on the well-known port; the server answers from a new
port (its TID) that carries the rest of the transfer, and packets from any other TID never
disturb the transfer: while the request is pending they are answered with error 5; once the
client has answered, the transfer's socket is connected to it (as tftpd-hpa's are), so the
kernel drops other sources' datagrams with an ICMP port unreachable, and the hot path saves
a route lookup and an address parse per packet each way. Write requests are refused (error 2):
this server only hands out boot files. Requests are parsed, checked and refused on the event
loop; an accepted transfer runs its socket in a worker thread (see ``_TransferPort`` for why).

Limits: concurrent transfers (in all and per client address), file size, and a token bucket
of requests per client address; requests over the bucket are dropped unanswered so a flood
costs nothing but the receive. A retransmitted RRQ for a transfer already under way is
ignored (the transfer retransmits by itself).

A request takes a transfer slot (and a worker thread) only once its client has answered the
first packet (the ACK of the OACK, or of block 1). Until then it is *pending*: driven on the
event loop, counted against its own small cap and the client address's cap, and dropped
after at most ``answer_wait`` seconds. A request's source address is not proof of anything
over UDP; forged RRQs (issue 14: 64 of them with ``timeout 255`` held every slot for
minutes) now hold only a pending place for seconds, never a slot of a real transfer, and a
client's ``timeout`` option above ``max_timeout`` is not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from hatchery import jail
from hatchery.errors import HatcheryError
from hatchery.log import EventSummary
from hatchery.metrics import Metrics, TftpMeter
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
_TIMEVAL = struct.Struct("@ll")
_RECEIVE_BUFFER = 65536  # anything a client sends a transfer port fits
#: An answer expected this soon is waited for awake, polling the socket, not asleep in
#: ``recv``: waking a blocked thread took ~50 µs on the 2-core VM this was measured on, most
#: of a lock-step block's round trip on a fast link (docs/netboot.md, "Serving a rack").
_SPIN_NS = 50_000
#: After an answer the spin missed, this many are waited for asleep before the next try: a
#: client further away than the spin costs a spin per this many packets, never one each.
_SPIN_BACKOFF = 64
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_UNKNOWN_TID = ERROR(ErrorCode.UNKNOWN_TID, "unknown transfer ID").encode()


class Refused(Exception):
    """A request the server answers with a TFTP ERROR packet (code and message)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The jail's refusals as TFTP error codes (RFC 1350, section 5).
_JAIL_CODES = {
    jail.Reason.NOT_FOUND: ErrorCode.FILE_NOT_FOUND,
    jail.Reason.FORBIDDEN: ErrorCode.ACCESS_VIOLATION,
    jail.Reason.FAILED: ErrorCode.NOT_DEFINED,
}


def open_boot_file(root: str, filename: str) -> jail.OpenedFile:
    """Open a boot loader's ``filename`` through the path jail shared with boot HTTP.

    Backslashes are path separators here (Windows PXE loaders send them), so ``..\\x`` is
    refused like ``../x``.
    """
    try:
        return jail.open_in_root(root, filename.replace("\\", "/"))
    except jail.Refused as exc:
        raise Refused(_JAIL_CODES[exc.reason], exc.message) from None


@dataclass(frozen=True, slots=True)
class TftpLimits:
    max_transfers: int = 64
    max_transfers_per_client: int = 8
    max_file_size: int = 4 << 30
    max_netascii_size: int = 16 << 20  # netascii files are converted in memory
    max_blksize: int = MAX_BLKSIZE
    max_windowsize: int = 64
    timeout: float = 1.0  # seconds before a retransmission, unless the client negotiates
    max_timeout: int = 5  # largest RFC 2349 timeout acknowledged (the RFC allows 255)
    retries: int = 5
    max_pending: int = 64  # requests whose client has not answered yet, in all
    answer_wait: float = 10.0  # seconds a pending request waits for its client's answer
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
    """One transfer's own socket (its TID), driven by a worker thread with blocking I/O.

    The listening socket is asyncio's; each accepted transfer gets a thread that blocks in
    ``recvfrom`` (with ``SO_RCVTIMEO`` as the retransmission timer) and answers straight from
    there. Lock-step TFTP is one round trip per block, and measured on loopback the event
    loop's per-wake-up work (epoll, dispatch, timer heap) cost a quarter of the throughput
    against tftpd-hpa; a blocked thread wakes straight into the ``recvfrom``, and with a
    core to spare it first polls for a quick answer (``_spin_receive``). The thread
    only holds the GIL between syscalls, and the server's tables are touched on the loop
    thread alone (``close`` there, ``_finished`` posted back with ``call_soon_threadsafe``).
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
        self.peer = peer
        self.name = name
        self._loop = server.loop
        self._gso = _GSO_SUPPORTED
        self._gso_cmsg: list[tuple[int, int, bytes]] = []
        self._gso_segment = 0
        self._stopping = threading.Event()
        self._forgotten = False
        self._connected = False  # to the peer, once the worker thread has the transfer
        self._started = time.monotonic()
        self.pending = True  # until the client answers; then a worker thread takes over
        self._timer: asyncio.TimerHandle | None = None
        self._answer_by = 0.0
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
        self.thread = threading.Thread(
            target=self._run, name=f"tftp {peer[0]}:{peer[1]} {name}", daemon=True
        )

    # -- pending, on the loop thread: until the client answers the first packet -------------

    def begin(self) -> None:
        """Send the first packet (OACK or DATA 1) and wait on the loop for the answer."""
        self._sock.setblocking(False)
        now = time.monotonic()
        self._answer_by = now + self._server.limits.answer_wait
        self.machine.start(now)
        self._loop.add_reader(self._sock.fileno(), self._readable)
        self._arm(now)

    def _arm(self, now: float) -> None:
        at = min(self.machine.deadline, self._answer_by)
        self._timer = self._loop.call_later(max(at - now, 0.0), self._tick)

    def _readable(self) -> None:
        buf = bytearray(_RECEIVE_BUFFER)
        view = memoryview(buf)
        while self.pending:
            try:
                size, addr = self._sock.recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("TFTP transfer of %s to %s: %s", self.name, self.peer[0], exc)
                continue
            if addr == self.peer:
                self.machine.on_datagram(view[:size], time.monotonic())
                if self.machine.finished:  # an error, or a one-block file already acked
                    self._end_pending()
                elif self.machine.answered:
                    self._server._promote(self)
            else:
                self._stray(view[:size], addr)

    def _tick(self) -> None:
        self._timer = None
        if not self.pending:
            return
        now = time.monotonic()
        if now >= self._answer_by:
            log.debug("TFTP request of %s from %s: no answer, dropped", self.name, self.peer[0])
            self._end_pending()
            return
        if now >= self.machine.deadline:
            self.machine.on_timeout(now)
            if self.machine.finished:
                log.debug("TFTP request of %s from %s: %s", self.name, self.peer[0],
                          self.machine.error)  # fmt: skip
                self._end_pending()
                return
        self._arm(now)

    def _leave_loop(self) -> None:
        self.pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())

    def _end_pending(self) -> None:
        """The request ends before it took a slot: no answer, an error, or all sent."""
        self._leave_loop()
        if self.machine.state is State.DONE:
            self._report()
        else:  # never answered, refused on promotion, or stopped: no slot was taken
            self._server.meter.ended("not_started", 0, self.machine.timeouts)
        self._sock.close()
        self.machine.source.close()
        self._finished()

    def open(self) -> None:
        """The client answered: hand the transfer to a worker thread (it holds a slot now)."""
        self._leave_loop()
        self._sock.setblocking(True)
        self._sock.connect(self.peer)
        self._connected = True
        self.thread.start()

    # -- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # a bug must not kill the agent: end this transfer, say why
            log.exception("TFTP transfer of %s to %s crashed", self.name, self.peer[0])
        finally:
            self._sock.close()
            self.machine.source.close()
            self._report()
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._finished)

    def _serve(self) -> None:
        sock, machine, peer = self._sock, self.machine, self.peer
        buf = bytearray(_RECEIVE_BUFFER)
        view = memoryview(buf)
        receive = sock.recv_into
        # What the hot path sends: a packet in lock-step, a batch of a window's packets else.
        send = sock.send if machine.windowsize == 1 else self._window_sender()
        clock = time.monotonic
        waiting = 0.0  # the SO_RCVTIMEO set now
        stopping = self._stopping.is_set
        server = self._server
        backoff = 0  # answers still to wait for asleep after a spin missed one
        while not machine.finished and not stopping():
            # The receive timeout is the retransmission timer: after an ACK it is the whole
            # timeout again (no syscall); after other traffic, only what is left of it.
            left = max(machine.deadline - clock(), 0.001)
            if abs(left - waiting) > 0.002:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
                waiting = left
            try:
                size = -2  # nothing received yet
                if backoff:
                    backoff -= 1
                elif server.active_transfers < _CPUS:  # a core to spare for spinning
                    size = _spin_receive(receive, buf)
                    if size == -2:
                        backoff = _SPIN_BACKOFF
                if size == -2:
                    size = receive(buf)
            except BlockingIOError:  # SO_RCVTIMEO ran out
                size = -1
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("TFTP transfer of %s to %s: %s", self.name, peer[0], exc)
                size = -1
            if size == 4 and buf[1] == OP_ACK and buf[0] == 0:  # the hot path
                block = (buf[2] << 8) | buf[3]
                if block == machine.release_on:
                    # What was built ahead (the next block, or the next window's first
                    # batch) goes out first, the bookkeeping after, while it is on its way:
                    # the round trip is the whole cost here.
                    try:
                        send(machine.next_packet)
                    except OSError as exc:  # as good as lost: the timeout resends it
                        log.debug("TFTP send to %s: %s", peer[0], exc)
                    machine.released(clock())
                else:
                    machine.on_ack(block, clock())
                continue  # the loop's test sees a stop before the next wait
            if stopping():  # close() shuts the socket down: the wait ends with nothing
                break
            now = clock()
            if size >= 0:
                machine.on_datagram(view[:size], now)
            if now >= machine.deadline:
                machine.on_timeout(now)

    def _stray(self, data: memoryview, addr: Address) -> None:
        # RFC 1350 section 4: answer a foreign TID with error 5, leave the transfer alone.
        try:
            packet = decode(data)
        except PacketError:
            return
        if not isinstance(packet, ERROR):
            with contextlib.suppress(OSError):
                self._sock.sendto(_UNKNOWN_TID, addr)

    def _send(self, packet: bytes | memoryview) -> None:
        try:
            if self._connected:
                self._sock.send(packet)
            else:
                self._sock.sendto(packet, self.peer)
        except OSError as exc:  # as good as lost: the timeout retransmits
            log.debug("TFTP send to %s: %s", self.peer[0], exc)

    def _send_batch(self, packets: memoryview, segment: int) -> None:
        """Datagrams of ``segment`` bytes laid end to end (the last may be shorter).

        With UDP GSO the kernel cuts them apart: one syscall for the lot. Without it (not
        Linux, no checksum offload, a block larger than the path MTU) each goes on its own.
        """
        if self._gso:
            if segment != self._gso_segment:
                self._gso_segment = segment
                self._gso_cmsg = [(_SOL_UDP, _UDP_SEGMENT, _U16_NATIVE.pack(segment))]
            try:
                if self._connected:
                    self._sock.sendmsg([packets], self._gso_cmsg)
                else:
                    self._sock.sendmsg([packets], self._gso_cmsg, 0, self.peer)
                return
            except OSError as exc:
                log.debug("UDP GSO unavailable towards %s: %s", self.peer[0], exc)
                self._gso = False
        for start in range(0, len(packets), segment):
            self._send(packets[start : start + segment])

    def _window_sender(self) -> Callable[[bytes | memoryview], object]:
        """The hot path's send in windowed mode, a batch of full-size segments: straight to
        ``sendmsg`` with UDP GSO (no call in between, the round trip waits on it), through
        ``_send_batch`` where GSO is off or fails (it then sends the packets one by one)."""
        segment = self.machine.blksize + 4
        cmsg = [(_SOL_UDP, _UDP_SEGMENT, _U16_NATIVE.pack(segment))]
        sendmsg = self._sock.sendmsg

        def send(packets: bytes | memoryview) -> None:
            if self._gso:
                try:
                    sendmsg([packets], cmsg)
                    return
                except OSError:
                    pass  # _send_batch tries once more and turns GSO off if it fails again
            self._send_batch(memoryview(packets), segment)

        return send

    def _report(self) -> None:
        machine = self.machine
        elapsed = time.monotonic() - self._started
        meter = self._server.meter
        if machine.state is State.DONE:
            size = machine.source.size
            meter.ended("done", size, machine.timeouts)
            log.info(
                "sent %s to %s: %d bytes in %.2f s (%.1f MB/s, %d timeouts)",
                self.name,
                self.peer[0],
                size,
                elapsed,
                size / elapsed / 1e6 if elapsed > 0 else 0.0,
                machine.timeouts,
            )
        else:
            why = machine.error or "stopped"
            log.info("transfer of %s to %s failed: %s", self.name, self.peer[0], why)
            meter.ended("failed", 0, machine.timeouts)

    # -- the loop thread -------------------------------------------------------------------------

    def _finished(self) -> None:
        if not self._forgotten:
            self._forgotten = True
            self._server._forget(self)

    def close(self) -> None:
        """Stop the transfer (on the loop thread): wake the worker, forget it now."""
        if self.pending:
            self._end_pending()
            return
        self._stopping.set()
        with contextlib.suppress(OSError):  # ENOTCONN on UDP, but the reader wakes anyway
            self._sock.shutdown(socket.SHUT_RDWR)
        self._finished()


def _spin_receive(receive: Callable[[bytearray, int, int], int], buf: bytearray) -> int:
    """Poll for a datagram for at most ``_SPIN_NS``; its size, or -2 if none came.

    Busy polling, as ``SO_BUSY_POLL`` does in the kernel for NICs that support it: on a
    fast link the client's answer comes sooner than a sleeping thread could be woken for
    it. Each try is a non-blocking ``recv``, which lets go of the GIL.
    """
    clock = time.perf_counter_ns
    end = clock() + _SPIN_NS
    while True:
        try:
            return receive(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if clock() > end:
                return -2


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return _TIMEVAL.pack(whole, int((seconds - whole) * 1e6))


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
        meter: TftpMeter | None = None,
    ) -> None:
        self.root = os.path.realpath(root)
        self.meter = meter or Metrics().tftp()
        self.host = host
        self.port = port
        self.limits = limits or TftpLimits()
        self._flood = _Flood(self.limits.requests_per_second, self.limits.request_burst)
        self._refusals = EventSummary(log, "tftp")
        self._listener: asyncio.DatagramTransport | None = None
        self._transfers: dict[tuple[Address, str], _TransferPort] = {}  # pending or running
        self._per_client: dict[str, int] = {}  # pending or running, per client address
        self._running = 0  # transfers holding a slot (their client answered)
        self._loop: asyncio.AbstractEventLoop | None = None
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
        """Transfers holding a slot: their client answered the first packet."""
        return self._running

    @property
    def pending_transfers(self) -> int:
        """Requests whose client has not answered the first packet yet."""
        return len(self._transfers) - self._running

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
        """Close the listener and abort transfers; returns once their threads are gone."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        ports = list(self._transfers.values())
        for port in ports:
            port.close()
        deadline = time.monotonic() + 10
        while any(p.thread.is_alive() for p in ports) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

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
            self.meter.request("refused_write")
            self._refuse(sendto, addr, ErrorCode.ACCESS_VIOLATION, "this server is read-only")
        elif isinstance(packet, RRQ):
            try:
                self._read_request(packet, addr)
            except Refused as exc:
                # Counted, not logged each: request sources are forgeable over UDP.
                log.debug("refused %r to %s: %s", packet.filename, host, exc.message)
                self._refusals.count(f"requests refused ({exc.code.name})", host)
                self.meter.request(f"refused_{exc.code.name.lower()}")
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
        if self._running >= limits.max_transfers or self.pending_transfers >= limits.max_pending:
            raise Refused(ErrorCode.NOT_DEFINED, "server busy: too many transfers")
        if self._per_client.get(host, 0) >= limits.max_transfers_per_client:
            raise Refused(ErrorCode.NOT_DEFINED, "too many transfers from this client")
        opened = open_boot_file(self.root, request.filename)
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
                max_timeout=limits.max_timeout,
            )
            sock = self._transfer_socket()
        except BaseException:
            source.close()
            raise
        port = _TransferPort(self, sock, addr, request.filename, source, settings)
        self._transfers[key] = port
        self._per_client[host] = self._per_client.get(host, 0) + 1
        port.begin()  # pending: no slot, no thread, until the client answers
        self.meter.request("accepted")

    def _promote(self, port: _TransferPort) -> None:
        """``port``'s client answered: give it a slot and a thread, or refuse if none is left."""
        if self._running >= self.limits.max_transfers:
            port.machine.abort(ErrorCode.NOT_DEFINED, "server busy: too many transfers")
            port._end_pending()
            return
        log.info(
            "RRQ %s from %s:%d, %d bytes, blksize %d, windowsize %d",
            port.name,
            port.peer[0],
            port.peer[1],
            port.machine.source.size,
            port.machine.blksize,
            port.machine.windowsize,
        )
        self._running += 1
        try:
            port.open()
        except RuntimeError as exc:  # no thread to be had
            log.warning("TFTP transfer of %s to %s: cannot start: %s", port.name, port.peer[0],
                        exc)  # fmt: skip
            self._running -= 1
            port.machine.abort(ErrorCode.NOT_DEFINED, "cannot start the transfer")
            port._end_pending()

    def _transfer_socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.bind((self.host, 0))  # the transfer's TID: a fresh ephemeral port
        except OSError as exc:
            sock.close()
            raise Refused(ErrorCode.NOT_DEFINED, f"cannot open a transfer port: {exc}") from exc
        return sock

    def _forget(self, port: _TransferPort) -> None:
        key = (port.peer, port.name)
        if self._transfers.get(key) is port:
            del self._transfers[key]
            if port.thread.is_alive() or port.thread.ident is not None:
                self._running -= 1
            host = str(port.peer[0])
            left = self._per_client.get(host, 1) - 1
            if left > 0:
                self._per_client[host] = left
            else:
                self._per_client.pop(host, None)
