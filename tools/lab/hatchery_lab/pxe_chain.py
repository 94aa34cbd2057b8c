"""The PXE chain with a real QEMU guest: firmware → DHCP → iPXE → HTTP script → kernel and
initrd over HTTP → a marker from /init on the serial console. Shared by tests and bench/pxe.py.

The guest has no disk and QEMU's own iPXE ROM for virtio-net (no ``romfile=``), so on BIOS
the first DHCP client is already iPXE and no TFTP is needed.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from hatchery import pki
from hatchery.efi_sigdb import cacerts_esl
from hatchery.qemu.accel import choose_accel
from hatchery.qemu.cmdline import GuestSpec, Nic, build_argv
from hatchery_lab import REPO
from hatchery_lab.guest import (
    INIT_PRELUDE,
    busybox_initramfs,
    find_arm64_guest,
    find_guest_kernel,
    run_guest,
)
from hatchery_lab.netenv import NetEnv, Service, sh

MARKER = "HATCHERY-PXE-UP"
HTTP_PORT = 8080
HTTPS_PORT = 8443
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
#: AAVMF, edk2's ArmVirtQemu (package qemu-efi-aarch64): OVMF's counterpart for -M virt
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
QEMU_AARCH64 = "qemu-system-aarch64"
#: The arm64 guest's CPU under TCG: faster than "max" (no pointer-auth or SVE to emulate;
#: measured in docs/netboot.md).
ARM64_CPU = "cortex-a57"
PROFILES = """default: test
profiles:
  test:
    image: test
    role: pxe-test
    cmdline: console=ttyS0 panic=-1 quiet
"""
INIT = (
    INIT_PRELUDE
    + 'role=$(sed -n "s/.*hatchery.role=\\([^ ]*\\).*/\\1/p" /proc/cmdline)\n'
    + 'echo "guest machine=$(uname -m)"\n'
    + f'echo "{MARKER} role=$role END"\n'
    + "poweroff -f\n"
)


@dataclass(frozen=True, slots=True)
class Boot:
    seconds: float  # QEMU start -> marker
    console: str


ARM64_PROFILE = """    arm64:
      image: test-arm64
      cmdline: console=ttyAMA0 panic=-1 quiet
"""


def prepare_artefacts(workdir: Path, *, arm64: bool = False) -> tuple[Path, Path]:
    """The artefact root (``test/vmlinuz``, ``test/initrd``) and a profiles file for it;
    ``arm64``: ``test-arm64/Image`` and ``test-arm64/initrd`` too (the arm64 guest's kernel
    and an initrd with its busybox), named by the profile's ``arm64:`` mapping."""
    kernel = find_guest_kernel()
    if kernel is None:
        raise FileNotFoundError("no guest kernel in .cache (make guest-kernel)")
    root = workdir / "artefacts"
    (root / "test").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel.vmlinuz, root / "test" / "vmlinuz")
    (root / "test" / "initrd").write_bytes(busybox_initramfs(INIT))
    (workdir / "templates").mkdir(exist_ok=True)
    repo_template = REPO / "pxe" / "templates" / "default.ipxe"
    shutil.copyfile(repo_template, workdir / "templates" / "default.ipxe")
    profiles = workdir / "profiles.yaml"
    profiles.write_text(PROFILES)
    if arm64:
        guest = find_arm64_guest()
        if guest is None:
            raise FileNotFoundError("no arm64 guest in .cache (make arm64-guest)")
        (root / "test-arm64").mkdir(exist_ok=True)
        shutil.copyfile(guest.image, root / "test-arm64" / "Image")
        initrd = busybox_initramfs(INIT, busybox=guest.busybox)
        (root / "test-arm64" / "initrd").write_bytes(initrd)
        profiles.write_text(PROFILES + ARM64_PROFILE)
    return root, profiles


def start_our_services(
    env: NetEnv, root: Path, profiles: Path, *extra_dhcp: str, proxy: bool = False,
    tls: tuple[Path, Path] | None = None, extra_http: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """DHCP (+RA) and boot HTTP from ``hatchery-agent serve``, in the server namespace.
    ``proxy``: proxyDHCP beside another DHCP server on the bridge, no births range.
    ``tls``: the boot certificate and key: HTTPS on ``HTTPS_PORT`` too, and UEFI HTTP Boot
    clients are sent there for a unified kernel image."""
    https = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1]),
             "--tls-port", str(HTTPS_PORT)] if tls else []  # fmt: skip
    http = env.agent("http", "http", "--root", str(root), "--profiles", str(profiles),
                     "--listen", f"{env.server_ip}:{HTTP_PORT}", *https, *extra_http)  # fmt: skip
    mode = ["--proxy"] if proxy else ["--birth-range", f"{env.subnet}.100-{env.subnet}.199"]
    if tls:
        extra_dhcp = ("--https-url", f"https://{env.server_ip}:{HTTPS_PORT}", *extra_dhcp)
    dhcp = env.agent(
        "dhcp", "dhcp", "--interface", env.bridge, *mode,
        "--http-url", f"http://{env.server_ip}:{HTTP_PORT}",
        "--state-dir", str(env.workdir / "state"), *extra_dhcp,
    )  # fmt: skip
    http.wait_for("boot http: serving")
    dhcp.wait_for("proxyDHCP on" if proxy else "dhcp: serving on")
    dhcp.wait_for("ra: advertising")


def start_site_dnsmasq(env: NetEnv, dnsmasq: str = "dnsmasq") -> Service:
    """The site's DHCP server for proxyDHCP chains: dnsmasq in a namespace of its own on the
    bridge (``.2``), addresses from ``.100-.199`` only (no boot options, no TFTP)."""
    site_ns = env.add_client("site")
    s, work = env.subnet, env.workdir
    sh("ip", "-n", site_ns, "addr", "add", f"{s}.2/24", "dev", "eth0")
    site = env.start("site-dnsmasq", [
        dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=eth0",
        "--bind-interfaces", "--user=root", "--group=root", "--no-ping",
        f"--dhcp-range={s}.100,{s}.199,255.255.255.0,1h", "--dhcp-authoritative",
        f"--dhcp-leasefile={work / 'site.leases'}", f"--pid-file={work / 'site.pid'}",
        "--log-dhcp", "--log-facility=-",
    ], ns=site_ns)  # fmt: skip
    site.wait_for("DHCP, IP range")
    return site


@dataclass(frozen=True, slots=True)
class BootPki:
    """HTTPS boot's keys for a chain: the boot certificate (from an RSA boot CA, naming the
    server's address) and that CA as an EFI signature list, for OVMF's fw_cfg."""

    cert: Path
    key: Path
    cacerts: Path

    def firmware_args(self) -> tuple[str, ...]:
        return ("-fw_cfg", f"name=etc/edk2/https/cacerts,file={self.cacerts}")


def make_boot_pki(work: Path, *server_names: str, name: str = "Boot CA") -> BootPki:
    pki.init_ca(work / "boot-ca", name, rsa_keys=True)
    pair = pki.issue(work / "boot-ca", "boot", work / "boot", server_names=server_names)
    cacerts = work / "cacerts.esl"
    cacerts.write_bytes(cacerts_esl((work / "boot-ca" / pki.CA_CERT).read_bytes(), uuid.uuid4()))
    return BootPki(pair.cert, pair.key, cacerts)


PREFIX6 = "fd42:6b1:0:1::"  # a unique-local /64, only inside the test's own namespace
SERVER6 = f"{PREFIX6}1"


def start_our_services6(env: NetEnv, root: Path, profiles: Path, *extra_dhcp6: str) -> None:
    """IPv6 births: DHCPv6 and managed RAs, and boot HTTP on the bridge's IPv6 address
    (``env`` made with ``boot_network(..., ipv4=False, ipv6=f"{SERVER6}/64")``)."""
    http = env.agent("http", "http", "--root", str(root), "--profiles", str(profiles),
                     "--listen", f"[{SERVER6}]:{HTTP_PORT}")  # fmt: skip
    dhcp = env.agent(
        "dhcp6", "dhcp6", "--interface", env.bridge,
        "--birth-range", f"{PREFIX6}100-{PREFIX6}1ff",
        "--http-url", f"http://[{SERVER6}]:{HTTP_PORT}",
        "--state-dir", str(env.workdir / "state"), *extra_dhcp6,
    )  # fmt: skip
    http.wait_for("boot http: serving")
    dhcp.wait_for("dhcp6: serving on")
    dhcp.wait_for("ra: advertising")


def qemu_argv(
    env: NetEnv, tap: str, mac: str, firmware: str, more: tuple[str, ...] = ()
) -> list[str]:
    """``firmware_argv`` run in ``env``'s namespace."""
    return env.in_ns(firmware_argv(env.workdir, tap, mac, firmware, more))


def firmware_argv(
    workdir: Path, tap: str, mac: str, firmware: str, more: tuple[str, ...] = ()
) -> list[str]:
    """A disk-less guest on ``tap`` that boots from the network. ``firmware``: ``bios``
    (SeaBIOS), ``uefi`` (OVMF with QEMU's iPXE ROM), ``uefi-http`` (OVMF's own network
    stack: the ROM is switched off with ``romfile=``) or ``uefi-pxe`` (OVMF's own stack and
    its PXEv4: ``ipxe.efi`` over TFTP, then iPXE). ``more``: further QEMU arguments."""
    extra = ["-boot", "n", "-no-reboot"]
    own_stack = firmware in ("uefi-http", "uefi-pxe")
    if firmware in ("uefi", "uefi-http", "uefi-pxe"):
        vars_copy = workdir / f"OVMF_VARS-{tap}.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        extra += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]  # fmt: skip
    spec = GuestSpec(
        name=f"pxe-{firmware}",
        accel=choose_accel(),
        memory_mib=512,
        nics=() if own_stack else (Nic(tap, mac),),
        extra=tuple(extra),
    )
    argv = build_argv(spec)
    if firmware == "uefi-http":
        # only HTTP Boot: OVMF's PXE (v4 and v6) boot options off (OvmfPkg RUNTIME_CONFIG.md);
        # otherwise PXEv4 and then PXEv6 (~65 s of DHCPv6 retries) come first
        argv += [
            "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
            "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
        ]  # fmt: skip
    if firmware == "uefi-pxe":  # PXEv4 only: no ~65 s of DHCPv6 for PXEv6 first
        argv += ["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]
    argv += more  # the caller's own arguments (e.g. -fw_cfg)
    if own_stack:
        argv += [
            "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=",
        ]  # fmt: skip
    return argv


def boot_guest(
    env: NetEnv, mac: str, firmware: str = "bios", timeout: float = 300,
    more: tuple[str, ...] = (),
) -> Boot:  # fmt: skip
    """Boot a disk-less guest to the initrd's marker; ``more``: more QEMU arguments."""
    tap = env.add_tap(firmware.replace("-", "")[:5])
    with run_guest(qemu_argv(env, tap, mac, firmware, more)) as guest:
        seconds = guest.wait_for(f"{MARKER} role=pxe-test END".encode(), timeout)
        return Boot(seconds, guest.output.decode(errors="replace"))


def arm64_qemu_argv(
    env: NetEnv, tap: str, mac: str, more: tuple[str, ...] = (), *, pxe: bool = False
) -> list[str]:
    """A disk-less arm64 guest under TCG: ``-M virt`` with AAVMF (its code read-only, a copy
    of its variables), virtio-net without an option ROM (AAVMF's own network stack and its
    HTTP Boot option), the PL011 serial console on stdout; ``more``: e.g. the boot CA.
    ``pxe``: leave AAVMF's PXE options on (they come before HTTP Boot)."""
    vars_copy = env.workdir / f"AAVMF_VARS-{tap}.fd"
    shutil.copyfile(AAVMF_VARS, vars_copy)
    argv = [
        QEMU_AARCH64, "-name", "pxe-arm64", "-machine", "virt", "-accel", "tcg",
        "-cpu", ARM64_CPU, "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-no-reboot",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=",
        *more,
    ]  # fmt: skip
    if not pxe:
        # only HTTP Boot, as for OVMF: ArmVirtQemu reads the same knobs; otherwise its PXEv4
        # option (arch 11, which we answer with no boot file) first spends ~130 s giving up
        argv += [
            "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
            "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
        ]  # fmt: skip
    return env.in_ns(argv)


def boot_arm64_guest(
    env: NetEnv, mac: str, timeout: float = 900, more: tuple[str, ...] = ()
) -> Boot:
    """Boot the disk-less arm64 guest to the initrd's marker (UEFI HTTP Boot of a UKI)."""
    tap = env.add_tap("arm64")
    with run_guest(arm64_qemu_argv(env, tap, mac, more)) as guest:
        seconds = guest.wait_for(f"{MARKER} role=pxe-test END".encode(), timeout)
        return Boot(seconds, guest.output.decode(errors="replace"))
