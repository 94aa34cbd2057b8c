"""The nftables ruleset of one VM bridge, as a pure function of its ports.

Two jobs, in one ``bridge`` family table per bridge, replaced atomically on every change:

* **Anti-spoofing** (prerouting, priority -350, before anything else): a frame from a VM's
  tap must carry the VM's MAC, its IPv4 source must be the VM's address (DHCP's 0.0.0.0
  excepted) and ARP must claim only the VM's own MAC and address. This is what makes the
  metadata service's source-IP identity trustworthy.
* **Redirect** (prerouting, ``dstnat`` priority -300, after anti-spoofing: chains of equal
  priority have no defined order): IPv4 frames from VM ports for 169.254.169.254 get the
  metadata veth's MAC as destination, so they reach the metadata namespace whatever
  gateway the guest used. A forward rule keeps the metadata veth talking only to VM ports:
  metadata traffic never leaves through an uplink.

Legacy ebtables has no nat table on current kernels; nftables' bridge family does this.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

METADATA_IP = "169.254.169.254"


@dataclass(frozen=True, slots=True)
class Port:
    """A VM's port on the bridge: its tap, and the only MAC and IPv4 it may use."""

    iface: str
    mac: str
    ip: str


def table_name(bridge: str) -> str:
    return "hatchery_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def _chain(iface: str) -> str:
    return "port_" + re.sub(r"[^A-Za-z0-9_]", "_", iface)


def render(bridge: str, metadata_iface: str, metadata_mac: str, ports: Sequence[Port]) -> str:
    """The script for ``nft -f -``: (re)create the bridge's table in one transaction."""
    table = table_name(bridge)
    ports = sorted(ports, key=lambda p: p.iface)
    lines = [
        f"table bridge {table}",  # make sure it exists, so the delete below cannot fail
        f"delete table bridge {table}",
        f"table bridge {table} {{",
    ]
    for port in ports:
        lines += [
            f"  chain {_chain(port.iface)} {{",
            f"    ether saddr != {port.mac} drop",
            f"    ether type arp arp saddr ether != {port.mac} drop",
            f"    ether type arp arp saddr ip != {{ 0.0.0.0, {port.ip} }} drop",
            "    ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
            f"    ether type ip ip saddr != {port.ip} drop",
            "  }",
        ]
    lines += [
        "  chain antispoof {",
        "    type filter hook prerouting priority -350; policy accept;",
    ]
    lines += [f'    iifname "{p.iface}" jump {_chain(p.iface)}' for p in ports]
    lines += ["  }", "  chain to_metadata {", "    type filter hook prerouting priority dstnat;"]
    if ports:
        names = ", ".join(f'"{p.iface}"' for p in ports)
        lines += [
            f"    iifname {{ {names} }} ether type ip ip daddr {METADATA_IP} "
            f"ether daddr set {metadata_mac}",
        ]
    lines += ["  }", "  chain metadata_confine {", "    type filter hook forward priority 0;"]
    if ports:
        lines.append(f'    iifname "{metadata_iface}" oifname != {{ {names} }} drop')
    else:
        lines.append(f'    iifname "{metadata_iface}" drop')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def render_delete(bridge: str) -> str:
    table = table_name(bridge)
    return f"table bridge {table}\ndelete table bridge {table}\n"
