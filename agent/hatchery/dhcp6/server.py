"""The DHCPv6 transport: one UDP socket on port 547 of one interface, joined to
All_DHCP_Relay_Agents_and_Servers (ff02::1:2, RFC 8415 section 7.1); it only moves bytes.

Who can reach it: anything on the boot link (the group is link-scoped and the socket is
bound to the bridge with SO_BINDTODEVICE; VM ports cannot, the bridge rules drop their
DHCPv6 server traffic). Every datagram is hostile: it is decoded (at most ``MAX_SIZE``
bytes, ``DecodeError`` counted and dropped), answered only when the source is a link-local
address (section 13.1: clients send from their link-local address; nothing relayed or
routed is served), and a reply goes back to the source on port 546. As for DHCPv4
(``dhcp/server.py``), a reply that follows a change of the birth leases is sent only once
the leases are on disk, written in a worker thread, one at a time and in order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from hatchery.dhcp.server import CountingProtocol, LeaseWrites
from hatchery.dhcp6.packet import ALL_SERVERS, CLIENT_PORT, SERVER_PORT, DecodeError, Dhcp6Packet
from hatchery.dhcp6.responder import Responder6, client_kind
from hatchery.errors import HatcheryError
from hatchery.metrics import DhcpMeter, Metrics

log = logging.getLogger(__name__)


class Dhcp6ServerError(HatcheryError):
    """The DHCPv6 service cannot start (no such interface, port taken, no permission)."""


IF_INET6 = Path("/proc/net/if_inet6")
_TENTATIVE = 0x40  # IFA_F_TENTATIVE: duplicate address detection still running


def interface_ipv6(
    interface: str, prefix: ipaddress.IPv6Network, table: Path = IF_INET6
) -> ipaddress.IPv6Address:
    """The address of ``interface`` inside ``prefix`` (read from ``/proc/net/if_inet6``:
    address, index, prefix length, scope, flags, name); the lowest if several.

    :raise Dhcp6ServerError: none there, or only tentative ones (DAD not finished).
    """
    found: list[ipaddress.IPv6Address] = []
    tentative: list[ipaddress.IPv6Address] = []
    try:
        lines = table.read_text().splitlines()
    except OSError as exc:
        raise Dhcp6ServerError(f"cannot read {table}: {exc.strerror} (IPv6 off?)") from exc
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or fields[5] != interface:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        if address in prefix:
            (tentative if int(fields[4], 16) & _TENTATIVE else found).append(address)
    if found:
        return min(found)
    why = "only a tentative one (DAD)" if tentative else "none"
    raise Dhcp6ServerError(
        f"{interface} has no usable IPv6 address in {prefix}: {why}",
        hint=f"give {interface} an address in boot.ipv6.prefix ({prefix[1]}/{prefix.prefixlen})",
    )


async def wait_for_ipv6(
    interface: str, prefix: ipaddress.IPv6Network, timeout: float = 10.0
) -> ipaddress.IPv6Address:
    """``interface_ipv6``, waiting up to ``timeout`` seconds for duplicate address detection
    to finish (an agent started at boot may find its address still tentative).

    :raise Dhcp6ServerError: no usable address by then.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return interface_ipv6(interface, prefix)
        except Dhcp6ServerError:
            if loop.time() >= deadline:
                raise
        await asyncio.sleep(0.2)


def open_socket(interface: str, port: int = SERVER_PORT) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        index = socket.if_nametoindex(interface)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        mreq = socket.inet_pton(socket.AF_INET6, ALL_SERVERS) + struct.pack("@I", index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        sock.bind(("::", port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise Dhcp6ServerError(
            f"cannot listen for DHCPv6 on {interface} port {port}: {exc.strerror or exc}",
            hint="is the interface there with IPv6 on, are we root, does another DHCPv6 "
            "server run there?",
        ) from exc
    return sock


class Dhcp6Protocol(CountingProtocol):
    """Every datagram is counted once in ``meter`` (type, outcome: answered, ignored,
    malformed, failed, unsaved, unsent); the attributes below are the same counts in total."""

    def __init__(
        self,
        responder: Responder6,
        clock: Callable[[], float] = time.time,
        meter: DhcpMeter | None = None,
    ) -> None:
        super().__init__(clock, meter)
        self.responder = responder
        self.unsaved = 0  # the leases could not be written: the reply was not sent
        self._writes = LeaseWrites(responder.births)

    def datagram_received(self, data: bytes, addr: tuple[str, int, int, int]) -> None:
        try:
            source = ipaddress.IPv6Address(addr[0].split("%")[0])
            request = Dhcp6Packet.decode(data)
        except (DecodeError, ValueError) as exc:
            self._malformed(data, addr[0], exc)
            return
        kind = request.msg_type.name
        if not source.is_link_local:
            self.meter.received(kind, "ignored")
            log.debug("dropped a %s from %s: not link-local", kind, source)
            return
        try:
            reply = self.responder.handle(request, source, self.clock())
        except Exception:  # a bug must not take the service down; say so loudly
            self.failed += 1
            self.meter.received(kind, "failed")
            log.exception("dhcp6 responder failed on a %s from %s", kind, source)
            return
        dest = (str(source), CLIENT_PORT, 0, addr[3])
        if self._writes.pending:
            self._writes.after_write(
                lambda: self._send(request, reply, dest, data),
                lambda exc: self._unsaved(request, source, exc),
                name=f"dhcp6-save-{source}",
            )
            return
        self._send(request, reply, dest, data)

    def _unsaved(self, request: Dhcp6Packet, source: ipaddress.IPv6Address, exc: Exception) -> None:
        self.unsaved += 1
        self.meter.received(request.msg_type.name, "unsaved")
        log.error("cannot save the IPv6 birth leases, %s not answered: %s", source, exc)

    def _send(
        self, request: Dhcp6Packet, reply: Dhcp6Packet | None,
        dest: tuple[str, int, int, int], data: bytes,
    ) -> None:  # fmt: skip
        kind = request.msg_type.name
        if reply is None or self.transport is None:
            self.meter.received(kind, "ignored")
            log.debug("%s from %s (%s): no answer", kind, dest[0], client_kind(request))
            return
        if log.isEnabledFor(logging.DEBUG):
            addresses = [str(a.address) for ia in reply.ia_na for a in ia.addresses]
            log.debug("%s from %s (%s) -> %s %s url=%r", kind, dest[0], client_kind(request),
                      reply.msg_type.name, ",".join(addresses) or "-",
                      reply.boot_file_url)  # fmt: skip
            log.debug("request bytes %s", data.hex())
        try:
            self.transport.sendto(reply.encode(), dest)
            self.answered += 1
        except OSError as exc:
            log.warning("cannot send to %s: %s", dest[0], exc)
            self.meter.received(kind, "unsent")
            return
        self.meter.received(kind, "answered")
        self.meter.replied(reply.msg_type.name, client_kind(request).value)

    def drop_pending(self) -> None:
        self._writes.cancel()


class Dhcp6Server:
    """A started DHCPv6 service on one interface; ``stop`` is idempotent."""

    def __init__(
        self, interface: str, responder: Responder6, port: int = SERVER_PORT,
        metrics: Metrics | None = None,
    ) -> None:  # fmt: skip
        self.interface, self.responder, self.port = interface, responder, port
        self.meter = (metrics or Metrics()).dhcp(interface)
        self._transport: asyncio.DatagramTransport | None = None
        self.protocol: Dhcp6Protocol | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = open_socket(self.interface, self.port)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: Dhcp6Protocol(self.responder, meter=self.meter), sock=sock
        )
        self._transport, self.protocol = transport, protocol
        births = self.responder.births
        log.info("dhcp6: serving on %s port %d, births %s-%s", self.interface, self.port,
                 births.start, births.end)  # fmt: skip

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self.protocol is not None:
            self.protocol.drop_pending()
