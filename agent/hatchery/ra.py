"""An IPv6 router advertisement responder: by default it says "no prefix, no default
router, no DHCPv6"; for IPv6 births it says "take your address from DHCPv6" (``Managed``).

iPXE waits about 13 s for IPv6 configuration on a link where nothing advertises; a single RA
with the M and O flags clear ends that wait at once (iPXE treats it as "IPv6 configuration
done"). We answer router solicitations (RFC 4861 section 6.2.6) and also advertise now and
then (section 6.2.4), with router lifetime 0 so no host takes us as its default router
(section 4.2) and no prefix option so no host configures an address from us.

In IPv6 birth mode (``Managed``) the RA sets M=1 and O=1 (section 4.2: addresses and other
configuration from DHCPv6, RFC 8415) and carries the birth range's prefix as on-link (L=1)
but not for autonomous configuration (A=0, section 4.6.2), so hosts take the address our
DHCPv6 server gives, and know the boot server is on the link. The router lifetime stays 0
unless the operator says this node routes for the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from hatchery.errors import HatcheryError
from hatchery.netdev import interface_mac

log = logging.getLogger(__name__)

ICMPV6_RS = 133
ICMPV6_RA = 134
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"


class RaError(HatcheryError):
    """The RA responder cannot start."""


FLAG_MANAGED = 0x80  # RFC 4861 4.2: M, addresses from DHCPv6
FLAG_OTHER = 0x40  # O, other configuration from DHCPv6
PREFIX_ON_LINK = 0x80  # 4.6.2: L
PREFIX_AUTONOMOUS = 0x40  # 4.6.2: A (never set here: addresses come from DHCPv6)
OPT_SOURCE_LL = 1
OPT_PREFIX_INFO = 3


@dataclass(frozen=True, slots=True)
class Managed:
    """IPv6 birth mode: M=1, O=1, ``prefix`` on-link without autonomous configuration;
    ``router_lifetime`` seconds (0: we are no default router) and the prefix's lifetimes."""

    prefix: ipaddress.IPv6Network
    router_lifetime: int = 0
    prefix_lifetime: int = 3600


def build_router_advertisement(
    mac: bytes, hop_limit: int = 64, managed: Managed | None = None
) -> bytes:
    """The ICMPv6 RA body (RFC 4861 4.2); the kernel fills in the checksum on raw sockets.

    Without ``managed``: flags M=0, O=0, router lifetime 0 and no prefix. Always: reachable
    time and retrans timer unspecified (0); the source link-layer address option (4.6.1),
    so solicitors need no extra NS. With ``managed``: M=1, O=1, its router lifetime, and one
    Prefix Information option (4.6.2) with L=1, A=0.
    """
    if len(mac) != 6:
        raise ValueError("an Ethernet MAC has 6 bytes")
    flags = FLAG_MANAGED | FLAG_OTHER if managed is not None else 0
    lifetime = managed.router_lifetime if managed is not None else 0
    if not 0 <= lifetime <= 9000:  # 4.2: at most 9000 s
        raise ValueError(f"router lifetime {lifetime} is outside 0..9000")
    header = struct.pack("!BBHBBHII", ICMPV6_RA, 0, 0, hop_limit, flags, lifetime, 0, 0)
    body = header + bytes((OPT_SOURCE_LL, 1)) + mac
    if managed is not None:
        p = managed.prefix
        life = managed.prefix_lifetime
        body += struct.pack("!BBBBIII", OPT_PREFIX_INFO, 4, p.prefixlen, PREFIX_ON_LINK, life,
                            life, 0) + p.network_address.packed  # fmt: skip
    return body


def is_router_solicitation(data: bytes) -> bool:
    return len(data) >= 8 and data[0] == ICMPV6_RS and data[1] == 0


class RaResponder:
    """Advertise on ``interface``: at start, every ``interval`` seconds and on solicitation."""

    def __init__(
        self, interface: str, interval: float = 4.0, managed: Managed | None = None
    ) -> None:
        self.interface = interface
        self.interval = interval
        self.managed = managed
        self.sent = 0
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._index = 0
        self._ra = b""

    async def start(self) -> None:
        mac = bytes.fromhex(interface_mac(self.interface).replace(":", ""))
        self._ra = build_router_advertisement(mac, managed=self.managed)
        try:
            self._index = socket.if_nametoindex(self.interface)
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        except OSError as exc:
            raise RaError(f"cannot open an ICMPv6 socket on {self.interface}: {exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self._index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            mreq = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@I", self._index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise RaError(f"cannot set up advertisements on {self.interface}: {exc}") from exc
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self._task = asyncio.create_task(self._periodic(), name=f"ra-{self.interface}")
        if self.managed is None:
            log.info("ra: advertising 'no router, no prefix' on %s", self.interface)
        else:
            log.info("ra: advertising 'managed (DHCPv6), prefix %s on-link, router lifetime %d' "
                     "on %s", self.managed.prefix, self.managed.router_lifetime,
                     self.interface)  # fmt: skip

    def _send(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(self._ra, (ALL_NODES, 0, 0, self._index))
            self.sent += 1
        except OSError as exc:  # e.g. the link-local address is still tentative (DAD)
            log.debug("ra: cannot send on %s yet: %s", self.interface, exc)

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data, addr = self._sock.recvfrom(1500)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("ra: receive error: %s", exc)
            return
        if is_router_solicitation(data):
            log.debug("ra: solicitation from %s", addr[0])
            self._send()

    async def _periodic(self) -> None:
        # a short burst first (the link may just have come up), then the steady interval
        for delay in (0.0, 0.5, 1.0):
            await asyncio.sleep(delay)
            self._send()
        while True:
            await asyncio.sleep(self.interval)
            self._send()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
