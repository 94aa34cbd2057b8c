"""The agent's parts, started in order and stopped in reverse (the composition root).

state → address pool → capacity → image store → VMs (re-adopted; they boot from the store
too) → upgrades → API → metadata (per bridge; from then on VM port changes reach the rules)
→ network boot and DHCP (per bridge). A part that cannot start stops the agent with "cannot
start <part>: <why>". Stopping never stops a VM, and leaves each bridge's anti-spoofing rules
in place while the agent is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hatchery.addresses import AddressPool, PoolError, Subnet
from hatchery.api.app import ApiContext, make_app
from hatchery.api.images import ImagesContext
from hatchery.api.policy import load_policy
from hatchery.api.server import ApiServer
from hatchery.capacity import HostCapacity, probe
from hatchery.config import AgentConfig, BridgeConfig, DhcpMode
from hatchery.containers.service import ContainerService
from hatchery.containers.store import ContainerStore
from hatchery.dhcp.leases import Lease
from hatchery.dhcp.responder import DhcpConfig, Responder
from hatchery.dhcp.server import DhcpServer, ProxyDhcpServer, interface_ipv4
from hatchery.errors import HatcheryError
from hatchery.health import NodeHealth
from hatchery.images.signing import KeyDirectory
from hatchery.images.store import ImageStore
from hatchery.log import recent_log
from hatchery.logs import node_logs
from hatchery.metadata.ruleset import Port
from hatchery.metadata.server import VmMetadata
from hatchery.metadata.service import MetadataService, node_services
from hatchery.metrics import Metrics
from hatchery.netdev import interface_mac, tap_name
from hatchery.pki import client_context, server_context
from hatchery.qemu.accel import choose_accel
from hatchery.revocation import Revocations
from hatchery.seed import birth_origin
from hatchery.upgrade.controller import Upgrader
from hatchery.upgrade.store_source import StoreImages
from hatchery.vms.manager import VmManager
from hatchery.vms.model import VmState
from hatchery.vms.sources import SourceFetcher

if TYPE_CHECKING:  # imported where used: only a node that births others needs them
    from hatchery.dhcp6.server import Dhcp6Server
    from hatchery.netboot import Netboot

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def part(name: str) -> AsyncIterator[None]:
    """Start one part; a failure says which part and why."""
    try:
        yield
    except HatcheryError as exc:
        raise HatcheryError(f"cannot start {name}: {exc.message}", hint=exc.hint) from exc
    except OSError as exc:
        raise HatcheryError(f"cannot start {name}: {exc}") from exc


async def _cancel(task: asyncio.Task[None]) -> None:
    """Stop an owned background task and wait for it; its cancellation stays its own."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def seed_pool(config: AgentConfig, pool: AddressPool) -> None:
    """Subnets and ranges named in the config exist in the pool (idempotent)."""
    for bridge in config.bridges:
        for sub in bridge.subnets:
            pool.add_subnet(Subnet(bridge.name, sub.cidr, sub.gateway, sub.dns))
            if sub.pool_start is not None:
                pool.add_range(sub.pool_start, sub.pool_end or sub.pool_start)


@dataclass
class VmDirectory:
    """The VM manager seen by the network services: who owns an address, which ports exist."""

    manager: VmManager

    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None:
        vm = self.manager.by_ip(bridge, ip)
        if vm is None or vm.state not in (VmState.RUNNING, VmState.STARTING, VmState.PAUSED):
            return None
        spec = vm.container
        return VmMetadata(vm.name, vm.uuid, vm.ip, vm.mac, vm.user_data, vm.public_keys,
                          vm.created, vm.started or 0.0,
                          container_image=spec.image if spec else "",
                          container_env=tuple(spec.env.items()) if spec else (),
                          container_ports=spec.ports if spec else ())  # fmt: skip

    def ports_of(self, bridge: str) -> list[Port]:
        return [Port(tap_name(vm.uuid), vm.mac, vm.ip) for vm in self.manager.on_bridge(bridge)]


@dataclass
class PoolLeases:
    """The address pool as the DHCP server's ``LeaseSource``: a VM's MAC gets its address."""

    pool: AddressPool
    bridge: str

    def lookup(self, mac: str) -> Lease | None:
        try:
            found = self.pool.lookup_mac(mac)
        except PoolError:
            return None
        if found is None:
            return None
        address, owner = found
        if owner is None or address.subnet.bridge != self.bridge:
            return None
        return Lease(address.mac, address.ip, hostname=owner)


def dhcp_for(
    bridge: BridgeConfig, pool: AddressPool, netboot: Netboot | None, metrics: Metrics
) -> DhcpServer | ProxyDhcpServer:
    """A DHCP server on ``bridge`` for the subnet holding the bridge's own address; with
    ``netboot``, it also answers machines being birthed (PXE, iPXE, UEFI HTTP Boot). In
    proxy mode (``boot.dhcp: proxy``), only the proxyDHCP service: no address, not even
    VMs' (the site's DHCP server owns the bridge's addresses)."""
    own = interface_ipv4(bridge.name)
    bindings = netboot.proxy_bindings() if netboot is not None else None
    if netboot is not None and bindings is not None:
        from hatchery.dhcp.proxy import ProxyConfig, ProxyResponder

        proxy = ProxyConfig(server_ip=own.ip, boot=netboot.dhcp_boot(own.ip))
        return ProxyDhcpServer(bridge.name, ProxyResponder(proxy, bindings), metrics=metrics)
    subnet = next((s for s in bridge.subnets if own.ip in s.cidr), None)
    if subnet is None:
        raise HatcheryError(
            f"{bridge.name}'s address {own} is in none of its subnets",
            hint="give the bridge an address in one of its subnets, or set dhcp: false",
        )
    config = DhcpConfig(
        server_ip=own.ip, network=subnet.cidr, router=subnet.gateway, dns=subnet.dns,
        boot=netboot.dhcp_boot(own.ip) if netboot is not None else None,
    )  # fmt: skip
    births = netboot.births() if netboot is not None else None
    responder = Responder(config, PoolLeases(pool, bridge.name), births)
    return DhcpServer(bridge.name, responder, metrics=metrics)


def dhcp6_for(
    bridge: BridgeConfig, netboot: Netboot, own: ipaddress.IPv6Address, metrics: Metrics
) -> Dhcp6Server:
    """The DHCPv6 server of ``bridge``'s IPv6 births (``boot.ipv6``): addresses from its
    range, boot URLs on the bridge's IPv6 address ``own``."""
    from hatchery.dhcp6.packet import duid_ll
    from hatchery.dhcp6.responder import Dhcp6Config, Responder6
    from hatchery.dhcp6.server import Dhcp6Server

    v6, births = netboot.config.ipv6, netboot.births6()
    assert v6 is not None and births is not None
    config = Dhcp6Config(duid_ll(interface_mac(bridge.name)), v6.prefix, v6.lease_time, v6.dns,
                         netboot.dhcp6_boot(own))  # fmt: skip
    return Dhcp6Server(bridge.name, Responder6(config, births), metrics=metrics)


class BridgeGuard:
    """The VM manager's port-rules collaborator, made before the manager; the metadata service
    that applies the rules starts later (it serves the API inside its namespaces, and the API
    needs the manager). Until it is attached, a port change on a guarded bridge waits, so no
    VM on such a bridge starts before its anti-spoofing rules exist."""

    def __init__(self, guarded: set[str]) -> None:
        self._guarded = guarded
        self._service: MetadataService | None = None
        self._ready = asyncio.Event()

    def attach(self, service: MetadataService) -> None:
        self._service = service
        self._ready.set()

    async def ports_changed(self, bridge: str) -> None:
        if bridge not in self._guarded:
            return
        await self._ready.wait()
        assert self._service is not None
        await self._service.ports_changed(bridge)


class Agent:
    """The composition root: each part is built from the config and the parts before it, in
    order, each in one method; ``running`` only sequences them and owns their cleanup."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.accel = choose_accel(config.accel)
        self.guard = BridgeGuard({b.name for b in config.bridges if b.metadata})
        self.metrics = Metrics()  # every part counts into it; GET /metrics shows it

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Agent]:
        log.info("accelerator %s: %s", self.accel.accel, self.accel.reason)
        async with contextlib.AsyncExitStack() as stack:
            async with part("state"):
                self.config.state_dir.mkdir(parents=True, exist_ok=True)
            async with part("address pool"):
                self.pool = self._pool(stack)
            async with part("capacity"):
                capacity = self._capacity()
            async with part("image store"):
                self.images = ImageStore(self.config.state_dir / "images")
                self.containers = ContainerStore(self.config.state_dir / "containers",
                                                 KeyDirectory(self.config.image_keys))  # fmt: skip
            async with part("vms"):
                self.manager = await self._vms(stack, capacity)
            async with part("upgrades"):
                self.upgrader = self._upgrades(stack)
                self.health = NodeHealth(upgrades=self.upgrader, state_dir=self.config.state_dir)
            async with part("api"):
                api = await self._api(stack)
            directory = VmDirectory(self.manager)
            self.metadata = MetadataService(directory, directory.ports_of,
                                            services=node_services(self.config),
                                            limits=self.config.limits,
                                            metrics=self.metrics,
                                            containers=ContainerService(
                                                self.containers,
                                                self.manager.set_container_state))  # fmt: skip
            stack.push_async_callback(self.metadata.close)
            for bridge in self.config.bridges:
                if bridge.metadata:
                    async with part(f"metadata on {bridge.name}"):
                        await self.metadata.add_bridge(
                            bridge.name, self._subnets(bridge), api=api,
                            require_token=bridge.metadata_require_token)  # fmt: skip
            self.guard.attach(self.metadata)
            for bridge in self.config.bridges:
                proxy = bridge.boot is not None and bridge.boot.dhcp is DhcpMode.PROXY
                ipv6 = bridge.boot is not None and bridge.boot.ipv6 is not None
                if proxy or ipv6 or (bridge.dhcp and bridge.subnets):
                    await self._network_services(stack, bridge)
            async with part("upgrade after boot"):
                await self.upgrader.after_boot()  # VMs a reboot-mode upgrade stopped
            self._take_booted_image(stack)
            yield self

    def _take_booted_image(self, stack: contextlib.AsyncExitStack) -> None:
        """A node born over the network takes the image it runs into its store from its
        birth peer (``images.booted``), in the background: nothing waits for it."""
        origin = birth_origin()
        version = self.health.version()
        if origin is None or version in self.images.versions():
            return
        # imported by a node born over the network only, as network boot's code is
        from hatchery.images.booted import Adopted, adopt_booted_image, adopt_with_retries
        from hatchery.images.running_root import running_root_device

        store, keys, root = self.images, KeyDirectory(self.config.image_keys), running_root_device()
        stop = threading.Event()

        def adopt() -> Adopted | None:
            return adopt_booted_image(store, keys, version, origin, root, stop)

        async def take() -> None:
            await asyncio.to_thread(adopt_with_retries, adopt, stop)

        task = asyncio.create_task(take(), name="the booted image")
        stack.callback(stop.set)  # runs after the cancel below (LIFO): the thread gives up
        stack.push_async_callback(_cancel, task)

    def _pool(self, stack: contextlib.AsyncExitStack) -> AddressPool:
        pool = AddressPool(self.config.state_dir / "pool.db")
        stack.callback(pool.close)
        seed_pool(self.config, pool)
        return pool

    def _capacity(self) -> HostCapacity:
        capacity = probe(self.config.capacity, self.config.state_dir)
        log.info("capacity for VMs: %d vCPUs, %d MiB RAM, %d MiB disk",
                 capacity.vcpus, capacity.memory_mib, capacity.disk_mib)  # fmt: skip
        return capacity

    async def _vms(self, stack: contextlib.AsyncExitStack, capacity: HostCapacity) -> VmManager:
        sources = SourceFetcher(self.config.vm_sources, self.images)
        manager = VmManager(self.config.state_dir, self.pool, capacity, self.accel,
                            self.config.qemu_binary, port_rules=self.guard,
                            sources=sources, isolation=self.config.vms,
                            meter=self.metrics.vms())  # fmt: skip
        stack.push_async_callback(manager.close)
        await manager.adopt_all()
        return manager

    def _upgrades(self, stack: contextlib.AsyncExitStack) -> Upgrader:
        # Re-verified at each use against the keys trusted then (a removed key stops its images).
        images = StoreImages(self.images, KeyDirectory(self.config.image_keys))
        upgrader = Upgrader(self.config.state_dir, images, self.config.root, vms=self.manager,
                            meter=self.metrics.upgrade())  # fmt: skip
        upgrader.settle_boot()  # a reboot-mode upgrade's outcome, before the API answers
        stack.push_async_callback(upgrader.close)
        return upgrader

    async def _api(self, stack: contextlib.AsyncExitStack) -> ApiServer:
        config = self.config
        tls = server_context(config.tls.ca, config.tls.cert, config.tls.key)
        # The agent's own certificate is its client certificate towards peers.
        peer_tls = client_context(config.tls.ca, config.tls.cert, config.tls.key)
        # Both contexts refuse revoked certificates; the CRL is re-read when it changes.
        revocations = Revocations(config.tls.crl, config.tls.ca, (tls, peer_tls))
        revocations.start()
        watcher = asyncio.create_task(revocations.run(), name="crl reload")
        stack.push_async_callback(_cancel, watcher)
        node_log = node_logs(recent_log())
        log.info("GET /v1/logs reads %s", "the journal" if node_log.name == "journal"
                 else "the agent's recent lines (no journal here)")  # fmt: skip
        context = ApiContext(self.manager, self.pool, load_policy(config.policy), self.health,
                             time.time(), self.upgrader, self.metrics, logs=node_log)  # fmt: skip
        images = ImagesContext.build(self.images, KeyDirectory(config.image_keys), peer_tls)
        api = ApiServer(make_app(context, images, revocations=revocations,
                                 containers=self.containers), tls, config.limits,
                        self.metrics.http("api"))  # fmt: skip
        await api.start(config.listen_host, config.listen_port)
        stack.push_async_callback(api.close)
        return api

    def _subnets(self, bridge: BridgeConfig) -> list[ipaddress.IPv4Network]:
        """The VM subnets the metadata namespace routes to: the config's, else the pool's."""
        return [s.cidr for s in bridge.subnets] or [
            ipaddress.IPv4Network(s.cidr) for s in self.pool.subnets() if s.bridge == bridge.name
        ]

    async def _network_services(
        self, stack: contextlib.AsyncExitStack, bridge: BridgeConfig
    ) -> None:
        """Network boot (if configured), DHCP and, for IPv6 births, DHCPv6 on ``bridge``.
        An IPv6-only bridge (IPv6 births, no IPv4 subnet) runs no DHCPv4 and needs no IPv4
        address."""
        netboot = None
        proxy = bridge.boot is not None and bridge.boot.dhcp is DhcpMode.PROXY
        ipv4 = proxy or (bridge.dhcp and bool(bridge.subnets))
        if bridge.boot is not None:
            # Network boot's code (boot HTTP, TFTP, DHCPv6, profiles) is imported only by a
            # node that births others: a third of a second of every other node's start under
            # TCG (docs/images.md, "The boot path, trimmed").
            from hatchery.dhcp6.server import wait_for_ipv6
            from hatchery.netboot import Netboot

            async with part(f"network boot on {bridge.name}"):
                netboot = Netboot(bridge.name, bridge.boot, self.config.state_dir, self.images,
                                  self.health.version, self.config.limits,
                                  self.metrics)  # fmt: skip
                v6 = bridge.boot.ipv6
                own6 = await wait_for_ipv6(bridge.name, v6.prefix) if v6 is not None else None
                await netboot.start(interface_ipv4(bridge.name).ip if ipv4 else None, own6)
                stack.push_async_callback(netboot.stop)
            if own6 is not None:
                async with part(f"dhcpv6 on {bridge.name}"):
                    server6 = dhcp6_for(bridge, netboot, own6, self.metrics)
                    await server6.start()
                    stack.callback(server6.stop)
        if not ipv4:
            return
        async with part(f"dhcp on {bridge.name}"):
            server = dhcp_for(bridge, self.pool, netboot, self.metrics)
            await server.start()
            stack.callback(server.stop)
