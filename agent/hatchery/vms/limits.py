"""How much of the node one VM's QEMU may take: memory and tasks, enforced by the kernel.

Why: a guest that escapes into its QEMU runs as the VM's own uid under a seccomp filter
(``sandbox``), so it cannot read another VM's disk; but memory and tasks are shared by every
process on the node. Unbounded, a compromised QEMU could allocate until the kernel's OOM
killer picks some other tenant's QEMU, or make threads until no one can make one. So each
QEMU's transient scope gets a ``MemoryMax`` and a ``TasksMax`` (cgroup v2 ``memory.max``,
``pids.max``): past them the kernel reclaims, then OOM-kills inside that scope only, and a
new thread fails in that QEMU only.

What an honest QEMU needs, and so the limit:

- the guest's RAM (``memory_mib``);
- the kernel and initrd of a direct boot, which QEMU holds in its own memory (fw_cfg blobs)
  beside the guest's copy: up to the download cap, so counted at their real size;
- under TCG, its translation cache (``tb-size``, see ``qemu.accel``);
- ``vms.memory_overhead_mib`` for everything else: device models, the block layer's
  bounce buffers, thread stacks, QEMU's own heap (117 MiB RSS in all, cache included, for a
  256 MiB appliance under TCG: docs/benchmarks.md; less under KVM).

Tasks: QEMU's main loop, RCU and worker threads (its thread pool grows to 64 per
``AioContext``), one thread per vCPU: ``TASKS_BASE`` plus the vCPUs leaves room for
several ``AioContext`` pools and is still far below the node's PID space.

Where systemd does not run (a development host, not a node), no scope is made and these
two limits are not applied; the agent says so at start.

Disk: QEMU has no folder on the data disk it may write in (``sandbox``), only the files it
is handed: its disk, its output and its console log. Each is held below ``RLIMIT_FSIZE``
(``prlimit``, on every host): the disk's virtual size plus room for qcow2's metadata, and at
least ``LOG_FILE_FACTOR`` times ``vms.log_limit_bytes`` or ``FILE_FLOOR``, far above what a
trimmed log reaches. A QEMU that writes past it gets ``SIGXFSZ`` and ends; nothing else on
the node is touched. Migration streams and suspended guests go through pipes, which no file
size limit applies to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from hatchery.vms.logtrim import PUNCHED_FACTOR
from hatchery.vms.sandbox import SandboxError

MIB = 1024**2

#: threads a QEMU may have besides one per vCPU
TASKS_BASE = 256
#: qcow2's metadata beside the guest's data: L2 tables and refcounts take well under 1 %
#: at 64 KiB clusters; a sixteenth of the disk and 256 MiB on top leave room to spare
QCOW2_SHARE, QCOW2_EXTRA = 16, 256 * MIB
#: the least a file of QEMU's may reach: logs cut at ``vms.log_limit_bytes`` stay far below
FILE_FLOOR = 1024 * MIB
#: and at least this many log limits: twice the apparent size at which a log that can only
#: be punched is emptied (``logtrim``)
LOG_FILE_FACTOR = 2 * PUNCHED_FACTOR

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
KMSG = Path("/dev/kmsg")
#: the OOM killer's line, a memory cgroup's ("Memory cgroup out of memory: ...") or the
#: node's ("Out of memory: ..."), as the kernel writes it to its log
_OOM_KILL = re.compile(rb"[Oo]ut of memory: Killed process (\d+) ")


@dataclass(frozen=True, slots=True)
class QemuLimits:
    """The most one QEMU's scope may hold at once."""

    memory_max_bytes: int
    tasks_max: int
    file_max_bytes: int = FILE_FLOOR

    def prlimit(self, binary: str) -> list[str]:
        """The prefix that sets the file size limit before exec (``prlimit`` execs in place,
        so the PID stays QEMU's)."""
        return [binary, f"--fsize={self.file_max_bytes}", "--"]

    def scope_properties(self) -> list[str]:
        """``systemd-run`` options that set them on the scope it makes."""
        return [
            f"--property=MemoryMax={self.memory_max_bytes}",
            f"--property=TasksMax={self.tasks_max}",
        ]


def for_vm(
    *, memory_mib: int, vcpus: int, boot_files: tuple[Path, ...], code_cache_mib: int,
    overhead_mib: int, disk_mib: int = 0, log_limit: int = 0,
) -> QemuLimits:  # fmt: skip
    """The limits of a QEMU that runs a guest of ``memory_mib`` and ``vcpus``, holding
    ``boot_files`` (a direct boot's kernel and initrd, rounded up to a whole MiB together;
    missing ones count 0), with a translation cache of ``code_cache_mib`` (0 under KVM), a
    disk of ``disk_mib`` (0: none) and logs cut at ``log_limit`` bytes."""
    files = 0
    for path in boot_files:
        with contextlib.suppress(FileNotFoundError):
            files += path.stat().st_size
    files_mib = -(-files // MIB)  # whole MiB, so the kernel keeps the limit as given
    memory = (memory_mib + code_cache_mib + overhead_mib + files_mib) * MIB
    disk = disk_mib * MIB
    logs = LOG_FILE_FACTOR * log_limit
    largest = max(disk + disk // QCOW2_SHARE + QCOW2_EXTRA, logs, FILE_FLOOR)
    return QemuLimits(memory, TASKS_BASE + vcpus, largest)


def prlimit_binary() -> str:
    """:raise SandboxError: ``prlimit`` (util-linux) is not installed."""
    found = shutil.which("prlimit")
    if found is None:
        raise SandboxError("prlimit (util-linux) is not installed: QEMU's files cannot be "
                           "held to a size", hint="install util-linux")  # fmt: skip
    return found


def _number(path: Path) -> int | None:
    """A cgroup file's value: None for ``max`` (no limit)."""
    text = path.read_text().strip()
    return None if text == "max" else int(text)


Held = dict[str, int | None]


def _file_max(pid: int) -> int | None:
    """``pid``'s hard ``RLIMIT_FSIZE``, from ``/proc/PID/limits``; None: unlimited. Not
    ``prlimit(2)``: for another uid's process it needs ``CAP_SYS_RESOURCE``, which a
    container's root may lack, while the file is readable by anyone."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max file size"):
            value = line.split()[4]
            return None if value == "unlimited" else int(value)
    return None


def cgroup_held(pid: int, *, proc: Path = PROC, root: Path = CGROUP_ROOT) -> Held:
    """The memory and tasks limits (``memory_max``, ``tasks_max``; None: unlimited) and use
    (``memory``, ``tasks``) of ``pid``'s cgroup v2; all None where the node has none with the
    memory and pids controllers (e.g. a host without systemd).

    :raise OSError: ``pid`` is gone.
    """
    held: Held = dict.fromkeys(("memory_max", "memory", "tasks_max", "tasks"))
    lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    unified = [line[3:] for line in lines if line.startswith("0::/")]
    if not unified:
        return held
    folder = root / unified[0].lstrip("/")
    names = ("memory.max", "memory.current", "pids.max", "pids.current")
    try:
        return {key: _number(folder / name) for key, name in zip(held, names, strict=True)}
    except (OSError, ValueError):  # no such controller there (cgroup v1 for memory, say)
        return held


def applied(pid: int) -> Held | None:
    """What the kernel holds ``pid`` to (the truth, not the agent's intention): its cgroup's
    memory and tasks (``cgroup_held``) and ``file_max``, its file size limit (None:
    unlimited). None where ``pid`` is gone."""
    try:
        return {**cgroup_held(pid), "file_max": _file_max(pid)}
    except OSError:  # gone (ProcessLookupError among them)
        return None


def oom_killed(pid: int, since: float, kmsg: Path = KMSG) -> bool:
    """Whether the kernel's log says its OOM killer ended ``pid`` after ``since`` (seconds of
    ``CLOCK_MONOTONIC``, so a PID used again is not mistaken for it); False where the log
    cannot be read (no ``/dev/kmsg``, or not root)."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    found = False
    try:
        os.lseek(fd, 0, os.SEEK_SET)  # from the oldest record the kernel still holds
        while True:
            try:
                record = os.read(fd, 8192)  # one record per read: "LEVEL,SEQ,USEC,-;TEXT"
            except BlockingIOError:
                break  # read them all
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while we read: go on
                    continue
                break
            if not record:
                break
            match = _OOM_KILL.search(record)
            if match is None or int(match.group(1)) != pid:
                continue
            with contextlib.suppress(ValueError, IndexError):
                found = int(record.split(b",", 3)[2]) / 1e6 >= since
    finally:
        os.close(fd)
    return found


def exit_cause(pid: int, killed_by: int | None, started: float) -> str | None:
    """Why a QEMU ended that no one asked to stop, when the kernel can tell: the file size
    limit (``SIGXFSZ``), the OOM killer (its log), or another signal. ``killed_by``: the
    signal, known for the agent's own children (``process.ExitWatch``); ``started``: when the
    QEMU started, wall-clock seconds (``VmRecord.started``)."""
    if killed_by == signal.SIGXFSZ:
        return "it wrote past its file size limit (vms.limits)"
    if killed_by in (None, signal.SIGKILL):
        since = time.monotonic() - (time.time() - started)
        if oom_killed(pid, since):
            return "the kernel's OOM killer ended it (its memory limit, or the node's memory)"
    if killed_by is not None:
        return f"killed by {signal.Signals(killed_by).name}"
    return None
