"""HTTPS boot with a pinned boot CA, with the real firmware: Debian's OVMF, given the boot CA
through its firmware configuration (``etc/edk2/https/cacerts``, an EFI signature list made
by ``hatchery.efi_sigdb``), boots a disk-less QEMU from our services over HTTPS — and a
server whose certificate comes from another CA gets nothing from it.

The chain: OVMF's UEFI HTTPv4 boot option → our DHCP sends the HTTPS URL of the machine's
unified kernel image (``/boot/uki.efi?mac=``) → OVMF checks the server's certificate against
the pinned CA and its address against the certificate, fetches the UKI over TLS and runs it
→ systemd's EFI stub starts the kernel with the initrd and command line from the same
download → the initrd's marker on the serial console. No iPXE and no plain HTTP in between:
Debian's iPXE has no HTTPS at all (docs/netboot.md), so a chain through it would not be
authenticated past the firmware.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hatchery_lab import pxe_chain
from hatchery_lab.guest import find_guest_kernel, run_guest
from hatchery_lab.netenv import NetEnv, boot_network, sh
from tests.conftest import missing

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
ROGUE_IP_SUFFIX = 2  # the man in the middle's address on the same bridge


@dataclass(frozen=True, slots=True)
class HttpsChain:
    env: NetEnv
    firmware: tuple[str, ...]  # QEMU arguments giving OVMF the boot CA
    rogue: tuple[Path, Path]  # a certificate for the rogue server, from another CA


@pytest.fixture
def https_chain(
    require_root: None, require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[HttpsChain]:
    require_tool("qemu-system-x86_64")
    if not pxe_chain.OVMF_CODE.exists():
        missing("OVMF is not installed (package ovmf)")
    if not STUB.exists():
        missing(f"no {STUB} (package systemd-boot-efi)")
    if find_guest_kernel() is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    with boot_network(tmp_path, subnet="10.233.0") as env:
        # The boot CA (RSA: Debian's OVMF has no elliptic-curve TLS) and this node's boot
        # certificate naming the bridge address the firmware connects to.
        ours = pxe_chain.make_boot_pki(tmp_path / "ours", env.server_ip)
        # Another CA, of the same kind and name, and a certificate it made for the rogue's
        # address: everything right except who signed it.
        rogue = pxe_chain.make_boot_pki(tmp_path / "rogue", f"{env.subnet}.{ROGUE_IP_SUFFIX}")
        root, profiles = pxe_chain.prepare_artefacts(tmp_path)
        pxe_chain.start_our_services(env, root, profiles, tls=(ours.cert, ours.key))
        yield HttpsChain(env, ours.firmware_args(), (rogue.cert, rogue.key))


def test_ovmf_boots_a_uki_over_https_with_the_pinned_ca(https_chain: HttpsChain) -> None:
    env = https_chain.env
    mac = "52:54:00:5e:08:01"
    boot = pxe_chain.boot_guest(env, mac, "uefi-http", timeout=600,
                                more=https_chain.firmware)  # fmt: skip
    dhcp = next(s for s in env.services if s.name == "dhcp").text()
    http = next(s for s in env.services if s.name == "http").text()
    url = f"https://{env.server_ip}:{pxe_chain.HTTPS_PORT}/boot/uki.efi?mac={mac}"
    assert url in dhcp, dhcp
    assert f"unified kernel image for {mac}: profile test" in http, http
    # the guest ran the command line that came inside the image
    assert "role=pxe-test END" in boot.console
    assert f"URI: {url}" in boot.console
    print(f"UEFI HTTPS Boot of a UKI: {boot.seconds:.1f} s from QEMU start to the guest marker")


def test_a_server_with_another_cas_certificate_gets_nothing(
    https_chain: HttpsChain, tmp_path: Path
) -> None:
    env = https_chain.env
    rogue_ip = f"{env.subnet}.{ROGUE_IP_SUFFIX}"
    sh("ip", "-n", env.ns, "addr", "add", f"{rogue_ip}/24", "dev", env.bridge)
    cert, key = https_chain.rogue
    root, profiles = tmp_path / "artefacts", tmp_path / "profiles.yaml"
    rogue = env.agent("rogue", "http", "--root", str(root), "--profiles", str(profiles),
                      "--listen", f"{rogue_ip}:8081", "--tls-cert", str(cert),
                      "--tls-key", str(key), "--tls-port", str(pxe_chain.HTTPS_PORT))  # fmt: skip
    rogue.wait_for("boot http: serving")
    # The rogue answers DHCP first (here: it is our DHCP server, told the rogue's URL, which
    # is what winning the race on the boot network gets an attacker).
    ours = next(s for s in env.services if s.name == "dhcp")
    ours.stop()
    env.services.remove(ours)
    dhcp = env.agent(
        "dhcp-rogue", "dhcp", "--interface", env.bridge,
        "--birth-range", f"{env.subnet}.100-{env.subnet}.199",
        "--http-url", f"http://{rogue_ip}:8081",
        "--https-url", f"https://{rogue_ip}:{pxe_chain.HTTPS_PORT}",
        "--state-dir", str(tmp_path / "rogue-state"),
    )  # fmt: skip
    dhcp.wait_for("dhcp: serving on")
    mac = "52:54:00:5e:08:02"
    tap = env.add_tap("rogue")
    argv = pxe_chain.qemu_argv(env, tap, mac, "uefi-http", https_chain.firmware)
    with run_guest(argv) as guest:
        # OVMF gives up on the HTTPv4 option: the handshake failed on the certificate
        guest.wait_for(b'failed to load Boot0001 "UEFI HTTPv4', 300)
    console = guest.output.decode(errors="replace")
    assert f"URI: https://{rogue_ip}:{pxe_chain.HTTPS_PORT}/boot/uki.efi" in console, console
    assert pxe_chain.MARKER not in console
    assert "unified kernel image for" not in rogue.text()  # not one request got through
