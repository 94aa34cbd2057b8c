"""arm64 births with the real firmware: a disk-less ``qemu-system-aarch64`` (``-M virt``,
TCG) with Debian's AAVMF boots Debian's arm64 kernel and a busybox initrd from our services.

The chain: AAVMF's UEFI HTTPv4 boot option → our DHCP sees client architecture 19 (ARM64
UEFI HTTP) and sends ``/boot/uki.efi?mac=MAC&arch=arm64`` → the boot HTTP service streams a
unified kernel image made of systemd's arm64 stub and the profile's ``arm64:`` artefacts
(the bare ``Image`` and an initrd with an arm64 busybox) → the stub starts the kernel → the
initrd's marker on the PL011 console. AAVMF's PXE options are switched off through fw_cfg
as OVMF's are (PXEv4, architecture 11, gets an address and no boot file from us: there is
no arm64 iPXE; the firmware spends ~130 s giving up on it). Then the same over HTTPS, with
the boot CA pinned through AAVMF's fw_cfg as for OVMF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery_lab import pxe_chain
from hatchery_lab.guest import find_arm64_guest, find_guest_kernel
from hatchery_lab.netenv import NetEnv, boot_network
from tests.conftest import missing


def _arm64_prerequisites(require_tool: Callable[[str], str]) -> Path:
    """The arm64 stub's path, or skip (locally) / fail (CI) naming what is missing."""
    require_tool(pxe_chain.QEMU_AARCH64)
    if not pxe_chain.AAVMF_CODE.exists():
        missing("AAVMF is not installed (package qemu-efi-aarch64)")
    guest = find_arm64_guest()
    if guest is None:
        missing("no arm64 guest in .cache (make arm64-guest)")
    if find_guest_kernel() is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    assert guest is not None
    return guest.stub


@pytest.fixture
def arm64_chain(
    require_root: None, require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[NetEnv]:
    stub = _arm64_prerequisites(require_tool)
    with boot_network(tmp_path, subnet="10.234.0") as env:
        root, profiles = pxe_chain.prepare_artefacts(tmp_path, arm64=True)
        pxe_chain.start_our_services(env, root, profiles,
                                     extra_http=("--uki-stub-arm64", str(stub)))  # fmt: skip
        yield env


@pytest.fixture
def arm64_https_chain(
    require_root: None, require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[tuple[NetEnv, tuple[str, ...]]]:
    stub = _arm64_prerequisites(require_tool)
    with boot_network(tmp_path, subnet="10.235.0") as env:
        ours = pxe_chain.make_boot_pki(tmp_path / "ours", env.server_ip)
        root, profiles = pxe_chain.prepare_artefacts(tmp_path, arm64=True)
        pxe_chain.start_our_services(env, root, profiles, tls=(ours.cert, ours.key),
                                     extra_http=("--uki-stub-arm64", str(stub)))  # fmt: skip
        yield env, ours.firmware_args()


def _check(env: NetEnv, mac: str, url: str, boot: pxe_chain.Boot) -> None:
    dhcp = next(s for s in env.services if s.name == "dhcp").text()
    http = next(s for s in env.services if s.name == "http").text()
    assert f"file='{url}'" in dhcp, dhcp  # architecture 19 answered with the arm64 URL
    assert f"unified kernel image for {mac}: profile test (arm64 image test-arm64)" in http, http
    assert f"URI: {url}" in boot.console
    assert "role=pxe-test END" in boot.console  # the command line from inside the image
    assert "guest machine=aarch64" in boot.console  # /init's uname -m: an arm64 kernel ran it


def test_aavmf_http_boots_the_arm64_uki(arm64_chain: NetEnv) -> None:
    env = arm64_chain
    mac = "52:54:00:5e:0a:01"
    boot = pxe_chain.boot_arm64_guest(env, mac)
    url = f"http://{env.server_ip}:{pxe_chain.HTTP_PORT}/boot/uki.efi?mac={mac}&arch=arm64"
    _check(env, mac, url, boot)
    print(f"arm64 UEFI HTTP Boot of a UKI under TCG ({pxe_chain.ARM64_CPU}): "
          f"{boot.seconds:.1f} s from QEMU start to the guest marker")  # fmt: skip


def test_aavmf_https_boots_the_arm64_uki_with_the_pinned_ca(
    arm64_https_chain: tuple[NetEnv, tuple[str, ...]],
) -> None:
    env, firmware = arm64_https_chain
    mac = "52:54:00:5e:0a:02"
    boot = pxe_chain.boot_arm64_guest(env, mac, more=firmware)
    url = f"https://{env.server_ip}:{pxe_chain.HTTPS_PORT}/boot/uki.efi?mac={mac}&arch=arm64"
    _check(env, mac, url, boot)
    print(f"arm64 UEFI HTTPS Boot of a UKI under TCG ({pxe_chain.ARM64_CPU}): "
          f"{boot.seconds:.1f} s from QEMU start to the guest marker")  # fmt: skip
