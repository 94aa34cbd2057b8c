"""A create reserves capacity and address in one persisted step, and a crash mid-create is
cleaned up at the next start. Real files, the real SQLite pool; the only stand-in is an
image store whose artefact stalls until the test lets it go (so creates overlap)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchery import state
from hatchery.addresses import AddressPool, Subnet
from hatchery.capacity import CapacityError, HostCapacity
from hatchery.config import VmSourcesConfig
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import CreateRequest, KernelRequest, VmManager
from hatchery.vms.model import VmRecord, VmState
from hatchery.vms.sources import SourceFetcher, StoreArtefact

KERNEL = b"\x7fELF not really a kernel" * 100


class StallingStore:
    """An ``ArtefactStore`` whose artefacts arrive only once ``go`` is set (a slow download)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()

    def artefact_chunks(self, version: str, artefact: str) -> Iterator[bytes]:
        with self._lock:
            self.waiting += 1
        self.go.wait(30)
        yield KERNEL


def _pool(tmp_path: Path) -> AddressPool:
    pool = AddressPool(tmp_path / "pool.db")
    if not pool.subnets():
        pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
        pool.add_range(ipaddress.IPv4Address("10.5.0.10"), ipaddress.IPv4Address("10.5.0.19"))
    return pool


def _manager(tmp_path: Path, pool: AddressPool, store: StallingStore) -> VmManager:
    sources = SourceFetcher(VmSourcesConfig(), store)
    return VmManager(tmp_path, pool, HostCapacity(8, 1024, 10_000), AccelChoice(Accel.TCG, "t"),
                     sources=sources)  # fmt: skip


def _request(name: str, memory_mib: int = 400) -> CreateRequest:
    kernel = KernelRequest(StoreArtefact("v1", "vmlinux"))
    return CreateRequest(name, memory_mib=memory_mib, kernel_boot=kernel, start=False)


async def test_parallel_creates_cannot_overcommit(tmp_path: Path) -> None:
    """Four creates of 400 MiB on a 1024 MiB host, all fetching at once: two fit."""
    store = StallingStore()
    pool = _pool(tmp_path)
    manager = _manager(tmp_path, pool, store)
    try:
        await manager.adopt_all()
        tasks = [asyncio.ensure_future(manager.create(_request(f"vm{i}"))) for i in range(4)]
        async with asyncio.timeout(10):  # until each create is refused or stalled in its fetch
            while sum(t.done() for t in tasks) + store.waiting < len(tasks):
                await asyncio.sleep(0.01)
        # While they download, they are listed as creating and hold capacity and addresses.
        assert [vm.state for vm in manager.records()] == [VmState.CREATING] * store.waiting
        assert manager.used().memory_mib == 400 * store.waiting
        assert pool.stats().free == pool.stats().total - store.waiting
        store.go.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        store.go.set()
        pool.close()
    made = [r for r in results if isinstance(r, VmRecord)]
    refused = [r for r in results if isinstance(r, CapacityError)]
    assert len(made) == 2 and len(refused) == 2, results
    assert all("memory: 400 MiB asked, 224 MiB free" in str(r) for r in refused)
    assert {vm.state for vm in made} == {VmState.STOPPED}
    assert sorted(p.name for p in (tmp_path / "vms").iterdir()) == sorted(v.name for v in made)


async def test_a_failed_fetch_frees_what_the_create_held(tmp_path: Path) -> None:
    store = StallingStore()
    store.go.set()
    pool = _pool(tmp_path)
    manager = VmManager(tmp_path, pool, HostCapacity(8, 1024, 10_000),
                        AccelChoice(Accel.TCG, "t"))  # no store: the fetch fails  # fmt: skip
    try:
        with pytest.raises(Exception, match="no image store"):
            await manager.create(_request("web1"))
        assert manager.records() == [] and manager.used().memory_mib == 0
        assert pool.stats().free == pool.stats().total
        assert not (tmp_path / "vms" / "web1").exists()
    finally:
        pool.close()


def _crashed_state(tmp_path: Path) -> None:
    """What an agent killed mid-create leaves, in every window of the create, beside a VM
    that is fine and one whose record is corrupt (kept aside for the operator)."""
    pool = _pool(tmp_path)
    try:
        vms = tmp_path / "vms"
        # Killed while downloading: a record in creating, a partial download, its address.
        address = pool.allocate("web1")
        (vms / "web1").mkdir(parents=True)
        (vms / "web1" / "kernel.part").write_bytes(KERNEL[:100])
        creating = VmRecord(name="web1", uuid="0f0e0d0c-0000-4000-8000-000000000001",
                            state=VmState.CREATING, vcpus=1, memory_mib=400, disk_mib=0,
                            bridge="br0", ip=str(address.ip), mac=address.mac)  # fmt: skip
        state.write_json(vms / "web1" / "vm.json", creating.to_json())
        # An older agent killed mid-create: a folder without a record, its address taken.
        pool.allocate("old1")
        (vms / "old1").mkdir()
        (vms / "old1" / "source.img.part").write_bytes(b"x" * 100)
        # Killed between taking the address and making the folder.
        pool.allocate("ghost")
        # A VM that is fine.
        kept = pool.allocate("keep1")
        (vms / "keep1").mkdir()
        stopped = VmRecord(name="keep1", uuid="0f0e0d0c-0000-4000-8000-000000000002",
                           state=VmState.STOPPED, vcpus=1, memory_mib=400, disk_mib=0,
                           bridge="br0", ip=str(kept.ip), mac=kept.mac)  # fmt: skip
        state.write_json(vms / "keep1" / "vm.json", stopped.to_json())
        # A corrupt record: kept aside with its folder and its address.
        pool.allocate("bad1")
        (vms / "bad1").mkdir()
        (vms / "bad1" / "vm.json").write_text("{not json")
    finally:
        pool.close()  # the agent is gone: its hold on the pool with it


async def test_a_crash_mid_create_is_cleaned_up_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _crashed_state(tmp_path)
    store = StallingStore()
    store.go.set()
    pool = _pool(tmp_path)
    manager = _manager(tmp_path, pool, store)
    try:
        with caplog.at_level(logging.WARNING, logger="hatchery.vms.manager"):
            await manager.adopt_all()
        assert [vm.name for vm in manager.records()] == ["keep1"]
        assert manager.used().memory_mib == 400
        owners = {row["owner"] for row in pool.listing()} - {None}
        assert owners == {"keep1", "bad1"}
        vms = tmp_path / "vms"
        assert sorted(p.name for p in vms.iterdir()) == ["bad1", "keep1"]
        assert list((vms / "bad1").glob("vm.json.corrupt-*"))
        text = caplog.text
        assert "vm web1: removed, the agent stopped while creating it; 10.5.0.10 is free" in text
        assert "vm old1: removed its folder, which has no record" in text
        assert "(the agent stopped while creating it); free again: 10.5.0.11" in text
        assert "its owner ghost has no record" in text and "owner old1" not in text
        # The names can be created again, and the addresses are given out again.
        for name in ("web1", "old1", "ghost"):
            vm = await manager.create(_request(name, memory_mib=100))
            assert vm.state is VmState.STOPPED
            assert (vms / name / "kernel").read_bytes() == KERNEL
        assert pool.stats().free == pool.stats().total - 5
    finally:
        pool.close()


async def test_a_second_start_changes_nothing(tmp_path: Path) -> None:
    """The clean-up converges: a start after it finds nothing more to do."""
    _crashed_state(tmp_path)
    store = StallingStore()
    for _ in range(2):
        pool = _pool(tmp_path)
        try:
            await _manager(tmp_path, pool, store).adopt_all()
            assert {row["owner"] for row in pool.listing()} - {None} == {"keep1", "bad1"}
        finally:
            pool.close()
