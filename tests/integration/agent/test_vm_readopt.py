"""A failed re-adoption never leaves a QEMU the agent forgot.

A restarted agent finds each VM's QEMU by the PID in its record and its UUID, and reconnects
QMP. A QEMU that is ours but does not answer (here: stopped with SIGSTOP, so its QMP socket
accepts and never greets) is stopped by the agent, then the VM is ``crashed`` with the reason; its
address stays held until destroy. A QEMU that answers is re-adopted running, as before.

Real QEMU (``-machine none``: no guest needed to have a QMP monitor), started the way the
agent starts it; the state a previous agent left is written as that agent writes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery import state
from hatchery.addresses import AddressPool, Subnet
from hatchery.capacity import HostCapacity
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms import manager as manager_module
from hatchery.vms import process
from hatchery.vms.manager import VmManager
from hatchery.vms.model import VmRecord, VmState


async def _launch(vm_dir: Path, vm_uuid: str) -> int:
    """A QEMU with a QMP socket in ``vm_dir``, started as the agent starts a VM's."""
    vm_dir.mkdir(parents=True)
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-no-user-config",
            "-display", "none", "-uuid", vm_uuid,
            "-qmp", f"unix:{vm_dir / 'qmp'},server=on,wait=off"]  # fmt: skip
    return await process.launch(argv, f"hatchery-test-{vm_dir.name}", qmp=vm_dir / "qmp",
                                output=vm_dir / "qemu.log", cwd=vm_dir)  # fmt: skip


async def _leave_running_vm(tmp_path: Path, pool: AddressPool, name: str) -> VmRecord:
    """A VM as a previous agent left it: its record ``running``, its QEMU alive (as root, its
    QMP socket in the VM's folder: a record without a uid, from before per-VM users)."""
    vm_uuid = str(uuid.uuid4())
    vm_dir = tmp_path / "vms" / name
    pid = await _launch(vm_dir, vm_uuid)
    address = pool.allocate(name)
    vm = VmRecord(name=name, uuid=vm_uuid, state=VmState.RUNNING, vcpus=1, memory_mib=64,
                  disk_mib=0, bridge="br0", ip=str(address.ip), mac=address.mac,
                  pid=pid)  # fmt: skip
    state.write_json(vm_dir / "vm.json", vm.to_json())
    return vm


@pytest.fixture
def qemus(require_tool: Callable[[str], str]) -> Iterator[list[int]]:
    """PIDs the test started; each is resumed and killed afterwards, whatever happened."""
    require_tool("qemu-system-x86_64")
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


async def test_an_unanswering_qemu_is_stopped_not_forgotten(
    tmp_path: Path, qemus: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "KILL_GRACE", 1.0)  # SIGTERM waits while stopped
    monkeypatch.setattr(manager_module, "ADOPT_QMP_TIMEOUT", 2.0)
    pool = AddressPool(tmp_path / "pool.db")
    try:
        pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
        pool.add_range(ipaddress.IPv4Address("10.5.0.10"), ipaddress.IPv4Address("10.5.0.19"))
        hung = await _leave_running_vm(tmp_path, pool, "hung")
        fine = await _leave_running_vm(tmp_path, pool, "fine")
        assert hung.pid is not None and fine.pid is not None
        qemus += [hung.pid, fine.pid]
        os.kill(hung.pid, signal.SIGSTOP)  # QMP accepts the connection, never greets

        manager = VmManager(tmp_path, pool, HostCapacity(8, 4096, 10_000),
                            AccelChoice(Accel.TCG, "t"))  # fmt: skip
        try:
            async with asyncio.timeout(30):  # on main: waits for the greeting for ever
                await manager.adopt_all()
            crashed = manager.get("hung")
            assert crashed.state is VmState.CRASHED and crashed.pid is None
            assert crashed.reason is not None and "did not answer on QMP" in crashed.reason
            assert "the agent stopped it" in crashed.reason
            assert not process.is_ours(hung.pid, hung.uuid), "the unanswering QEMU still runs"
            assert not Path(f"/proc/{hung.pid}").exists()
            # Its address stays held until destroy.
            owners = {row["ip"]: row["owner"] for row in pool.listing()}
            assert owners[hung.ip] == "hung"
            # The QEMU that answers is re-adopted, untouched.
            assert manager.get("fine").state is VmState.RUNNING
            assert process.is_ours(fine.pid, fine.uuid)

            await manager.destroy("hung")
            owners = {row["ip"]: row["owner"] for row in pool.listing()}
            assert owners[hung.ip] is None
            assert not (tmp_path / "vms" / "hung").exists()
            await manager.destroy("fine")
            assert not process.is_ours(fine.pid, fine.uuid)
            assert pool.stats().free == pool.stats().total
        finally:
            await manager.close()
    finally:
        pool.close()


async def test_terminate_spares_a_process_that_is_not_the_vm(
    tmp_path: Path, qemus: list[int]
) -> None:
    """The UUID is checked before any signal: a recycled PID is left alone."""
    pid = await _launch(tmp_path / "vms" / "one", str(uuid.uuid4()))
    qemus.append(pid)
    assert await process.terminate(pid, str(uuid.uuid4()), grace=0) is True
    assert process.is_ours(pid, "qemu-system")
    assert await process.terminate(pid, "qemu-system", grace=1.0) is True  # SIGTERM suffices
    assert not Path(f"/proc/{pid}").exists()
