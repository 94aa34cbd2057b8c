"""The nftables ruleset of one VM bridge, as a pure function of its ports.

A VM port may send only what a VM should. Two tables per bridge, ``bridge hatchery_<br>``
and ``inet hatchery_<br>``, both replaced in one ``nft -f`` transaction on every change:

* **Anti-spoofing** (bridge prerouting, priority -350, before anything else), per VM port:

  - Ethernet: the VM's own source MAC; only the ethertypes IPv4, ARP and IPv6. Everything
    else is dropped: 802.1Q/802.1ad tags (a VM must not hop into a VLAN of the uplink or of
    a VLAN-aware bridge), LLC frames such as STP BPDUs (a VM must not become root bridge),
    LLDP/CDP (a VM must not lie about the topology to the node or its switch), EAPOL,
    PPPoE discovery, Wake-on-LAN (0x0842: a VM must not power on nodes), MPLS... A VM on a
    flat L2 has no use for any of them; a VM that needs a VLAN gets a port on that VLAN.
  - ARP: sender MAC is the VM's, sender IPv4 is the VM's (or 0.0.0.0, ARP probes).
  - IPv4: source is the VM's address; DHCP *client* traffic from 0.0.0.0:68 to :67 is the
    one exception. No DHCP/BOOTP *server* traffic (udp sport 67, or dport 68): a VM never
    answers a PXE-booting node.
  - DHCP requests (udp dport 67) carry the VM's own MAC as ``chaddr``, with hardware type 1
    and length 6 (Ethernet, RFC 2131 section 2): the node's DHCP server reads a UDP socket
    and never sees the frame's source MAC, so this is what keeps a VM from asking for, or
    DECLINE-ing, another machine's address in its name. ``chaddr`` is bits 224..271 of the
    UDP payload (op, htype, hlen, hops, xid, secs, flags and four addresses come first).
  - IPv6: source is the VM's link-local address derived from its MAC (modified EUI-64 in
    fe80::/64, RFC 4291 section 2.5.1 and appendix A), one of the port's IPv6 pool addresses,
    or ``::`` for duplicate address detection and MLD reports only (RFC 4862 section 5.4.2,
    RFC 3590). No router advertisements (134) or redirects (137), RFC 4861 sections 4.2 and
    4.5: only routers send those, and a VM is not one. No DHCPv6 server or relay traffic
    (udp sport 547, dport 546). A neighbour advertisement (136) may only claim one of the
    VM's own addresses (its target address, RFC 4861 section 4.4): the IPv6 form of ARP
    spoofing. nft 1.0.6 has no ``icmpv6 taddr``; the target is matched as raw payload,
    bits 64..191 of the ICMPv6 header.

  This is what makes the metadata service's source-IP identity trustworthy.
* **Rate limits** (the same per-port chains, after the checks above): what a VM may ask of
  the agent's own userspace servers, per port, so one VM cannot spend the agent's single
  event loop on everyone's behalf. A flood beyond the rate is dropped on the bridge, before
  it costs the agent anything; the other VMs, nodes being birthed and the API are not
  slowed by it (``tests/integration/isolation/test_hostile_guest.py``):

  - DHCP and DHCPv6 requests (udp dport 67, 547): ``DHCP_RATE``. A client sends a handful
    per boot and one per renewal; iPXE in a VM asks twice.
  - Router solicitations (answered by ``hatchery.ra``): ``RS_RATE``. A host sends three
    at start-up (RFC 4861 section 10, MAX_RTR_SOLICITATIONS).
  - New connections to the metadata service (TCP SYN to 169.254.169.254):
    ``METADATA_RATE``. cloud-init makes a few dozen requests at boot; the service's own
    limits (``ConnectionLimits``) bound what is open at once, this bounds the rate.
* **Redirect** (bridge prerouting, ``dstnat`` priority -300, after anti-spoofing: chains of
  equal priority have no defined order): IPv4 frames from VM ports for 169.254.169.254 get
  the metadata veth's MAC as destination, so they reach the metadata namespace whatever
  gateway the guest used. A forward rule keeps the metadata veth talking only to VM ports:
  metadata traffic never leaves through an uplink.
* **The node's own services** (TFTP, boot HTTP, API): VM ports may not reach them on any of
  the node's addresses; ports that are not VMs' (nodes being birthed, peers, operators)
  still may. Such traffic is not switched across the bridge: it is passed *up* to the
  host's IP stack, where the bridge port it came in on is no longer known. What the kernel
  here offers (6.18, nft 1.0.6, tried):

  - ``fib daddr type local`` in a bridge-family chain, to tell "for this host" apart from
    "to be routed by this host": nft accepts it, the kernel refuses it (ENOENT: no fib
    expression for the bridge family).
  - ``meta ibrname`` (or any bridge-port key) in an ``inet`` chain: EOPNOTSUPP, these keys
    exist only in the bridge family; in ``inet`` the input interface is the bridge itself.
  - Dropping by port in the bridge ``input`` hook alone would also drop a VM's routed
    traffic (the node can be the VMs' gateway: a VM's tcp/8080 to the internet goes up the
    same way), and matching the bridge's own addresses there would miss the node's other
    addresses, which the node accepts on any interface (weak host model).

  So the bridge ``input`` hook (frames passed up to this host, never frames switched to
  another port) sets bit ``VM_PORT_MARK`` of the packet mark on frames from VM ports, and an
  ``inet`` ``input`` chain (packets delivered to a local address of this host, after the
  routing decision, IPv4 and IPv6) drops marked packets for the node's service ports. This
  works with and without br_netfilter (bridge-nf-call-iptables 0 and 1 both tried). The
  metadata path is untouched: frames for 169.254.169.254 are redirected in prerouting and
  switched to the metadata veth, never passed up. DHCP to the node (udp 67) stays open: VMs
  get their leases there.

Legacy ebtables has no nat table on current kernels; nftables' bridge family does this.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

METADATA_IP = "169.254.169.254"
TFTP_PORT = 69
# The packet-mark bit that says "came up from a VM port" between the bridge table and the
# inet table. Only this bit is set and tested; other users of the mark keep theirs.
VM_PORT_MARK = 0x10000000
# Per-port token buckets (nft ``limit``): sustained rate, and the burst allowed at once.
DHCP_RATE = "10/second burst 20 packets"
RS_RATE = "2/second burst 10 packets"
METADATA_RATE = "50/second burst 200 packets"


@dataclass(frozen=True, slots=True)
class Port:
    """A VM's port on the bridge: its tap, and the only MAC and addresses it may use.

    ``ipv6`` holds the port's IPv6 pool addresses, if any (pools are IPv4-only today); the
    link-local address derived from ``mac`` is always allowed.
    """

    iface: str
    mac: str
    ip: str
    ipv6: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeServices:
    """The node's own listeners that VM ports may not reach, on any address of the node."""

    tcp: tuple[int, ...] = ()
    udp: tuple[int, ...] = (TFTP_PORT,)


def link_local(mac: str) -> str:
    """The IPv6 link-local address a MAC gives by modified EUI-64 (RFC 4291 appendix A)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    if len(octets) != 6:
        raise ValueError(f"not an Ethernet MAC: {mac!r}")
    iid = bytes((octets[0] ^ 0x02,)) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


def table_name(bridge: str, held: bool = False) -> str:
    """The name of ``bridge``'s two tables; ``held``: of their copies that a flush cannot
    take (``held.py``). The prefixes differ, so no bridge's name gives another's table."""
    return ("hatcheryheld_" if held else "hatchery_") + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def _chain(iface: str) -> str:
    return "port_" + re.sub(r"[^A-Za-z0-9_]", "_", iface)


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _ipv6(port: Port) -> list[str]:
    """The port's own IPv6 addresses, canonical and without duplicates, link-local first."""
    own = [link_local(port.mac)]
    for text in port.ipv6:
        address = str(ipaddress.IPv6Address(text))
        if address not in own:
            own.append(address)
    return own


def _drop(reason: str) -> str:
    """A counted drop, named: ``drops`` reads the counters back by ``reason`` for /metrics."""
    return f'counter drop comment "{reason}"'


def _port_chain(port: Port) -> list[str]:
    own6 = _ipv6(port)
    targets = _set(f"0x{int(ipaddress.IPv6Address(a)):032x}" for a in own6)
    mac = port.mac.replace(":", "").lower()
    return [
        f"  chain {_chain(port.iface)} {{",
        f"    ether saddr != {port.mac} {_drop('mac')}",
        f"    ether type != {{ ip, arp, ip6 }} {_drop('ethertype')}",
        f"    ether type arp arp saddr ether != {port.mac} {_drop('arp')}",
        f"    ether type arp arp saddr ip != {{ 0.0.0.0, {port.ip} }} {_drop('arp')}",
        f"    udp sport {{ 67, 547 }} {_drop('dhcp-server')}",
        f"    udp dport {{ 68, 546 }} {_drop('dhcp-server')}",
        f"    udp dport 67 @ih,8,16 != 0x0106 {_drop('dhcp-chaddr')}",  # htype 1, hlen 6
        f"    udp dport 67 @ih,224,48 != 0x{mac} {_drop('dhcp-chaddr')}",
        f"    udp dport {{ 67, 547 }} limit rate over {DHCP_RATE} {_drop('dhcp-rate')}",
        f"    icmpv6 type nd-router-solicit limit rate over {RS_RATE} {_drop('rs-rate')}",
        f"    ether type ip ip daddr {METADATA_IP} tcp flags & (syn | ack) == syn "
        f"limit rate over {METADATA_RATE} {_drop('metadata-rate')}",
        "    ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
        f"    ether type ip ip saddr != {port.ip} {_drop('ipv4-source')}",
        f"    icmpv6 type {{ nd-router-advert, nd-redirect }} {_drop('router')}",
        f"    ether type ip6 ip6 saddr != {_set(['::', *own6])} {_drop('ipv6-source')}",
        # ICMPv6 by number: the image has no /etc/protocols
        f"    ip6 saddr :: meta l4proto != 58 {_drop('ipv6-source')}",
        "    ip6 saddr :: icmpv6 type != "
        f"{{ nd-neighbor-solicit, mld-listener-report, mld2-listener-report }} "
        f"{_drop('ipv6-source')}",
        f"    icmpv6 type nd-neighbor-advert @th,64,128 != {targets} {_drop('neighbour')}",
        "  }",
    ]


def render(
    bridge: str,
    metadata_iface: str,
    metadata_mac: str,
    ports: Sequence[Port],
    services: NodeServices | None = None,
    *,
    held: bool = False,
) -> str:
    """The script for ``nft -f -``: (re)create the bridge's two tables in one transaction.

    ``services`` are the node's ports closed to VM ports (default: TFTP only; the agent
    passes its API and boot HTTP ports too, see ``metadata.service.node_services``).
    ``held``: the same rules in the held copy (``held.py``), flagged ``owner``: only the
    session that runs this script may change or delete those tables, a flush passes them by.
    """
    table = table_name(bridge, held)
    flags = " { flags owner; }" if held else ""
    services = services if services is not None else NodeServices()
    ports = sorted(ports, key=lambda p: p.iface)
    names = _set(f'"{p.iface}"' for p in ports)
    mark = f"0x{VM_PORT_MARK:08x}"
    lines = [
        # make sure both exist, so the deletes below cannot fail
        f"table bridge {table}{flags}",
        f"delete table bridge {table}",
        f"table inet {table}{flags}",
        f"delete table inet {table}",
        f"table bridge {table} {{",
    ]
    if held:
        lines.append("  flags owner")
    for port in ports:
        lines += _port_chain(port)
    lines += [
        "  chain antispoof {",
        "    type filter hook prerouting priority -350; policy accept;",
    ]
    lines += [f'    iifname "{p.iface}" jump {_chain(p.iface)}' for p in ports]
    lines += ["  }", "  chain to_metadata {", "    type filter hook prerouting priority dstnat;"]
    if ports:
        lines += [
            f"    iifname {names} ether type ip ip daddr {METADATA_IP} "
            f"ether daddr set {metadata_mac}",
        ]
    lines += ["  }", "  chain metadata_confine {", "    type filter hook forward priority 0;"]
    if ports:
        lines.append(f'    iifname "{metadata_iface}" oifname != {names} drop')
    else:
        lines.append(f'    iifname "{metadata_iface}" drop')
    lines += ["  }", "  chain up_from_vms {", "    type filter hook input priority 0;"]
    if ports:
        lines.append(f"    iifname {names} meta mark set meta mark | {mark}")
    lines += ["  }", "}", f"table inet {table} {{", *(["  flags owner"] if held else []),
              "  chain vm_to_node {", "    type filter hook input priority 0;"]  # fmt: skip
    for proto, numbers in (("tcp", services.tcp), ("udp", services.udp)):
        if numbers:
            dports = _set(str(n) for n in sorted(set(numbers)))
            lines.append(f"    meta mark & {mark} == {mark} meta l4proto {proto} "
                         f"th dport {dports} {_drop('node-service')}")  # fmt: skip
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


DROP_REASONS = (
    "mac", "ethertype", "arp", "dhcp-server", "dhcp-chaddr", "ipv4-source", "router",
    "ipv6-source", "neighbour", "node-service", "dhcp-rate", "rs-rate", "metadata-rate",
)  # fmt: skip


def drops(listing: dict[str, Any]) -> dict[str, int]:
    """Packets dropped by reason, from ``nft -j list table ...`` of a table ``render`` made
    (every reason present, 0 if none). Rules without a known reason are not counted."""
    found = dict.fromkeys(DROP_REASONS, 0)
    for item in listing.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or rule.get("comment") not in found:
            continue
        for expr in rule.get("expr", []):
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict) and isinstance(counter.get("packets"), int):
                found[rule["comment"]] += counter["packets"]
    return found


def render_delete(bridge: str, held: bool = False) -> str:
    table = table_name(bridge, held)
    flags = " { flags owner; }" if held else ""
    return "".join(f"table {f} {table}{flags}\ndelete table {f} {table}\n"
                   for f in ("bridge", "inet"))  # fmt: skip
