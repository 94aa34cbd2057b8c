"""IPv6 births with the real firmware: a disk-less QEMU with Debian's OVMF on a bridge with
no IPv4 at all HTTP-boots over IPv6 from our DHCPv6, managed RAs and boot HTTP.

The chain, as far as it goes here: OVMF's UEFI HTTPv6 boot option solicits DHCPv6 (vendor
class HTTPClient, architecture 16) → our Advertise/Reply with an address from the birth
range and the Boot File URL ``http://[fd42:6b1:0:1::1]:8080/ipxe/ipxe.efi`` → OVMF fetches
Debian's ipxe.efi over IPv6 → that iPXE sees our RA (M=1), runs DHCPv6 itself (user class
iPXE) and gets its script URL → script, kernel and initrd over IPv6 HTTP → the marker
printed by the initrd's /init on the serial console.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery_lab import pxe_chain
from hatchery_lab.guest import find_guest_kernel
from hatchery_lab.netenv import NetEnv, boot_network, sh
from tests.conftest import missing


@pytest.fixture
def chain6(
    require_root: None, require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[NetEnv]:
    require_tool("qemu-system-x86_64")
    if not pxe_chain.OVMF_CODE.exists():
        missing("OVMF is not installed (package ovmf)")
    if find_guest_kernel() is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    if not Path("/usr/lib/ipxe/ipxe.efi").exists():
        missing("no /usr/lib/ipxe/ipxe.efi (package ipxe)")
    with boot_network(tmp_path, ipv4=False, ipv6=f"{pxe_chain.SERVER6}/64") as env:
        root, profiles = pxe_chain.prepare_artefacts(tmp_path)
        pxe_chain.start_our_services6(env, root, profiles)
        yield env


def test_ovmf_http_boots_over_ipv6_only(chain6: NetEnv) -> None:
    env = chain6
    bridge = sh("ip", "-n", env.ns, "-j", "addr", "show", env.bridge).stdout
    families = {a["family"] for link in json.loads(bridge) for a in link["addr_info"]}
    assert families == {"inet6"}, families  # no IPv4 address on the bridge at all
    mac = "52:54:00:5e:06:01"
    boot = pxe_chain.boot_guest(env, mac, "uefi-http", timeout=900)
    dhcp6 = next(s for s in env.services if s.name == "dhcp6").text()
    http = next(s for s in env.services if s.name == "http").text()
    url = f"http://[{pxe_chain.SERVER6}]:{pxe_chain.HTTP_PORT}"
    assert f"(http) -> REPLY {pxe_chain.PREFIX6}100 url='{url}/ipxe/ipxe.efi'" in dhcp6, dhcp6
    assert f"(ipxe) -> REPLY {pxe_chain.PREFIX6}100 url='{url}/boot/ipxe?mac={mac}'" in dhcp6
    assert f"boot script for {mac}: profile test" in http
    assert f"to {pxe_chain.PREFIX6}100" in http
    leases = json.loads((env.workdir / "state" / "dhcp6-births.json").read_text())["leases"]
    assert [(x["mac"], x["ip"]) for x in leases] == [(mac, f"{pxe_chain.PREFIX6}100")]
    print(f"UEFI HTTP Boot over IPv6: {boot.seconds:.1f} s from QEMU start to the guest marker")
