"""One QMP connection per running VM: commands out, lifecycle events in.

QEMU accepts one QMP client at a time; the agent holds it while it runs and gives it up on
exit, and a restarted agent simply reconnects (re-adoption). Disconnecting is idempotent
and never stops the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from hatchery.errors import HatcheryError
from hatchery.vms.sandbox import checked_socket

log = logging.getLogger(__name__)
WATCHED_EVENTS = frozenset({"SHUTDOWN", "STOP", "RESUME", "RESET", "POWERDOWN"})


class MonitorError(HatcheryError):
    """QMP is unreachable or refused a command."""


class Monitor:
    def __init__(
        self,
        name: str,
        socket: Path,
        on_event: Callable[[str, dict[str, Any]], None],
        owners: tuple[int, ...] = (0,),
    ):
        """``owners``: the uids the socket may belong to (QEMU's); it is connected to only
        if it is a socket of theirs, never through a symlink (``sandbox.checked_socket``):
        a hostile QEMU cannot point the agent at another VM's monitor."""
        self.name = name
        self._socket = socket
        self._owners = owners
        self._on_event = on_event
        self._qmp = QMPClient(name)
        self._events: asyncio.Task[None] | None = None

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect within ``timeout`` seconds, the greeting and capabilities negotiation
        included: a QEMU that accepts the connection but never greets (hung, or stopped
        with SIGSTOP) fails here instead of holding the caller forever.

        :raise MonitorError: no QMP session within ``timeout``.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                fd = checked_socket(self._socket, self._owners)
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._qmp.connect(f"/proc/self/fd/{fd}")
                finally:
                    os.close(fd)
                break
            except TimeoutError as exc:  # before OSError, of which it is a subclass
                raise MonitorError(f"vm {self.name}: QMP did not answer within "
                                   f"{timeout:g}s") from exc  # fmt: skip
            except (QMPError, OSError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise MonitorError(f"vm {self.name}: cannot connect to QMP: {exc}") from exc
                await asyncio.sleep(0.1)
        self._events = asyncio.create_task(self._pump(), name=f"qmp-events-{self.name}")

    async def _pump(self) -> None:
        async for event in self._qmp.events:
            kind = str(event["event"])
            if kind in WATCHED_EVENTS:
                data = event.get("data", {})
                log.info("vm %s: QMP event %s %s", self.name, kind, data or "")
                self._on_event(kind, dict(data) if isinstance(data, dict) else {})

    async def execute(self, command: str, args: dict[str, object] | None = None) -> object:
        try:
            return await self._qmp.execute(command, args)
        except (QMPError, OSError, EOFError) as exc:
            raise MonitorError(f"vm {self.name}: QMP {command} failed: {exc}") from exc

    async def pass_fd(self, name: str, fd: int) -> None:
        """Give QEMU a copy of ``fd`` under ``name`` (SCM_RIGHTS, then ``getfd``), e.g. a
        migration channel (``fd:NAME``). The caller keeps and closes its own copy.

        :raise MonitorError: QEMU did not take it.
        """
        try:
            self._qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise MonitorError(f"vm {self.name}: cannot pass a descriptor: {exc}") from exc
        await self.execute("getfd", {"fdname": name})

    async def powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        """Ask QEMU to exit now; the connection drops as it does, which is expected."""
        with contextlib.suppress(MonitorError):
            await self.execute("quit")

    async def close(self) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
            self._events = None
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._qmp.disconnect()
