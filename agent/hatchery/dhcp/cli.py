"""``hatchery-agent serve dhcp`` and ``serve ra``: the network-boot services alone, for
debugging and for tests; the agent starts the same classes from its configuration."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from hatchery.dhcp.leases import BirthLeases, StaticLeases
from hatchery.dhcp.proxy import ProxyConfig, ProxyResponder
from hatchery.dhcp.responder import BootConfig, DhcpConfig, Responder
from hatchery.dhcp.server import DhcpServer, ProxyDhcpServer, interface_ipv4
from hatchery.errors import ConfigError
from hatchery.ra import RaResponder

log = logging.getLogger(__name__)

LEASE_FILE = "dhcp-births.json"


async def serve_until_stopped(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start, run until SIGTERM/SIGINT, stop (stop also runs if start failed half-way)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    try:
        await start()
        await done.wait()
    finally:
        await stop()


Address = TypeVar("Address", ipaddress.IPv4Address, ipaddress.IPv6Address)


def parse_address(family: type[Address], text: str) -> Address:
    """An address of ``family`` from a command line argument (``serve dhcp``, ``dhcp6``)."""
    try:
        return family(text)
    except ValueError as exc:
        name = "IPv4" if family is ipaddress.IPv4Address else "IPv6"
        raise argparse.ArgumentTypeError(f"not an {name} address: {text!r}") from exc


def parse_range(family: type[Address], text: str) -> tuple[Address, Address]:
    """``START-END``: two addresses of ``family``."""
    start, sep, end = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected START-END, got {text!r}")
    return parse_address(family, start), parse_address(family, end)


_ip = functools.partial(parse_address, ipaddress.IPv4Address)
_range = functools.partial(parse_range, ipaddress.IPv4Address)


def add_dhcp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", required=True, help="serve on this interface only")
    p.add_argument("--server-ip", type=_ip, help="our address (default: the interface's)")
    p.add_argument("--network", help="the client subnet CIDR (default: the interface's)")
    p.add_argument("--router", type=_ip)
    p.add_argument("--dns", type=_ip, action="append", default=[])
    p.add_argument("--domain")
    p.add_argument("--lease-time", type=int, default=3600)
    p.add_argument(
        "--leases", type=Path, help="static leases: YAML {MAC: IP or {ip, hostname, boot}}"
    )
    p.add_argument("--birth-range", type=_range, metavar="START-END",
                   help="answer unknown MACs (nodes being birthed) from this range")  # fmt: skip
    p.add_argument("--state-dir", type=Path, help=f"where {LEASE_FILE} is kept")
    p.add_argument(
        "--http-url", help="boot HTTP service as clients see it, e.g. http://10.0.0.1:8080"
    )
    p.add_argument("--https-url", help="the boot service over TLS, e.g. https://10.0.0.1:8443: "
                   "UEFI HTTP Boot clients get a unified kernel image from it")  # fmt: skip
    p.add_argument("--tftp-server", type=_ip, help="TFTP server for PXE ROMs (default: us)")
    p.add_argument("--no-tftp", action="store_true", help="no TFTP here: iPXE and HTTP Boot only")
    p.add_argument("--bios-file", default="undionly.kpxe")
    p.add_argument("--efi-file", default="ipxe.efi")
    p.add_argument("--proxy", action="store_true",
                   help="proxyDHCP: boot answers only (ports 67 and 4011), beside the site's "
                   "DHCP server; no address is ever given")  # fmt: skip
    p.add_argument("--no-ra", action="store_true", help="do not send IPv6 router advertisements")
    p.add_argument("--port", type=int, default=67, help=argparse.SUPPRESS)


def build_responder(args: argparse.Namespace) -> Responder:
    try:
        network = ipaddress.IPv4Network(args.network) if args.network else None
    except ValueError as exc:
        raise ConfigError(f"--network: {exc}") from exc
    server_ip: ipaddress.IPv4Address | None = args.server_ip
    if server_ip is None or network is None:
        iface = interface_ipv4(args.interface)
        server_ip = server_ip or iface.ip
        network = network or iface.network
    if args.lease_time < 60:
        raise ConfigError("--lease-time: at least 60 seconds")
    boot = None
    if args.http_url:
        boot = BootConfig(args.http_url, not args.no_tftp, args.tftp_server, args.bios_file,
                          args.efi_file, https_base=args.https_url)  # fmt: skip
    config = DhcpConfig(server_ip, network, args.router, tuple(args.dns), args.domain,
                        args.lease_time, boot)  # fmt: skip
    static = StaticLeases.from_file(args.leases) if args.leases else StaticLeases()
    births = None
    if args.birth_range is not None:
        start, end = args.birth_range
        if start not in network or end not in network:
            raise ConfigError(f"--birth-range: {start}-{end} is not inside {network}")
        path = args.state_dir / LEASE_FILE if args.state_dir else None
        if path is None:
            log.warning("no --state-dir: birth leases are kept in memory only")
        births = BirthLeases(start, end, path)
    return Responder(config, static, births)


def build_proxy(args: argparse.Namespace) -> ProxyResponder:
    """The proxyDHCP responder: only boot options, so nothing about leases may be given."""
    for flag, value in (("--birth-range", args.birth_range), ("--leases", args.leases),
                        ("--router", args.router), ("--dns", args.dns)):  # fmt: skip
        if value:
            raise ConfigError(f"{flag}: the proxy gives no addresses or network settings",
                              hint="the site's DHCP server gives them; drop the flag")  # fmt: skip
    if not args.http_url:
        raise ConfigError("--proxy needs --http-url: boot answers are all it gives")
    server_ip: ipaddress.IPv4Address = args.server_ip or interface_ipv4(args.interface).ip
    boot = BootConfig(args.http_url, not args.no_tftp, args.tftp_server, args.bios_file,
                      args.efi_file, https_base=args.https_url)  # fmt: skip
    return ProxyResponder(ProxyConfig(server_ip, boot))


def run_dhcp(args: argparse.Namespace) -> int:
    server: DhcpServer | ProxyDhcpServer
    if args.proxy:
        server = ProxyDhcpServer(args.interface, build_proxy(args), args.port)
    else:
        server = DhcpServer(args.interface, build_responder(args), args.port)
    ra = None if args.no_ra else RaResponder(args.interface)

    async def start() -> None:
        await server.start()
        if ra is not None:
            await ra.start()

    async def stop() -> None:
        if ra is not None:
            await ra.stop()
        server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_until_stopped(start, stop))
    return 0


def add_ra_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", required=True)
    p.add_argument("--interval", type=float, default=4.0, help="seconds between advertisements")


def run_ra(args: argparse.Namespace) -> int:
    ra = RaResponder(args.interface, args.interval)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_until_stopped(ra.start, ra.stop))
    return 0
