"""QEMU processes that outlive the agent.

QEMU is started in a session of its own (re-parented to init when the agent goes) and,
where systemd runs, inside its own transient scope, so neither a SIGKILL of the agent nor systemd
restarting the agent's unit stops a VM. The agent finds the process again through the
PID in its record and checks ``/proc/PID/cmdline`` for the VM's UUID, so a recycled PID is never
mistaken for the VM. Exit is watched with a pidfd, which works for processes that are not
our children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from hatchery import host
from hatchery.errors import HatcheryError
from hatchery.vms.limits import QemuLimits, prlimit_binary
from hatchery.vms.sandbox import QemuUser, setpriv_binary

log = logging.getLogger(__name__)


class ProcessError(HatcheryError):
    """QEMU could not be started or found."""


def scope_runner() -> str | None:
    """``systemd-run`` where systemd manages this host (a node), else None: QEMU then runs
    in no scope of its own and no limit holds it (``vms.limits``)."""
    runner = shutil.which("systemd-run")
    return runner if runner is not None and host.systemd_running() else None


def scope_prefix(unit: str, limits: QemuLimits | None = None) -> list[str]:
    """Run in a transient scope of its own, held to ``limits``, when systemd manages this
    host."""
    runner = scope_runner()
    if runner is None:
        return []
    properties = limits.scope_properties() if limits is not None else []
    return [runner, "--scope", "--quiet", "--collect", f"--unit={unit}", *properties, "--"]


async def launch(
    argv: list[str],
    unit: str,
    *,
    qmp: Path | None,
    output: Path,
    cwd: Path,
    user: QemuUser | None = None,
    limits: QemuLimits | None = None,
    pass_fds: tuple[int, ...] = (),
    timeout: float = 60.0,
) -> int:
    """Start QEMU detached; return its PID, once its QMP socket ``qmp`` exists if QEMU is
    to make it (None: the caller bound it and hands it over, ``sandbox.open_channels``). The
    caller connects to QMP, which answers once QEMU is initialised.

    The scope is made as root (``systemd-run --scope`` runs the rest in place), held to
    ``limits`` (memory and tasks; ``prlimit`` then sets the file size limit: ``vms.limits``),
    then, with ``user``, ``setpriv`` drops to that user and execs QEMU: the PID returned is
    QEMU's, whose command line carries the VM's UUID (``is_ours``). QEMU runs in ``cwd``, the
    VM's folder; its paths are relative to it (see ``sandbox``). No ``-pidfile``: QEMU
    resolves that path to an absolute one, which its user may not search, and the PID is
    known here.

    Not with ``-daemonize``: QEMU installs its seccomp filter before it daemonizes, and the
    filter forbids the ``fork`` and ``setsid`` that needs (``spawn=deny``,
    ``elevateprivileges=deny``). The agent starts it in a session of its own instead
    (``host.spawn``), its stdout and stderr appended to ``output``.

    :raise CommandError: QEMU failed to start (the tail of ``output`` says why) or was not
        ready within ``timeout``.
    :raise SandboxError: ``user`` is given and ``setpriv`` is missing, or ``limits`` and
        ``prlimit``.
    """
    if qmp is not None:
        qmp.unlink(missing_ok=True)
    drop = user.setpriv(setpriv_binary()) if user is not None else []
    sized = limits.prlimit(prlimit_binary()) if limits is not None else []
    full = [*scope_prefix(unit, limits), *sized, *drop, *argv]
    log.debug("exec %s (in %s)", " ".join(full), cwd)
    ready = (lambda: os.path.lexists(qmp)) if qmp is not None else (lambda: True)
    return await host.spawn(full, log=output, ready=ready, timeout=timeout, cwd=cwd,
                            pass_fds=pass_fds)  # fmt: skip


def is_ours(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and its command line carries ``marker`` (the VM's UUID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline


def kill(pid: int, marker: str) -> bool:
    """SIGKILL ``pid`` if it is still the VM's QEMU; return whether a signal was sent."""
    if not is_ours(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


class ExitWatch:
    """Calls ``on_exit`` once when ``pid`` exits (pidfd readable); idempotent close.

    ``signal``: the signal that ended it, once it has, when it was this agent's child (the
    kernel tells only the parent); None if it exited by itself or is someone else's (a QEMU
    a previous agent started).
    """

    def __init__(self, pid: int, on_exit: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = os.pidfd_open(pid)
        self._on_exit = on_exit
        self.exited = asyncio.Event()
        self.signal: int | None = None
        self._loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        if self._fd is not None:  # our own child (started by this agent): reap it
            with contextlib.suppress(ChildProcessError, OSError):
                status = os.waitid(os.P_PIDFD, self._fd, os.WEXITED | os.WNOHANG)
                if status is not None and status.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
                    self.signal = status.si_status
        self.close()
        self.exited.set()
        self._on_exit()

    def close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


async def terminate(pid: int, marker: str, grace: float = 5.0, wait: float = 10.0) -> bool:
    """Stop the VM's QEMU: SIGTERM, SIGKILL if it still runs after ``grace`` seconds (at once
    if ``grace`` is 0); True once it is gone (or ``pid`` is no longer the VM's QEMU), False
    if it outlived ``wait`` seconds after SIGKILL.

    The process is held by a pidfd opened before ``is_ours`` is checked, and signalled and
    watched through it: a PID recycled meanwhile is never signalled. Works for a QEMU that
    is not our child (one a previous agent started); one that is, is reaped.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if not is_ours(pid, marker):
            return True
        steps = ((signal.SIGTERM, grace),) if grace > 0 else ()
        for sig, timeout in (*steps, (signal.SIGKILL, wait)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
            if await _exited(fd, timeout):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                return True
        return False
    finally:
        os.close(fd)


async def _exited(pidfd: int, timeout: float) -> bool:
    """Whether the process behind ``pidfd`` exits within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(pidfd, done.set)
    try:
        await asyncio.wait_for(done.wait(), timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
