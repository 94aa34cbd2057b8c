"""The bridge ruleset: golden text, anti-spoofing before the redirect, checked by nft itself."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hatchery.config import AgentConfig, BootServiceConfig, BridgeConfig
from hatchery.metadata.ruleset import (
    NodeServices,
    Port,
    link_local,
    render,
    render_delete,
    table_name,
)
from hatchery.metadata.service import DEFAULT_NODE_SERVICES, node_services

GOLDEN = Path(__file__).parent / "golden"
PORTS = [
    Port("hv-b", "52:54:0a:00:00:0b", "10.0.0.11"),
    Port("hv-a", "52:54:0a:00:00:0a", "10.0.0.10", ipv6=("fd00:0::10",)),
]
SERVICES = NodeServices(tcp=(8080, 6976), udp=(69,))


def _golden(name: str) -> str:
    return (GOLDEN / name).read_text()


def test_golden_ruleset_with_ports() -> None:
    """The whole script, reviewed line by line once; a change here is a change of policy."""
    script = render("br0", "hmd0123456789", "aa:bb:cc:dd:ee:ff", PORTS, SERVICES)
    assert script == _golden("ruleset-br0.nft")


def test_golden_ruleset_without_ports() -> None:
    script = render("br0", "hmd0123456789", "aa:bb:cc:dd:ee:ff", [], SERVICES)
    assert script == _golden("ruleset-br0-empty.nft")


def test_priorities_put_antispoofing_first() -> None:
    script = render("br0", "hmdx", "aa:bb:cc:dd:ee:ff", PORTS)
    assert "priority -350" in script and "priority dstnat" in script
    assert script.index("chain antispoof") < script.index("chain to_metadata")
    assert 'iifname { "hv-a", "hv-b" } ether type ip ip daddr 169.254.169.254' in script
    assert "ether saddr != 52:54:0a:00:00:0a counter drop" in script
    assert "arp saddr ip != { 0.0.0.0, 10.0.0.11 } counter drop" in script
    assert 'iifname "hmdx" oifname != { "hv-a", "hv-b" } drop' in script


def test_dhcp_server_traffic_is_dropped_before_the_client_exception() -> None:
    chain = render("br0", "m", "aa:bb:cc:dd:ee:ff", PORTS).split("chain port_hv_a {")[1]
    server = chain.index("udp sport { 67, 547 } counter drop")
    assert server < chain.index("udp dport { 68, 546 } counter drop")
    assert server < chain.index("ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")


def test_ipv6_sources_are_the_link_local_the_pool_and_dad_only() -> None:
    script = render("br0", "m", "aa:bb:cc:dd:ee:ff", PORTS)
    assert "ip6 saddr != { ::, fe80::5054:aff:fe00:a, fd00::10 } counter drop" in script
    assert "ip6 saddr != { ::, fe80::5054:aff:fe00:b } counter drop" in script
    assert "icmpv6 type { nd-router-advert, nd-redirect } counter drop" in script


def test_node_services_are_closed_to_marked_packets_only() -> None:
    script = render("br0", "m", "aa:bb:cc:dd:ee:ff", PORTS, SERVICES)
    assert 'iifname { "hv-a", "hv-b" } meta mark set meta mark | 0x10000000' in script
    assert (
        "th dport { 6976, 8080 } counter drop" in script
        and "th dport { 69 } counter drop" in script
    )
    no_services = render("br0", "m", "aa:bb:cc:dd:ee:ff", PORTS, NodeServices(udp=()))
    assert "dport" not in no_services.rsplit("table inet", 1)[1]


@pytest.mark.parametrize(
    ("mac", "address"),
    [
        ("52:54:00:12:34:56", "fe80::5054:ff:fe12:3456"),  # QEMU's default NIC
        ("00:00:5e:00:53:01", "fe80::200:5eff:fe00:5301"),  # RFC 7042's documentation MAC
        ("02:00:00:00:00:01", "fe80::ff:fe00:1"),  # the U/L bit flips back to 0
    ],
)
def test_link_local_is_modified_eui64(mac: str, address: str) -> None:
    assert link_local(mac) == address
    assert ipaddress.IPv6Address(link_local(mac.upper())) == ipaddress.IPv6Address(address)


def test_link_local_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        link_local("52:54:00:12:34")


def test_order_of_ports_does_not_matter() -> None:
    assert render("br0", "m", "aa:bb:cc:dd:ee:ff", PORTS) == render(
        "br0", "m", "aa:bb:cc:dd:ee:ff", list(reversed(PORTS))
    )


def test_table_names_are_safe() -> None:
    assert table_name("br-vm.10") == "hatchery_br_vm_10"


def test_the_held_copy_is_the_same_policy_in_owned_tables() -> None:
    """``held.py``: other names, the ``owner`` flag, and otherwise line for line the rules
    of the golden script (so the review of one is the review of both)."""
    held = render("br0", "hmd0123456789", "aa:bb:cc:dd:ee:ff", PORTS, SERVICES, held=True)
    lines = held.replace("hatcheryheld_br0", "hatchery_br0").replace(" { flags owner; }", "")
    assert [x for x in lines.splitlines() if x.strip() != "flags owner"] == (
        _golden("ruleset-br0.nft").splitlines()
    )
    assert held.count("table bridge hatcheryheld_br0 {\n  flags owner\n") == 1
    assert held.count("table inet hatcheryheld_br0 {\n  flags owner\n") == 1
    assert table_name("br0", held=True) == "hatcheryheld_br0"
    assert not table_name("held_br0").startswith(table_name("br0", held=True))


def test_delete_removes_both_tables() -> None:
    assert render_delete("br0") == (
        "table bridge hatchery_br0\ndelete table bridge hatchery_br0\n"
        "table inet hatchery_br0\ndelete table inet hatchery_br0\n"
    )


def test_node_services_come_from_the_config() -> None:
    config = AgentConfig(
        listen_port=7000,
        bridges=(
            BridgeConfig("br0", boot=BootServiceConfig(http_port=8081)),
            BridgeConfig("br1", boot=BootServiceConfig()),
            BridgeConfig("br2"),
        ),
    )
    assert node_services(config) == NodeServices(tcp=(7000, 8080, 8081), udp=(69, 4011, 547))
    assert node_services(AgentConfig()) == NodeServices(tcp=(6976,), udp=(69, 4011, 547))
    assert DEFAULT_NODE_SERVICES == NodeServices(tcp=(6976, 8080), udp=(69, 4011, 547))


def test_nft_accepts_the_ruleset(require_tool: Callable[[str], str], require_root: None) -> None:
    """``nft -c``: parsed and checked against the kernel, nothing changed.

    nft runs where /etc/protocols and /etc/services are empty, as in the hypervisor image
    (no netbase): a protocol or service *name* in the rules would not resolve there (the e2e
    demo once failed on ``ipv6-icmp``), so the rules use numbers.
    """
    nft = require_tool("nft")
    unshare = require_tool("unshare")
    hidden = (
        "mount --bind /dev/null /etc/protocols && mount --bind /dev/null /etc/services && "
        f"exec {nft} -c -f -"
    )
    argv = [unshare, "--mount", "--propagation", "private", "sh", "-c", hidden]
    scripts = [
        render("br-test", "hmdx", "aa:bb:cc:dd:ee:ff", ports, services)
        for ports in (PORTS, [])
        for services in (SERVICES, NodeServices(), NodeServices(udp=()))
    ]
    held = render("br-test", "hmdx", "aa:bb:cc:dd:ee:ff", PORTS, SERVICES, held=True)
    for script in [*scripts, held, render_delete("br-test"), render_delete("br-test", True)]:
        check = subprocess.run(argv, input=script, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_a_ports_requests_to_the_agent_are_rate_limited_before_the_dhcp_exception() -> None:
    """Per port (each port has its own chain, so its own buckets), before the accept that
    lets a VM's DHCP client through and before anything reaches the agent."""
    chain = render("br0", "m", "aa:bb:cc:dd:ee:ff", PORTS).split("chain port_hv_a {")[1]
    chain = chain.split("\n  }", 1)[0]
    dhcp = chain.index("udp dport { 67, 547 } limit rate over 10/second burst 20 packets")
    assert chain.index("icmpv6 type nd-router-solicit limit rate over") > 0
    assert chain.index("tcp flags & (syn | ack) == syn limit rate over 50/second") > 0
    assert dhcp > chain.index('drop comment "dhcp-chaddr"')  # forged ones are not counted
    assert dhcp < chain.index("ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")
