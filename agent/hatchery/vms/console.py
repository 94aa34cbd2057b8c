"""Interactive serial consoles: one connection to a VM's console socket, many watchers.

QEMU's console chardev (``-chardev socket,...,server=on,logfile=...``) accepts one client at
a time, and logs everything the guest prints to ``console.log`` whether or not one is
connected. A ``ConsoleHub`` holds that one connection while at least one session is
attached and fans the guest's output out to each session; at most one session is the
*writer*, whose input goes to the guest. The API's WebSocket handler (``api.console``) only
moves bytes between a session and its client; everything a hostile guest (or client) can
do to the agent's memory is bounded here:

- the guest's output is read ``CHUNK`` bytes at a time, and queued per session up to
  ``ConsoleLimits.session_buffer`` bytes; a session whose client reads slower than the guest
  writes is *dropped* (``dropped`` says why) instead of buffering without end, and the
  others go on;
- input from the writer is at most ``max_input`` bytes a message, and a guest that stops
  reading its serial port holds the writer for at most ``write_timeout`` seconds;
- at most ``max_sessions`` sessions per VM.

The socket is reached like QMP's (``sandbox.checked_socket``): only a socket owned by the
VM's QEMU uid, never through a symlink a hostile QEMU put in its ``run/`` folder. No
aiohttp here: the module knows sockets and bytes, not HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hatchery.errors import HatcheryError
from hatchery.vms.sandbox import checked_socket

log = logging.getLogger(__name__)

#: The largest piece of guest output read (and sent to a client) at once.
CHUNK = 4096


class ConsoleError(HatcheryError):
    """The console cannot be attached (socket unreachable, VM not running)."""


class ConsoleBusy(ConsoleError):
    """The console has a writer already, or as many sessions as it takes."""


@dataclass(frozen=True, slots=True)
class ConsoleLimits:
    """Bounds on what one console costs the agent, whatever the guest or the client do."""

    session_buffer: int = 256 * 1024  # guest output queued per session before it is dropped
    max_input: int = 4096  # bytes per message from the writer (a paste comes in pieces)
    max_sessions: int = 16  # per VM, the writer included
    write_timeout: float = 10.0  # a guest that does not read its serial port
    idle_timeout: float = 3600.0  # no byte either way for this long: the session ends
    connect_timeout: float = 5.0


class Session:
    """One attached client: the guest's output for it, and (if the writer) its input.

    ``read`` returns the next output, ``b""`` once the session is over; ``dropped`` then
    says why (the VM stopped, the client was too slow, ...), None for a detach.
    """

    def __init__(self, hub: ConsoleHub, who: str, writer: bool) -> None:
        self.who = who
        self.writer = writer
        self.dropped: str | None = None
        self._hub = hub
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _offer(self, data: bytes) -> None:
        """Queue guest output; past the session's buffer the session is dropped."""
        if self._closed:
            return
        if self._queued + len(data) > self._hub.limits.session_buffer:
            self._chunks.clear()  # what it has not read is dropped with it
            self._queued = 0
            self._end(f"dropped: the client read more slowly than the guest wrote "
                      f"({self._hub.limits.session_buffer} bytes behind)")  # fmt: skip
            return
        self._chunks.append(data)
        self._queued += len(data)
        self._ready.set()

    def _end(self, why: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.dropped = why
        self._ready.set()
        self._hub._leave(self)

    async def read(self) -> bytes:
        """The next piece of guest output (at most ``CHUNK`` bytes); ``b""`` at the end."""
        while not self._chunks:
            if self._closed:
                return b""
            self._ready.clear()
            await self._ready.wait()
        data = self._chunks.popleft()
        self._queued -= len(data)
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the guest (writer only; ``ConsoleError`` otherwise, or when it is
        over ``max_input`` bytes)."""
        if not self.writer:
            raise ConsoleError("this session is read-only")
        if len(data) > self._hub.limits.max_input:
            raise ConsoleError(f"input of {len(data)} bytes, over {self._hub.limits.max_input}")
        if not self._closed:
            await self._hub._write(self, data)

    def close(self, why: str | None = None) -> None:
        """Detach (idempotent); the hub lets go of the socket after its last session."""
        self._end(why)


class ConsoleHub:
    """The one connection to one VM's console socket, shared by its sessions."""

    def __init__(
        self,
        name: str,
        socket: Path,
        owners: Iterable[int],
        limits: ConsoleLimits,
        on_empty: Callable[[ConsoleHub], None] | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self._socket = socket
        self._owners = tuple(owners)
        self._on_empty = on_empty
        self._sessions: list[Session] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions)

    @property
    def writer(self) -> Session | None:
        return next((s for s in self._sessions if s.writer), None)

    async def open(self) -> None:
        """Connect to the console socket.

        :raise ConsoleError: it is missing, not the VM's (a symlink, another uid's) or does
            not accept within ``connect_timeout``.
        """
        try:
            fd = checked_socket(self._socket, self._owners)
            try:
                async with asyncio.timeout(self.limits.connect_timeout):
                    self._reader, self._writer = await asyncio.open_unix_connection(
                        f"/proc/self/fd/{fd}", limit=CHUNK
                    )
            finally:
                os.close(fd)
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            raise ConsoleError(f"vm {self.name}: its console did not accept a connection "
                               f"within {self.limits.connect_timeout:g}s") from exc  # fmt: skip
        except OSError as exc:
            raise ConsoleError(f"vm {self.name}: cannot connect to its console: "
                               f"{exc.strerror or exc}") from exc  # fmt: skip
        self._pump = asyncio.create_task(self._fan_out(), name=f"console-{self.name}")

    def join(self, who: str, writer: bool) -> Session:
        """A new session of ``who``.

        :raise ConsoleBusy: see ``check``.
        """
        if self._closed:
            raise ConsoleError(f"vm {self.name}: its console is closed")
        self.check(writer)
        session = Session(self, who, writer)
        self._sessions.append(session)
        return session

    def check(self, writer: bool) -> None:
        """:raise ConsoleBusy: ``writer`` and the console has one (named in the message), or
        ``max_sessions`` are attached."""
        current = self.writer
        if writer and current is not None:
            raise ConsoleBusy(
                f"vm {self.name}: its console has a writer already ({current.who})",
                hint="attach with --read-only to watch, or wait until they detach",
            )
        if len(self._sessions) >= self.limits.max_sessions:
            raise ConsoleBusy(f"vm {self.name}: its console has {len(self._sessions)} "
                              "sessions, as many as it takes")  # fmt: skip

    async def _fan_out(self) -> None:
        assert self._reader is not None
        why = f"vm {self.name}: its console closed (the VM stopped?)"
        try:
            while True:
                data = await self._reader.read(CHUNK)
                if not data:
                    break
                for session in list(self._sessions):
                    session._offer(data)
        except OSError as exc:
            why = f"vm {self.name}: console read failed: {exc}"
        self.close(why)

    async def _write(self, session: Session, data: bytes) -> None:
        assert self._writer is not None
        try:
            self._writer.write(data)
            async with asyncio.timeout(self.limits.write_timeout):
                await self._writer.drain()
        except TimeoutError:
            session.close(f"dropped: the guest did not read its console for "
                          f"{self.limits.write_timeout:g}s")  # fmt: skip
        except OSError as exc:
            self.close(f"vm {self.name}: console write failed: {exc}")

    def _leave(self, session: Session) -> None:
        with contextlib.suppress(ValueError):
            self._sessions.remove(session)
        if not self._sessions:
            self.close(None)

    def close(self, why: str | None) -> None:
        """End every session (``why`` tells them) and let go of the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._sessions):
            session._end(why)
        if self._writer is not None:
            self._writer.close()
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()
        if self._on_empty is not None:
            self._on_empty(self)


class Consoles:
    """The hubs of every VM with an attached session, by VM uuid (a VM destroyed and made
    again under its name is another console)."""

    def __init__(self, limits: ConsoleLimits | None = None) -> None:
        self.limits = limits or ConsoleLimits()
        self._hubs: dict[str, ConsoleHub] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def attach(
        self, name: str, uuid: str, socket: Path, owners: Iterable[int], who: str, writer: bool
    ) -> Session:
        """A session on VM ``name``'s console, connecting to its socket if no one is.

        :raise ConsoleBusy: see ``ConsoleHub.join``.
        :raise ConsoleError: the socket cannot be reached.
        """
        async with self._opening.setdefault(uuid, asyncio.Lock()):
            hub = self._hubs.get(uuid)
            if hub is None:
                hub = ConsoleHub(name, socket, owners, self.limits, self._forget(uuid))
                await hub.open()
                self._hubs[uuid] = hub
            return hub.join(who, writer)

    def _forget(self, uuid: str) -> Callable[[ConsoleHub], None]:
        def forget(hub: ConsoleHub) -> None:
            if self._hubs.get(uuid) is hub:
                del self._hubs[uuid]
            lock = self._opening.get(uuid)
            if lock is not None and not lock.locked():  # nobody holds or awaits it
                del self._opening[uuid]

        return forget

    def hub(self, uuid: str) -> ConsoleHub | None:
        return self._hubs.get(uuid)

    def check(self, uuid: str, writer: bool) -> None:
        """What ``attach`` would refuse, without attaching (``ConsoleBusy``)."""
        hub = self._hubs.get(uuid)
        if hub is not None:
            hub.check(writer)

    def close(self, why: str = "the agent is stopping") -> None:
        """End every session (at shutdown)."""
        for hub in list(self._hubs.values()):
            hub.close(why)
