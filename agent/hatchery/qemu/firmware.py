"""A VM's firmware: QEMU's default (SeaBIOS), or qboot for a direct kernel boot; kept per VM.

qboot (``qboot.rom`` from Debian's ``qemu-system-data``, 64 KiB) does what a kernel handed
over by QEMU's fw_cfg needs -- the ACPI and SMBIOS tables QEMU builds, the PVH or bzImage
entry -- and nothing else: no option ROMs, no boot menu, no disks. Under TCG it takes
0.04-0.06 s off an appliance's start to its lease (docs/appliance.md); the kernel sees the
same ACPI tables (the power button works) and the same SMBIOS serial (cloud-init's NoCloud
seed). Since it cannot boot a disk, only direct-kernel VMs get it.

The firmware is part of a VM's migration state: QEMU moves the BIOS region as the RAM block
``pc.bios``, whose size must match on the destination (256 KiB for SeaBIOS, 64 KiB for
qboot). So, like the versioned machine type (``machines``), it is chosen once, when the VM
is created, kept in its record, and every later QEMU of that VM (a start, a refresh, a
resume after a reboot-mode upgrade) gets the same. A record from before this has none:
SeaBIOS, as it had.
"""

from __future__ import annotations

from pathlib import Path

from hatchery.errors import HatcheryError

QBOOT = "qboot"
#: Firmware by the name records keep, and the file QEMU is given (an absolute path: QEMU
#: runs in the VM's folder and would look there first for a bare name).
FILES: dict[str, Path] = {QBOOT: Path("/usr/share/qemu/qboot.rom")}


class FirmwareError(HatcheryError):
    """A VM's recorded firmware is unknown or missing on this node."""


def for_new_vm(direct_kernel: bool, files: dict[str, Path] = FILES) -> str | None:
    """The firmware a VM gets at create: qboot for a direct kernel boot if this node has it,
    else QEMU's default (None)."""
    if direct_kernel and files[QBOOT].is_file():
        return QBOOT
    return None


def qemu_path(firmware: str | None, files: dict[str, Path] = FILES) -> Path | None:
    """The ``-bios`` file for a recorded ``firmware`` (None: QEMU's default).

    :raise FirmwareError: a name this agent does not know, or its file is missing.
    """
    if firmware is None:
        return None
    path = files.get(firmware)
    if path is None:
        raise FirmwareError(f"unknown firmware {firmware!r} in the VM's record")
    if not path.is_file():
        raise FirmwareError(
            f"the VM's firmware {firmware} ({path}) is missing on this node",
            hint="install qemu-system-data: a VM keeps the firmware it was created with",
        )
    return path
