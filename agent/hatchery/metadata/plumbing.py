"""Per-bridge metadata plumbing through pyroute2: a namespace, a veth pair, routes, nft.

``hmd-<bridge>`` holds the inner veth end with 169.254.169.254/32 and routes to the VM
subnets; the outer end is a port of the bridge. Setting up is idempotent (a restarted agent
finds and keeps what is there), tearing down removes all of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from hatchery import host
from hatchery.errors import CommandError, HatcheryError
from hatchery.metadata.held import SESSION, HeldTablesError
from hatchery.metadata.ruleset import (
    METADATA_IP,
    NodeServices,
    Port,
    drops,
    render,
    render_delete,
    table_name,
)
from hatchery.netdev import link_index
from hatchery.netlink import IPRoute, NetlinkError, netns

log = logging.getLogger(__name__)
INNER = "md0"


class PlumbingError(HatcheryError):
    """The metadata namespace, veth or rules cannot be set up."""


@dataclass(frozen=True, slots=True)
class Names:
    netns: str
    outer: str

    @classmethod
    def for_bridge(cls, bridge: str) -> Names:
        digest = hashlib.sha256(bridge.encode()).hexdigest()[:10]
        return cls(netns=f"hmd-{bridge}", outer=f"hmd{digest}")


def _setup(bridge: str, subnets: Sequence[ipaddress.IPv4Network]) -> str:
    """Create what is missing; return the inner end's MAC."""
    names = Names.for_bridge(bridge)
    with IPRoute() as ipr:
        master = link_index(ipr, bridge)
        if master is None:
            raise PlumbingError(f"bridge {bridge} does not exist")
        if names.netns not in netns.listnetns():
            netns.create(names.netns)
        if link_index(ipr, names.outer) is None:
            with IPRoute(netns=names.netns) as inner:
                stale = link_index(inner, INNER)
                if stale is not None:
                    inner.link("del", index=stale)
            ipr.link("add", ifname=names.outer, kind="veth", peer={"ifname": INNER})
            ipr.link("set", index=link_index(ipr, INNER), net_ns_fd=names.netns)
        outer = link_index(ipr, names.outer)
        ipr.link("set", index=outer, master=master, state="up")
    with IPRoute(netns=names.netns) as inner:
        lo = link_index(inner, "lo")
        inner.link("set", index=lo, state="up")
        index = link_index(inner, INNER)
        if index is None:
            raise PlumbingError(f"{INNER} is missing in namespace {names.netns}")
        inner.link("set", index=index, state="up")
        have = {a.get_attr("IFA_ADDRESS") for a in inner.get_addr(index=index)}
        if METADATA_IP not in have:
            inner.addr("add", index=index, address=METADATA_IP, prefixlen=32)
        for net in subnets:
            try:
                inner.route("replace", dst=str(net), oif=index, scope=253)
            except NetlinkError as exc:
                raise PlumbingError(f"cannot route {net} in {names.netns}: {exc}") from exc
        mac = inner.get_links(index)[0].get_attr("IFLA_ADDRESS")
    return str(mac)


def _nft(script: str) -> None:
    host.run(["nft", "-f", "-"], input=script)


def _teardown(bridge: str) -> None:
    names = Names.for_bridge(bridge)
    try:
        SESSION.run(render_delete(bridge, held=True))
    except HeldTablesError as exc:  # none were made; or they go with the process anyway
        log.debug("held tables of %s: %s", bridge, exc)
    _nft(render_delete(bridge))
    with IPRoute() as ipr:
        index = link_index(ipr, names.outer)
        if index is not None:
            ipr.link("del", index=index)
    if names.netns in netns.listnetns():
        netns.remove(names.netns)


class BridgePlumbing:
    """The metadata namespace of one bridge and its nft tables.

    ``services`` are the node's own ports that VM ports may not reach (see ruleset.py).
    """

    def __init__(
        self,
        bridge: str,
        subnets: Sequence[ipaddress.IPv4Network],
        services: NodeServices | None = None,
    ) -> None:
        self.bridge = bridge
        self.names = Names.for_bridge(bridge)
        self._subnets = tuple(subnets)
        self._services = services
        self.inner_mac = ""
        self._lock = asyncio.Lock()
        #: Whether the held copy of the rules (``held.py``) is in place, as of the last apply.
        self.held = False
        self._held_refusal_logged = False

    async def setup(self) -> None:
        try:
            self.inner_mac = await asyncio.to_thread(_setup, self.bridge, self._subnets)
        except (NetlinkError, OSError) as exc:
            raise PlumbingError(f"metadata plumbing for {self.bridge}: {exc}") from exc
        log.info("metadata for %s: namespace %s, veth %s", self.bridge, *self.names_tuple())

    def names_tuple(self) -> tuple[str, str]:
        return self.names.netns, self.names.outer

    async def apply_ports(self, ports: Sequence[Port]) -> None:
        """Replace the bridge's nft tables with rules for exactly ``ports`` (atomic), then
        their held copy (``held.py``). The ordinary tables are the ones a VM may not run
        without (an error here fails the VM's start); a held copy refused (a kernel without
        table owners) is logged, counted in ``held`` and left out."""
        args = (self.bridge, self.names.outer, self.inner_mac, ports, self._services)
        async with self._lock:
            await asyncio.to_thread(_nft, render(*args))
            try:
                await asyncio.to_thread(SESSION.run, render(*args, held=True))
            except HeldTablesError as exc:
                if self.held or not self._held_refusal_logged:
                    log.warning("%s: VM port rules without their held copy, so a flush of "
                                "the ruleset leaves VM ports open until they are put "
                                "back: %s", self.bridge, exc.message)  # fmt: skip
                self._held_refusal_logged = True
                self.held = False
            else:
                self.held = True

    async def dropped(self) -> dict[str, int]:
        """Packets the bridge's tables dropped, by reason, since they were last replaced
        (a VM port came or went): nft counters restart with their table. Both copies count:
        a frame either drops is seen by the other no more."""
        total: dict[str, int] = {}
        for family, held in (("bridge", False), ("inet", False), ("bridge", True),
                             ("inet", True)):  # fmt: skip
            argv = ["nft", "-j", "list", "table", family, table_name(self.bridge, held)]
            try:
                done = await host.run_async(argv)
            except CommandError:
                if held and not self.held:
                    continue  # no held copy: nothing it dropped
                raise
            try:
                listing = json.loads(done.stdout)
            except ValueError as exc:
                raise PlumbingError(f"nft -j list table {family}: not JSON: {exc}") from exc
            for reason, packets in drops(listing).items():
                total[reason] = total.get(reason, 0) + packets
        return total

    def listen(self, port: int) -> socket.socket:
        """A TCP socket bound to 169.254.169.254:``port`` inside the namespace."""
        sock: socket.socket = netns.create_socket(self.names.netns, socket.AF_INET,
                                                  socket.SOCK_STREAM)  # fmt: skip
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((METADATA_IP, port))
        sock.listen(128)
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
        return sock

    async def teardown(self) -> None:
        await asyncio.to_thread(_teardown, self.bridge)
