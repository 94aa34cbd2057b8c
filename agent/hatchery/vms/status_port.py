"""A container VM's status port: what its init says about the container, in bounded memory.

The appliance's init writes ``started``, then ``exited N``, one line each, to the
virtio-serial port ``org.hatchery.status`` (docs/appliance.md). QEMU used to append what
came in to a file: a guest writing that port without end (it moved 3 MB in under a second
under TCG) would have filled /data. Now QEMU keeps it in a ring of ``RING_BYTES`` in its
own memory (``-chardev ringbuf``): a guest that floods the port only overwrites its own ring.

The agent drains the ring over QMP (``ringbuf-read``, which consumes what it returns) and
keeps the last valid line in the VM's record. It drains when the status is asked for, before
a refresh or a suspend moves the guest to another QEMU, and when the guest powers off:
container VMs run with ``-action shutdown=pause``, so their QEMU waits, the guest's last
words in its ring, until the agent has read them and quits it -- also when the agent was
down at the time (it finds the QEMU in runstate ``shutdown`` when it re-adopts it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass, field

from hatchery.vms.monitor import Monitor

PORT_NAME = "org.hatchery.status"
CHARDEV = "status"
#: QEMU's ring for the port; a power of two, as ``ringbuf`` wants.
RING_BYTES = 4096
#: What a line may say; anything else the guest writes is ignored.
STATUS_LINE = re.compile(r"(started|exited \d{1,3})")
#: The longest unfinished line kept from one read for the next (the longest valid one: 10).
_CARRY = 16


def qemu_args() -> list[str]:
    """The port, its ring, and the pause at power-off that lets the agent read it last."""
    return [
        "-device", "virtio-serial-pci,id=hatchery-serial",
        "-chardev", f"ringbuf,id={CHARDEV},size={RING_BYTES}",
        "-device", f"virtserialport,bus=hatchery-serial.0,chardev={CHARDEV},name={PORT_NAME}",
        "-action", "shutdown=pause",
    ]  # fmt: skip


def last_status(data: bytes) -> tuple[str | None, bytes]:
    """The last valid status line in ``data`` (None if there is none), and its unfinished
    last line (kept for the next read when short enough to be the start of a valid one)."""
    *lines, rest = data.split(b"\n")
    found = None
    for line in reversed(lines):
        text = line.strip().decode("ascii", "replace")
        if STATUS_LINE.fullmatch(text):
            found = text
            break
    return found, rest if len(rest) <= _CARRY else b""


@dataclass
class StatusReader:
    """One QEMU's status ring as the agent reads it: reads one at a time (each consumes
    what it returns, so two at once could each see half a line), the unfinished line carried."""

    carry: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def drain(self, monitor: Monitor) -> str | None:
        """Everything the ring holds now; the last valid line in it, or None.

        :raise MonitorError: QMP failed.
        """
        async with self.lock:
            answer = await monitor.execute(
                "ringbuf-read", {"device": CHARDEV, "size": RING_BYTES, "format": "base64"}
            )
            try:
                data = base64.b64decode(str(answer), validate=True)
            except (binascii.Error, ValueError):
                data = b""
            found, self.carry = last_status(self.carry + data)
            return found
