"""``hatchery-agent serve http``: the boot HTTP service alone, for debugging and tests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from hatchery.boothttp.app import DEFAULT_IPXE_DIR, BootHttpConfig, BootHttpServer
from hatchery.boothttp.profiles import Profiles
from hatchery.dhcp.cli import serve_until_stopped
from hatchery.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, required=True, help="artefact root (kernels, initrds)")
    p.add_argument("--listen", default="0.0.0.0:8080", help="HOST:PORT (default %(default)s)")
    p.add_argument("--profiles", type=Path, help="boot profiles YAML (e.g. pxe/profiles.yaml)")
    p.add_argument("--ipxe-dir", type=Path, default=DEFAULT_IPXE_DIR, help="served as /ipxe/")
    p.add_argument("--public-url", help="base URL written into scripts (default: from Host)")


def run(args: argparse.Namespace) -> int:
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen: expected HOST:PORT, got {args.listen!r}")
    if not args.root.is_dir():
        raise ConfigError(f"--root: {args.root} is not a directory")
    profiles = Profiles.load(args.profiles) if args.profiles else None
    config = BootHttpConfig(args.root, profiles, args.ipxe_dir, args.public_url)
    server = BootHttpServer(config, host.strip("[]") or "0.0.0.0", int(port))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_until_stopped(server.start, server.stop))
    return 0
