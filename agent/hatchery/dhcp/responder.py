"""The DHCP server's decisions: the reply as a function of the request and the lease state.

No sockets and no clock here (``now`` is passed in): ``Responder.handle`` takes a decoded
request and returns the reply to send, or None to stay silent. Message handling follows
RFC 2131 section 4.3; boot answers follow RFC 4578 (PXE), iPXE's conventions and the UEFI
specification's HTTP Boot (section 24.7).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from dataclasses import dataclass
from enum import StrEnum

from hatchery.dhcp.leases import BirthLeases, LeaseSource
from hatchery.dhcp.packet import (
    BROADCAST_FLAG,
    ZERO_IP,
    ClientArch,
    DhcpPacket,
    IpxeOpt,
    MessageType,
    Op,
    Opt,
    Option,
    encapsulate,
    opt_ip,
    opt_str,
    opt_u8,
    opt_u32,
)
from hatchery.log import EventSummary

log = logging.getLogger(__name__)

#: At most one line per this many seconds about what strangers can cause at will (a full
#: birth range, NAKs).
SUMMARY_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class BootConfig:
    """How to answer network-boot clients.

    ``http_base`` is the boot HTTP service as clients reach it (``http://10.0.0.1:8080``).
    PXE ROMs that are not iPXE get an iPXE binary over TFTP from ``tftp_server`` (default: our
    own address); iPXE gets its script URL; UEFI HTTP Boot clients get ``http_efi_path`` —
    or, with ``https_base`` (the same service over TLS, ``https://10.0.0.1:8443``), their whole
    boot as one unified kernel image over HTTPS (``uki_path``), which firmware pinning the
    boot CA authenticates end to end. arm64 HTTP Boot clients always get the unified kernel
    image (``&arch=arm64``), over HTTPS when there is ``https_base``, else over plain HTTP:
    there is no arm64 iPXE to send them to (Debian builds none).
    """

    http_base: str
    tftp: bool = True  # False: no TFTP on this network, PXE ROMs get no boot file
    tftp_server: ipaddress.IPv4Address | None = None
    bios_file: str = "undionly.kpxe"
    efi_file: str = "ipxe.efi"
    script_path: str = "/boot/ipxe"
    http_efi_path: str = "/ipxe/ipxe.efi"
    https_base: str | None = None
    uki_path: str = "/boot/uki.efi"

    def http_boot_url(self, mac: str, arch: str = "x86-64") -> str:
        """What a UEFI HTTP Boot client of ``arch`` (``x86-64``, ``arm64``) is sent to fetch
        and run."""
        base = (self.https_base or self.http_base).rstrip("/")
        if arch != "x86-64":
            return f"{base}{self.uki_path}?mac={mac}&arch={arch}"
        if self.https_base is not None:
            return f"{base}{self.uki_path}?mac={mac}"
        return f"{base}{self.http_efi_path}"


@dataclass(frozen=True, slots=True)
class DhcpConfig:
    server_ip: ipaddress.IPv4Address
    network: ipaddress.IPv4Network
    router: ipaddress.IPv4Address | None = None
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    domain: str | None = None
    lease_time: int = 3600
    boot: BootConfig | None = None


_MESSAGE_TYPES = {kind: opt_u8(Opt.MESSAGE_TYPE, kind) for kind in MessageType}


def _common_options(cfg: DhcpConfig) -> tuple[Option, ...]:
    """The options every OFFER/ACK on this network carries, built once."""
    t = cfg.lease_time
    options = [
        opt_ip(Opt.SERVER_ID, cfg.server_ip),
        opt_u32(Opt.LEASE_TIME, t),
        opt_u32(Opt.RENEWAL_TIME, t // 2),  # RFC 2131 4.4.5: T1 = 0.5, T2 = 0.875
        opt_u32(Opt.REBINDING_TIME, t * 7 // 8),
        opt_ip(Opt.SUBNET_MASK, cfg.network.netmask),
        opt_ip(Opt.BROADCAST_ADDRESS, cfg.network.broadcast_address),
    ]
    if cfg.router is not None:
        options.append(opt_ip(Opt.ROUTER, cfg.router))
    if cfg.dns:
        options.append(opt_ip(Opt.DNS, *cfg.dns))
    if cfg.domain:
        options.append(opt_str(Opt.DOMAIN_NAME, cfg.domain))
    return tuple(options)


class ClientKind(StrEnum):
    PLAIN = "plain"
    PXE = "pxe"  # a firmware PXE ROM (vendor class PXEClient), not iPXE
    IPXE = "ipxe"
    HTTP = "http"  # UEFI HTTP Boot (vendor class HTTPClient)


def client_kind(request: DhcpPacket) -> ClientKind:
    """iPXE: user class 77 is ``iPXE`` (raw, as iPXE sends it, or RFC 3004), or option 175 is
    present. HTTP Boot: vendor class starts ``HTTPClient``. PXE: it starts ``PXEClient``."""
    if b"iPXE" in request.user_classes() or request.get(Opt.IPXE) is not None:
        return ClientKind.IPXE
    vendor = request.vendor_class or b""
    if vendor.startswith(b"HTTPClient"):
        return ClientKind.HTTP
    if vendor.startswith(b"PXEClient"):
        return ClientKind.PXE
    return ClientKind.PLAIN


class Responder:
    """One interface's DHCP server state: static leases, birthing leases, configuration."""

    def __init__(
        self,
        config: DhcpConfig,
        static: LeaseSource,
        births: BirthLeases | None = None,
    ) -> None:
        self.config = config
        self.static = static
        self.births = births  # None: birthing disabled, unknown MACs get no answer
        self._common = _common_options(config)
        self._summary = EventSummary(log, f"dhcp as {config.server_ip}", SUMMARY_INTERVAL)

    # --- entry point --------------------------------------------------------------------

    def handle(self, request: DhcpPacket, now: float) -> DhcpPacket | None:
        if request.op != Op.BOOTREQUEST or request.htype != 1 or len(request.chaddr) != 6:
            return None  # we serve Ethernet clients only
        if request.chaddr[0] & 1:
            return None  # a multicast "client" address is forged: no client has one
        kind = request.message_type
        if kind == MessageType.DISCOVER:
            return self._discover(request, now)
        if kind == MessageType.REQUEST:
            return self._request(request, now)
        if kind == MessageType.DECLINE:
            self._decline(request, now)
        elif kind == MessageType.RELEASE:
            self._release(request)
        elif kind == MessageType.INFORM:
            return self._inform(request)
        return None  # OFFER/ACK/NAK are server messages: never answered

    # --- RFC 2131 4.3.1: DHCPDISCOVER ------------------------------------------------------

    def _discover(self, request: DhcpPacket, now: float) -> DhcpPacket | None:
        mac = request.mac
        lease = self.static.lookup(mac)
        if lease is not None:
            if lease.ip not in self.config.network:
                log.warning("static lease %s for %s is outside %s", lease.ip, mac,
                            self.config.network)  # fmt: skip
                return None
            return self._reply(request, MessageType.OFFER, lease.ip, lease.hostname, lease.boot)
        if self.births is None:
            log.debug("DISCOVER from unknown %s: birthing is off, no answer", mac)
            return None
        if client_kind(request) is ClientKind.PLAIN and self.births.binding(mac, now) is None:
            # Only machines booting from the network are birthed. A plain client we do not
            # know is someone else's — a VM of another hypervisor on this segment, whose own
            # agent answers it: offering it a birth address would steal it from that agent.
            log.debug("DISCOVER from unknown %s without a network-boot client: no answer", mac)
            return None
        ip = self.births.offer(mac, request.requested_ip, now)
        if ip is None:
            # One line per interval: a flood of forged DISCOVERs must not flood the log.
            self._summary.count("DISCOVERs not answered: the birth range is full", mac, now)
            return None
        return self._reply(request, MessageType.OFFER, ip, None, True)

    # --- RFC 2131 4.3.2: DHCPREQUEST --------------------------------------------------------

    def _request(self, request: DhcpPacket, now: float) -> DhcpPacket | None:
        mac = request.mac
        server_id = request.server_id
        if server_id is not None and server_id != self.config.server_ip:
            # SELECTING, and the client chose another server: forget our offer, stay silent
            if self.births is not None:
                self.births.forget_offer(mac)
            return None
        wanted = request.requested_ip
        if wanted is None:
            if server_id is not None:
                return self._nak(request, now, "SELECTING without a requested address")
            wanted = request.ciaddr  # RENEWING/REBINDING: the address is in ciaddr
            if wanted == ZERO_IP:
                return None
        lease = self.static.lookup(mac)
        if lease is not None:
            if wanted != lease.ip or lease.ip not in self.config.network:
                return self._nak(request, now, f"address {wanted} is not yours")
            return self._reply(request, MessageType.ACK, lease.ip, lease.hostname, lease.boot)
        if self.births is None:
            return None
        if wanted not in self.config.network:
            return self._nak(request, now, f"address {wanted} is not on this network")
        if server_id is None:
            # INIT-REBOOT, RENEWING, REBINDING: silent without a record of the client,
            # NAK when its address is not the one we bound (RFC 2131 4.3.2)
            bound = self.births.binding(mac, now)
            if bound is None:
                return None
            if bound.ip != wanted:
                return self._nak(request, now, f"address {wanted} is not yours")
        elif wanted not in self.births:
            return self._nak(request, now, f"address {wanted} is not in the birth range")
        if not self.births.commit(mac, wanted, self.config.lease_time, now):
            return self._nak(request, now, f"address {wanted} is taken")
        return self._reply(request, MessageType.ACK, wanted, None, True)

    # --- RFC 2131 4.3.3 / 4.3.4: DHCPDECLINE, DHCPRELEASE -------------------------------------

    def _decline(self, request: DhcpPacket, now: float) -> None:
        """Honoured only from the client holding the offer or lease (``BirthLeases.decline``).

        The client is known by chaddr alone: the server reads DHCP from a UDP socket, which
        does not see the Ethernet frame's source MAC, so it cannot check that the frame came
        from chaddr. What keeps a VM from declining for another machine is that chaddr must
        hold the offer or lease of the very address declined (which the VM would have to
        guess while the real client's offer lasts), and that VMs' ports may send DHCP only
        with their own source MAC (``metadata/ruleset.py``).
        """
        if request.server_id != self.config.server_ip or request.requested_ip is None:
            return
        if self.births is None or self.static.lookup(request.mac) is not None:
            return
        if self.births.decline(request.mac, request.requested_ip, now):
            log.warning("%s declined %s: the address is in use by someone else", request.mac,
                        request.requested_ip)  # fmt: skip
        else:
            log.debug("DECLINE of %s from %s, which does not hold it: ignored",
                      request.requested_ip, request.mac)  # fmt: skip

    def _release(self, request: DhcpPacket) -> None:
        if request.server_id not in (None, self.config.server_ip):
            return
        if self.births is not None and self.births.release(request.mac, request.ciaddr):
            log.info("%s released %s", request.mac, request.ciaddr)

    # --- RFC 2131 4.3.5: DHCPINFORM ---------------------------------------------------------

    def _inform(self, request: DhcpPacket) -> DhcpPacket | None:
        if request.ciaddr == ZERO_IP or request.ciaddr not in self.config.network:
            return None
        reply = self._reply(request, MessageType.ACK, ZERO_IP, None, False)
        # no lease time in an ACK to INFORM (RFC 2131 4.3.5, table 3)
        keep = tuple(o for o in reply.options if o.code not in (51, 58, 59))
        return dataclasses.replace(reply, options=keep)

    # --- building replies -------------------------------------------------------------------

    def _nak(self, request: DhcpPacket, now: float, why: str) -> DhcpPacket:
        # Anyone can provoke a NAK with a forged REQUEST: counted, each one only at DEBUG.
        log.debug("NAK to %s: %s", request.mac, why)
        self._summary.count("NAKs sent", request.mac, now)
        return DhcpPacket(
            op=Op.BOOTREPLY,
            xid=request.xid,
            chaddr=request.chaddr,
            flags=request.flags | BROADCAST_FLAG,  # RFC 2131 4.1: NAKs are broadcast
            giaddr=request.giaddr,
            options=(
                opt_u8(Opt.MESSAGE_TYPE, MessageType.NAK),
                opt_ip(Opt.SERVER_ID, self.config.server_ip),
                opt_str(Opt.MESSAGE, why),
            ),
        )

    def _reply(
        self,
        request: DhcpPacket,
        kind: MessageType,
        yiaddr: ipaddress.IPv4Address,
        hostname: str | None,
        boot: bool,
    ) -> DhcpPacket:
        cfg = self.config
        options = [_MESSAGE_TYPES[kind], *self._common]
        if hostname:
            options.append(opt_str(Opt.HOSTNAME, hostname))
        siaddr, file = ZERO_IP, b""
        if boot and cfg.boot is not None:
            siaddr, file, boot_options = boot_answer(request, cfg.boot, cfg.server_ip)
            options += boot_options
        return DhcpPacket(
            op=Op.BOOTREPLY,
            xid=request.xid,
            chaddr=request.chaddr,
            flags=request.flags,
            ciaddr=request.ciaddr if kind == MessageType.ACK else ZERO_IP,
            yiaddr=yiaddr,
            siaddr=siaddr,
            giaddr=request.giaddr,
            file=file,
            options=tuple(options),
        )


#: UEFI HTTP Boot architectures we have a boot for (None: no option 93, taken as x86-64).
_HTTP_ARCHES: dict[int | None, str] = {
    None: "x86-64",
    ClientArch.HTTP_X64: "x86-64",
    ClientArch.HTTP_ARM64: "arm64",
}


def boot_answer(
    request: DhcpPacket, boot: BootConfig, server_ip: ipaddress.IPv4Address
) -> tuple[ipaddress.IPv4Address, bytes, list[Option]]:
    """siaddr, the header's file field and the boot options for a network-boot client
    (RFC 4578 2.1 for the architecture; both the full server and the proxy answer with it)."""
    kind = client_kind(request)
    arch = request.client_arch[0] if request.client_arch else None
    base = boot.http_base.rstrip("/")
    if kind == ClientKind.IPXE:
        url = f"{base}{boot.script_path}?mac={request.mac}"
        no_wait = encapsulate(Opt.IPXE, [Option(IpxeOpt.NO_PXEDHCP, b"\x01")])
        return server_ip, _file(url), [opt_str(Opt.BOOTFILE, url), no_wait]
    if kind == ClientKind.HTTP:
        if arch not in _HTTP_ARCHES:
            log.info("%s: HTTP Boot for arch %s: no binary for it", request.mac, arch)
            return ZERO_IP, b"", []
        url = boot.http_boot_url(request.mac, _HTTP_ARCHES[arch])
        # UEFI 2.x 24.7.2: the offer must carry vendor class "HTTPClient" to be used
        options = [opt_str(Opt.BOOTFILE, url), opt_str(Opt.VENDOR_CLASS, b"HTTPClient")]
        return server_ip, _file(url), options
    if kind == ClientKind.PXE and not boot.tftp:
        log.info("%s: PXE ROM, but no TFTP here: address only", request.mac)
    elif kind == ClientKind.PXE:
        if arch == ClientArch.BIOS or arch is None:
            name = boot.bios_file
        elif arch in (ClientArch.EFI_X64, ClientArch.EFI_BC):
            name = boot.efi_file
        elif arch == ClientArch.EFI_ARM64:
            # The firmware tries its HTTP Boot option next, which we answer (arch 19).
            log.info("%s: arm64 PXE (arch 11): no arm64 iPXE to send; arm64 machines boot by "
                     "UEFI HTTP Boot (arch 19)", request.mac)  # fmt: skip
            return ZERO_IP, b"", []
        else:
            log.info("%s: PXE for arch %s: no binary for it", request.mac, arch)
            return ZERO_IP, b"", []
        tftp = boot.tftp_server or server_ip
        options = [opt_str(Opt.TFTP_SERVER, str(tftp)), opt_str(Opt.BOOTFILE, name)]
        return tftp, _file(name), options
    return ZERO_IP, b"", []


def _file(name: str) -> bytes:
    raw = name.encode()
    return raw if len(raw) <= 127 else b""  # too long for the header: option 67 carries it


def destination(request: DhcpPacket, reply: DhcpPacket) -> tuple[str, int]:
    """Where a reply goes (RFC 2131 section 4.1): to the relay if there is one; to the
    client's address if it has one (and this is not a NAK); else broadcast on the link
    (we do not inject ARP entries to unicast to an unconfigured client)."""
    if request.giaddr != ZERO_IP:
        return str(request.giaddr), 67
    if request.ciaddr != ZERO_IP and reply.message_type != MessageType.NAK:
        return str(request.ciaddr), 68
    return "255.255.255.255", 68
