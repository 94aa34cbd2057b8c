"""``hatchery-agent``: the daemon. ``main`` only wires parts together, in order.

``hatchery-agent run`` (the default) starts every configured subsystem; a part that cannot
start stops the agent with "cannot start <part>: <why>" and a non-zero exit. ``hatchery-agent
serve <service>`` runs one network service alone, for debugging.

``hatchery-agent run --seed`` (the unit's command) first tries the node's seed, once per
boot (``hatchery.seed``): in this process, as a unit of its own it was a second Python start
on the way to the agent (1.9 s of each boot of an emulated node). ``hatchery-agent seed``
applies it by hand. The agent's stack (aiohttp, pyroute2, cryptography, every subsystem) is
imported only by the command that runs it.

``run --after PATH`` (the unit's command too) imports that stack first, then waits for PATH
to exist before it reads anything of the node. The unit starts early in the boot, and
``hatchery-node-ready.service``, ordered where the agent used to be (after ``/data``,
``sysinit.target`` and networkd), creates PATH. So the imports (5.5 s of CPU on an emulated
node, half a second on hardware) run while udev probes the devices and ``/data`` is found,
not after: an emulated node's agent was ready at 19.5 s instead of 23 s (docs/images.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hatchery.errors import HatcheryError, report
from hatchery.host import notify, open_notify, watchdog_interval
from hatchery.log import recent_log, setup_logging

if TYPE_CHECKING:
    from hatchery.config import AgentConfig

log = logging.getLogger("hatchery.agent")

#: Subcommands of ``serve``: name -> (module, its add_arguments function, its run function),
#: imported only when ``serve`` is on the command line.
SERVE_COMMANDS: dict[str, tuple[str, str, str]] = {
    "dhcp": ("hatchery.dhcp.cli", "add_dhcp_arguments", "run_dhcp"),
    "dhcp6": ("hatchery.dhcp6.cli", "add_arguments", "run"),
    "http": ("hatchery.boothttp.cli", "add_arguments", "run"),
    "ra": ("hatchery.dhcp.cli", "add_ra_arguments", "run_ra"),
    "tftp": ("hatchery.tftp.cli", "add_arguments", "run"),
}


def _serve_command(
    name: str,
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    module, add_arguments, run = SERVE_COMMANDS[name]
    loaded = importlib.import_module(module)
    return getattr(loaded, add_arguments), getattr(loaded, run)


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def run_agent(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Run every part until SIGTERM/SIGINT (or ``stop``); READY=1 once all have started."""
    from hatchery.agent import Agent  # deferred: see the docstring

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


def loading_cost() -> str:
    """How long this process has run and the CPU it spent, e.g. ``in 11.5 s (8.6 s of CPU:
    5.3 user, 3.3 system)``: on an emulated node, loading the agent is the longest way to a
    ready node (docs/images.md), and this line says how long it was on this boot."""
    times = os.times()
    # /proc/self/stat's 22nd field: the start, in clock ticks since boot (the command name
    # in field 2 may hold spaces, so count after its closing parenthesis)
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    started = ticks / os.sysconf("SC_CLK_TCK")
    wall = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    return (f"in {wall:.1f} s ({times.user + times.system:.1f} s of CPU: {times.user:.1f} user, "
            f"{times.system:.1f} system)")  # fmt: skip


#: How often ``--after`` looks for its file: a stat, so the wait costs nothing, and the agent
#: goes on at most this late.
AFTER_POLL_SECONDS = 0.05


def wait_for_boot(marker: Path) -> None:
    """Import the agent's stack, then wait until ``marker`` exists (``run --after``).

    Meanwhile systemd hears why the unit is still starting (``STATUS=``) and the watchdog is
    fed, so a slow ``/data`` (a disk being formatted) is never mistaken for a hung agent.
    """
    import hatchery.agent  # noqa: F401  (the point: load it while the boot goes on)
    import hatchery.config  # noqa: F401
    import hatchery.seed  # noqa: F401

    if os.getpriority(os.PRIO_PROCESS, 0) < 0:  # the unit's Nice= was for loading only
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    log.info("agent loaded %s", loading_cost())
    if marker.exists():
        return
    log.info("waiting for the node's boot (%s)", marker)
    notify(f"STATUS=loaded; waiting for the node's boot ({marker})")
    interval = watchdog_interval()
    fed = time.monotonic()
    while not os.path.exists(marker):
        time.sleep(AFTER_POLL_SECONDS)
        if interval and time.monotonic() - fed >= interval:
            notify("WATCHDOG=1")
            fed = time.monotonic()
    notify("STATUS=starting")


def _parser(with_services: bool) -> argparse.ArgumentParser:
    from hatchery.config import DEFAULT_CONFIG_PATH

    parser = argparse.ArgumentParser(prog="hatchery-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="log at DEBUG, show tracebacks")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the agent (default)")
    run.add_argument(
        "--seed",
        action="store_true",
        help="first try the boot environment's seed, once per boot (the unit does)",
    )
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    run.add_argument(
        "--after",
        type=Path,
        metavar="PATH",
        help="load the agent, then wait until PATH exists before reading the node (the unit "
        "does: hatchery-node-ready.service creates it)",
    )
    sub.add_parser("seed", help="write the boot environment's seed files into /etc (once)")
    serve = sub.add_parser("serve", help="run one network service alone, for debugging")
    services = serve.add_subparsers(dest="service", required=True)
    for name in sorted(SERVE_COMMANDS) if with_services else ():
        _serve_command(name)[0](services.add_parser(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = _parser(with_services="serve" in words).parse_args(words)
    setup_logging(args.debug)
    try:
        if args.command == "serve":
            return _serve_command(args.service)[1](args)
        if args.command == "seed":
            from hatchery.seed import run_seed

            return run_seed()
        from hatchery.config import DEFAULT_CONFIG_PATH, load_config

        recent_log()  # from the first line on: what GET /v1/logs serves without a journal
        if getattr(args, "after", None) is not None:
            wait_for_boot(args.after)
        if getattr(args, "seed", False):
            from hatchery.seed import run_seed_once

            run_seed_once()  # it may write the configuration read next
        config = load_config(getattr(args, "config", DEFAULT_CONFIG_PATH))
        asyncio.run(run_agent(config))
    except HatcheryError as exc:
        return report("hatchery-agent", exc)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
