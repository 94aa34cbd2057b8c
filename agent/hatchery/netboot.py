"""Birthing peers: this node serves its own image to machines that boot from the network.

For each bridge with a ``boot:`` section the agent answers unknown machines' DHCP (the
births range) with PXE/iPXE/HTTP-boot options, advertises IPv6 "no router" so iPXE does not
stall, and runs the boot HTTP service: per-MAC iPXE scripts and the artefacts of the image
this node runs (exported from its image store into ``<state>/netboot/<bridge>/``, public,
with its signed manifest, so the nodes born from here take it into their own stores:
``images.booted``),
plus each machine's seed (``<seeds>/<mac>.tar``) so it comes up with its own certificate and
config. A seed holds a private key: it is read from the seeds folder only when the machine
redeems the single-use birth token its boot script named, and never copied where the public
artefacts are. The boot HTTP service and the DHCP server share one birth-lease table, so a
script (and its token) goes only to the address our DHCP leased to that MAC. In proxyDHCP
mode (``boot.dhcp: proxy``) the site's DHCP server gives the address, and the table shared
is instead the address each MAC's iPXE came from to our proxy on port 4011
(``dhcp/proxy.py``): the script and token go only there. With IPv6 births (``boot.ipv6``)
a DHCPv6 server (``dhcp6/``) leases from its own range, the RAs say "managed", and the boot
HTTP service also listens on the bridge's IPv6 address; a script or seed then goes to the
IPv6 address that holds the MAC's DHCPv6 lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from hatchery.boothttp.app import BootHttpConfig, BootHttpError, BootHttpServer, boot_tls_context
from hatchery.boothttp.profiles import Profile, Profiles
from hatchery.boothttp.seeds import SeedFolder
from hatchery.config import BootServiceConfig, ConnectionLimits, DhcpMode
from hatchery.dhcp.leases import BirthLeases, BirthLeases6
from hatchery.dhcp.proxy import ProxyBindings
from hatchery.dhcp.responder import BootConfig
from hatchery.dhcp6.responder import Boot6Config
from hatchery.errors import ConfigError
from hatchery.images.booted import exported_name
from hatchery.images.manifest import SIGNED_NAME
from hatchery.images.store import ImageStore, StoreError
from hatchery.metrics import Metrics
from hatchery.ra import Managed, RaResponder
from hatchery.state import write_atomic
from hatchery.tftp.server import TftpServer

log = logging.getLogger(__name__)
DEFAULT_TEMPLATE = Path(__file__).parent / "boothttp" / "default.ipxe"
REFRESH_SECONDS = 15.0
IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")


def default_profiles(cmdline: str) -> Profiles:
    """Every machine boots this node's image (the boot service adds its seed's token URL)."""
    profile = Profile(
        name="hypervisor",
        image="hypervisor/current",
        role="hypervisor",
        cmdline=cmdline,
        template=DEFAULT_TEMPLATE.read_text(),
    )
    return Profiles({"hypervisor": profile}, {}, "hypervisor")


@dataclass(frozen=True, slots=True)
class BirthLeaseHolders:
    """The DHCP servers' birth leases as the boot HTTP service asks them: who holds MAC's
    IPv4 (DHCPv4) or IPv6 (DHCPv6) birth lease?"""

    leases: BirthLeases | None
    leases6: BirthLeases6 | None = None

    def birth_address(
        self, mac: str, version: int
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        table = self.leases if version == 4 else self.leases6
        binding = table.binding(mac, time.time()) if table is not None else None
        return binding.ip if binding is not None else None


@dataclass(frozen=True, slots=True)
class ProxyAddressHolders:
    """The proxy's observed addresses as the boot HTTP service asks them: where did MAC's
    iPXE come from (its ProxyDHCPREQUEST on 4011)?"""

    bindings: ProxyBindings

    def birth_address(self, mac: str, version: int) -> ipaddress.IPv4Address | None:
        return self.bindings.address(mac, time.time()) if version == 4 else None


def copy_ipxe_binaries(target: Path, source: Path = IPXE_DIR) -> list[str]:
    """Copy Debian's iPXE binaries into the TFTP root as plain files (some are symlinks out
    of /usr/lib/ipxe, which the TFTP jail would rightly refuse)."""
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in IPXE_BINARIES:
        src = source / name
        if src.exists():
            shutil.copyfile(src.resolve(), target / name)
            copied.append(name)
    if not copied:
        log.warning("no iPXE binaries in %s: firmware PXE clients cannot boot (apt install ipxe)",
                    source)  # fmt: skip
    return copied


class Netboot:
    def __init__(
        self,
        bridge: str,
        config: BootServiceConfig,
        state_dir: Path,
        images: ImageStore,
        version: Callable[[], str],
        limits: ConnectionLimits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.bridge = bridge
        self.limits = limits or ConnectionLimits()
        self.metrics = metrics or Metrics()
        self.config = config
        self.root = state_dir / "netboot" / bridge
        self._images = images
        self._version = version
        self._births_file = state_dir / f"dhcp-births-{bridge}.json"
        self._births: BirthLeases | None = None
        self._births6: BirthLeases6 | None = None
        self._proxy = ProxyBindings() if config.dhcp is DhcpMode.PROXY else None
        self._http: BootHttpServer | None = None
        self._ra: RaResponder | None = None
        self._task: asyncio.Task[None] | None = None
        self._tftp: TftpServer | None = None
        self._store_changed = asyncio.Event()
        self._unlisten: Callable[[], None] | None = None

    def births(self) -> BirthLeases | None:
        """The bridge's one birth-lease table, shared by its DHCP server (which writes it) and
        its boot HTTP service (which reads who holds a MAC's lease); None without a range."""
        c = self.config
        if c.births_start is None or c.births_end is None:
            return None
        if self._births is None:
            self._births = BirthLeases(c.births_start, c.births_end, self._births_file)
        return self._births

    def births6(self) -> BirthLeases6 | None:
        """The bridge's IPv6 birth-lease table (DHCPv6), shared like ``births``; None without
        ``boot.ipv6``."""
        v6 = self.config.ipv6
        if v6 is None:
            return None
        if self._births6 is None:
            path = self._births_file.with_name(f"dhcp6-births-{self.bridge}.json")
            self._births6 = BirthLeases6(v6.births_start, v6.births_end, path)
        return self._births6

    def dhcp6_boot(self, server_ip: ipaddress.IPv6Address) -> Boot6Config:
        https = self.config.https
        return Boot6Config(
            http_base=f"http://[{server_ip}]:{self.config.http_port}",
            https_base=f"https://[{server_ip}]:{https.port}" if https is not None else None,
        )

    def proxy_bindings(self) -> ProxyBindings | None:
        """In proxy mode, the bridge's one table of observed addresses, shared by its
        proxyDHCP service (which writes it) and its boot HTTP service; None otherwise."""
        return self._proxy

    def dhcp_boot(self, server_ip: ipaddress.IPv4Address) -> BootConfig:
        https = self.config.https
        return BootConfig(
            http_base=f"http://{server_ip}:{self.config.http_port}",
            tftp=self.config.tftp,
            https_base=f"https://{server_ip}:{https.port}" if https is not None else None,
        )

    # --- the artefacts ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Export the running image (when the store has it), keep the seeds private;
        idempotent."""
        version = self._images.current() or self._version()
        target = self.root / "hypervisor" / version
        try:
            complete = (target / "initrd").exists() and (target / SIGNED_NAME).exists()
            if not complete and version in self._images.versions():
                staging = target.with_name(f".{version}.export")
                shutil.rmtree(staging, ignore_errors=True)
                exported = self._images.export(version, staging)
                for role, path in exported.items():
                    os.replace(path, staging / exported_name(role, path.name))
                # public as the artefacts are: the nodes born from here take their image
                # into their own store with it (images.booted)
                write_atomic(staging / SIGNED_NAME, self._images.manifest_bytes(version),
                             mode=0o644)  # fmt: skip
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
                log.info("netboot on %s: serving image %s", self.bridge, version)
        except (StoreError, OSError) as exc:
            log.error("netboot on %s: cannot export image %s: %s", self.bridge, version, exc)
        current = self.root / "hypervisor" / "current"
        if target.exists() and (not current.is_symlink() or os.readlink(current) != version):
            tmp = current.with_name(".current.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(version)
            tmp.replace(current)
        SeedFolder(self.config.seeds).tighten()

    async def _refresher(self) -> None:
        """Refresh when the store changes (a publish, an upgrade) and every
        ``REFRESH_SECONDS`` (a seed dropped into the folder by hand)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store_changed.wait(), REFRESH_SECONDS)
            self._store_changed.clear()
            await asyncio.to_thread(self.refresh)

    def _listen_to_the_store(self) -> None:
        loop = asyncio.get_running_loop()

        def changed() -> None:  # in the thread that changed the store
            with contextlib.suppress(RuntimeError):  # the loop is closed: the agent stopped
                loop.call_soon_threadsafe(self._store_changed.set)

        self._unlisten = self._images.on_change(changed)

    # --- the services -------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything before the services start (blocking: run it in a worker thread).

        Refuses a seeds folder inside the public artefact folder, and removes the copies of
        seeds that agents before birth tokens kept there (``<root>/seeds``, served to
        anyone): an upgraded node must not keep serving them. Then the first ``refresh``.
        """
        (self.root / "hypervisor").mkdir(parents=True, exist_ok=True)
        if self.config.seeds.resolve().is_relative_to(self.root.resolve()):
            raise ConfigError(
                f"boot.seeds: {self.config.seeds} is inside {self.root}, which is served to "
                "anyone on the boot network; keep seeds elsewhere (default /etc/hatchery/seeds)"
            )
        legacy = self.root / "seeds"
        if legacy.is_dir() and not legacy.is_symlink():
            shutil.rmtree(legacy)
            log.warning("netboot on %s: removed %s, public copies of seeds made by an older "
                        "agent", self.bridge, legacy)  # fmt: skip
        self.refresh()

    def http_config(self) -> BootHttpConfig:
        """The boot HTTP service's configuration: this bridge's profiles, artefacts, birth
        leases and seeds (seeds only with a births range: a token is bound to a lease)."""
        profiles = (
            Profiles.load(self.config.profiles)
            if self.config.profiles is not None
            else default_profiles(self.config.cmdline)
        )
        births, births6 = self.births(), self.births6()
        holders: BirthLeaseHolders | ProxyAddressHolders | None = None
        if births is not None or births6 is not None:
            holders = BirthLeaseHolders(births, births6)
        elif self._proxy is not None:
            holders = ProxyAddressHolders(self._proxy)
        if holders is None and any(self.config.seeds.glob("*.tar")):
            log.warning("netboot on %s: no births range, so no seed is handed out (seeds go "
                        "only to holders of a birth lease)", self.bridge)  # fmt: skip
        return BootHttpConfig(
            self.root, profiles, births=holders,
            seeds=SeedFolder(self.config.seeds) if holders is not None else None,
            uki_stub=self.config.uki_stub, uki_stub_arm64=self.config.uki_stub_arm64,
        )  # fmt: skip

    def _boot_tls(self, hosts: tuple[str, ...]) -> ssl.SSLContext:
        """The boot certificate's TLS context, refused when it does not name every address
        it is served on: firmware checks the URL's host against it, and would fail each
        machine's boot with nothing in this node's log to say why."""
        https = self.config.https
        assert https is not None
        try:
            cert = x509.load_pem_x509_certificate(https.cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"boot.https.cert: cannot read {https.cert}: {exc}") from exc
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            named = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            named = set()
        missing = [h for h in hosts if str(ipaddress.ip_address(h)) not in named]
        if missing:
            raise ConfigError(
                f"boot.https.cert: {https.cert} does not name {', '.join(missing)}, where "
                f"{self.bridge}'s boot service listens",
                hint="issue it with: hatchery ca issue --dir BOOT_CA --server "
                + " --server ".join(hosts),
            )
        try:
            return boot_tls_context(https.cert, https.key)
        except BootHttpError as exc:
            raise ConfigError(f"boot.https: {exc.message}") from exc

    async def start(
        self, server_ip: ipaddress.IPv4Address | None,
        server_ip6: ipaddress.IPv6Address | None = None,
    ) -> None:  # fmt: skip
        """Serve on the bridge's IPv4 address, its IPv6 address (IPv6 births), or both."""
        await asyncio.to_thread(self.prepare)
        config = self.http_config()
        meter = self.metrics.http("boot", self.bridge)
        hosts = tuple(str(ip) for ip in (server_ip, server_ip6) if ip is not None)
        tls, tls_port = None, 0
        if self.config.https is not None:
            tls = await asyncio.to_thread(self._boot_tls, hosts)
            tls_port = self.config.https.port
        self._http = BootHttpServer(config, hosts, self.config.http_port, self.limits, meter,
                                    tls=tls, tls_port=tls_port)  # fmt: skip
        await self._http.start()
        v6 = self.config.ipv6
        managed = None
        if v6 is not None:
            managed = Managed(v6.prefix, 1800 if v6.router else 0, v6.lease_time)
        self._ra = RaResponder(self.bridge, managed=managed)
        await self._ra.start()
        if self.config.tftp and server_ip is not None:
            # Firmware PXE ROMs fetch iPXE itself over TFTP; everything big then goes over HTTP.
            tftp_root = self.root / "tftp"
            await asyncio.to_thread(copy_ipxe_binaries, tftp_root)
            self._tftp = TftpServer(tftp_root, str(server_ip), 69,
                                    meter=self.metrics.tftp(self.bridge))  # fmt: skip
            await self._tftp.start()
        self._listen_to_the_store()
        self._task = asyncio.create_task(self._refresher(), name=f"netboot-{self.bridge}")

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._tftp is not None:
            await self._tftp.stop()
        if self._ra is not None:
            await self._ra.stop()
        if self._http is not None:
            await self._http.stop()
