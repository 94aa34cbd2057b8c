"""``hatchery-agent serve dhcp6``: the DHCPv6 server of IPv6 births and its managed RAs
alone, for debugging and tests; the agent starts the same classes from ``boot.ipv6``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
from pathlib import Path

from hatchery.dhcp.cli import parse_address, parse_range, serve_until_stopped
from hatchery.dhcp.leases import BirthLeases6
from hatchery.dhcp6.packet import duid_ll
from hatchery.dhcp6.responder import Boot6Config, Dhcp6Config, Responder6
from hatchery.dhcp6.server import Dhcp6Server
from hatchery.errors import ConfigError
from hatchery.netdev import interface_mac
from hatchery.ra import Managed, RaResponder

log = logging.getLogger(__name__)

LEASE_FILE = "dhcp6-births.json"


_ip6 = functools.partial(parse_address, ipaddress.IPv6Address)
_range = functools.partial(parse_range, ipaddress.IPv6Address)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", required=True, help="serve on this interface only")
    p.add_argument("--birth-range", type=_range, required=True, metavar="START-END",
                   help="give addresses from this range")  # fmt: skip
    p.add_argument("--prefix", help="the on-link prefix (default: the /64 of the range)")
    p.add_argument("--http-url", help="boot HTTP service as clients see it, "
                   "e.g. http://[fd00::1]:8080")  # fmt: skip
    p.add_argument("--state-dir", type=Path, help=f"where {LEASE_FILE} is kept")
    p.add_argument("--https-url", help="the boot service over TLS, e.g. https://[fd00::1]:8443: "
                   "UEFI HTTP Boot clients get a unified kernel image from it")  # fmt: skip
    p.add_argument("--dns", type=_ip6, action="append", default=[])
    p.add_argument("--lease-time", type=int, default=3600)
    p.add_argument("--router", action="store_true", help="RAs name us the default router")
    p.add_argument("--no-rapid-commit", action="store_true", help="always Advertise first")
    p.add_argument("--no-ra", action="store_true", help="do not send router advertisements")


def build(args: argparse.Namespace) -> tuple[Dhcp6Server, RaResponder | None]:
    start, end = args.birth_range
    try:
        prefix = ipaddress.IPv6Network(args.prefix or f"{start}/64", strict=args.prefix is not None)
    except ValueError as exc:
        raise ConfigError(f"--prefix: {exc}") from exc
    if start not in prefix or end not in prefix or end < start:
        raise ConfigError(f"--birth-range: {start}-{end} is not a range inside {prefix}")
    if args.lease_time < 60:
        raise ConfigError("--lease-time: at least 60 seconds")
    path = args.state_dir / LEASE_FILE if args.state_dir else None
    if path is None:
        log.warning("no --state-dir: IPv6 birth leases are kept in memory only")
    boot = Boot6Config(args.http_url, https_base=args.https_url) if args.http_url else None
    config = Dhcp6Config(duid_ll(interface_mac(args.interface)), prefix, args.lease_time,
                         tuple(args.dns), boot, not args.no_rapid_commit)  # fmt: skip
    server = Dhcp6Server(args.interface, Responder6(config, BirthLeases6(start, end, path)))
    managed = Managed(prefix, 1800 if args.router else 0, args.lease_time)
    return server, None if args.no_ra else RaResponder(args.interface, managed=managed)


def run(args: argparse.Namespace) -> int:
    server, ra = build(args)

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
