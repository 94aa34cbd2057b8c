"""How much of the node a VM's QEMU may take (vms/limits): the sums, the scope's options and
reading back what the kernel applies."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hatchery.config import parse_config
from hatchery.errors import ConfigError
from hatchery.qemu.accel import decide
from hatchery.vms import limits, process
from hatchery.vms.limits import MIB, TASKS_BASE, QemuLimits

from ..test_accel import BARE_METAL


def test_the_limit_counts_ram_boot_files_cache_and_overhead(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "kernel", tmp_path / "initrd"
    kernel.write_bytes(b"k" * 3000)
    initrd.write_bytes(b"i" * 5000)
    tcg = decide("tcg", BARE_METAL)
    held = limits.for_vm(memory_mib=256, vcpus=2, boot_files=(kernel, initrd),
                         code_cache_mib=tcg.code_cache_mib, overhead_mib=512)  # fmt: skip
    # the boot files in whole MiB: the kernel keeps memory.max in pages
    assert held == QemuLimits((256 + 256 + 512 + 1) * MIB, TASKS_BASE + 2)
    # under KVM there is no translation cache; a disk boot holds no boot files
    kvm = decide("auto", BARE_METAL)
    assert kvm.code_cache_mib == 0
    held = limits.for_vm(memory_mib=1024, vcpus=4, boot_files=(), code_cache_mib=0,
                         overhead_mib=512)  # fmt: skip
    assert held.memory_max_bytes == 1536 * MIB and held.tasks_max == TASKS_BASE + 4
    # a boot file not there (yet) counts nothing rather than failing the start
    assert (
        limits.for_vm(
            memory_mib=64,
            vcpus=1,
            boot_files=(tmp_path / "gone",),
            code_cache_mib=0,
            overhead_mib=64,
        ).memory_max_bytes
        == 128 * MIB
    )


def test_the_scope_is_made_with_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    held = QemuLimits(1536 * MIB, 260)
    monkeypatch.setattr(process, "scope_runner", lambda: "/usr/bin/systemd-run")
    argv = process.scope_prefix("hatchery-vm-a", held)
    assert argv[:2] == ["/usr/bin/systemd-run", "--scope"] and argv[-1] == "--"
    assert f"--property=MemoryMax={1536 * MIB}" in argv and "--property=TasksMax=260" in argv
    assert "--unit=hatchery-vm-a" in argv
    # no systemd (a development host): no scope, so nothing to hold QEMU to
    monkeypatch.setattr(process, "scope_runner", lambda: None)
    assert process.scope_prefix("hatchery-vm-a", held) == []


def _cgroup(tmp_path: Path, pid: int, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(lines)
    folder = root / "system.slice" / "hatchery-vm-a.scope"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return proc, root


def test_the_cgroups_limits_are_read_from_its_files(tmp_path: Path) -> None:
    files = {"memory.max": "1610612736\n", "memory.current": "123731968\n",
             "pids.max": "260\n", "pids.current": "7\n"}  # fmt: skip
    proc, root = _cgroup(tmp_path, 42, "0::/system.slice/hatchery-vm-a.scope\n", files)
    assert limits.cgroup_held(42, proc=proc, root=root) == {
        "memory_max": 1610612736,
        "memory": 123731968,
        "tasks_max": 260,
        "tasks": 7,
    }
    with pytest.raises(OSError):  # gone
        limits.cgroup_held(43, proc=proc, root=root)


def test_unlimited_and_unknown(tmp_path: Path) -> None:
    files = {"memory.max": "max\n", "memory.current": "1\n", "pids.max": "max\n",
             "pids.current": "1\n"}  # fmt: skip
    proc, root = _cgroup(tmp_path, 42, "0::/system.slice/hatchery-vm-a.scope\n", files)
    held = limits.cgroup_held(42, proc=proc, root=root)
    assert held["memory_max"] is None and held["tasks_max"] is None and held["tasks"] == 1
    unknown = dict.fromkeys(("memory_max", "memory", "tasks_max", "tasks"))
    # a cgroup v1 host (the memory controller is not on the unified hierarchy)
    proc, root = _cgroup(tmp_path / "v1", 42, "4:memory:/x\n0::/\n", {})
    assert limits.cgroup_held(42, proc=proc, root=root) == unknown
    proc, root = _cgroup(tmp_path / "v1only", 42, "4:memory:/x\n", {})
    assert limits.cgroup_held(42, proc=proc, root=root) == unknown


def test_the_file_size_limit_is_the_live_processs() -> None:
    child = subprocess.Popen(["prlimit", f"--fsize={5 * MIB}", "--", "sleep", "30"])
    try:
        comm = Path(f"/proc/{child.pid}/comm")
        for _ in range(500):  # until prlimit has set the limit and run sleep
            if comm.read_text().strip() == "sleep":
                break
            time.sleep(0.01)
        held = limits.applied(child.pid)
        assert held is not None and held["file_max"] == 5 * MIB
    finally:
        child.kill()
        child.wait()
    assert limits.applied(child.pid) is None  # gone (and reaped)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    mine = limits.applied(os.getpid())
    assert mine is not None
    assert mine["file_max"] == (None if hard == resource.RLIM_INFINITY else hard)


def test_config_memory_overhead() -> None:
    assert parse_config(None).vms.memory_overhead_mib == 512
    assert parse_config({"vms": {"memory_overhead_mib": 256}}).vms.memory_overhead_mib == 256
    with pytest.raises(ConfigError, match="vms.memory_overhead_mib"):
        parse_config({"vms": {"memory_overhead_mib": 16}})


def test_each_file_qemu_writes_is_held_below_a_size() -> None:
    def largest(disk_mib: int, log_limit: int) -> int:
        return limits.for_vm(memory_mib=256, vcpus=1, boot_files=(), code_cache_mib=0,
                             overhead_mib=512, disk_mib=disk_mib,
                             log_limit=log_limit).file_max_bytes  # fmt: skip

    # a disk: its virtual size, a sixteenth for qcow2's metadata and 256 MiB
    assert largest(10240, 2 * MIB) == (10240 + 640 + 256) * MIB
    # no disk: the logs' bound, never below the floor
    assert largest(0, 2 * MIB) == limits.FILE_FLOOR
    assert largest(0, 64 * MIB) == limits.LOG_FILE_FACTOR * 64 * MIB
    held = QemuLimits(MIB, 1, 5 * MIB)
    assert held.prlimit("/usr/bin/prlimit") == ["/usr/bin/prlimit", f"--fsize={5 * MIB}", "--"]


def _oom_killed_child() -> tuple[int, float]:
    """A child the kernel's OOM killer ends in a memory cgroup of 32 MiB made here (cgroup
    v1's memory controller, as on this project's test machines); its PID and start."""
    memory = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (memory / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and cgroup v1's memory controller")
    group = memory / f"hatchery-oom-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(32 * MIB))
        since = time.monotonic()
        hog = f'{sys.executable} -c "b = bytearray(256 * 1024 * 1024)"'
        child = subprocess.Popen(["sh", "-c", f"echo $$ > {group}/cgroup.procs; exec {hog}"])
        assert child.wait(60) == -signal.SIGKILL
        return child.pid, since
    finally:
        group.rmdir()


def test_an_oom_kill_is_named_from_the_kernels_log() -> None:
    pid, since = _oom_killed_child()
    started = time.time() - (time.monotonic() - since)  # its start, wall-clock
    assert limits.oom_killed(pid, since)
    assert not limits.oom_killed(pid, time.monotonic() + 1)  # an older line: another process
    assert not limits.oom_killed(pid + 1_000_000, since)
    assert "OOM killer" in (limits.exit_cause(pid, signal.SIGKILL, started) or "")
    assert "OOM killer" in (limits.exit_cause(pid, None, started) or "")  # not our child


async def test_the_exit_watch_tells_the_signal_of_its_child(tmp_path: Path) -> None:
    # a writer past its RLIMIT_FSIZE, as QEMU would be: SIGXFSZ, seen by its parent's watch
    argv = ["prlimit", "--fsize=4096", "--", "dd", "if=/dev/zero", f"of={tmp_path / 'f'}",
            "bs=8192", "count=2"]  # fmt: skip
    child = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    watch = process.ExitWatch(child.pid, lambda: None)
    await asyncio.wait_for(watch.exited.wait(), 30)
    assert watch.signal == signal.SIGXFSZ
    assert limits.exit_cause(child.pid, watch.signal, time.time()) == (
        "it wrote past its file size limit (vms.limits)")  # fmt: skip
    assert (tmp_path / "f").stat().st_size == 4096
    assert limits.exit_cause(child.pid, signal.SIGTERM, time.time()) == "killed by SIGTERM"
