"""Tenant-isolation lab: the node's side of a bridge, and what a hostile guest sends.

``python -m hatchery_lab.isolation node SPEC.json`` runs, in the namespace it is started in,
the agent's real ``MetadataService`` for one bridge (the metadata namespace, the veth and
the bridge's nft tables, applied exactly as the agent applies them) plus an API stand-in:
an aiohttp app behind the agent's own mutual-TLS context, on ``0.0.0.0:<api_port>`` and in
the metadata namespace on ``169.254.169.254:<api_port>``, as the agent serves its API. It
prints ``ready`` once serving and tears everything down on SIGTERM. On SIGUSR1 it ends its
libnftables session, and with it the held copy of the rules (``metadata/held.py``): no other
process can remove those.

``... ra IFACE PREFIX`` sends router advertisements for ``PREFIX``/64 (RFC 4861 section 4.2,
with a prefix information option, 4.6.2, that hosts autoconfigure from), and ``... na IFACE
TARGET`` an unsolicited neighbour advertisement (4.4, override flag set) claiming
``TARGET`` for this interface's MAC: what a guest would send to become a router or to steal
another's address. Plain raw ICMPv6 sockets; the kernel fills in the checksum.

``... frames IFACE`` broadcasts one raw frame of each ethertype in ``ETHERTYPES`` (an
802.1Q-tagged IPv4 frame, 802.1ad, LLDP, Wake-on-LAN, the IEEE local-experimental type, an
802.3/LLC frame as STP uses), each carrying a marker, plus an ordinary IPv4 UDP broadcast
through the kernel as the control; ``... sniff IFACE SECONDS`` prints which markers arrived.

``... discover IFACE CHADDR`` sends a DHCPDISCOVER from udp/68 with ``CHADDR`` as the client
hardware address (broadcast flag set, so any answer is broadcast back) and prints
``offer YIADDR`` for each OFFER to that ``CHADDR`` within two seconds: a guest asking the
node's DHCP server for another machine's lease in its name. ``... dhcp-flood IFACE CHADDR
COUNT`` sends COUNT DISCOVERs from ``CHADDR`` at once and prints ``sent N offers M``;
``... rs-flood IFACE COUNT`` sends COUNT router solicitations at once;
``... connect-flood ADDRESS PORT SECONDS`` opens TCP connections as fast as it can and prints
``connected N``: a guest spending the agent's time.
The kernel here has no 802.1Q module (``ip link add ... type vlan`` fails), so the tagged
frame is built by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from hatchery.api.server import ApiServer
from hatchery.dhcp.packet import (
    BROADCAST_FLAG,
    DecodeError,
    DhcpPacket,
    MessageType,
    Op,
    Opt,
    opt_u8,
)
from hatchery.metadata import held
from hatchery.metadata.ruleset import NodeServices, Port
from hatchery.metadata.server import VmMetadata
from hatchery.metadata.service import MetadataService
from hatchery.pki import server_context

ALL_NODES = "ff02::1"
API_REPLY = "hatchery api stand-in\n"
MARKER = b"HATCHERY-ISOLATION-"
BROADCAST = b"\xff" * 6
# name -> (ethertype or 802.3 length field, what follows it before the marker)
ETHERTYPES: dict[str, tuple[int, bytes]] = {
    "8021q": (0x8100, struct.pack("!HH", 42, 0x0800)),  # VLAN 42, then an IPv4 ethertype
    "8021ad": (0x88A8, struct.pack("!HH", 42, 0x8100)),
    "lldp": (0x88CC, b""),
    "wol": (0x0842, b""),
    "experimental": (0x88B5, b""),
    "llc": (0x0040, b"\x42\x42\x03"),  # 802.3 length, then the STP LLC header
}
CONTROL = "ipv4"
DISCARD_PORT = 9


@dataclass
class _Directory:
    """The service's MetadataSource: each VM port's data, by source IP."""

    vms: dict[str, VmMetadata]

    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None:
        return self.vms.get(ip)


async def _api_root(request: web.Request) -> web.Response:
    return web.Response(text=API_REPLY)


@dataclass(frozen=True)
class NodeSpec:
    """What ``node`` serves: one bridge, its VM ports, the closed services, the API's TLS."""

    bridge: str
    subnets: tuple[str, ...]
    ports: tuple[Port, ...]
    services: NodeServices
    tls: tuple[str, str, str]  # CA, certificate, key (pem files)
    api_port: int

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> NodeSpec:
        d = json.loads(path.read_text())
        ports = tuple(Port(p["iface"], p["mac"], p["ip"], tuple(p["ipv6"])) for p in d["ports"])
        services = NodeServices(tuple(d["services"]["tcp"]), tuple(d["services"]["udp"]))
        ca, cert, key = d["tls"]
        return cls(d["bridge"], tuple(d["subnets"]), ports, services, (ca, cert, key),
                   int(d["api_port"]))  # fmt: skip


async def serve_node(spec: NodeSpec) -> None:
    vms = {p.ip: VmMetadata(p.iface, f"uuid-{p.iface}", p.ip, p.mac) for p in spec.ports}
    ca, cert, key = (Path(x) for x in spec.tls)
    tls = server_context(ca, cert, key)
    app = web.Application()
    app.router.add_get("/", _api_root)
    api = ApiServer(app, tls)
    service = MetadataService(_Directory(vms), lambda _: spec.ports, services=spec.services)
    try:
        await api.start("0.0.0.0", spec.api_port)
        subnets = [ipaddress.IPv4Network(s) for s in spec.subnets]
        await service.add_bridge(spec.bridge, subnets, api=api)
        try:
            # Only now, as the agent does: pyroute2 sends SIGTERM to the helper processes it
            # forks while setting up, and a forked child shares the loop's signal wake-up
            # socket, so a handler installed earlier would read that as our own SIGTERM.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            # The tests' "without the rules" half: the held copy can only go with the
            # session that holds it (held.py), so the node ends its session on SIGUSR1.
            loop.add_signal_handler(signal.SIGUSR1, held.SESSION.close)
            print("ready", flush=True)
            await stop.wait()
        finally:
            await service.close(teardown=True)
    finally:
        await api.close()


def _icmpv6_socket(iface: str) -> tuple[socket.socket, int]:
    index = socket.if_nametoindex(iface)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # RFC 4861 6.1.2
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    return sock, index


def _mac(iface: str) -> bytes:
    text = Path(f"/sys/class/net/{iface}/address").read_text().strip()
    return bytes.fromhex(text.replace(":", ""))


def router_advertisement(mac: bytes, prefix: ipaddress.IPv6Network) -> bytes:
    """An RA that makes us a default router for 30 min and hands out ``prefix`` (SLAAC)."""
    header = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    # 4.6.2: type 3, length 4 (x 8 octets), prefix length, L and A flags, lifetimes, reserved
    info = struct.pack("!BBBBIII", 3, 4, prefix.prefixlen, 0xC0, 86400, 14400, 0)
    return header + info + prefix.network_address.packed + bytes((1, 1)) + mac


def neighbour_advertisement(mac: bytes, target: ipaddress.IPv6Address) -> bytes:
    """An unsolicited NA with the override flag: "``target`` is at ``mac``" (4.4, 4.6.1)."""
    return struct.pack("!BBHI", 136, 0, 0, 0x20000000) + target.packed + bytes((2, 1)) + mac


def router_solicitation(mac: bytes) -> bytes:
    """An RS (4.1) with the source link-layer option: what a host sends to find routers."""
    return struct.pack("!BBHI", 133, 0, 0, 0) + bytes((1, 1)) + mac


def send(iface: str, message: bytes, count: int = 3, gap: float = 0.2) -> None:
    sock, index = _icmpv6_socket(iface)
    with sock:
        for _ in range(count):
            sock.sendto(message, (ALL_NODES, 0, 0, index))
            time.sleep(gap)


def send_frames(iface: str) -> None:
    """One raw broadcast frame per ``ETHERTYPES`` entry, then the kernel's own IPv4 control."""
    source = _mac(iface)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((iface, 0))
        for name, (kind, inner) in ETHERTYPES.items():
            raw.send(BROADCAST + source + struct.pack("!H", kind) + inner + MARKER + name.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        udp.sendto(MARKER + CONTROL.encode(), ("255.255.255.255", DISCARD_PORT))


def sniff(iface: str, seconds: float) -> set[str]:
    """The markers seen on ``iface`` within ``seconds``."""
    seen: set[str] = set()
    eth_p_all = 0x0003
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_all)) as sock:
        sock.bind((iface, 0))
        sock.settimeout(0.2)
        print("listening", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame = sock.recv(2048)
            except TimeoutError:
                continue
            at = frame.find(MARKER)
            if at >= 0:
                seen.add(frame[at + len(MARKER) :].split(b"\0", 1)[0].decode(errors="replace"))
    return seen


def _offers(iface: str, chaddr: str, xids: range, seconds: float) -> list[DhcpPacket]:
    """Send a DISCOVER from udp/68 on ``iface`` with ``chaddr`` for each of ``xids``, all at
    once (broadcast flag set, so any answer is broadcast back), then collect for ``seconds``
    the OFFERs that answer one of them."""
    mac = bytes.fromhex(chaddr.replace(":", ""))
    discover = (opt_u8(Opt.MESSAGE_TYPE, MessageType.DISCOVER),)
    offers: list[DhcpPacket] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # a flood's answers
        sock.bind(("0.0.0.0", 68))
        for xid in xids:
            request = DhcpPacket(
                op=Op.BOOTREQUEST, xid=xid, chaddr=mac, flags=BROADCAST_FLAG, options=discover
            )
            sock.sendto(request.encode(), ("255.255.255.255", 67))
        sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                answer = DhcpPacket.decode(sock.recv(2048))
            except (TimeoutError, DecodeError):
                continue
            if (
                (answer.op, answer.chaddr) == (Op.BOOTREPLY, mac)
                and answer.xid in xids
                and (answer.message_type is MessageType.OFFER)
            ):
                offers.append(answer)
    return offers


def discover_as(iface: str, chaddr: str, seconds: float = 2.0) -> list[str]:
    """The addresses the DHCP servers on ``iface`` offer to ``chaddr`` (see the module doc)."""
    xid = int.from_bytes(bytes.fromhex(chaddr.replace(":", ""))[-4:], "big")
    return [str(offer.yiaddr) for offer in _offers(iface, chaddr, range(xid, xid + 1), seconds)]


def flood_discover(iface: str, chaddr: str, count: int, listen: float = 3.0) -> int:
    """A VM flooding the DHCP server: ``count`` DISCOVERs from its own ``chaddr`` (so the
    anti-spoofing rules let each through), then how many were answered within ``listen`` s."""
    return len(_offers(iface, chaddr, range(1, count + 1), listen))


def flood_connect(address: str, port: int, seconds: float) -> int:
    """A VM opening TCP connections to ``address`` as fast as it can for ``seconds`` (at most
    256 pending, each closed once it is up): how many were established."""
    pending: dict[int, socket.socket] = {}
    done = 0
    poller = select.epoll()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            while len(pending) < 256:
                conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                conn.setblocking(False)
                conn.connect_ex((address, port))
                pending[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLOUT)
            for fd, _ in poller.poll(0.05):
                conn = pending.pop(fd)
                poller.unregister(fd)
                done += conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                conn.close()
    finally:
        for conn in pending.values():
            conn.close()
        poller.close()
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hatchery_lab.isolation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("node").add_argument("spec", type=Path)
    ra = sub.add_parser("ra")
    ra.add_argument("iface")
    ra.add_argument("prefix", type=ipaddress.IPv6Network)
    na = sub.add_parser("na")
    na.add_argument("iface")
    na.add_argument("target", type=ipaddress.IPv6Address)
    sub.add_parser("frames").add_argument("iface")
    sniffer = sub.add_parser("sniff")
    sniffer.add_argument("iface")
    sniffer.add_argument("seconds", type=float)
    forge = sub.add_parser("discover")
    forge.add_argument("iface")
    forge.add_argument("chaddr")
    rs_flood = sub.add_parser("rs-flood")
    rs_flood.add_argument("iface")
    rs_flood.add_argument("count", type=int)
    dhcp_flood = sub.add_parser("dhcp-flood")
    dhcp_flood.add_argument("iface")
    dhcp_flood.add_argument("chaddr")
    dhcp_flood.add_argument("count", type=int)
    syn_flood = sub.add_parser("connect-flood")
    syn_flood.add_argument("address")
    syn_flood.add_argument("port", type=int)
    syn_flood.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "node":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_node(NodeSpec.load(args.spec)))
    elif args.command == "ra":
        send(args.iface, router_advertisement(_mac(args.iface), args.prefix))
    elif args.command == "na":
        send(args.iface, neighbour_advertisement(_mac(args.iface), args.target))
    elif args.command == "discover":
        for offer in discover_as(args.iface, args.chaddr):
            print("offer", offer, flush=True)
    elif args.command == "rs-flood":
        send(args.iface, router_solicitation(_mac(args.iface)), args.count, gap=0)
    elif args.command == "dhcp-flood":
        offers = flood_discover(args.iface, args.chaddr, args.count)
        print(f"sent {args.count} offers {offers}", flush=True)
    elif args.command == "connect-flood":
        print("connected", flood_connect(args.address, args.port, args.seconds), flush=True)
    elif args.command == "frames":
        send_frames(args.iface)
    else:
        print("seen:", " ".join(sorted(sniff(args.iface, args.seconds))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
