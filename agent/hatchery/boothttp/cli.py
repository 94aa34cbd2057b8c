"""``hatchery-agent serve http``: the boot HTTP service alone, for debugging and tests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from hatchery.boothttp.app import DEFAULT_IPXE_DIR, BootHttpConfig, BootHttpServer, boot_tls_context
from hatchery.boothttp.profiles import Profiles
from hatchery.config import DEFAULT_UKI_STUB, DEFAULT_UKI_STUB_ARM64
from hatchery.dhcp.cli import serve_until_stopped
from hatchery.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, required=True, help="artefact root (kernels, initrds)")
    p.add_argument("--listen", default="0.0.0.0:8080", help="HOST:PORT (default %(default)s)")
    p.add_argument("--profiles", type=Path, help="boot profiles YAML (e.g. pxe/profiles.yaml)")
    p.add_argument("--ipxe-dir", type=Path, default=DEFAULT_IPXE_DIR, help="served as /ipxe/")
    p.add_argument("--public-url", help="base URL written into scripts (default: from Host)")
    p.add_argument("--tls-port", type=int, default=8443, help="HTTPS port (with --tls-cert)")
    p.add_argument("--tls-cert", type=Path, help="boot certificate (from the boot CA): serve HTTPS")
    p.add_argument("--tls-key", type=Path, help="its key")
    p.add_argument("--uki-stub", type=Path, default=DEFAULT_UKI_STUB,
                   help="systemd's x86-64 EFI stub for a UKI (%(default)s)")  # fmt: skip
    p.add_argument("--uki-stub-arm64", type=Path, default=DEFAULT_UKI_STUB_ARM64,
                   help="systemd's arm64 EFI stub (%(default)s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen: expected HOST:PORT, got {args.listen!r}")
    if not args.root.is_dir():
        raise ConfigError(f"--root: {args.root} is not a directory")
    profiles = Profiles.load(args.profiles) if args.profiles else None
    config = BootHttpConfig(args.root, profiles, args.ipxe_dir, args.public_url,
                            uki_stub=args.uki_stub, uki_stub_arm64=args.uki_stub_arm64)  # fmt: skip
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = boot_tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = BootHttpServer(config, host.strip("[]") or "0.0.0.0", int(port),
                            tls=tls, tls_port=args.tls_port)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_until_stopped(server.start, server.stop))
    return 0
