"""What this host can give to VMs: CPU, RAM and disk, probed at start, minus a reserve.

A create that does not fit is refused with a message naming what is short, instead of
letting QEMU or the kernel's OOM killer find out later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hatchery.config import CapacityConfig
from hatchery.errors import HatcheryError


class CapacityError(HatcheryError):
    """The request does not fit in what is left on this host."""


@dataclass(frozen=True, slots=True)
class Resources:
    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus + other.vcpus,
            self.memory_mib + other.memory_mib,
            self.disk_mib + other.disk_mib,
        )


@dataclass(frozen=True, slots=True)
class HostCapacity:
    """Totals offered to VMs (after the reserve; vCPUs after overcommit)."""

    vcpus: int
    memory_mib: int
    disk_mib: int

    def check(self, used: Resources, request: Resources) -> None:
        short = []
        if used.vcpus + request.vcpus > self.vcpus:
            short.append(f"vCPUs: {request.vcpus} asked, {max(self.vcpus - used.vcpus, 0)} free")
        if used.memory_mib + request.memory_mib > self.memory_mib:
            free = max(self.memory_mib - used.memory_mib, 0)
            short.append(f"memory: {request.memory_mib} MiB asked, {free} MiB free")
        if used.disk_mib + request.disk_mib > self.disk_mib:
            free = max(self.disk_mib - used.disk_mib, 0)
            short.append(f"disk: {request.disk_mib} MiB asked, {free} MiB free")
        if short:
            raise CapacityError(
                "not enough capacity on this host: " + "; ".join(short),
                hint="choose a smaller size, free resources, or use another host",
            )


def _mem_total_mib(meminfo: Path) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise HatcheryError(f"no MemTotal in {meminfo}")


def probe(
    config: CapacityConfig, state_dir: Path, meminfo: Path = Path("/proc/meminfo")
) -> HostCapacity:
    cpus = len(os.sched_getaffinity(0))
    st = os.statvfs(state_dir)
    disk_mib = st.f_bavail * st.f_frsize // (1024 * 1024)
    return HostCapacity(
        vcpus=max(int((cpus - config.reserve_cpus) * config.cpu_overcommit), 0),
        memory_mib=max(_mem_total_mib(meminfo) - config.reserve_memory_mib, 0),
        disk_mib=max(disk_mib - config.reserve_disk_mib, 0),
    )
