"""A disk image is read as the format the request declares, and may not reach other files.

A qcow2 file can name a backing file or an external data file: host paths of its author's
choosing, which ``qemu-img convert`` would read into the new VM's disk. Declared raw, the
same bytes stay raw (no header is interpreted); declared qcow2, such an image is refused.
Real ``qemu-img``; no VM is started.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hatchery.addresses import AddressPool, Subnet
from hatchery.capacity import HostCapacity
from hatchery.config import VmSourcesConfig
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import CreateRequest, DiskRequest, VmManager
from hatchery.vms.sources import FolderFile, SourceError, SourceFetcher

SECRET = b"HATCHERY-SECRET-" * 64


def _manager(tmp_path: Path, folder: Path) -> tuple[VmManager, AddressPool]:
    pool = AddressPool(tmp_path / "pool.db")
    pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
    pool.add_range(ipaddress.IPv4Address("10.5.0.10"), ipaddress.IPv4Address("10.5.0.19"))
    sources = SourceFetcher(VmSourcesConfig(folders=(folder,)))
    manager = VmManager(tmp_path, pool, HostCapacity(8, 4096, 10_000), AccelChoice(Accel.TCG, "t"),
                        sources=sources)  # fmt: skip
    return manager, pool


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def hostile(tmp_path: Path, require_tool: Callable[[str], str]) -> tuple[Path, Path]:
    """An artefact folder holding a qcow2 whose backing file is a secret outside it."""
    require_tool("qemu-img")
    secret = tmp_path / "secret.raw"
    secret.write_bytes(SECRET.ljust(1 << 20, b"\0"))
    folder = tmp_path / "artefacts"
    folder.mkdir()
    image = folder / "evil.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(image))
    return folder, image


def _request(name: str, image: Path, fmt: str) -> CreateRequest:
    return CreateRequest(name, disk_boot=DiskRequest(FolderFile(str(image)), fmt), start=False)


def _disk(volume: Path) -> bytes:
    raw = volume.with_suffix(".raw")
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(volume), str(raw))
    return raw.read_bytes()


async def test_declared_raw_stays_raw(tmp_path: Path, hostile: tuple[Path, Path]) -> None:
    folder, image = hostile
    manager, pool = _manager(tmp_path, folder)
    try:
        vm = await manager.create(_request("d1", image, "raw"))
        disk = _disk(tmp_path / "vms" / "d1" / "root.qcow2")
        assert SECRET not in disk and disk.startswith(b"QFI\xfb")  # the qcow2 header, as data
        assert vm.disk_boot is not None and vm.disk_boot.format == "raw"
        assert "backing" not in _qemu_img("info", str(tmp_path / "vms" / "d1" / "root.qcow2"))
    finally:
        pool.close()


async def test_declared_qcow2_with_a_backing_file_is_refused(
    tmp_path: Path, hostile: tuple[Path, Path]
) -> None:
    folder, image = hostile
    manager, pool = _manager(tmp_path, folder)
    try:
        with pytest.raises(SourceError, match="backing file") as err:
            await manager.create(_request("d2", image, "qcow2"))
        assert err.value.field == "disk.image"
        assert manager.records() == [] and not (tmp_path / "vms" / "d2").exists()
        assert pool.stats().free == pool.stats().total
        # A plain qcow2 converts.
        plain = folder / "plain.qcow2"
        _qemu_img("create", "-q", "-f", "qcow2", str(plain), "1M")
        await manager.create(_request("d3", plain, "qcow2"))
        assert (tmp_path / "vms" / "d3" / "root.qcow2").is_file()
    finally:
        pool.close()


async def test_the_record_holds_the_volumes_real_size(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    # The size bounds what QEMU may write (vms.limits): an image larger than the size asked
    # for (or none asked) must not leave a limit below the disk the guest really has.
    require_tool("qemu-img")
    folder = tmp_path / "artefacts"
    folder.mkdir()
    image = folder / "cloud.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(image), "2G")
    manager, pool = _manager(tmp_path, folder)
    try:
        vm = await manager.create(_request("sized", image, "qcow2"))
        assert vm.disk_mib == 2048 and manager.get("sized").disk_mib == 2048
        grown = await manager.create(
            CreateRequest(
                "grown",
                disk_mib=3072,
                start=False,
                disk_boot=DiskRequest(FolderFile(str(image)), "qcow2"),
            )  # fmt: skip
        )
        assert grown.disk_mib == 3072
        assert '"virtual-size": 3221225472' in _qemu_img(
            "info", "--output=json", str(tmp_path / "vms" / "grown" / "root.qcow2"))  # fmt: skip
        held = manager._limits(vm)
        assert held.file_max_bytes == (2048 + 128 + 256) * 1024**2
    finally:
        pool.close()
