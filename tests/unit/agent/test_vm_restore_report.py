"""What ``VmManager.restore`` reports after a reboot, per VM: resumed with its pause, or
cold-started, stopped with the reason. The real manager and its records on disk; starting a
guest needs QEMU (tests/integration/agent/test_vm_outlive.py), so ``start`` here only moves
the record the way the real one does (a resume, or the cold-start fallback with its reason)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hatchery.addresses import AddressPool
from hatchery.capacity import HostCapacity
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery.vms.model import VmRecord, VmState
from hatchery.wire import VmOutcome, VmResult

COLD = "resume failed: its state file is missing; cold-started"


class Starts(VmManager):
    """The manager with ``start`` standing in for QEMU: a suspended VM whose name begins
    with ``bad`` falls back to a cold start (the reason kept, as ``_cold_start_after``
    does); any other resumes after a 3 s pause; a stopped one is cold-started."""

    async def start(self, name: str) -> VmRecord:
        vm = self.get(name)
        if vm.state is VmState.SUSPENDED and not name.startswith("bad"):
            resumed = replace(vm, state=VmState.RUNNING, state_file=None, suspended_at=None,
                              pause_seconds=3.0, reason=None)  # fmt: skip
            return self._save(resumed)
        reason = COLD if vm.state is VmState.SUSPENDED else None
        return self._save(replace(vm, state=VmState.RUNNING, reason=reason))


def record(name: str, state: VmState, reason: str | None = None) -> VmRecord:
    return VmRecord(name, f"uuid-{name}", state, 1, 256, 0, "br0", "10.5.0.10",
                    "52:54:00:00:00:01", reason=reason)  # fmt: skip


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Starts]:
    with AddressPool(tmp_path / "pool.db") as pool:
        yield make(tmp_path, pool)


def make(tmp_path: Path, pool: AddressPool) -> Starts:
    vms = Starts(tmp_path, pool, HostCapacity(8, 4096, 10_000), AccelChoice(Accel.TCG, "t"))
    for vm in (
        record("web1", VmState.SUSPENDED),
        record("bad1", VmState.SUSPENDED),
        record("soft", VmState.STOPPED, reason="suspend failed: migration failed"),
        record("busy", VmState.RUNNING),
        record("leaving", VmState.DESTROYING),
    ):
        (tmp_path / "vms" / vm.name).mkdir(parents=True)
        vms._save(vm)
    return vms


async def test_each_vm_says_what_became_of_it(manager: Starts) -> None:
    assert await manager.restore("web1") == VmOutcome("web1", VmResult.RESUMED, 3.0)
    assert await manager.restore("bad1") == VmOutcome("bad1", VmResult.COLD_STARTED,
                                                      reason=COLD)  # fmt: skip
    soft = await manager.restore("soft")
    assert soft == VmOutcome("soft", VmResult.COLD_STARTED, reason="it was stopped before the "
                             "boot, not saved (suspend failed: migration failed)")  # fmt: skip
    assert await manager.restore("busy") == VmOutcome("busy", VmResult.COLD_STARTED, reason=(
        "it was already running after the boot: started afresh, not resumed"))  # fmt: skip
    assert await manager.restore("leaving") == VmOutcome(
        "leaving", VmResult.STOPPED, reason="it was destroying after the boot, not restored"
    )
    assert await manager.restore("gone") == VmOutcome("gone", VmResult.STOPPED,
                                                      reason="it no longer exists")  # fmt: skip
