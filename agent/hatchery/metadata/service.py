"""The metadata service of the agent: for each bridge, plumbing plus a server in its namespace.

The agent tells it when a bridge's VM ports change (a VM starts or is destroyed); it then
replaces that bridge's nft tables atomically, anti-spoofing first, and with them the rule that
keeps VM ports away from the node's own services (``node_services``: the API, the boot HTTP
ports, TFTP). The agent's API is also served inside each namespace on 169.254.169.254:6976
(mutual TLS as everywhere): that path stays open to VMs.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hatchery.config import API_PORT, AgentConfig, BootServiceConfig, ConnectionLimits
from hatchery.containers.service import ContainerService
from hatchery.dhcp.proxy import PXE_PORT
from hatchery.dhcp6.packet import SERVER_PORT as DHCP6_PORT
from hatchery.errors import HatcheryError
from hatchery.listener import VM_STOP_GRACE, HttpListener
from hatchery.metadata.keeper import TableKeeper
from hatchery.metadata.plumbing import BridgePlumbing
from hatchery.metadata.ruleset import TFTP_PORT, NodeServices, Port
from hatchery.metadata.server import MetadataSource, make_app
from hatchery.metrics import Metrics, ReadCollector, Reading

log = logging.getLogger(__name__)
METADATA_PORT = 80
BOOT_UDP = (TFTP_PORT, PXE_PORT, DHCP6_PORT)  # the node's UDP boot services, closed to VMs


def node_services(config: AgentConfig) -> NodeServices:
    """The node's listeners closed to VM ports: the API, every bridge's boot HTTP port, TFTP,
    the proxyDHCP port (4011) and DHCPv6 (547: only IPv6 births use it, VMs get no address
    from it).

    TFTP and 4011 are closed whether or not this node serves them: their ports are fixed and
    only machines being booted speak them (a VM's 4011 request, naming a MAC and its own
    address, would bind a booting machine's script to the VM). DHCP (udp 67) stays open: VMs
    get their leases from it.
    """
    http = {b.boot.http_port for b in config.bridges if b.boot is not None}
    return NodeServices(tcp=tuple(sorted({config.listen_port, *http})), udp=BOOT_UDP)


# Without a config (benchmarks, tests): the defaults of a node that births peers.
DEFAULT_NODE_SERVICES = NodeServices(tcp=(API_PORT, BootServiceConfig().http_port), udp=BOOT_UDP)


class ApiListener(Protocol):
    """The agent's API as this service needs it: serve on a socket made in the namespace."""

    port: int

    async def serve_on(self, sock: socket.socket) -> None: ...


@dataclass
class _Bridge:
    plumbing: BridgePlumbing
    listener: HttpListener


class MetadataService:
    def __init__(
        self,
        source: MetadataSource,
        ports_of: Callable[[str], Sequence[Port]],
        port: int = METADATA_PORT,
        services: NodeServices = DEFAULT_NODE_SERVICES,
        limits: ConnectionLimits | None = None,
        metrics: Metrics | None = None,
        containers: ContainerService | None = None,
    ) -> None:
        self._source = source
        self._containers = containers
        self._limits = limits or ConnectionLimits()
        self._metrics = metrics or Metrics()
        self._dropped: dict[str, dict[str, int]] = {}  # bridge -> reason -> packets
        self._bridges: dict[str, _Bridge] = {}
        self._keeper = TableKeeper(lambda: list(self._bridges), self.ports_changed)
        self._metrics.add(ReadCollector([Reading(
            "hatchery_bridge_dropped_packets",
            "Packets from VM ports the bridge rules dropped, by reason, since the bridge's "
            "VM ports last changed (nft counters restart with their tables).",
            ("bridge", "reason"), self._dropped_samples, counter=True,
        ), Reading(
            "hatchery_bridge_tables_restored",
            "Times a bridge's nft tables were deleted by something else (a flush of the "
            "node's ruleset) and put back by the agent.",
            (), lambda: [((), float(self._keeper.restored))], counter=True,
        ), Reading(
            "hatchery_bridge_held_rules",
            "1 when the bridge's VM port rules also have their held copy, which a flush of "
            "the ruleset cannot take; 0 when the kernel refused it (no nft table owners).",
            ("bridge",), self._held_samples,
        )]), refresh=self._read_dropped)  # fmt: skip
        self._ports_of = ports_of
        self._port = port
        self._services = services

    async def add_bridge(
        self,
        bridge: str,
        subnets: Sequence[ipaddress.IPv4Network],
        api: ApiListener | None = None,
        *,
        require_token: bool = False,
    ) -> None:
        """Set up ``bridge``'s namespace, rules and server; serve ``api`` there too if given.
        ``require_token``: the metadata server answers GETs only with an IMDSv2 token."""
        plumbing = BridgePlumbing(bridge, subnets, self._services)
        # Every VM of the bridge reaches this one listener: its per-client cap is per VM.
        listener = HttpListener(make_app(bridge, self._source, require_token=require_token,
                                         containers=self._containers),
                                self._limits, name=f"metadata on {bridge}",
                                meter=self._metrics.http("metadata", bridge),
                                stop_grace=VM_STOP_GRACE)  # fmt: skip
        try:
            await plumbing.setup()
            await plumbing.apply_ports(self._ports_of(bridge))
            await listener.start()
            await listener.serve_on(plumbing.listen(self._port))
            if api is not None:
                await api.serve_on(plumbing.listen(api.port))
        except BaseException:
            await listener.close()
            await plumbing.teardown()
            raise
        self._bridges[bridge] = _Bridge(plumbing, listener)
        self._keeper.start()  # its tables are put back if a flush of the ruleset takes them
        log.info("metadata service on %s: 169.254.169.254:%d", bridge, self._port)

    def _held_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [((bridge,), float(entry.plumbing.held)) for bridge, entry in self._bridges.items()]

    def _dropped_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [((bridge, reason), packets) for bridge, by_reason in self._dropped.items()
                for reason, packets in by_reason.items()]  # fmt: skip

    async def _read_dropped(self) -> None:
        for bridge, entry in list(self._bridges.items()):
            try:
                self._dropped[bridge] = await entry.plumbing.dropped()
            except HatcheryError as exc:  # a scrape must not fail for one bridge
                log.warning("cannot read the drop counters of %s: %s", bridge, exc)
                self._dropped.pop(bridge, None)
        for gone in set(self._dropped) - set(self._bridges):
            del self._dropped[gone]

    async def ports_changed(self, bridge: str) -> None:
        entry = self._bridges.get(bridge)
        if entry is not None:
            await entry.plumbing.apply_ports(self._ports_of(bridge))

    async def close(self, teardown: bool = False) -> None:
        """Stop serving; with ``teardown`` also remove namespaces and rules.

        The agent leaves the plumbing in place when it merely restarts: the anti-spoofing
        rules keep protecting running VMs while it is down (though not against a flush of
        the ruleset then: they come back when it starts again, ``keeper.py``; their held
        copy, ``held.py``, goes with this process).
        """
        await self._keeper.close()  # first: a teardown's deletions are not to be undone
        for bridge, entry in list(self._bridges.items()):
            await entry.listener.close()
            if teardown:
                await entry.plumbing.teardown()
            del self._bridges[bridge]


async def teardown_bridge(bridge: str) -> None:
    await BridgePlumbing(bridge, ()).teardown()
