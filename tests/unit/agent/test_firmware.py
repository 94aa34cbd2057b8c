"""A VM's firmware: qboot for direct kernel boots, chosen at create and kept in its record."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.qemu.cmdline import DirectKernel, GuestSpec, build_argv
from hatchery.qemu.firmware import QBOOT, FirmwareError, for_new_vm, qemu_path
from hatchery.vms.model import VmRecord, VmState


def test_a_direct_kernel_boot_gets_qboot_where_the_node_has_it(tmp_path: Path) -> None:
    rom = tmp_path / "qboot.rom"
    files = {QBOOT: rom}
    assert for_new_vm(True, files) is None  # not installed: QEMU's default
    rom.write_bytes(b"\0" * 65536)
    assert for_new_vm(True, files) == QBOOT
    assert for_new_vm(False, files) is None  # qboot cannot boot a disk
    assert qemu_path(QBOOT, files) == rom
    assert qemu_path(None, files) is None


def test_a_recorded_firmware_that_is_gone_or_unknown_is_an_error_not_a_silent_change(
    tmp_path: Path,
) -> None:
    """Another firmware would change the VM's migration state (the ``pc.bios`` block)."""
    with pytest.raises(FirmwareError, match="missing on this node") as err:
        qemu_path(QBOOT, {QBOOT: tmp_path / "gone.rom"})
    assert err.value.hint is not None and "qemu-system-data" in err.value.hint
    with pytest.raises(FirmwareError, match="unknown firmware 'ovmf'"):
        qemu_path("ovmf", {QBOOT: tmp_path / "gone.rom"})


def test_the_firmware_reaches_qemu_as_an_absolute_bios_path() -> None:
    spec = GuestSpec("vm", AccelChoice(Accel.TCG, "test"), firmware=Path("/usr/share/x.rom"),
                     boot=DirectKernel(Path("kernel")))  # fmt: skip
    argv = build_argv(spec)
    assert argv[argv.index("-bios") + 1] == "/usr/share/x.rom"
    assert "-bios" not in build_argv(GuestSpec("vm", AccelChoice(Accel.TCG, "test")))


def test_a_record_from_before_has_qemus_default_firmware() -> None:
    record = VmRecord(name="old", uuid="u", state=VmState.STOPPED, vcpus=1, memory_mib=256,
                      disk_mib=0, bridge="br0", ip="10.0.0.2", mac="52:54:00:00:00:02")  # fmt: skip
    data = record.to_json()
    del data["firmware"]
    assert VmRecord.from_json(data).firmware is None
    assert VmRecord.from_json({**data, "firmware": QBOOT}).firmware == QBOOT
