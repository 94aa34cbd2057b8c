"""``hatchery vm console NAME --attach``: type into a VM's serial console, like virsh console.

The terminal is put in raw mode (every key, Ctrl-C included, goes to the guest) and put
back on every way out: a detach with ``Ctrl-]``, the VM stopping, the agent closing the
session, an error, SIGTERM or SIGHUP. ``--read-only`` watches without typing (``vm.read``
is enough); the agent takes one writer at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from urllib.parse import quote

import aiohttp

from hatchery.client import AgentClient, Credentials
from hatchery.errors import HatcheryError

#: ``Ctrl-]``, the detach key of telnet and virsh console.
DETACH = b"\x1d"
#: The close code of a session the agent ended (``api.console.ENDED``).
ENDED = 4000


class ConsoleEnded(HatcheryError):
    """The agent ended the session (the VM stopped, idle, too slow a reader)."""


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """``fd``'s terminal in raw mode for the block, its settings restored however it ends
    (nothing done when ``fd`` is not a terminal)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _say(text: str) -> None:
    """A line of ours on stderr; ``\\r\\n`` because the terminal may be raw."""
    sys.stderr.write(text + "\r\n")
    sys.stderr.flush()


async def attach(client: AgentClient, name: str, read_only: bool) -> None:
    """Relay stdin to the guest and its output to stdout until detached.

    :raise ApiError: the agent refused (its reason), :raise ConsoleEnded: the agent ended it.
    """
    mode = "read" if read_only else "write"
    async with client.websocket(f"/v1/vms/{quote(name, safe='')}/console/attach?mode={mode}") as ws:
        try:
            hello = await ws.receive_json(timeout=30)
        except (TypeError, ValueError, TimeoutError) as exc:  # closed at once, or not ours
            raise ConsoleEnded(f"vm {name}: the agent did not open the console "
                               f"(code {ws.close_code})") from exc  # fmt: skip
        role = hello.get("role") if isinstance(hello, dict) else None
        loop = asyncio.get_running_loop()
        stdin = sys.stdin.fileno()
        detached = asyncio.Event()
        keys: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

        def on_key() -> None:
            try:
                data = os.read(stdin, 4096)
            except OSError:
                data = b""
            if not data:  # end of input: as a detach
                detached.set()
                loop.remove_reader(stdin)
                return
            if DETACH in data:
                data = data.split(DETACH, 1)[0]
                detached.set()
                loop.remove_reader(stdin)
            if data and not read_only and not keys.full():
                keys.put_nowait(data)

        async def send_keys() -> None:
            while True:
                await ws.send_bytes(await keys.get())

        ended: list[str] = []

        async def show() -> None:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    _out(msg.data)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    if msg.data == ENDED:
                        ended.append(str(msg.extra or ""))
                    return
                elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.ERROR):  # fmt: skip
                    return

        with raw_terminal(stdin):
            # Said once the terminal is raw: what the user types from here goes to the guest.
            _say(f"Connected to vm {name} as {role}. Escape character is ^]")
            if not read_only or os.isatty(stdin):  # a watcher without a terminal: until killed
                loop.add_reader(stdin, on_key)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, detached.set)
            tasks = [asyncio.create_task(show(), name="console-show"),
                     asyncio.create_task(send_keys(), name="console-keys"),
                     asyncio.create_task(detached.wait(), name="console-detach")]  # fmt: skip
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                while not keys.empty():  # what was typed before the detach key
                    await ws.send_bytes(keys.get_nowait())
            finally:
                loop.remove_reader(stdin)
                for sig in (signal.SIGTERM, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if detached.is_set():
            _say(f"Detached from vm {name}.")
            return
        why = ended[0] if ended and ended[0] else f"closed with code {ws.close_code}"
        raise ConsoleEnded(f"the agent ended the console session of vm {name}: {why}")


def run(args: argparse.Namespace) -> int:
    async def go() -> None:
        creds = Credentials.from_env(args.ca, args.cert, args.key)
        async with AgentClient(args.agent, creds, timeout=None) as client:
            await attach(client, args.name, args.read_only)

    asyncio.run(go())
    return 0
