"""The DHCP transport: one UDP socket on port 67 bound to one interface (and 4011 too in
proxy mode, ``ProxyDhcpServer``); it only moves bytes.

Decoding, deciding and addressing are elsewhere (packet, responder, ``destination``); this
module opens the socket (SO_BINDTODEVICE so several bridges can each have a server, and
SO_BROADCAST for replies to clients without an address), and never lets a bad datagram or a
bug in the responder stop the service.

A reply that follows a change of the birth leases is sent only once the leases are on disk
(a node must not be told an address the server could forget); that write runs in a worker
thread, one at a time and in order, so the event loop never waits for an fsync. Any reply
decided while such a write is pending waits behind it.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from hatchery.dhcp.leases import RangeLeases
from hatchery.dhcp.packet import DecodeError, DhcpPacket
from hatchery.dhcp.proxy import PXE_PORT, ProxyResponder, gives_no_address
from hatchery.dhcp.responder import Responder, client_kind, destination
from hatchery.errors import HatcheryError
from hatchery.metrics import DhcpMeter, Metrics

log = logging.getLogger(__name__)

SERVER_PORT = 67
_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


class DhcpServerError(HatcheryError):
    """The DHCP service cannot start (no such interface, port taken, no permission)."""


def interface_ipv4(interface: str) -> ipaddress.IPv4Interface:
    """The primary IPv4 address and prefix of ``interface`` (SIOCGIFADDR/SIOCGIFNETMASK)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16s16x", interface.encode()[:15])
        try:
            addr = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24]
            mask = fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, req)[20:24]
        except OSError as exc:
            raise DhcpServerError(
                f"interface {interface} has no IPv4 address: {exc.strerror}",
                hint="give the boot interface an address, or pass --server-ip",
            ) from exc
    return ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(addr)}/{ipaddress.IPv4Address(mask)}")


def open_socket(interface: str, port: int = SERVER_PORT) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise DhcpServerError(
            f"cannot listen for DHCP on {interface} port {port}: {exc.strerror}",
            hint="is the interface there, are we root, does another DHCP server run there?",
        ) from exc
    return sock


class LeaseWrites:
    """Replies that must follow their lease onto disk, for both DHCP servers (IPv4 and v6).

    A reply decided after a change of ``leases`` (or while an earlier write is pending) is
    sent by ``after_write``: the write runs in a worker thread, one at a time and in the
    order the changes were made, and the reply goes out once it is done. If the write fails,
    the leases are marked unsaved again (a later write retries) and ``failed`` is called
    instead of ``send``: the client, unanswered, retries.
    """

    def __init__(self, leases: RangeLeases[Any]) -> None:
        self.leases = leases
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> bool:
        """Whether a reply now must wait: the leases changed, or a write is under way."""
        return self.leases.unsaved or bool(self._tasks)

    def after_write(
        self, send: Callable[[], None], failed: Callable[[Exception], None], name: str
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._write_then(send, failed), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_then(
        self, send: Callable[[], None], failed: Callable[[Exception], None]
    ) -> None:
        async with self._lock:  # FIFO: writes land in the order the changes were made
            write = self.leases.take_write()  # None: an earlier write covered this change
            if write is not None:
                try:
                    await asyncio.to_thread(write)
                except (HatcheryError, OSError) as exc:
                    self.leases.changed_again()
                    failed(exc)
                    return
        send()

    def cancel(self) -> None:
        """Drop the replies still waiting (the clients retry); the writes finish."""
        for task in list(self._tasks):
            task.cancel()


class CountingProtocol(asyncio.DatagramProtocol):
    """What the DHCP protocols (v4, proxy, v6) share: the transport, the meter and the
    counts; a malformed datagram is counted, logged at DEBUG and dropped (anyone can send
    one)."""

    def __init__(self, clock: Callable[[], float], meter: DhcpMeter | None) -> None:
        self.clock = clock
        self.meter = meter or Metrics().dhcp("")
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0
        self.malformed = 0  # not DHCP: dropped without a reply
        self.failed = 0  # the responder raised: a bug, logged with its traceback

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def _malformed(self, data: bytes, source: str, exc: Exception) -> None:
        self.malformed += 1
        self.meter.received("unknown", "malformed")
        log.debug("dropped %d bytes from %s: %s", len(data), source, exc)

    def _decode(self, data: bytes, addr: tuple[str, int]) -> DhcpPacket | None:
        try:
            return DhcpPacket.decode(data)
        except DecodeError as exc:
            self._malformed(data, f"{addr[0]}:{addr[1]}", exc)
            return None

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error: %s", exc)


class DhcpProtocol(CountingProtocol):
    """Every datagram is counted once in ``meter`` (type, outcome: answered, ignored,
    malformed, failed, unsaved, unsent); the attributes below are the same counts in total."""

    def __init__(
        self,
        responder: Responder,
        clock: Callable[[], float] = time.time,
        meter: DhcpMeter | None = None,
    ) -> None:
        super().__init__(clock, meter)
        self.responder = responder
        self.unsaved = 0  # the leases could not be written: the reply was not sent
        births = responder.births
        self._writes = LeaseWrites(births) if births is not None else None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = self._decode(data, addr)
        if request is None:
            return
        try:
            reply = self.responder.handle(request, self.clock())
        except Exception:  # a bug must not take the service down; say so loudly
            self.failed += 1
            self.meter.received(request.message_type.name, "failed")
            log.exception("responder failed on a %s from %s", request.message_type.name,
                          request.mac)  # fmt: skip
            return
        if self._writes is not None and self._writes.pending:
            self._writes.after_write(
                lambda: self._send(request, reply, data),
                lambda exc: self._unsaved(request, exc),
                name=f"dhcp-save-{request.mac}",
            )
            return
        self._send(request, reply, data)

    def _unsaved(self, request: DhcpPacket, exc: Exception) -> None:
        self.unsaved += 1
        self.meter.received(request.message_type.name, "unsaved")
        log.error("cannot save the birth leases, %s not answered: %s", request.mac, exc)

    def _send(self, request: DhcpPacket, reply: DhcpPacket | None, data: bytes) -> None:
        if reply is None or self.transport is None:
            self.meter.received(request.message_type.name, "ignored")
            return
        dest = destination(request, reply)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s (%s) -> %s %s %s file=%r", request.message_type.name, request.mac,
                      client_kind(request), reply.message_type.name, reply.yiaddr, dest[0],
                      reply.bootfile.decode(errors="replace"))  # fmt: skip
            log.debug("request bytes %s", data.hex())
        try:
            self.transport.sendto(reply.encode(), dest)
            self.answered += 1
        except OSError as exc:
            log.warning("cannot send to %s: %s", dest[0], exc)
            self.meter.received(request.message_type.name, "unsent")
            return
        self.meter.received(request.message_type.name, "answered")
        self.meter.replied(reply.message_type.name, client_kind(request).value)

    def drop_pending(self) -> None:
        if self._writes is not None:
            self._writes.cancel()


class DhcpServer:
    """A started DHCP service on one interface; ``stop`` is idempotent."""

    def __init__(
        self,
        interface: str,
        responder: Responder,
        port: int = SERVER_PORT,
        metrics: Metrics | None = None,
    ) -> None:
        self.interface, self.responder, self.port = interface, responder, port
        self.meter = (metrics or Metrics()).dhcp(interface)
        self._transport: asyncio.DatagramTransport | None = None
        self.protocol: DhcpProtocol | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = open_socket(self.interface, self.port)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: DhcpProtocol(self.responder, meter=self.meter), sock=sock
        )
        self._transport, self.protocol = transport, protocol
        log.info("dhcp: serving on %s port %d as %s", self.interface, self.port,
                 self.responder.config.server_ip)  # fmt: skip

    def stop(self) -> None:
        """Close the socket; replies still waiting for their lease write are dropped (the
        clients retry), the writes themselves finish in their threads."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self.protocol is not None:
            self.protocol.drop_pending()


class ProxyProtocol(CountingProtocol):
    """One proxyDHCP socket (port 67 or 4011): decode, ask the responder, send.

    Replies go where ``destination`` says on port 67 (a proxy OFFER is broadcast to a client
    that has no address yet), and back to the request's source on 4011 (PXE 2.1 2.2.5: the
    client sends from its new address and waits for the answer from port 4011). Whatever
    the responder returns, a reply that would give an address is not sent (``refused``):
    proxy mode must never compete with the site's DHCP server.
    """

    def __init__(
        self,
        responder: ProxyResponder,
        port: int,
        clock: Callable[[], float] = time.time,
        meter: DhcpMeter | None = None,
    ) -> None:
        super().__init__(clock, meter)
        self.responder, self.port = responder, port
        self.refused = 0  # replies that would have given an address: never sent

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = self._decode(data, addr)
        if request is None:
            return
        kind = request.message_type.name
        try:
            if self.port == PXE_PORT:
                source = ipaddress.IPv4Address(addr[0])
                reply = self.responder.request(request, source, self.clock())
                dest = addr
            else:
                reply = self.responder.discover(request, self.clock())
                dest = destination(request, reply) if reply is not None else addr
        except Exception:  # a bug must not take the service down; say so loudly
            self.failed += 1
            self.meter.received(kind, "failed")
            log.exception("proxy responder failed on a %s from %s", request.message_type.name,
                          request.mac)  # fmt: skip
            return
        if reply is None or self.transport is None:
            self.meter.received(kind, "ignored")
            return
        if not gives_no_address(reply):
            self.refused += 1
            self.meter.received(kind, "refused")
            log.error("proxy: a reply to %s would give an address: not sent", request.mac)
            return
        log.debug("%s %s (%s) on %d -> %s yiaddr=%s to %s:%d file=%r",
                  request.message_type.name, request.mac, client_kind(request), self.port,
                  reply.message_type.name, reply.yiaddr, dest[0], dest[1],
                  reply.bootfile.decode(errors="replace"))  # fmt: skip
        try:
            self.transport.sendto(reply.encode(), dest)
            self.answered += 1
        except OSError as exc:
            log.warning("cannot send to %s: %s", dest[0], exc)
            self.meter.received(kind, "unsent")
            return
        self.meter.received(kind, "answered")
        self.meter.replied(reply.message_type.name, client_kind(request).value)


class ProxyDhcpServer:
    """The proxyDHCP service on one interface: UDP 67 and 4011; ``stop`` is idempotent."""

    def __init__(
        self, interface: str, responder: ProxyResponder, port: int = SERVER_PORT,
        pxe_port: int = PXE_PORT, metrics: Metrics | None = None,
    ) -> None:  # fmt: skip
        self.interface, self.responder = interface, responder
        self.meter = (metrics or Metrics()).dhcp(interface)
        self.ports = (port, pxe_port)
        self._transports: list[asyncio.DatagramTransport] = []
        self.protocols: list[ProxyProtocol] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for port in self.ports:
                sock = open_socket(self.interface, port)
                transport, protocol = await loop.create_datagram_endpoint(
                    lambda port=port: ProxyProtocol(  # type: ignore[misc]
                        self.responder, port, meter=self.meter
                    ),
                    sock=sock,
                )
                self._transports.append(transport)
                self.protocols.append(protocol)
        except BaseException:
            self.stop()
            raise
        log.info("dhcp: proxyDHCP on %s ports %d and %d as %s (no addresses given)",
                 self.interface, *self.ports, self.responder.config.server_ip)  # fmt: skip

    def stop(self) -> None:
        while self._transports:
            self._transports.pop().close()
