"""A disk-less QEMU guest boots over the network from our services alone (DHCP, RA, HTTP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hatchery_lab import pxe_chain
from hatchery_lab.guest import find_guest_kernel
from hatchery_lab.netenv import NetEnv
from tests.conftest import missing


@pytest.fixture
def chain(netenv: NetEnv, require_tool: Callable[[str], str], tmp_path: Path, request):
    require_tool("qemu-system-x86_64")
    if find_guest_kernel() is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    root, profiles = pxe_chain.prepare_artefacts(tmp_path)
    extra = getattr(request, "param", ())
    pxe_chain.start_our_services(netenv, root, profiles, *extra)
    return netenv


def _services_saw_ipxe(env: NetEnv, mac: str) -> None:
    dhcp = env.services[1].text()
    http = env.services[0].text()
    assert f"REQUEST {mac} (ipxe) -> ACK" in dhcp
    assert f"boot script for {mac}: profile test" in http


def test_bios_ipxe_rom_boots_kernel_and_initrd_over_http(chain: NetEnv) -> None:
    mac = "52:54:00:5e:00:01"
    boot = pxe_chain.boot_guest(chain, mac, "bios")
    _services_saw_ipxe(chain, mac)
    print(f"BIOS PXE chain: {boot.seconds:.1f} s from QEMU start to the guest marker")


def test_uefi_ovmf_with_ipxe_rom_boots_over_http(chain: NetEnv) -> None:
    if not pxe_chain.OVMF_CODE.exists():
        missing("OVMF is not installed (package ovmf)")
    mac = "52:54:00:5e:00:02"
    boot = pxe_chain.boot_guest(chain, mac, "uefi", timeout=600)
    _services_saw_ipxe(chain, mac)
    print(f"UEFI PXE chain: {boot.seconds:.1f} s from QEMU start to the guest marker")


@pytest.mark.parametrize("chain", [("--no-tftp",)], indirect=True)
def test_uefi_http_boot_needs_no_tftp(chain: NetEnv) -> None:
    """OVMF's own network stack (the iPXE ROM switched off): HTTP Boot gets ipxe.efi over
    HTTP straight away; that iPXE then fetches its script. No TFTP anywhere in the path."""
    if not pxe_chain.OVMF_CODE.exists():
        missing("OVMF is not installed (package ovmf)")
    mac = "52:54:00:5e:00:03"
    boot = pxe_chain.boot_guest(chain, mac, "uefi-http", timeout=900)
    dhcp = chain.services[1].text()
    assert f"REQUEST {mac} (http) -> ACK" in dhcp
    _services_saw_ipxe(chain, mac)
    print(f"UEFI HTTP Boot chain: {boot.seconds:.1f} s from QEMU start to the guest marker")
