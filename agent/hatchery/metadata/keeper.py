"""The bridges' nft tables put back when something deletes them while VMs run.

Why: what a VM port may send (its own MAC and addresses only, no DHCP or router answers, the
node's services closed, the metadata redirect) is enforced by two nft tables per bridge
(``ruleset.py``). Debian's ``nftables.service`` flushes the whole ruleset when it is
reloaded, restarted or stopped (its ``/etc/nftables.conf`` begins with ``flush ruleset``; its
``ExecStop`` is ``nft flush ruleset``), and so does an operator's own ``nft flush ruleset``:
our tables go with everyone's, while the VMs keep running and nothing refuses what they
send. The agent applied them only when a VM port came or went, so until then a guest could
spoof its neighbours or answer DHCP for a node being born. (Meanwhile the held copy of the
same rules, which a flush passes by, keeps the ports closed: ``held.py``. The ordinary
tables are still needed: they are what protects the VMs while the agent restarts.)

The keeper follows ``nft monitor tables`` (the kernel's own notifications: nothing is polled).
Once a burst of notifications is over, if the last one about one of our tables was its
``delete table``, it asks ``nft list tables`` what is there and re-applies the rules of each
bridge that lacks a table. The agent's own replacement of a bridge's tables (every VM port
that comes or goes) deletes and adds them in one transaction, so it costs no check at all.
It also checks once each time it starts following
(``START_CHECK_SECONDS`` in, once ``nft monitor`` listens), for what went while it did not,
and follows again ``RETRY_SECONDS`` after ``nft monitor`` ends.

A table emptied but not deleted is not noticed: only root can do either, and emptying ours
takes intent, not a routine reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable, Iterable

from hatchery import host
from hatchery.errors import HatcheryError
from hatchery.metadata.ruleset import table_name

log = logging.getLogger(__name__)

MONITOR = ("nft", "monitor", "tables")
FAMILIES = ("bridge", "inet")
#: After a deletion, how long the notifications must pause before the check (one
#: transaction's arrive together).
QUIET_SECONDS = 0.05
#: After ``nft monitor`` starts, when to check for what went before it listened.
START_CHECK_SECONDS = 0.5
RETRY_SECONDS = 1.0


def _monitor() -> list[str]:
    """``nft monitor tables``, killed by the kernel if the agent dies first: the agent's unit
    kills only the agent (``KillMode=process``, for its VMs), so a monitor outliving an agent
    killed outright would wait on its own for the next notification."""
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv is not None else []
    return [*prefix, *MONITOR]


class TableKeeper:
    """Follows the kernel's nft notifications and calls ``restore(bridge)`` for each bridge
    of ``bridges()`` whose tables someone else deleted; ``start`` and ``close`` from the
    event loop."""

    def __init__(
        self, bridges: Callable[[], Iterable[str]], restore: Callable[[str], Awaitable[None]]
    ) -> None:
        self._bridges = bridges
        self._restore = restore
        self._follower: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._dirty = False
        self._unsure = False  # a check is due whatever the notifications say (a new monitor)
        self._gone: set[str] = set()  # our tables whose last notification was a deletion
        self.restored = 0  # bridges put back since start (each time a bridge's tables)

    def start(self) -> None:
        if self._follower is None:
            self._follower = asyncio.create_task(self._follow(), name="nft-table-keeper")

    async def close(self) -> None:
        """Stop following; nothing is restored after this returns."""
        for task in (self._follower, self._checker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._follower = self._checker = None

    async def check(self) -> list[str]:
        """Re-apply the rules of every bridge that lacks one of its tables; which ones.

        :raise CommandError: ``nft list tables`` failed.
        """
        listed = await host.run_async(["nft", "list", "tables"])
        present = {line.strip() for line in listed.stdout.splitlines()}
        restored = []
        for bridge in list(self._bridges()):
            name = table_name(bridge)
            missing = [f for f in FAMILIES if f"table {f} {name}" not in present]
            if not missing:
                continue
            held = all(f"table {f} {table_name(bridge, held=True)}" in present
                       for f in FAMILIES)  # fmt: skip
            meanwhile = (
                "their held copy stayed, so its VM ports were never open"
                if held
                else "they had no held copy, so its VM ports were open meanwhile"
            )
            log.warning("the nft tables of %s were deleted (%s; a flush of the node's "
                        "ruleset?): putting its VM port rules back; %s", bridge,
                        ", ".join(f"{f} {name}" for f in missing), meanwhile)  # fmt: skip
            await self._restore(bridge)
            self.restored += 1
            restored.append(bridge)
        return restored

    async def _follow(self) -> None:
        while True:
            self._unsure = True
            self._soon(START_CHECK_SECONDS)
            try:
                async with contextlib.aclosing(host.stream_lines(_monitor())) as events:
                    async for line in events:
                        self._note(line)
                log.warning("nft monitor ended: following again in %g s", RETRY_SECONDS)
            except HatcheryError as exc:
                log.warning("nft monitor failed (%s): following again in %g s", exc.message,
                            RETRY_SECONDS)  # fmt: skip
            await asyncio.sleep(RETRY_SECONDS)

    def _note(self, line: str) -> None:
        """One notification (``add table bridge hatchery_br0``): a deletion of one of ours
        asks for a check once the burst is over, unless its table is added back first."""
        words = line.split()
        if len(words) != 4 or words[1] != "table" or words[2] not in FAMILIES:
            return
        if words[3] not in {table_name(b) for b in self._bridges()}:
            return
        table = f"{words[2]} {words[3]}"
        if words[0] == "delete":
            self._gone.add(table)
            self._soon(QUIET_SECONDS)
        elif words[0] == "add":
            self._gone.discard(table)

    def _soon(self, delay: float) -> None:
        """A check ``delay`` from now; one more after it if a deletion comes meanwhile."""
        self._dirty = True
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._check_while_dirty(delay),
                                                name="nft-table-check")  # fmt: skip

    async def _check_while_dirty(self, delay: float) -> None:
        while self._dirty:
            self._dirty = False
            await asyncio.sleep(delay)
            if not (self._gone or self._unsure):
                continue  # deleted and added back: the agent's own replacement
            self._gone.clear()
            self._unsure = False
            try:
                await self.check()
            except HatcheryError as exc:
                log.warning("cannot check the bridges' nft tables: %s", exc.message)
            delay = QUIET_SECONDS
