"""The table keeper's ``nft monitor`` dies with the agent, even one killed outright.

The agent's unit kills only the agent (``KillMode=process``, so its VMs outlive it); a
monitor outliving a SIGKILLed agent would have waited on its own for the next nft
notification. A real keeper in a real process with its real ``nft monitor tables`` (it
only listens), SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROGRAM = """
import asyncio
from hatchery.metadata.keeper import TableKeeper

async def main() -> None:
    async def restore(bridge: str) -> None:
        pass
    TableKeeper(lambda: [], restore).start()
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _monitor_of(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"monitor" in argv and any(a.endswith(b"nft") for a in argv):
            return int(entry.name)
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_monitor_dies_with_a_killed_agent() -> None:
    agent = subprocess.Popen([sys.executable, "-c", PROGRAM])
    try:
        deadline = time.monotonic() + 30
        monitor = _monitor_of(agent.pid)
        while monitor is None:
            assert agent.poll() is None, "the keeper's process ended"
            assert time.monotonic() < deadline, "no nft monitor started"
            time.sleep(0.05)
            monitor = _monitor_of(agent.pid)
    finally:
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
    deadline = time.monotonic() + 10  # a deadline to fail by: without it, it lives on
    while _alive(monitor):
        assert time.monotonic() < deadline, "nft monitor outlived the agent"
        time.sleep(0.05)
