"""``hatchery-agent serve tftp``: the TFTP server alone, in the foreground, for debugging."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from hatchery.errors import ConfigError
from hatchery.tftp.packet import MAX_BLKSIZE, MIN_BLKSIZE
from hatchery.tftp.server import TftpLimits, TftpServer


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:6969")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TftpLimits()
    parser.description = __doc__.splitlines()[0] if __doc__ else None
    parser.add_argument("--root", type=Path, required=True, help="directory to serve")
    parser.add_argument(
        "--listen", default="0.0.0.0:69", help="HOST:PORT (port 0: any free port; logged)"
    )
    parser.add_argument("--max-transfers", type=int, default=defaults.max_transfers)
    parser.add_argument(
        "--max-transfers-per-client", type=int, default=defaults.max_transfers_per_client
    )
    parser.add_argument("--max-file-size", type=int, default=defaults.max_file_size)
    parser.add_argument("--max-blksize", type=int, default=defaults.max_blksize)
    parser.add_argument("--max-windowsize", type=int, default=defaults.max_windowsize)
    parser.add_argument(
        "--timeout", type=float, default=defaults.timeout, help="retransmission timeout, s"
    )
    parser.add_argument("--retries", type=int, default=defaults.retries)
    parser.add_argument(
        "--requests-per-second",
        type=float,
        default=defaults.requests_per_second,
        help="per client address",
    )


def _limits(args: argparse.Namespace) -> TftpLimits:
    if not MIN_BLKSIZE <= args.max_blksize <= MAX_BLKSIZE:
        raise ConfigError(f"--max-blksize must be {MIN_BLKSIZE}..{MAX_BLKSIZE}")
    if not 1 <= args.max_windowsize <= 65535:
        raise ConfigError("--max-windowsize must be 1..65535")
    for name in ("max_transfers", "max_transfers_per_client", "retries", "max_file_size"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    if args.timeout <= 0 or args.requests_per_second <= 0:
        raise ConfigError("--timeout and --requests-per-second must be positive")
    return TftpLimits(
        max_transfers=args.max_transfers,
        max_transfers_per_client=args.max_transfers_per_client,
        max_file_size=args.max_file_size,
        max_blksize=args.max_blksize,
        max_windowsize=args.max_windowsize,
        timeout=args.timeout,
        retries=args.retries,
        requests_per_second=args.requests_per_second,
        request_burst=max(1, int(args.requests_per_second * 2)),
    )


async def _serve(root: Path, host: str, port: int, limits: TftpLimits) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with TftpServer(root, host, port, limits):
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    asyncio.run(_serve(args.root, host, port, _limits(args)))
    return 0
