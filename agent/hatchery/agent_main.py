"""``hatchery-agent``: the daemon. ``main`` only wires parts together, in order.

``hatchery-agent run`` (the default) starts every configured subsystem; a part that cannot
start stops the agent with "cannot start <part>: <why>" and a non-zero exit. ``hatchery-agent
serve <service>`` runs one network service alone, for debugging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from hatchery.addresses import AddressPool, Subnet
from hatchery.api.app import ApiContext, make_app
from hatchery.api.policy import load_policy
from hatchery.boothttp import cli as boothttp_cli
from hatchery.capacity import probe
from hatchery.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from hatchery.dhcp import cli as dhcp_cli
from hatchery.errors import HatcheryError
from hatchery.health import NodeHealth
from hatchery.log import setup_logging
from hatchery.pki import server_context
from hatchery.qemu.accel import choose_accel
from hatchery.sdnotify import notify, watchdog_interval
from hatchery.vms.manager import VmManager

log = logging.getLogger("hatchery.agent")

# Subcommands of ``serve`` register here: name -> (add_arguments, run).
ServeCommand = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
SERVE_COMMANDS: dict[str, ServeCommand] = {
    "dhcp": (dhcp_cli.add_dhcp_arguments, dhcp_cli.run_dhcp),
    "http": (boothttp_cli.add_arguments, boothttp_cli.run),
    "ra": (dhcp_cli.add_ra_arguments, dhcp_cli.run_ra),
}


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _seed_pool(config: AgentConfig, pool: AddressPool) -> None:
    """Subnets and ranges named in the config exist in the pool (idempotent)."""
    for bridge in config.bridges:
        for sub in bridge.subnets:
            pool.add_subnet(Subnet(bridge.name, sub.cidr, sub.gateway, sub.dns))
            if sub.pool_start is not None:
                pool.add_range(sub.pool_start, sub.pool_end or sub.pool_start)


@contextlib.asynccontextmanager
async def _part(name: str) -> AsyncIterator[None]:
    """Start one part; a failure says which part and why."""
    try:
        yield
    except HatcheryError as exc:
        raise HatcheryError(f"cannot start {name}: {exc.message}", hint=exc.hint) from exc
    except OSError as exc:
        raise HatcheryError(f"cannot start {name}: {exc}") from exc


async def run_agent(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Start the parts in order, report READY, run until SIGTERM/SIGINT, stop in reverse."""
    accel = choose_accel(config.accel)
    log.info("accelerator %s: %s", accel.accel, accel.reason)
    async with _part("state"):
        config.state_dir.mkdir(parents=True, exist_ok=True)
    async with _part("address pool"):
        pool = AddressPool(config.state_dir / "pool.json")
        _seed_pool(config, pool)
    async with _part("capacity"):
        capacity = probe(config.capacity, config.state_dir)
        log.info(
            "capacity for VMs: %d vCPUs, %d MiB RAM, %d MiB disk",
            capacity.vcpus, capacity.memory_mib, capacity.disk_mib,
        )  # fmt: skip
    manager = VmManager(config.state_dir, pool, capacity, accel, config.qemu_binary)
    async with _part("vms"):
        await manager.adopt_all()
    health = NodeHealth()
    runner: web.AppRunner | None = None
    try:
        async with _part("api"):
            tls = server_context(config.tls.ca, config.tls.cert, config.tls.key)
            app = make_app(
                ApiContext(manager, pool, load_policy(config.policy), health, time.time())
            )
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, config.listen_host, config.listen_port, ssl_context=tls)
            await site.start()
            log.info("api listening on %s:%d (mutual TLS)", config.listen_host, config.listen_port)

        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks: list[asyncio.Task[None]] = []
        interval = watchdog_interval()
        if interval:
            tasks.append(asyncio.create_task(_watchdog(interval), name="watchdog"))
        notify("READY=1")
        log.info("agent ready (version %s, state in %s)", health.version(), config.state_dir)
        try:
            await stop.wait()
        finally:
            notify("STOPPING=1")
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        if runner is not None:
            await runner.cleanup()
        await manager.close()
    log.info("agent stopped (VMs keep running)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hatchery-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="log at DEBUG, show tracebacks")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the agent (default)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    serve = sub.add_parser("serve", help="run one network service alone, for debugging")
    services = serve.add_subparsers(dest="service", required=True)
    for name, (add_arguments, _) in sorted(SERVE_COMMANDS.items()):
        add_arguments(services.add_parser(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        if args.command == "serve":
            return SERVE_COMMANDS[args.service][1](args)
        config = load_config(getattr(args, "config", DEFAULT_CONFIG_PATH))
        asyncio.run(run_agent(config))
    except HatcheryError as exc:
        log.debug("failure", exc_info=True)
        print(f"hatchery-agent: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
