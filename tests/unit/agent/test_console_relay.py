"""The console relay (``vms.console``) against a real unix socket standing in for QEMU's.

What a hostile guest can do to the agent through its serial console is bounded: a session
whose reader falls behind is dropped (the others go on), input is capped, there is one
writer, and the socket is reached only if it is the VM's own (no symlink, no other uid).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hatchery.vms.console import (
    CHUNK,
    ConsoleBusy,
    ConsoleError,
    ConsoleLimits,
    Consoles,
    Session,
)
from tests.support.fake_console import FakeQemu, fake_qemu


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[FakeQemu]:
    async with fake_qemu(tmp_path / "console") as fake:
        yield fake


OWNERS = (os.getuid(),)


async def _attach(consoles: Consoles, qemu: FakeQemu, who: str, writer: bool) -> Session:
    return await consoles.attach("web1", "uuid-1", qemu.path, OWNERS, who, writer)


async def _read(session: Session, want: bytes, timeout: float = 5) -> bytes:
    got = b""
    async with asyncio.timeout(timeout):
        while want not in got:
            data = await session.read()
            assert data, f"session ended ({session.dropped}) after {got!r}"
            got += data
    return got


async def test_every_reader_sees_the_output_and_one_writer_types(qemu: FakeQemu) -> None:
    consoles = Consoles()
    writer = await _attach(consoles, qemu, "alice", writer=True)
    reader = await _attach(consoles, qemu, "rita", writer=False)
    await qemu.send(b"login: ")
    assert b"login: " in await _read(writer, b"login: ")
    assert b"login: " in await _read(reader, b"login: ")
    await writer.write(b"root\r")
    async with asyncio.timeout(5):
        while b"root\r" not in qemu.received:
            await asyncio.sleep(0.01)
    with pytest.raises(ConsoleError, match="read-only"):
        await reader.write(b"rm -rf /\r")
    hub = consoles.hub("uuid-1")
    assert hub is not None and len(hub.sessions) == 2
    writer.close()
    reader.close()
    assert consoles.hub("uuid-1") is None  # the last one out lets go of QEMU's one client slot
    await asyncio.wait_for(qemu.gone.wait(), 5)


async def test_a_second_writer_is_refused_until_the_first_leaves(qemu: FakeQemu) -> None:
    consoles = Consoles()
    first = await _attach(consoles, qemu, "alice", writer=True)
    with pytest.raises(ConsoleBusy, match=r"has a writer already \(alice\)"):
        await _attach(consoles, qemu, "bob", writer=True)
    with pytest.raises(ConsoleBusy):
        consoles.check("uuid-1", writer=True)
    watcher = await _attach(consoles, qemu, "bob", writer=False)  # watching is fine
    first.close()
    second = await _attach(consoles, qemu, "bob", writer=True)
    assert second.writer and not watcher.writer


async def test_a_slow_reader_is_dropped_and_the_others_go_on(qemu: FakeQemu) -> None:
    consoles = Consoles(ConsoleLimits(session_buffer=64 * 1024))
    slow = await _attach(consoles, qemu, "sam", writer=False)
    fast = await _attach(consoles, qemu, "fay", writer=False)
    flood = b"x" * (CHUNK - 1) + b"\n"
    for _ in range(64):  # 256 KiB: four times what a session may hold
        await qemu.send(flood)
        got = 0
        async with asyncio.timeout(5):
            while got < len(flood):  # fay keeps up; sam never reads
                got += len(await fast.read())
    assert slow.closed and slow.dropped is not None and "more slowly" in slow.dropped
    assert await slow.read() == b""  # nothing it had not read is kept for it
    assert not fast.closed
    hub = consoles.hub("uuid-1")
    assert hub is not None and hub.sessions == [fast]
    await qemu.send(b"still here\n")
    await _read(fast, b"still here")


async def test_input_is_capped_and_sessions_are_counted(qemu: FakeQemu) -> None:
    consoles = Consoles(ConsoleLimits(max_input=16, max_sessions=2))
    writer = await _attach(consoles, qemu, "alice", writer=True)
    with pytest.raises(ConsoleError, match="over 16"):
        await writer.write(b"y" * 17)
    await _attach(consoles, qemu, "rita", writer=False)
    with pytest.raises(ConsoleBusy, match="as many as it takes"):
        await _attach(consoles, qemu, "ron", writer=False)


async def test_the_vm_going_away_ends_every_session_with_why(qemu: FakeQemu) -> None:
    consoles = Consoles()
    session = await _attach(consoles, qemu, "alice", writer=True)
    await qemu.send(b"bye\n")
    await qemu.hang_up()
    assert await _read(session, b"bye") == b"bye\n"  # what came before the end is delivered
    async with asyncio.timeout(5):
        assert await session.read() == b""
    assert session.dropped is not None and "console closed" in session.dropped
    assert consoles.hub("uuid-1") is None


async def test_only_the_vms_own_socket_is_connected(qemu: FakeQemu, tmp_path: Path) -> None:
    consoles = Consoles(ConsoleLimits(connect_timeout=1))
    link = tmp_path / "link"
    link.symlink_to(qemu.path)  # a hostile QEMU's run/console pointing elsewhere
    with pytest.raises(ConsoleError, match="cannot connect"):
        await consoles.attach("web1", "uuid-1", link, OWNERS, "alice", True)
    with pytest.raises(ConsoleError, match="not the VM's socket"):  # someone else's socket
        await consoles.attach("web1", "uuid-1", qemu.path, (OWNERS[0] + 1,), "alice", True)
    with pytest.raises(ConsoleError):
        await consoles.attach("web1", "uuid-1", tmp_path / "none", OWNERS, "alice", True)
    assert not qemu.connected.is_set() and consoles.hub("uuid-1") is None
    session = await consoles.attach("web1", "uuid-1", qemu.path, OWNERS, "alice", True)
    assert session.writer


async def test_closing_the_consoles_ends_every_session(qemu: FakeQemu) -> None:
    consoles = Consoles()
    session = await _attach(consoles, qemu, "alice", writer=True)
    consoles.close()
    assert await session.read() == b"" and session.dropped == "the agent is stopping"
    await asyncio.wait_for(qemu.gone.wait(), 5)
