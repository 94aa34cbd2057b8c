"""``hatchery``: the operator CLI. Errors are one line plus a hint; tracebacks with --debug."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from hatchery.cli import ca, container, image, logs, vm
from hatchery.errors import HatcheryError, report
from hatchery.log import setup_logging
from hatchery.qemu.accel import choose_accel

log = logging.getLogger("hatchery.cli")

# Command groups: name -> (help, register(parser) that adds subcommands setting func=...).
COMMAND_GROUPS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "ca": ("make the CA and issue certificates", ca.register),
    "vm": ("create, list, start, stop, destroy VMs on an agent", vm.register_vm),
    "pool": ("the agent's address pool", vm.register_pool),
    "subnet": ("the agent's subnets", vm.register_subnet),
    "health": ("the agent's health and version", vm.register_health),
    "logs": ("the node's journal or the agent's log (--unit, --since, --follow)", logs.register),
    "image": ("signing keys, signed images, publish to and fetch between agents", image.register),
    "container": ("OCI images for container VMs: sign, check, publish, list", container.register),
}


def _cmd_accel(args: argparse.Namespace) -> int:
    choice = choose_accel(args.accel)
    if args.json:
        print(json.dumps({"accel": choice.accel.value, "reason": choice.reason}))
    else:
        print(f"{choice.accel}: {choice.reason}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hatchery", description="Operate Hatchery hypervisors.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    accel = sub.add_parser("accel", help="which QEMU accelerator this host would use, and why")
    accel.add_argument("--accel", default=None, help="auto, kvm or tcg (default: $HATCHERY_ACCEL)")
    accel.add_argument("--json", action="store_true")
    accel.set_defaults(func=_cmd_accel)
    for name, (help_text, add_arguments) in sorted(COMMAND_GROUPS.items()):
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        result: int = args.func(args)
        return result
    except HatcheryError as exc:
        return report("hatchery", exc)


if __name__ == "__main__":
    sys.exit(main())
