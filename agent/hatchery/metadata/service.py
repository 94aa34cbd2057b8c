"""The metadata service of the agent: for each bridge, plumbing plus a server in its namespace.

The agent tells it when a bridge's VM ports change (a VM starts or is destroyed); it then
replaces that bridge's nft table atomically, anti-spoofing first. The agent's API is also
served inside each namespace on 169.254.169.254:6976 (mutual TLS as everywhere).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from hatchery.metadata.plumbing import BridgePlumbing
from hatchery.metadata.ruleset import Port
from hatchery.metadata.server import MetadataSource, make_app

log = logging.getLogger(__name__)
METADATA_PORT = 80


class ApiListener(Protocol):
    """The agent's API as this service needs it: serve on a socket made in the namespace."""

    port: int

    async def serve_on(self, sock: socket.socket) -> None: ...


@dataclass
class _Bridge:
    plumbing: BridgePlumbing
    runner: web.AppRunner


class MetadataService:
    def __init__(
        self,
        source: MetadataSource,
        ports_of: Callable[[str], Sequence[Port]],
        port: int = METADATA_PORT,
    ) -> None:
        self._source = source
        self._ports_of = ports_of
        self._port = port
        self._bridges: dict[str, _Bridge] = {}

    async def add_bridge(
        self,
        bridge: str,
        subnets: Sequence[ipaddress.IPv4Network],
        api: ApiListener | None = None,
    ) -> None:
        """Set up ``bridge``'s namespace, rules and server; serve ``api`` there too if given."""
        plumbing = BridgePlumbing(bridge, subnets)
        runner = web.AppRunner(make_app(bridge, self._source), access_log=None)
        try:
            await plumbing.setup()
            await plumbing.apply_ports(self._ports_of(bridge))
            await runner.setup()
            await web.SockSite(runner, plumbing.listen(self._port)).start()
            if api is not None:
                await api.serve_on(plumbing.listen(api.port))
        except BaseException:
            await runner.cleanup()
            await plumbing.teardown()
            raise
        self._bridges[bridge] = _Bridge(plumbing, runner)
        log.info("metadata service on %s: 169.254.169.254:%d", bridge, self._port)

    async def ports_changed(self, bridge: str) -> None:
        entry = self._bridges.get(bridge)
        if entry is not None:
            await entry.plumbing.apply_ports(self._ports_of(bridge))

    async def close(self, teardown: bool = False) -> None:
        """Stop serving; with ``teardown`` also remove namespaces and rules.

        The agent leaves the plumbing in place when it merely restarts: the anti-spoofing
        rules keep protecting running VMs while it is down.
        """
        for bridge, entry in list(self._bridges.items()):
            await entry.runner.cleanup()
            if teardown:
                await entry.plumbing.teardown()
            del self._bridges[bridge]


async def teardown_bridge(bridge: str) -> None:
    await BridgePlumbing(bridge, ()).teardown()
