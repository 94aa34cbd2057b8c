"""Our mkosi images in tests and benchmarks: build them, boot them, give them a network.

``built_images()`` runs ``tools/build-images.sh`` (a no-op when nothing changed) and returns
build/images. ``appliance_lan()`` is a throwaway network namespace holding a bridge, a tap for
the guest and dnsmasq as the DHCP server; QEMU runs inside that namespace. Everything is
removed afterwards, even on failure: only processes started here are killed, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hatchery.qemu import firmware
from hatchery.qemu.accel import choose_accel
from hatchery.qemu.cmdline import DirectKernel, GuestSpec, Nic, build_argv
from hatchery_lab import REPO
from hatchery_lab.net import unique_name

IMAGES_DIR = REPO / "build" / "images"
BUILD_SCRIPT = REPO / "tools" / "build-images.sh"
APPLIANCE_MAC = "52:54:00:a1:00:01"
LEASE_MARKER = b"HATCHERY-APPLIANCE: lease "


class ImageBuildError(RuntimeError):
    pass


def run_build(
    *args: str,
    output_dir: Path | None = None,
    timeout: float = 3600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the image build as ``make images`` does (``env`` adds variables such as LOCKED)."""
    argv = [str(BUILD_SCRIPT), *args]
    if output_dir is not None:
        argv += ["--output-dir", str(output_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})  # fmt: skip


def build_images(*args: str, output_dir: Path | None = None, timeout: float = 3600) -> Path:
    """Run the image build (cached by inputs unless ``--force``); return the output folder."""
    result = run_build(*args, output_dir=output_dir, timeout=timeout)
    if result.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(map(str, result.args))} failed ({result.returncode}):\n"
            + (result.stdout[-4000:] + result.stderr[-4000:])
        )
    return output_dir or IMAGES_DIR


def manifest(images: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((images / name / "manifest.json").read_text())
    return data


# --- appliance network: netns + bridge + tap + dnsmasq ---------------------------------------


@dataclass(frozen=True)
class ApplianceLan:
    netns: str
    bridge: str
    tap: str
    server_ip: str
    prefix: str  # e.g. "10.213.7." for the DHCP range

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        argv_ns = ["ip", "netns", "exec", self.netns, *argv]
        return subprocess.run(argv_ns, capture_output=True, text=True, timeout=timeout, check=False)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@contextlib.contextmanager
def appliance_lan(dnsmasq: str, workdir: Path) -> Iterator[ApplianceLan]:
    """A private L2 segment with a DHCP server, inside a namespace of its own."""
    netns = unique_name("happ")
    octet = 100 + (os.getpid() + int(time.time())) % 150
    prefix = f"10.213.{octet}."
    lan = ApplianceLan(netns, "br0", "tap0", prefix + "1", prefix)
    _ip("netns", "add", netns)
    proc: subprocess.Popen[bytes] | None = None
    try:
        ns = ["ip", "-n", netns]
        for argv in (
            [*ns, "link", "set", "lo", "up"],
            [*ns, "link", "add", "br0", "type", "bridge"],
            [*ns, "addr", "add", f"{lan.server_ip}/24", "dev", "br0"],
            [*ns, "link", "set", "br0", "up"],
            [*ns, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            [*ns, "link", "set", "tap0", "master", "br0", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        leases = workdir / f"{netns}.leases"
        proc = subprocess.Popen(
            lan.wrap([
                dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                "--interface=br0", "--bind-interfaces", "--no-ping", "--log-facility=-",
                f"--dhcp-range={prefix}50,{prefix}99,255.255.255.0,1h",
                f"--dhcp-leasefile={leases}", f"--pid-file={workdir / (netns + '.pid')}",
            ]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited at once ({proc.returncode})")
        yield lan
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def appliance_argv(
    images: Path,
    lan: ApplianceLan,
    *,
    kernel: str = "vmlinux",
    machine: str = "q35",
    default_devices: bool = False,
    qmp: Path | None = None,
    cmdline: str = "",
) -> list[str]:
    """QEMU for the appliance on ``lan``'s tap: ours (vmlinux, q35, -nodefaults, the firmware
    the agent gives a direct kernel boot) or a baseline (SeaBIOS, QEMU's default devices)."""
    image = images / "appliance-vm"
    default_firmware = default_devices or machine == "microvm"  # microvm: its own qboot
    spec = GuestSpec(
        name="appliance",
        accel=choose_accel(),
        machine=machine,
        firmware=None if default_firmware else firmware.qemu_path(firmware.for_new_vm(True)),
        memory_mib=256,
        boot=DirectKernel(
            image / f"appliance-vm.{kernel}",
            image / "appliance-vm.cpio.lz4",
            f"console=ttyS0 quiet panic=-1 {cmdline}".strip(),
        ),
        nics=(Nic(lan.tap, APPLIANCE_MAC),),
        qmp_socket=qmp,
        extra=("-no-reboot",),
        accel_kernel_args=not default_devices,  # the baseline is the untuned SmallStack way
    )
    argv = build_argv(spec)
    if default_devices:
        argv.remove("-nodefaults")
    return lan.wrap(argv)


def qmp_command(sock_path: Path, command: str, timeout: float = 10) -> dict[str, object]:
    """One QMP command over a fresh connection (greeting, capabilities, command)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # greeting
        for cmd in ("qmp_capabilities", command):
            sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
            while True:
                reply: dict[str, object] = json.loads(reader.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply


# --- hypervisor ------------------------------------------------------------------------------


def hypervisor_argv(images: Path, disk: Path | None, cmdline: str = "") -> list[str]:
    """QEMU for the hypervisor image booted into RAM, with ``disk`` as a virtio disk."""
    image = images / "hypervisor"
    extra: list[str] = ["-no-reboot"]
    if disk is not None:
        extra += ["-drive", f"file={disk},format=raw,if=virtio,cache=unsafe"]
    spec = GuestSpec(
        name="hypervisor",
        accel=choose_accel(),
        memory_mib=2048,
        vcpus=2,
        boot=DirectKernel(
            image / "hypervisor.vmlinuz",
            image / "hypervisor.cpio.zst",
            f"console=ttyS0 panic=-1 {cmdline}".strip(),
        ),
        extra=tuple(extra),
    )
    return build_argv(spec)
