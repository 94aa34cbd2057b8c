"""Build QEMU command lines from a typed description of the guest.

One builder for the agent and the tests, so what the tests boot is what the agent runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hatchery.qemu.accel import AccelChoice

QEMU_BINARY = "qemu-system-x86_64"

#: The machine types a VM may have: the one list the API, the CLI and the VM records use.
#: Both have a PCI bus for the ``virtio-net-pci`` NIC and ``if=virtio`` disk built below.
#: ``microvm`` is deliberately absent. It has no PCI bus (its devices would be
#: ``virtio-*-device`` on virtio-mmio, a module Debian's guests must load first), disk boot
#: needs its own firmware, and it has no HPET or ACPI PM timer: under TCG (hosts without
#: usable KVM) the kernel's TSC calibration against the PIT fails and an uncompressed
#: ``vmlinux`` (the appliances' fast path) hung in 2 of 5 boots, where q35 boots 5 of 5.
MACHINES: tuple[str, ...] = ("q35", "pc")
DEFAULT_MACHINE = MACHINES[0]
#: The NIC's option ROM region, fixed. QEMU sizes it from the ROM file (rounded up to a power
#: of two) and migrates it as a RAM block whose size must match on both ends: Debian's iPXE
#: ``efi-virtio.rom`` (244 KiB) takes 256 KiB today, a bigger one in a later package would
#: take 512 KiB and a guest could no longer move from an older QEMU to the newer one. Every
#: VM ever started has had 256 KiB: never change it (a VM that runs or is saved keeps it).
NIC_ROM_SIZE = 256 << 10


@dataclass(frozen=True, slots=True)
class DirectKernel:
    """Boot a kernel straight from the host's files: no firmware boot menu, no disk."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = "console=ttyS0"


@dataclass(frozen=True, slots=True)
class Nic:
    """A virtio-net NIC on a tap device the caller has created and attached to a bridge."""

    tap: str
    mac: str
    fd: int | None = None  # the tap already opened by the caller and passed to QEMU


@dataclass(frozen=True, slots=True)
class GuestSpec:
    name: str
    accel: AccelChoice
    memory_mib: int = 256
    vcpus: int = 1
    machine: str = DEFAULT_MACHINE
    firmware: Path | None = None  # ``-bios``; None: QEMU's default (``qemu.firmware``)
    boot: DirectKernel | None = None
    nics: tuple[Nic, ...] = ()
    serial: str = (
        "stdio"  # any QEMU chardev spec: "stdio", "file:PATH", "unix:PATH,server=on,wait=off"
    )
    qmp_socket: Path | None = None
    smbios: tuple[str, ...] = ()  # e.g. "type=1,serial=ds=nocloud-net;s=http://..."
    #: the accelerator's words on a direct boot's command line (``AccelChoice.kernel_args``);
    #: off only for benchmarks' untuned baselines
    accel_kernel_args: bool = True
    extra: tuple[str, ...] = field(default=())


def build_argv(spec: GuestSpec, binary: str = QEMU_BINARY) -> list[str]:
    """The full argv for ``spec``; ``-nodefaults`` so only the devices named here exist."""
    argv = [
        binary,
        "-name", spec.name,
        "-machine", spec.machine,
        *spec.accel.qemu_args(),
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", spec.serial,
    ]  # fmt: skip
    if spec.firmware is not None:
        argv += ["-bios", str(spec.firmware)]
    if spec.boot is not None:
        words = spec.boot.cmdline.split()
        tuned = spec.accel.kernel_args(spec.vcpus) if spec.accel_kernel_args else ()
        hints = [w for w in tuned if w not in words]
        cmdline = " ".join([spec.boot.cmdline, *hints]) if hints else spec.boot.cmdline
        argv += ["-kernel", str(spec.boot.kernel), "-append", cmdline]
        if spec.boot.initrd is not None:
            argv += ["-initrd", str(spec.boot.initrd)]
    for index, nic in enumerate(spec.nics):
        netdev = f"net{index}"
        tap = f"fd={nic.fd}" if nic.fd is not None else f"ifname={nic.tap},script=no,downscript=no"
        argv += [
            "-netdev", f"tap,id={netdev},{tap}",
            "-device", f"virtio-net-pci,netdev={netdev},mac={nic.mac},romsize={NIC_ROM_SIZE}",
        ]  # fmt: skip
    if spec.qmp_socket is not None:
        argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    for table in spec.smbios:
        argv += ["-smbios", table]
    argv += list(spec.extra)
    return argv
