"""The host under the agent: one way to run a command, systemd's tools, sd_notify.

In the spirit of mkosi's ``run.py``: every external command goes through ``run`` (blocking,
for worker threads and start-up) or ``run_async`` (on the event loop, never blocking it).
Both capture stderr and raise one error, ``CommandError``, naming the command and the cause
(exit status and the tail of stderr, a timeout, or a program that cannot be started);
cancellation is never wrapped: ``run_async`` kills the command and re-raises it.

systemd is optional: on a host where it does not run (containers, tests) ``systemctl`` is
skipped and says so, ``failed_units`` answers None and ``notify`` does nothing, so the agent
runs the same in the foreground.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hatchery.errors import CommandError

log = logging.getLogger(__name__)

AGENT_UNIT = "hatchery-agent.service"
"""The agent's own unit: a live patch restarts it last, from inside it."""

SYSTEMD_RUNTIME = Path("/run/systemd/system")
DEFAULT_TIMEOUT = 120.0

__all__ = [
    "AGENT_UNIT",
    "CommandError",
    "Completed",
    "failed_units",
    "notify",
    "open_notify",
    "run",
    "run_async",
    "spawn",
    "stream_lines",
    "systemctl",
    "systemd_running",
    "watchdog_interval",
]


@dataclass(frozen=True, slots=True)
class Completed:
    """A command that ran to its end (``returncode`` 0 unless the caller passed check=False)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> Completed:
    """Run ``argv`` to its end, blocking: call it from a worker thread or before the loop runs.

    :raise CommandError: the command cannot be started, outlives ``timeout`` seconds (it is
        killed), or (with ``check``) exits non-zero; the message carries its stderr.
    """
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, errors="replace",
            timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise CommandError(
            argv, None, _text(exc.stderr), reason=f"timed out after {timeout:g}s"
        ) from exc
    except OSError as exc:
        raise CommandError(argv, None, reason=f"cannot run: {exc.strerror or exc}") from exc
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr)
    return Completed(tuple(argv), done.returncode, done.stdout, done.stderr)


async def run_async(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    new_session: bool = False,
) -> Completed:
    """Run ``argv`` as an asyncio subprocess: the event loop keeps serving meanwhile.

    ``new_session`` starts it in a session of its own (a daemonizing QEMU must not share the
    agent's). Cancelled, the command is killed and ``CancelledError`` propagates untouched.

    :raise CommandError: as ``run``.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=new_session,
        )
    except OSError as exc:
        raise CommandError(argv, None, reason=f"cannot run: {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input.encode() if input is not None else None)
    except TimeoutError:
        await _kill(proc)
        raise CommandError(argv, None, reason=f"timed out after {timeout:g}s") from None
    except asyncio.CancelledError:
        await _kill(proc)
        raise
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    returncode = proc.returncode if proc.returncode is not None else -1
    if check and returncode != 0:
        raise CommandError(argv, returncode, stderr)
    return Completed(tuple(argv), returncode, stdout, stderr)


async def stream_lines(
    argv: Sequence[str], *, max_line: int = 64 * 1024, max_lines: int | None = None
) -> AsyncGenerator[str]:
    """Run ``argv`` and yield its output line by line as it comes (``journalctl --follow``).

    Bounded whatever the command prints: a line is cut to ``max_line`` bytes (the rest of it
    skipped), at most ``max_lines`` lines are yielded, stderr's last 4 KiB are kept. The
    command is killed when the consumer stops early (close the generator: ``aclosing``) or
    is cancelled; cancellation passes through untouched.

    :raise CommandError: it cannot be started, or it exits non-zero (with its stderr).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise CommandError(argv, None, reason=f"cannot run: {exc.strerror or exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    stderr = bytearray()

    async def drain_stderr(pipe: asyncio.StreamReader) -> None:
        while chunk := await pipe.read(4096):
            stderr.extend(chunk)
            del stderr[:-4096]

    errors = asyncio.create_task(drain_stderr(proc.stderr), name=f"stderr-{argv[0]}")
    count, buffer, skipping = 0, bytearray(), False
    try:
        while max_lines is None or count < max_lines:
            chunk = await proc.stdout.read(64 * 1024)
            if not chunk:
                break
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0 and (max_lines is None or count < max_lines):
                line = bytes(buffer[: min(end, max_line)])
                del buffer[: end + 1]
                if skipping:  # the tail of a line already cut
                    skipping = False
                    continue
                count += 1
                yield line.decode(errors="replace")
            if len(buffer) > max_line and not skipping:
                count += 1
                yield bytes(buffer[:max_line]).decode(errors="replace")
                skipping = True
            if skipping:
                buffer.clear()
        if buffer and not skipping and (max_lines is None or count < max_lines):
            yield bytes(buffer[:max_line]).decode(errors="replace")  # no newline at the end
            count += 1
        if max_lines is None or count < max_lines:  # it ended by itself: did it fail?
            await proc.wait()
            await errors
            if proc.returncode:
                raise CommandError(argv, proc.returncode, stderr.decode(errors="replace"))
    finally:
        errors.cancel()
        await _kill(proc)


#: Processes ``spawn`` started that may still run.
_DETACHED: set[subprocess.Popen[bytes]] = set()


async def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    ready: Callable[[], bool],
    timeout: float = DEFAULT_TIMEOUT,
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> int:
    """Start a long-lived process in a session of its own, its output appended to ``log``,
    and return its PID once ``ready()`` holds. For processes that must outlive the agent and
    cannot daemonize themselves (a VM's QEMU, whose seccomp filter forbids the ``fork`` and
    ``setsid`` of ``-daemonize``). ``cwd``: its working directory; ``pass_fds``: descriptors
    it inherits (at the same numbers).

    Started with ``subprocess.Popen``, not asyncio: an asyncio subprocess transport kills its
    process when it is closed or collected, which would stop every VM when the agent stops.
    Nothing waits for it after this returns: its watcher reaps it (``os.waitid`` on its
    pidfd), or init once the agent is gone.

    :raise CommandError: it cannot be started, exits before it is ready (with the tail of
        ``log``), or is not ready within ``timeout`` (then it is killed).
    """
    loop = asyncio.get_running_loop()
    offset = log.stat().st_size if log.exists() else 0
    for gone in [p for p in _DETACHED if p.poll() is not None]:  # reaps any not yet reaped
        _DETACHED.discard(gone)
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, cwd=cwd, pass_fds=tuple(pass_fds),
            )  # fmt: skip
    except OSError as exc:
        raise CommandError(argv, None, reason=f"cannot run: {exc.strerror or exc}") from exc
    deadline = loop.time() + timeout
    try:
        while not ready():
            code = proc.poll()
            if code is not None:
                raise CommandError(argv, code, _log_tail(log, offset))
            if loop.time() > deadline:
                raise CommandError(argv, None, reason=f"not ready after {timeout:g}s")
            await asyncio.sleep(0.05)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    _DETACHED.add(proc)  # held, so that it is not collected (and warned about) while it runs
    return proc.pid


def _log_tail(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return f.read()[-4096:].decode(errors="replace")
    except OSError:
        return ""


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


# --- systemd ------------------------------------------------------------------------------------
def systemd_running() -> bool:
    """Whether systemd manages this host (sd_booted(3): its runtime folder exists)."""
    return SYSTEMD_RUNTIME.is_dir()


def systemctl(*args: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """``systemctl ARGS`` (blocking); False, and nothing done, where systemd does not run.

    :raise CommandError: systemctl failed (its stderr is in the message).
    """
    program = shutil.which("systemctl")
    if program is None or not systemd_running():
        log.info("no systemd here: skipping systemctl %s", " ".join(args))
        return False
    run([program, *args], timeout=timeout)
    return True


async def failed_units(systemctl: str | None = None, timeout: float = 10.0) -> list[str] | None:
    """The units systemd reports as failed; None where systemd does not run this host.

    Asynchronous because ``/healthz`` asks on every call. ``systemctl`` names the program
    (found on PATH where systemd runs when not given; tests pass a stand-in).

    :raise CommandError: systemctl failed or did not answer within ``timeout`` seconds.
    """
    if systemctl is None:
        systemctl = shutil.which("systemctl")
        if systemctl is None or not systemd_running():
            return None
    done = await run_async(
        [systemctl, "list-units", "--state=failed", "--no-legend", "--plain"], timeout=timeout
    )
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


# --- sd_notify ----------------------------------------------------------------------------------
_notify_socket: socket.socket | None = None


def open_notify() -> None:
    """Open the one socket every ``notify`` sends through (idempotent); call it at start.

    One unconnected datagram socket for the process's whole life, so a watchdog ping never
    needs a new file descriptor: a process whose descriptors are exhausted (a flood of
    connections, issue 14) still tells systemd it is alive rather than being killed for it.
    Unconnected (``sendto`` names the address each time) so it survives systemd re-creating
    its socket (``daemon-reexec``); non-blocking so a busy systemd never stalls the loop.
    """
    global _notify_socket
    if _notify_socket is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        _notify_socket = sock


def notify(state: str) -> bool:
    """Tell systemd ``state`` (``READY=1``, ``WATCHDOG=1``…), one datagram as sd_notify(3)
    sends it, without libsystemd. Returns whether a supervisor was told: with no
    ``$NOTIFY_SOCKET`` (not started by systemd) it does nothing; a send that fails is
    logged and answered False, never raised (the watchdog task must not die of it)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        open_notify()
        assert _notify_socket is not None
        _notify_socket.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state.split("=", 1)[0], exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for us (in seconds), or None without one."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
