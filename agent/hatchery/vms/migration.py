"""QEMU migration over descriptors the agent hands out: to another QEMU, to and from a file.

Every migration channel is a descriptor given to QEMU over QMP (``getfd``, then the
``fd:NAME`` URI), never a path or a command: QEMU 7.2 has no ``file:`` URI, its seccomp
filter (``spawn=deny``) refuses ``exec:``, and a socket in the VM's ``run/`` folder would
be a name its (hostile) QEMU could swap. ``vm refresh`` joins the old and the new QEMU with
a socket pair; a suspend gives QEMU the write end of a pipe whose other end the agent copies
into the state file (fsynced), and a resume feeds the file into a pipe the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

from hatchery.errors import HatcheryError
from hatchery.qemu.machines import from_qom_type
from hatchery.state import fsync_dir
from hatchery.vms.monitor import Monitor, MonitorError

#: A local migration is bounded by memory bandwidth, not by QEMU 7.2's default 32 MiB/s.
LOCAL_PARAMETERS: dict[str, object] = {"max-bandwidth": 8 << 30, "downtime-limit": 300}
#: ``query-migrate`` states after which nothing more happens.
FINAL = frozenset({"completed", "failed", "cancelled"})
CHUNK = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class MigrationError(HatcheryError):
    """A migration did not complete; the message says where and why."""


async def prepare_source(monitor: Monitor) -> None:
    """Migration parameters for a local migration."""
    await monitor.execute("migrate-set-parameters", LOCAL_PARAMETERS)


async def wait_done(monitor: Monitor, timeout: float, what: str) -> dict[str, Any]:
    """Poll ``query-migrate`` until it completes; its answer (``downtime`` on the source).

    :raise MigrationError: it failed, was cancelled, or did not end within ``timeout``.
    :raise MonitorError: QMP is gone (QEMU exited).
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await monitor.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            assert isinstance(info, dict)
            return info
        if status in FINAL:
            assert isinstance(info, dict)
            raise MigrationError(f"{what}: migration {status}: "
                                 f"{info.get('error-desc', 'no reason given')}")  # fmt: skip
        if asyncio.get_running_loop().time() > deadline:
            raise MigrationError(f"{what}: migration not done within {timeout:g}s ({status})")
        await asyncio.sleep(0.05)


async def wait_running(monitor: Monitor, timeout: float, what: str) -> None:
    """Wait until QEMU runs the guest (an ``-incoming`` QEMU starts it once it has it all).

    :raise MigrationError: it did not run within ``timeout``.
    :raise MonitorError: QMP is gone (QEMU exited: its log says why).
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await monitor.execute("query-status")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "running":
            return
        if asyncio.get_running_loop().time() > deadline:
            raise MigrationError(f"{what}: the guest is {status}, not running, after "
                                 f"{timeout:g}s")  # fmt: skip
        await asyncio.sleep(0.05)


async def status(monitor: Monitor) -> str:
    """QEMU's run state (``running``, ``paused``, ``postmigrate``, ``inmigrate``, ...)."""
    info = await monitor.execute("query-status")
    return str(info.get("status")) if isinstance(info, dict) else "unknown"


async def running_machine(monitor: Monitor) -> str:
    """The versioned machine a running QEMU built (``qom-get /machine type``)."""
    return from_qom_type(str(await monitor.execute("qom-get", {"path": "/machine",
                                                               "property": "type"})))  # fmt: skip


async def resume_if_stopped(monitor: Monitor | None) -> None:
    """Give the guest back to a source QEMU after a failed migration (``cont`` also takes
    back its disks, which a completed migration let go)."""
    if monitor is None:
        return
    with contextlib.suppress(MonitorError):
        if await status(monitor) in ("paused", "postmigrate", "finish-migrate"):
            await monitor.execute("cont")


def pipe() -> tuple[int, int]:
    """A pipe with a large buffer (fewer wake-ups per MiB), both ends close-on-exec."""
    read, write = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write, _F_SETPIPE_SZ, CHUNK)
    return read, write


async def pipe_to(monitor: Monitor, fdname: str, *, qemu_writes: bool) -> int:
    """A pipe whose one end QEMU holds as ``fdname`` (QMP ``getfd``; the end it writes when
    ``qemu_writes``, saving, else the end it reads, resuming); return the agent's end. Our
    copy of QEMU's end is closed either way, ours too if QEMU could not take its end."""
    read, write = pipe()
    theirs, ours = (write, read) if qemu_writes else (read, write)
    try:
        await monitor.pass_fd(fdname, theirs)
    except BaseException:
        os.close(ours)
        raise
    finally:
        os.close(theirs)
    return ours


def partial(path: Path) -> Path:
    """Where a state file is written until QEMU says the stream was whole."""
    return path.with_name(path.name + ".partial")


def save_stream(read_fd: int, path: Path) -> int:
    """Copy the stream from ``read_fd`` until its end into ``partial(path)`` (the agent's
    own file, 0600) and fsync it; the bytes written. Blocking: for a worker thread. Closes
    ``read_fd``. ``commit`` makes it ``path`` once QEMU reports the migration complete."""
    tmp = partial(path)
    total = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)  # fmt: skip
        try:
            while chunk := os.read(read_fd, CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                total += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(read_fd)
    return total


def commit(path: Path) -> None:
    """The partial state file becomes ``path``, durably (rename, fsync of the folder)."""
    os.replace(partial(path), path)
    fsync_dir(path.parent)


def feed_stream(path: Path, write_fd: int) -> None:
    """Write ``path`` into ``write_fd`` and close it (the end of the stream). Blocking.
    A reader that gives up (QEMU refused the stream) ends the copy with ``BrokenPipeError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            while chunk := os.read(fd, CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(write_fd, view) :]
        finally:
            os.close(fd)
    finally:
        os.close(write_fd)
