"""A stand-in for QEMU's console chardev: a real unix socket server taking one client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeQemu:
    """QEMU's console chardev: a unix socket server taking one client; what it is sent is
    kept in ``received``; ``send`` is the guest printing."""

    path: Path
    server: asyncio.AbstractServer | None = None
    writer: asyncio.StreamWriter | None = None
    received: bytearray = field(default_factory=bytearray)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writer = writer
            self.gone.clear()
            self.connected.set()
            while data := await reader.read(65536):
                self.received += data
            self.gone.set()

        self.server = await asyncio.start_unix_server(client, str(self.path))

    async def send(self, data: bytes) -> None:
        await asyncio.wait_for(self.connected.wait(), 5)
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def hang_up(self) -> None:
        assert self.writer is not None
        self.writer.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def fake_qemu(path: Path) -> AsyncIterator[FakeQemu]:
    """A ``FakeQemu`` listening at ``path`` for the block."""
    fake = FakeQemu(path)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
