"""proxyDHCP: boot answers beside a DHCP server we do not run, and no address ever.

In most datacenters the network team owns DHCP. In proxy mode the site's server gives the
address and this module gives only the boot information, as the PXE specification's
proxyDHCP service does (PXE 2.1, section 2.2 "DHCP/ProxyDHCP" and 2.2.5, and RFC 4578):

1. A PXE client (firmware ROM or iPXE, option 60 ``PXEClient``) broadcasts DISCOVER to 67.
   The site server OFFERs an address; we OFFER (``discover``) with yiaddr 0.0.0.0, option
   60 ``PXEClient``, option 54 our address (to name us, not a lease: no option 51, no
   yiaddr, so no client can take an address from us) and option 43 with
   PXE_DISCOVERY_CONTROL bit 3 ("boot file in the offer: skip boot-server discovery").
   A firmware ROM also gets the iPXE binary to fetch over TFTP (siaddr, file, 66, 67): it
   is public. iPXE gets no boot file here, on purpose: without one it must come back, from
   the address the site gave it, with a ProxyDHCPREQUEST to port 4011.
2. The client takes the site's address (DHCPREQUEST/ACK with the site server; we ignore
   every REQUEST on 67), then sends DHCPREQUEST to us on udp/4011 with ciaddr set.
3. We ACK it (``request``) from port 4011 to its source: the boot file — the TFTP binary
   for a firmware ROM, the iPXE script URL for iPXE (detected by option 77/175 as in full
   mode). For iPXE we first record that MAC's address *as we observed it*: ciaddr, and only
   when it is also the datagram's source address. The boot HTTP service then gives the
   script (and its birth token) only to that address (``ProxyBindings``), as it gives it
   only to the holder of the birth lease in full mode.

Clients that are not PXE or iPXE (plain DHCP clients, UEFI HTTP Boot) are never answered.
Pure: requests, sources and ``now`` in, a reply (or None) out; the sockets are in
``server.py``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from hatchery.dhcp.packet import (
    ZERO_IP,
    DhcpPacket,
    MessageType,
    Op,
    Opt,
    Option,
    encapsulate,
    opt_ip,
    opt_str,
    opt_u8,
)
from hatchery.dhcp.responder import BootConfig, ClientKind, boot_answer, client_kind

log = logging.getLogger(__name__)

PXE_PORT = 4011  # PXE 2.1 section 2.2.5: the proxyDHCP/boot-server port
PXE_CLIENT = b"PXEClient"  # PXE 2.1 2.2.5: option 60 of a proxyDHCP reply
PXE_DISCOVERY_CONTROL = 6  # PXE 2.1 table 2-1: a sub-option of option 43
SKIP_DISCOVERY = 0x08  # bit 3: boot file present in the offer, download it, no discovery
#: Options a proxy reply must never carry: each is part of handing out an address
#: (RFC 2131 4.3.1 table 3: lease time, renewal, rebinding; RFC 2132 3.3/3.5: mask, router).
LEASE_OPTIONS = frozenset(
    {Opt.LEASE_TIME, Opt.RENEWAL_TIME, Opt.REBINDING_TIME, Opt.SUBNET_MASK, Opt.ROUTER}
)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    server_ip: ipaddress.IPv4Address  # our address on the boot interface (option 54)
    boot: BootConfig


@dataclass(frozen=True, slots=True)
class Observed:
    ip: ipaddress.IPv4Address
    expires: float


class ProxyBindings:
    """MAC -> the address its iPXE came from on port 4011: what full mode's birth lease is.

    One entry per MAC, replaced by each new observation, kept ``hold`` seconds (longer than
    a birth token lives, so a node redeeming its token still finds its binding) and at most
    ``max_held`` at once: the oldest goes first, so forged requests under invented MACs
    cannot grow the table. Entries are kept in expiry order (every hold is the same), so
    pruning looks only at the front.
    """

    def __init__(self, hold: float = 1800.0, max_held: int = 4096) -> None:
        self.hold, self.max_held = hold, max_held
        self._seen: dict[str, Observed] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def observe(self, mac: str, ip: ipaddress.IPv4Address, now: float) -> None:
        self._prune(now)
        self._seen.pop(mac, None)  # re-inserted at the back: expiry order
        while len(self._seen) >= self.max_held:
            del self._seen[next(iter(self._seen))]
        self._seen[mac] = Observed(ip, now + self.hold)

    def address(self, mac: str, now: float) -> ipaddress.IPv4Address | None:
        """The address ``mac`` was last observed at, if that is recent enough."""
        seen = self._seen.get(mac)
        return seen.ip if seen is not None and seen.expires > now else None

    def _prune(self, now: float) -> None:
        while self._seen:
            mac, seen = next(iter(self._seen.items()))
            if seen.expires > now:
                return
            del self._seen[mac]


_OPTION_43 = encapsulate(
    Opt.VENDOR_SPECIFIC, [Option(PXE_DISCOVERY_CONTROL, bytes((SKIP_DISCOVERY,)))]
)


class ProxyResponder:
    """The proxyDHCP service of one interface: ``discover`` for port 67, ``request`` for
    port 4011. Neither ever returns a reply with yiaddr other than 0.0.0.0."""

    def __init__(self, config: ProxyConfig, bindings: ProxyBindings | None = None) -> None:
        self.config = config
        self.bindings = bindings if bindings is not None else ProxyBindings()

    def _client(self, request: DhcpPacket) -> ClientKind | None:
        """The PXE client kind we answer, or None: Ethernet, a unicast chaddr, option 60
        ``PXEClient`` (PXE 2.1 2.2.5; iPXE sends it too), iPXE or a firmware ROM."""
        if request.op != Op.BOOTREQUEST or request.htype != 1 or len(request.chaddr) != 6:
            return None
        if request.chaddr[0] & 1 or not (request.vendor_class or b"").startswith(PXE_CLIENT):
            return None
        kind = client_kind(request)
        return kind if kind in (ClientKind.PXE, ClientKind.IPXE) else None

    def discover(self, request: DhcpPacket, now: float) -> DhcpPacket | None:
        """Port 67: a proxy OFFER to a PXE client's DISCOVER; every other message, silence
        (the REQUEST that follows is for the site's server, RFC 2131 4.3.2)."""
        kind = self._client(request)
        if kind is None or request.message_type != MessageType.DISCOVER:
            return None
        if kind is ClientKind.IPXE:
            return self._reply(request, MessageType.OFFER, ZERO_IP, b"", [])
        siaddr, file, options = boot_answer(request, self.config.boot, self.config.server_ip)
        if not file and not options:
            return None  # no binary for this client (no TFTP, unknown architecture)
        return self._reply(request, MessageType.OFFER, siaddr, file, options)

    def request(
        self, request: DhcpPacket, source: ipaddress.IPv4Address, now: float
    ) -> DhcpPacket | None:
        """Port 4011: the boot file in an ACK to a PXE client's DHCPREQUEST, which comes from
        the address the site gave it (PXE 2.1 2.2.5: ciaddr is the client's address). For
        iPXE, that address is recorded first: the boot script goes only there."""
        kind = self._client(request)
        if kind is None or request.message_type != MessageType.REQUEST:
            return None
        if request.server_id not in (None, self.config.server_ip):
            return None
        if source == ZERO_IP or request.ciaddr != source or request.giaddr != ZERO_IP:
            # A client on 4011 has its address and sends from it; a ciaddr that is not the
            # source is a forgery or a relay we do not serve: nothing to bind, no answer.
            log.debug("proxy: 4011 REQUEST from %s claims ciaddr %s: ignored", source,
                      request.ciaddr)  # fmt: skip
            return None
        siaddr, file, options = boot_answer(request, self.config.boot, self.config.server_ip)
        if not file and not options:
            return None
        if kind is ClientKind.IPXE:
            self.bindings.observe(request.mac, source, now)
            options = [o for o in options if o.code != Opt.IPXE]  # no "skip proxyDHCP" here
        return self._reply(request, MessageType.ACK, siaddr, file, options)

    def _reply(
        self,
        request: DhcpPacket,
        kind: MessageType,
        siaddr: ipaddress.IPv4Address,
        file: bytes,
        boot_options: list[Option],
    ) -> DhcpPacket:
        options = [
            opt_u8(Opt.MESSAGE_TYPE, kind),
            opt_ip(Opt.SERVER_ID, self.config.server_ip),  # who we are, not a lease server
            opt_str(Opt.VENDOR_CLASS, PXE_CLIENT),
            _OPTION_43,
            *boot_options,
        ]
        return DhcpPacket(
            op=Op.BOOTREPLY,
            xid=request.xid,
            chaddr=request.chaddr,
            flags=request.flags,
            ciaddr=request.ciaddr if kind == MessageType.ACK else ZERO_IP,
            yiaddr=ZERO_IP,  # never an address: the site's server gives it
            siaddr=siaddr,
            giaddr=request.giaddr,
            file=file,
            options=tuple(options),
        )


def gives_no_address(reply: DhcpPacket) -> bool:
    """The proxy's invariant, checked again by the transport before anything is sent."""
    return reply.yiaddr == ZERO_IP and not any(o.code in LEASE_OPTIONS for o in reply.options)
