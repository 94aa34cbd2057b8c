"""proxyDHCP beside the site's DHCP server: QEMU's iPXE ROM boots through our proxy.

The bridge's "site" DHCP server is dnsmasq in a namespace of its own, giving addresses only
(no boot options, no TFTP). Our ``serve dhcp --proxy`` answers the PXE client with boot
information only (an OFFER on 67 without address, the script URL in an ACK on 4011), and
``serve http`` serves the script, kernel and initrd. A watcher on the bridge records every
DHCP datagram on the wire: our server never sent an address, and the guest's address came
from dnsmasq's ACK.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery.netboot import copy_ipxe_binaries
from hatchery_lab import pxe_chain
from hatchery_lab.guest import find_guest_kernel
from hatchery_lab.netenv import NetEnv, Service
from tests.conftest import missing


@pytest.fixture
def proxy_lab(
    netenv: NetEnv, require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[NetEnv]:
    require_tool("qemu-system-x86_64")
    dnsmasq = require_tool("dnsmasq")
    if find_guest_kernel() is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    env = netenv
    env.run("ip", "link", "set", env.bridge, "promisc", "on")  # the watcher sees all ports
    watch = env.start("watch", [sys.executable, "-m", "hatchery_lab.dhcp_watch", env.bridge,
                                str(tmp_path / "wire.jsonl")])  # fmt: skip
    watch.wait_for("watching")
    pxe_chain.start_site_dnsmasq(env, dnsmasq)
    root, profiles = pxe_chain.prepare_artefacts(tmp_path)
    pxe_chain.start_our_services(env, root, profiles, proxy=True)
    yield env


def wire(env: NetEnv) -> list[dict[str, str]]:
    path = env.workdir / "wire.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def service(env: NetEnv, name: str) -> Service:
    return next(s for s in env.services if s.name == name)


def check_proxy_only(env: NetEnv, mac: str) -> None:
    """On the wire: our replies carry no address; the guest's lease is dnsmasq's; the guest
    asked us on 4011 from that very address."""
    s = env.subnet
    seen = [p for p in wire(env) if p["mac"] == mac]
    ours = [p for p in seen if p["src"] == env.server_ip and p["sport"] in (67, 4011)]
    assert ours, seen
    assert {p["yiaddr"] for p in ours} == {"0.0.0.0"}, ours
    assert any(p["type"] == "OFFER" and p["sport"] == 67 for p in ours), ours
    acks = [p for p in ours if p["type"] == "ACK"]
    assert acks and all(p["sport"] == 4011 and "/boot/ipxe?mac=" in p["file"] for p in acks)
    site = [p for p in seen if p["src"] == f"{s}.2" and p["type"] == "ACK"]
    assert site and site[-1]["yiaddr"].startswith(f"{s}."), seen
    leased = site[-1]["yiaddr"]
    asks = [p for p in seen if p["dport"] == 4011 and p["type"] == "REQUEST"]
    assert asks and all(p["src"] == leased == p["ciaddr"] for p in asks), asks
    dhcp = service(env, "dhcp").text()
    assert f"REQUEST {mac} (ipxe) on 4011 -> ACK yiaddr=0.0.0.0 to {leased}:68" in dhcp
    assert f"boot script for {mac}: profile test" in service(env, "http").text()
    assert f"DHCPACK(eth0) {leased} {mac}" in service(env, "site-dnsmasq").text()


def test_bios_ipxe_rom_boots_through_the_proxy(proxy_lab: NetEnv) -> None:
    mac = "52:54:00:5e:01:01"
    boot = pxe_chain.boot_guest(proxy_lab, mac, "bios")
    check_proxy_only(proxy_lab, mac)
    print(f"BIOS proxyDHCP chain: {boot.seconds:.1f} s from QEMU start to the guest marker")


def test_uefi_ovmf_boots_through_the_proxy(proxy_lab: NetEnv) -> None:
    if not pxe_chain.OVMF_CODE.exists():
        missing("OVMF is not installed (package ovmf)")
    mac = "52:54:00:5e:01:02"
    boot = pxe_chain.boot_guest(proxy_lab, mac, "uefi", timeout=600)
    check_proxy_only(proxy_lab, mac)
    print(f"UEFI proxyDHCP chain: {boot.seconds:.1f} s from QEMU start to the guest marker")


def test_ovmf_own_pxe_gets_ipxe_over_tftp_through_the_proxy(proxy_lab: NetEnv) -> None:
    """The classic proxyDHCP client: UEFI firmware's own PXE (EDK2's PxeBcDxe, QEMU's iPXE
    ROM switched off). It gets ``ipxe.efi`` from our proxy and TFTP, that iPXE does DHCP
    again, and from then on it is the iPXE path above."""
    if not pxe_chain.OVMF_CODE.exists():
        missing("OVMF is not installed (package ovmf)")
    env = proxy_lab
    tftp_root = env.workdir / "tftp"
    copy_ipxe_binaries(tftp_root)
    if not (tftp_root / "ipxe.efi").exists():
        missing("no /usr/lib/ipxe/ipxe.efi (package ipxe)")
    tftp = env.agent("tftp", "tftp", "--root", str(tftp_root), "--listen", f"{env.server_ip}:69")
    tftp.wait_for("TFTP serving")
    mac = "52:54:00:5e:01:03"
    boot = pxe_chain.boot_guest(env, mac, "uefi-pxe", timeout=600)
    firmware = [p for p in wire(env) if p["mac"] == mac and p["src"] == env.server_ip
                and p["file"] == "ipxe.efi"]  # fmt: skip
    assert firmware and {p["yiaddr"] for p in firmware} == {"0.0.0.0"}, firmware
    check_proxy_only(env, mac)
    print(f"OVMF PXE proxyDHCP chain: {boot.seconds:.1f} s from QEMU start to the guest marker")
