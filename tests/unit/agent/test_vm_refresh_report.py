"""What ``VmManager.refresh_for_upgrade`` reports for a live patch's ``refresh_vms``, for the
VMs it cannot move, on the real manager and its records (moving a running guest needs QEMU:
tests/integration/qemu_versions/test_refresh_upgrade.py)."""

from __future__ import annotations

from pathlib import Path

from hatchery.addresses import AddressPool
from hatchery.capacity import HostCapacity
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery.vms.model import VmRecord, VmState
from hatchery.wire import VmResult


def record(name: str, state: VmState) -> VmRecord:
    return VmRecord(name, f"uuid-{name}", state, 1, 256, 0, "br0", "10.5.0.10",
                    "52:54:00:00:00:01")  # fmt: skip


async def test_vms_that_cannot_be_moved_are_reported_and_keep_their_state(
    tmp_path: Path,
) -> None:
    with AddressPool(tmp_path / "pool.db") as pool:
        vms = VmManager(tmp_path, pool, HostCapacity(8, 4096, 10_000),
                        AccelChoice(Accel.TCG, "t"))  # fmt: skip
        for vm in (record("paused1", VmState.PAUSED), record("orphan", VmState.RUNNING),
                   record("off", VmState.STOPPED)):  # fmt: skip
            (tmp_path / "vms" / vm.name).mkdir(parents=True)
            vms._save(vm)

        paused = await vms.refresh_for_upgrade("paused1")
        assert paused.result is VmResult.REFRESH_FAILED and paused.degraded
        assert "paused" in str(paused.reason) and "old QEMU" in str(paused.reason)
        assert vms.get("paused1").state is VmState.PAUSED

        # Running, but the agent holds no QMP connection to its QEMU: not moved, not touched.
        orphan = await vms.refresh_for_upgrade("orphan")
        assert orphan.result is VmResult.REFRESH_FAILED
        assert "no QMP connection" in str(orphan.reason)
        assert vms.get("orphan").state is VmState.RUNNING

        off = await vms.refresh_for_upgrade("off")
        assert off.result is VmResult.STOPPED and "stopped" in str(off.reason)
        gone = await vms.refresh_for_upgrade("gone")
        assert gone.result is VmResult.STOPPED and gone.reason == "it no longer exists"
