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
from collections.abc import Callable, Sequence
from pathlib import Path

from hatchery.agent import Agent
from hatchery.boothttp import cli as boothttp_cli
from hatchery.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from hatchery.dhcp import cli as dhcp_cli
from hatchery.dhcp6 import cli as dhcp6_cli
from hatchery.errors import HatcheryError, report
from hatchery.host import notify, open_notify, watchdog_interval
from hatchery.log import recent_log, setup_logging
from hatchery.seed import run_seed
from hatchery.tftp import cli as tftp_cli

log = logging.getLogger("hatchery.agent")

# Subcommands of ``serve`` register here: name -> (add_arguments, run).
ServeCommand = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
SERVE_COMMANDS: dict[str, ServeCommand] = {
    "dhcp": (dhcp_cli.add_dhcp_arguments, dhcp_cli.run_dhcp),
    "dhcp6": (dhcp6_cli.add_arguments, dhcp6_cli.run),
    "http": (boothttp_cli.add_arguments, boothttp_cli.run),
    "ra": (dhcp_cli.add_ra_arguments, dhcp_cli.run_ra),
    "tftp": (tftp_cli.add_arguments, tftp_cli.run),
}


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def run_agent(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Run every part until SIGTERM/SIGINT (or ``stop``); READY=1 once all have started."""
    open_notify()  # before any listener: the watchdog's socket is never short of an fd
    agent = Agent(config)
    async with agent.running():
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watchdog: asyncio.Task[None] | None = None
        interval = watchdog_interval()
        if interval:
            watchdog = asyncio.create_task(_watchdog(interval), name="watchdog")
        notify("READY=1")
        log.info("agent ready (version %s, state in %s)", agent.health.version(), config.state_dir)
        try:
            await stop.wait()
        finally:
            notify("STOPPING=1")
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
    log.info("agent stopped (VMs keep running)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hatchery-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="log at DEBUG, show tracebacks")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the agent (default)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    sub.add_parser("seed", help="write the boot environment's seed files into /etc (once)")
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
        if args.command == "seed":
            return run_seed()
        recent_log()  # from the first line on: what GET /v1/logs serves without a journal
        config = load_config(getattr(args, "config", DEFAULT_CONFIG_PATH))
        asyncio.run(run_agent(config))
    except HatcheryError as exc:
        return report("hatchery-agent", exc)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
