"""The DHCPv6 server's decisions: a pure function of a request, its source and the birth
leases (RFC 8415 section 18.3, RFC 5970 for network boot, UEFI 2.x 24.7 for HTTP Boot).

Who gets what:

- Any client on the boot link gets a non-temporary address (IA_NA) from the birth range, one
  per machine: the lease is keyed by the machine's MAC (its EUI-64 link-local source, else
  the Ethernet address in a DUID-LLT/LL), so the firmware's DHCPv6 and then iPXE's, which
  present different DUIDs and IAIDs, get the same address; the boot HTTP service asks "who
  holds MAC's address?" as it does for IPv4. Only a client's first IA_NA gets an address;
  further ones come back with NoAddrsAvail. Unlike the IPv4 births range, plain clients are
  answered too: our managed RA tells every host on the link to take its address from
  DHCPv6, so not answering would leave them without one, and no one else's DHCPv6 is
  there to lose them to (agents give VMs no DHCPv6, and VM ports cannot reach udp 547).
- Boot information (Boot File URL, option 59) only to clients that ask for it in their
  Option Request (RFC 5970 section 3.1) and are UEFI HTTP Boot on x86-64 or arm64
  (architectures 16 and 19, RFC 5970 3.3 and the IANA registry) or iPXE (user class
  ``iPXE``). HTTP Boot clients also get the Vendor Class ``HTTPClient`` back, without
  which EDK2 (OVMF) ignores the offer.
- A Solicit with Rapid Commit gets the Reply at once (RFC 8415 18.3.1); otherwise an
  Advertise holds the address briefly and a Request commits it.

Messages that break RFC 8415 section 16's rules (a Solicit naming a server, a Request for
another server, no Client Identifier ...) are dropped without a reply.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from dataclasses import dataclass
from enum import StrEnum

from hatchery.dhcp.leases import BirthLeases6, normalise_mac
from hatchery.dhcp6.packet import (
    Dhcp6Packet,
    IaAddress,
    IaNa,
    MessageType,
    Opt,
    Option,
    Status,
    duid_mac,
    opt_addresses,
    opt_length_prefixed,
    opt_status,
)

log = logging.getLogger(__name__)

ARCH_HTTP_X64 = 16  # RFC 5970 3.3, IANA "Processor Architecture Types": x64 UEFI HTTP
ARCH_HTTP_ARM64 = 19  # the same registry: ARM 64-bit UEFI HTTP
HTTP_CLIENT = b"HTTPClient"  # UEFI 2.x 24.7.2.2: the class an HTTP Boot client sends
PREFERENCE_MAX = 255  # RFC 8415 18.2.1: the client takes this Advertise without waiting


class ClientKind(StrEnum):
    OTHER = "other"  # an ordinary DHCPv6 client: an address only
    HTTP = "http"  # UEFI HTTP Boot (vendor class HTTPClient)
    IPXE = "ipxe"  # iPXE (user class iPXE)


@dataclass(frozen=True, slots=True)
class Boot6Config:
    """How boot clients are answered: ``http_base`` is the boot HTTP service as clients reach
    it over IPv6, with the address in brackets (``http://[fd00::1]:8080``)."""

    http_base: str
    script_path: str = "/boot/ipxe"
    http_efi_path: str = "/ipxe/ipxe.efi"
    https_base: str | None = None  # with it, HTTP Boot clients get a UKI over HTTPS
    uki_path: str = "/boot/uki.efi"

    def http_boot_url(self, mac: str | None, arch: str = "x86-64") -> str | None:
        """What a UEFI HTTP Boot client is sent to fetch and run (as ``BootConfig``'s);
        None for an arm64 client whose MAC we do not know (its image is made per MAC)."""
        base = (self.https_base or self.http_base).rstrip("/")
        if arch != "x86-64":
            return f"{base}{self.uki_path}?mac={mac}&arch={arch}" if mac is not None else None
        if self.https_base is not None and mac is not None:
            return f"{base}{self.uki_path}?mac={mac}"
        return f"{self.http_base.rstrip('/')}{self.http_efi_path}"


@dataclass(frozen=True, slots=True)
class Dhcp6Config:
    server_duid: bytes
    prefix: ipaddress.IPv6Network  # the link's on-link prefix (Confirm answers from it)
    lease_time: int = 3600  # valid and preferred lifetime; T1 = 1/2, T2 = 4/5 of it
    dns: tuple[ipaddress.IPv6Address, ...] = ()
    boot: Boot6Config | None = None
    rapid_commit: bool = True


def client_kind(request: Dhcp6Packet) -> ClientKind:
    if any(c == b"iPXE" for c in request.user_classes):
        return ClientKind.IPXE
    vendor = request.vendor_class
    if vendor is not None and any(i.startswith(HTTP_CLIENT) for i in vendor[1]):
        return ClientKind.HTTP
    return ClientKind.OTHER


def eui64_mac(source: ipaddress.IPv6Address) -> str | None:
    """The MAC inside a modified EUI-64 link-local address (RFC 4291 appendix A), if it is one."""
    if not source.is_link_local:
        return None
    iid = source.packed[8:]
    if iid[3:5] != b"\xff\xfe":
        return None
    mac = bytes((iid[0] ^ 0x02,)) + iid[1:3] + iid[5:]
    return ":".join(f"{b:02x}" for b in mac)


def client_mac(request: Dhcp6Packet, source: ipaddress.IPv6Address) -> str | None:
    """The machine a request comes from, as a MAC: from its EUI-64 link-local source (the
    interface that sent it), else from its DUID-LLT/LL; None if neither carries one."""
    mac = eui64_mac(source) or duid_mac(request.client_id or b"")
    if mac is None:
        return None
    try:
        return normalise_mac(mac)
    except ValueError:
        return None


class Responder6:
    """Answers one link's DHCPv6 clients from ``births``; ``handle`` is pure but for the
    lease table it changes (the server persists it before sending the answer)."""

    def __init__(self, config: Dhcp6Config, births: BirthLeases6) -> None:
        self.config, self.births = config, births

    def handle(
        self, request: Dhcp6Packet, source: ipaddress.IPv6Address, now: float
    ) -> Dhcp6Packet | None:
        kind = request.msg_type
        client = request.client_id
        server = request.server_id
        ours = server == self.config.server_duid
        # RFC 8415 section 16: which identifiers each message must (not) carry
        if kind == MessageType.INFORMATION_REQUEST:
            if (server is not None and not ours) or request.ia_na:
                return None
            return self._reply(MessageType.REPLY, request, [])
        if client is None:
            return None
        if kind in (MessageType.SOLICIT, MessageType.CONFIRM, MessageType.REBIND):
            if server is not None:
                return None
        elif kind in (MessageType.REQUEST, MessageType.RENEW, MessageType.RELEASE,
                      MessageType.DECLINE):  # fmt: skip
            if not ours:
                return None
        else:  # Advertise, Reply, Reconfigure: server messages, never answered
            return None
        if kind == MessageType.CONFIRM:
            return self._confirm(request)
        mac = client_mac(request, source)
        if mac is None:
            log.info("dhcp6: %s from %s names no MAC (no EUI-64 source, no DUID-LL): ignored",
                     kind.name, source)  # fmt: skip
            return None
        if kind == MessageType.SOLICIT:
            return self._solicit(request, mac, now)
        if kind == MessageType.REQUEST:
            return self._assign(request, mac, now, MessageType.REPLY)
        if kind in (MessageType.RENEW, MessageType.REBIND):
            return self._extend(request, mac, now)
        if kind == MessageType.RELEASE:
            for ia in request.ia_na:
                for a in ia.addresses:
                    self.births.release(mac, a.address)
            return self._reply(MessageType.REPLY, request, [opt_status(Status.SUCCESS)])
        for ia in request.ia_na:  # Decline (18.3.8)
            for a in ia.addresses:
                self.births.decline(mac, a.address, now)
        return self._reply(MessageType.REPLY, request, [opt_status(Status.SUCCESS)])

    # --- the messages ---------------------------------------------------------------------
    def _solicit(self, request: Dhcp6Packet, mac: str, now: float) -> Dhcp6Packet | None:
        if self.config.rapid_commit and request.rapid_commit:
            return self._assign(request, mac, now, MessageType.REPLY, rapid=True)
        return self._assign(request, mac, now, MessageType.ADVERTISE)

    def _assign(
        self, request: Dhcp6Packet, mac: str, now: float, kind: MessageType, rapid: bool = False
    ) -> Dhcp6Packet:
        """Advertise (an offer held briefly) or Reply (a committed lease) to the first IA_NA;
        RFC 8415 18.3.1, 18.3.2 and 18.3.9 (NoAddrsAvail when nothing can be given)."""
        options: list[Option] = []
        given = False
        for n, ia in enumerate(request.ia_na):
            address = None
            if n == 0:
                wanted = ia.addresses[0].address if ia.addresses else None
                address = self.births.offer(mac, wanted, now)
                if address is not None and kind == MessageType.REPLY:
                    if not self.births.commit(mac, address, self.config.lease_time, now):
                        address = None
            if address is None:
                options.append(self._ia(ia.iaid, [opt_status(Status.NO_ADDRS_AVAIL)]))
            else:
                given = True
                options.append(self._ia(ia.iaid, [self._address(address)]))
        if not given:
            options.append(opt_status(Status.NO_ADDRS_AVAIL, "no address for you here"))
        if rapid:
            options.append(Option(Opt.RAPID_COMMIT, b""))
        if kind == MessageType.ADVERTISE:
            options.append(Option(Opt.PREFERENCE, bytes((PREFERENCE_MAX,))))
        return self._reply(kind, request, options, mac)

    def _extend(self, request: Dhcp6Packet, mac: str, now: float) -> Dhcp6Packet | None:
        """Renew and Rebind (18.3.4, 18.3.5): extend what the client still holds; an address
        it may not have comes back with lifetimes 0; a Renew for nothing we know gets
        NoBinding, a Rebind for nothing we know no answer (another server may know it)."""
        options: list[Option] = []
        known = False
        for n, ia in enumerate(request.ia_na):
            inner: list[Option] = []
            for a in ia.addresses:
                if n == 0 and self.births.commit(mac, a.address, self.config.lease_time, now):
                    known = True
                    inner.append(self._address(a.address))
                else:
                    inner.append(IaAddress(a.address, 0, 0).encode())
            if not ia.addresses:
                inner.append(opt_status(Status.NO_BINDING))
            options.append(self._ia(ia.iaid, inner))
        if not known and request.msg_type == MessageType.REBIND:
            return None
        return self._reply(MessageType.REPLY, request, options, mac)

    def _confirm(self, request: Dhcp6Packet) -> Dhcp6Packet | None:
        """18.3.3: Success if every address is on this link, NotOnLink otherwise, no answer
        if the client listed none."""
        addresses = [a.address for ia in request.ia_na for a in ia.addresses]
        if not addresses:
            return None
        on_link = all(a in self.config.prefix for a in addresses)
        status = opt_status(Status.SUCCESS if on_link else Status.NOT_ON_LINK)
        return self._reply(MessageType.REPLY, request, [status])

    # --- building answers ----------------------------------------------------------------
    def _address(self, address: ipaddress.IPv6Address) -> Option:
        t = self.config.lease_time
        return IaAddress(address, t, t).encode()

    def _ia(self, iaid: int, options: list[Option]) -> Option:
        t = self.config.lease_time
        return IaNa(iaid, t // 2, t * 4 // 5, tuple(options)).encode()

    def _reply(
        self, kind: MessageType, request: Dhcp6Packet, options: list[Option],
        mac: str | None = None,
    ) -> Dhcp6Packet:  # fmt: skip
        head = [Option(Opt.SERVERID, self.config.server_duid)]
        if request.client_id is not None:
            head.append(Option(Opt.CLIENTID, request.client_id))
        wanted = set(request.requested_options)
        if self.config.dns and Opt.DNS_SERVERS in wanted:
            options.append(opt_addresses(Opt.DNS_SERVERS, *self.config.dns))
        options += boot_options(request, self.config.boot, mac)
        return Dhcp6Packet(kind, request.transaction_id, tuple(head + options))


def boot_options(request: Dhcp6Packet, boot: Boot6Config | None, mac: str | None) -> list[Option]:
    """The Boot File URL (RFC 5970 3.1) for a client that requested it and that we have a
    boot file for; the Vendor Class ``HTTPClient`` for UEFI HTTP Boot (UEFI 2.x 24.7.2.2)."""
    if boot is None or Opt.BOOTFILE_URL not in request.requested_options:
        return []
    kind = client_kind(request)
    base = boot.http_base.rstrip("/")
    if kind == ClientKind.IPXE and mac is not None:
        return [Option(Opt.BOOTFILE_URL, f"{base}{boot.script_path}?mac={mac}".encode())]
    if kind == ClientKind.HTTP:
        if ARCH_HTTP_X64 in request.client_arch:
            url = boot.http_boot_url(mac)
        elif ARCH_HTTP_ARM64 in request.client_arch:
            url = boot.http_boot_url(mac, "arm64")
        else:
            log.info("dhcp6: HTTP Boot for arch %s: no binary for it", request.client_arch)
            return []
        if url is None:
            log.info("dhcp6: arm64 HTTP Boot from a client whose MAC is unknown (no EUI-64 "
                     "source, no link-layer DUID): no per-machine image to name")  # fmt: skip
            return []
        vendor = request.vendor_class
        enterprise = vendor[0] if vendor is not None else 343
        return [
            Option(Opt.BOOTFILE_URL, url.encode()),
            opt_length_prefixed(Opt.VENDOR_CLASS, [HTTP_CLIENT], struct.pack("!I", enterprise)),
        ]
    return []
