"""What a process costs, read from /proc: the benches' one way to measure a server or a QEMU
they started (``wait4``'s rusage serves only for a child that has ended)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` now, in MiB; 0 when it has none (ended, a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuGroup:
    """A cgroup (v2) of its own for a server a bench starts, to read the CPU time of all its
    processes: ``/proc/PID/stat`` misses the children of a server that forks per request and
    lets the kernel reap them (tftpd-hpa)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def join(self) -> None:
        """Move the calling process into the group (a ``preexec_fn``: before the exec)."""
        (self.path / "cgroup.procs").write_text("0")

    def cpu_seconds(self) -> float:
        """User plus system CPU time of every process that ran in the group so far."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise RuntimeError(f"{self.path}/cpu.stat has no usage_usec")


@contextlib.contextmanager
def cpu_group(name: str) -> Iterator[CpuGroup]:
    """A fresh cgroup named after ``name`` and this process, removed afterwards (its
    processes must have ended by then)."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    root = next((Path(m.split()[1]) for m in mounts if m.split()[2] == "cgroup2"), None)
    if root is None:
        raise SystemExit("bench: no cgroup2 file system is mounted (needed to read CPU time)")
    path = root / f"hatchery-bench-{name}-{os.getpid()}"
    path.mkdir()
    try:
        yield CpuGroup(path)
    finally:
        for _ in range(50):  # the group's last process may still be exiting
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
