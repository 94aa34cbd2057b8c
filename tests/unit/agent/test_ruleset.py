"""The bridge ruleset: anti-spoofing before the redirect, checked by nft itself."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from hatchery.metadata.ruleset import Port, render, table_name

PORTS = [
    Port("hv-b", "52:54:0a:00:00:0b", "10.0.0.11"),
    Port("hv-a", "52:54:0a:00:00:0a", "10.0.0.10"),
]


def test_priorities_put_antispoofing_first() -> None:
    script = render("br0", "hmdx", "aa:bb:cc:dd:ee:ff", PORTS)
    assert "priority -350" in script and "priority dstnat" in script
    assert script.index("chain antispoof") < script.index("chain to_metadata")
    assert 'iifname { "hv-a", "hv-b" } ether type ip ip daddr 169.254.169.254' in script
    assert "ether saddr != 52:54:0a:00:00:0a drop" in script
    assert "arp saddr ip != { 0.0.0.0, 10.0.0.11 } drop" in script
    assert 'iifname "hmdx" oifname != { "hv-a", "hv-b" } drop' in script


def test_order_of_ports_does_not_matter() -> None:
    assert render("br0", "m", "aa:bb:cc:dd:ee:ff", PORTS) == render(
        "br0", "m", "aa:bb:cc:dd:ee:ff", list(reversed(PORTS))
    )


def test_table_names_are_safe() -> None:
    assert table_name("br-vm.10") == "hatchery_br_vm_10"


def test_nft_accepts_the_ruleset(require_tool: Callable[[str], str], require_root: None) -> None:
    nft = require_tool("nft")
    for ports in (PORTS, []):
        script = render("br-test", "hmdx", "aa:bb:cc:dd:ee:ff", ports)
        check = subprocess.run([nft, "-c", "-f", "-"], input=script, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
