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

from hatchery.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from hatchery.errors import HatcheryError
from hatchery.log import setup_logging
from hatchery.qemu.accel import choose_accel
from hatchery.sdnotify import notify, watchdog_interval

log = logging.getLogger("hatchery.agent")

# Subcommands of ``serve`` register here: name -> (add_arguments, run).
ServeCommand = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
SERVE_COMMANDS: dict[str, ServeCommand] = {}


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def run_agent(config: AgentConfig) -> None:
    """Start the subsystems in order, report READY, run until SIGTERM/SIGINT, stop in reverse."""
    accel = choose_accel(config.accel)
    log.info("accelerator %s: %s", accel.accel, accel.reason)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HatcheryError(f"cannot start state: {config.state_dir}: {exc.strerror}") from exc

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    interval = watchdog_interval()
    if interval:
        tasks.append(asyncio.create_task(_watchdog(interval), name="watchdog"))
    notify("READY=1")
    log.info("agent ready (state in %s)", config.state_dir)
    try:
        await stop.wait()
    finally:
        notify("STOPPING=1")
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    log.info("agent stopped")


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
