"""Watch every DHCP/proxyDHCP datagram on one interface and write one JSON line each.

``python -m hatchery_lab.dhcp_watch IFACE OUT`` (run inside the test's namespace, as root):
an ``AF_PACKET`` socket sees what the interface receives and what it sends, so a test can
check what each server really put on the wire (say, that our proxyDHCP never gave an
address) rather than what the server says it did. UDP to or from 67, 68 and 4011 only;
no VLAN tags (the test bridges have none). The interface should be promiscuous to see
unicast between other ports of a bridge.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import struct
import sys
from pathlib import Path

from hatchery.dhcp.packet import DecodeError, DhcpPacket

ETH_P_ALL = 0x0003
PORTS = {67, 68, 4011}


def record(frame: bytes) -> dict[str, object] | None:
    """The DHCP facts of one Ethernet frame, or None if it carries no DHCP."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 17 or len(ip) < ihl + 8:
        return None
    sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
    if sport not in PORTS and dport not in PORTS:
        return None
    try:
        packet = DhcpPacket.decode(ip[ihl + 8 :])
    except DecodeError:
        return None
    return {
        "src": str(ipaddress.IPv4Address(ip[12:16])), "sport": sport,
        "dst": str(ipaddress.IPv4Address(ip[16:20])), "dport": dport,
        "type": packet.message_type.name, "mac": packet.mac, "ciaddr": str(packet.ciaddr),
        "yiaddr": str(packet.yiaddr), "server_id": str(packet.server_id or ""),
        "file": packet.bootfile.decode(errors="replace"),
    }  # fmt: skip


def main(argv: list[str]) -> int:
    interface, out = argv[1], Path(argv[2])
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    seen: set[bytes] = set()  # a frame seen twice (received and forwarded) counts once
    with out.open("a") as log:
        print("watching", interface, flush=True)
        while True:
            frame = sock.recv(65535)
            if frame in seen:
                continue
            seen.add(frame)
            found = record(frame)
            if found is not None:
                log.write(json.dumps(found) + "\n")
                log.flush()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
