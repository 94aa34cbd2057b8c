"""An IPv6 router advertisement responder that says "no prefix, no default router, no DHCPv6".

iPXE waits about 13 s for IPv6 configuration on a link where nothing advertises; a single RA
with the M and O flags clear ends that wait at once (iPXE treats it as "IPv6 configuration
done"). We answer router solicitations (RFC 4861 section 6.2.6) and also advertise now and
then (section 6.2.4), with router lifetime 0 so no host takes us as its default router
(section 4.2) and no prefix option so no host configures an address from us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from pathlib import Path

from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)

ICMPV6_RS = 133
ICMPV6_RA = 134
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"


class RaError(HatcheryError):
    """The RA responder cannot start."""


def build_router_advertisement(mac: bytes, hop_limit: int = 64) -> bytes:
    """The ICMPv6 RA body (RFC 4861 4.2); the kernel fills in the checksum on raw sockets.

    Flags M=0, O=0; router lifetime 0; reachable time and retrans timer unspecified (0);
    one option: the source link-layer address (4.6.1), so solicitors need no extra NS.
    """
    if len(mac) != 6:
        raise ValueError("an Ethernet MAC has 6 bytes")
    header = struct.pack("!BBHBBHII", ICMPV6_RA, 0, 0, hop_limit, 0, 0, 0, 0)
    return header + bytes((1, 1)) + mac


def is_router_solicitation(data: bytes) -> bool:
    return len(data) >= 8 and data[0] == ICMPV6_RS and data[1] == 0


def _interface_mac(interface: str) -> bytes:
    try:
        text = Path(f"/sys/class/net/{interface}/address").read_text().strip()
    except OSError as exc:
        raise RaError(f"no interface {interface}: {exc.strerror}") from exc
    return bytes.fromhex(text.replace(":", ""))


class RaResponder:
    """Advertise on ``interface``: at start, every ``interval`` seconds and on solicitation."""

    def __init__(self, interface: str, interval: float = 4.0) -> None:
        self.interface = interface
        self.interval = interval
        self.sent = 0
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._index = 0
        self._ra = b""

    async def start(self) -> None:
        self._ra = build_router_advertisement(_interface_mac(self.interface))
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
        log.info("ra: advertising 'no router, no prefix' on %s", self.interface)

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
