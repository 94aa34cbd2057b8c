"""``hatchery vm|pool|subnet|health``: talk to one agent over mutual TLS (vm-control-like)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from hatchery.cli import console as live_console
from hatchery.client import AgentClient, Credentials
from hatchery.errors import HatcheryError
from hatchery.qemu.cmdline import DEFAULT_MACHINE, MACHINES
from hatchery.wire import Health, Phase, UpgradeStatus, VmResult

Run = Callable[[AgentClient, argparse.Namespace], Awaitable[Any]]


def connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agent",
        default=os.environ.get("HATCHERY_AGENT", "127.0.0.1"),
        help="agent address HOST[:PORT] (default: $HATCHERY_AGENT or 127.0.0.1)",
    )
    parser.add_argument("--ca", type=Path, help="CA certificate (default: $HATCHERY_CA)")
    parser.add_argument("--cert", type=Path, help="client certificate ($HATCHERY_CERT)")
    parser.add_argument("--key", type=Path, help="client key ($HATCHERY_KEY)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _command(run: Run, render: Callable[[Any, argparse.Namespace], None]) -> Callable[..., int]:
    def func(args: argparse.Namespace) -> int:
        async def go() -> Any:
            creds = Credentials.from_env(args.ca, args.cert, args.key)
            async with AgentClient(args.agent, creds) as client:
                return await run(client, args)

        result = asyncio.run(go())
        if args.json and not isinstance(result, str):
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            render(result, args)
        return 0

    return func


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _render_vms(result: Any, _: argparse.Namespace) -> None:
    vms = result["vms"]
    if not vms:
        print("no VMs")
        return
    rows = [
        (
            v["name"],
            v["state"],
            v["ip"],
            v["mac"],
            v["vcpus"],
            v["memory_mib"],
            _uptime(v["uptime"]),
        )
        for v in vms
    ]
    print_table(rows, ["name", "state", "ip", "mac", "vcpus", "mem MiB", "uptime"])


def _render_vm(vm: Any, _: argparse.Namespace) -> None:
    for key in ("name", "state", "ip", "mac", "bridge", "vcpus", "memory_mib", "disk_mib",
                "machine", "owner_group", "pid", "uid", "uuid", "reason", "pause_seconds",
                "state_file", "container_state", "container_status"):  # fmt: skip
        print(f"{key + ':':<13}{vm.get(key) if vm.get(key) is not None else '-'}")
    print(f"{'uptime:':<13}{_uptime(vm.get('uptime'))}")
    if vm.get("kernel_boot"):
        kb = vm["kernel_boot"]
        print(f"{'kernel:':<13}{kb['kernel']} initrd={kb.get('initrd')} cmdline={kb['cmdline']!r}")
    if vm.get("disk_boot"):
        print(f"{'disk:':<13}{vm['disk_boot']['image']}")
    if vm.get("container"):
        c = vm["container"]
        print(f"{'container:':<13}{c['image']} ports={c.get('ports') or '-'}")
    print(f"{'limits:':<13}{_limits(vm.get('limits'))}")


def _limits(held: dict[str, int | None] | None) -> str:
    """What the kernel holds the VM's QEMU to, as ``vm show`` prints it."""
    if held is None:
        return "- (not running)"

    def mib(value: int | None) -> str:
        return "unlimited" if value is None else f"{value / 1024**2:.0f} MiB"

    files = f"files {mib(held.get('file_max'))} each"
    if held["memory"] is None:  # no cgroup v2 with those controllers: a development host
        return f"memory and tasks not limited on this host, {files}"
    tasks_max = "unlimited" if held["tasks_max"] is None else str(held["tasks_max"])
    return (f"memory {mib(held['memory'])} of {mib(held['memory_max'])}, "
            f"tasks {held['tasks']} of {tasks_max}, {files}")  # fmt: skip


# --- vm ------------------------------------------------------------------------------
SOURCE_HELP = (
    "a file in one of the node's artefact folders (absolute path), an http(s) URL, or "
    "image:VERSION:ARTEFACT (an artefact of an image in the node's store, by role or name)"
)


def _source(text: str) -> str | dict[str, str]:
    """A VM source as the API takes it: ``image:VERSION:ARTEFACT`` is a store artefact (an
    absolute path or a URL never starts so), anything else goes as it is."""
    if text.startswith("image:"):
        version, sep, artefact = text[len("image:") :].partition(":")
        if not sep or not version or not artefact:
            raise HatcheryError(f"{text!r}: a store artefact is image:VERSION:ARTEFACT")
        return {"image": version, "artefact": artefact}
    return text


async def _create(client: AgentClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {
        "name": args.name, "vcpus": args.vcpus, "memory_mib": args.memory,
        "disk_mib": args.disk_size, "start": not args.no_start, "machine": args.machine,
    }  # fmt: skip
    if args.kernel:
        body["kernel"] = {"kernel": _source(args.kernel), "cmdline": args.cmdline}
        if args.initrd:
            body["kernel"]["initrd"] = _source(args.initrd)
    elif args.disk:
        body["disk"] = {"image": _source(args.disk), "format": args.disk_format}
    else:
        raise HatcheryError("give --kernel (direct kernel boot) or --disk IMAGE")
    if args.bridge:
        body["bridge"] = args.bridge
    if args.owner_group:
        body["owner_group"] = args.owner_group
    if args.user_data:
        body["user_data"] = _read_user_data(args.user_data)
    if args.ssh_key:
        body["public_keys"] = [_read_user_data(path).strip() for path in args.ssh_key]
    labels = _key_values(args.label, "--label")
    if labels:
        body["labels"] = labels
    if args.container:
        env = _key_values(args.env, "--env")
        body["container"] = {"image": args.container, "env": env, "ports": args.port}
    elif args.env or args.port:
        raise HatcheryError("--env and --port go with --container")
    return await client.request("POST", "/v1/vms", json=body)


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` arguments as a mapping (a later KEY wins)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise HatcheryError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _read_user_data(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise HatcheryError(f"cannot read user data {path}: {exc}") from exc


async def _list(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("GET", "/v1/vms")


async def _show(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("GET", f"/v1/vms/{args.name}")


async def _start(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("POST", f"/v1/vms/{args.name}/start")


async def _stop(client: AgentClient, args: argparse.Namespace) -> Any:
    body = {"timeout": args.timeout, "force": args.force}
    return await client.request("POST", f"/v1/vms/{args.name}/stop", json=body)


async def _refresh(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("POST", f"/v1/vms/{args.name}/refresh")


async def _suspend(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("POST", f"/v1/vms/{args.name}/suspend")


async def _destroy(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("DELETE", f"/v1/vms/{args.name}")


async def _user_data(client: AgentClient, args: argparse.Namespace) -> Any:
    data = _read_user_data(args.file).encode()
    return await client.request("PUT", f"/v1/vms/{args.name}/user-data", data=data)


async def _console(client: AgentClient, args: argparse.Namespace) -> Any:
    seen = 0
    while True:
        text = await client.request("GET", f"/v1/vms/{args.name}/console?bytes=4194304")
        assert isinstance(text, str)
        sys.stdout.write(text[seen:] if len(text) >= seen else text)
        sys.stdout.flush()
        seen = len(text)
        if not args.follow:
            return ""
        await asyncio.sleep(1)


def _console_command(args: argparse.Namespace) -> int:
    """The log (``--follow``: as it grows), or ``--attach`` (``cli.console``)."""
    if args.attach:
        return live_console.run(args)
    if args.read_only:
        raise HatcheryError("--read-only goes with --attach")
    return _command(_console, _quiet)(args)


def _quiet(_: Any, __: argparse.Namespace) -> None:
    return None


def _say(template: str) -> Callable[[Any, argparse.Namespace], None]:
    return lambda result, args: print(template.format(r=result, a=args))


# --- pool, subnet, health -------------------------------------------------------------------
async def _pool_add(client: AgentClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"start": args.start}
    if args.end:
        body["end"] = args.end
    if args.mac:
        body["mac"] = args.mac
    return await client.request("POST", "/v1/pool", json=body)


async def _pool_list(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("GET", "/v1/pool")


def _render_pool(result: Any, _: argparse.Namespace) -> None:
    rows = [(a["ip"], a["mac"], a["bridge"], a["owner"] or "free") for a in result["addresses"]]
    print_table(rows, ["ip", "mac", "bridge", "owner"])
    print(f"{result['free']} of {result['total']} free")


async def _subnet_add(client: AgentClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"bridge": args.bridge, "cidr": args.cidr}
    if args.gateway:
        body["gateway"] = args.gateway
    if args.dns:
        body["dns"] = args.dns
    return await client.request("POST", "/v1/subnets", json=body)


async def _subnet_list(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("GET", "/v1/subnets")


def _render_subnets(result: Any, _: argparse.Namespace) -> None:
    rows = [(s["bridge"], s["cidr"], s["gateway"], ",".join(s["dns"])) for s in result["subnets"]]
    print_table(rows, ["bridge", "cidr", "gateway", "dns"])


async def _health(client: AgentClient, args: argparse.Namespace) -> Any:
    return await client.request("GET", "/healthz")


def _render_health(answer: Any, _: argparse.Namespace) -> None:
    try:
        h = Health.from_json(answer)
    except ValueError as exc:
        raise HatcheryError(f"the agent's health answer is not one: {exc}") from exc
    print(f"version {h.version}, {'healthy' if h.healthy else 'UNHEALTHY'}")
    for name, value in sorted(h.checks.items()):
        print(f"  {name}: {value}")
    print(f"  vms: {h.vms.get('running', 0)} running of {h.vms_total or 0}")
    for line in upgrade_lines(h.upgrade):
        print(f"  {line}")


def upgrade_lines(status: UpgradeStatus) -> list[str]:
    """The latest upgrade in a few lines: its state and, after a reboot, one line per VM
    that ran before it (resumed with its pause, or why not)."""
    if status.state is Phase.IDLE:
        return []
    mode = f" ({status.mode.value})" if status.mode else ""
    said = status.error if status.state is Phase.FAILED else status.detail
    lines = [f"upgrade to {status.target or '?'}{mode}: {status.state.value}"
             + (f": {said}" if said else "")]  # fmt: skip
    for vm in status.vms:
        if vm.result is VmResult.RESUMED and vm.pause_seconds is not None:
            lines.append(f"  vm {vm.name}: resumed after a {vm.pause_seconds:.1f}s pause")
        else:
            lines.append(f"  vm {vm.name}: {vm.result.value}"
                         + (f": {vm.reason}" if vm.reason else ""))  # fmt: skip
    return lines


def register_vm(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vm_command", required=True)

    create = sub.add_parser("create", help="create (and start) a VM")
    create.add_argument("name")
    create.add_argument("--kernel", help="direct kernel boot: " + SOURCE_HELP)
    create.add_argument("--initrd", help=SOURCE_HELP)
    create.add_argument("--cmdline", default="console=ttyS0")
    create.add_argument("--disk", help="disk boot: the image the root volume is made from: "
                        + SOURCE_HELP)  # fmt: skip
    create.add_argument("--disk-format", choices=("qcow2", "raw"), default="qcow2",
                        help="how the disk image is read (default: qcow2)")  # fmt: skip
    create.add_argument("--vcpus", type=int, default=1)
    create.add_argument("--memory", type=int, default=256, help="MiB")
    create.add_argument("--disk-size", type=int, default=0, help="MiB")
    create.add_argument("--bridge")
    create.add_argument("--machine", default=DEFAULT_MACHINE, choices=MACHINES)
    create.add_argument("--user-data", type=Path, help="file handed to the VM by metadata")
    create.add_argument("--ssh-key", type=Path, action="append", default=[],
                        help="public key file served as metadata (repeatable)")  # fmt: skip
    create.add_argument("--owner-group", help="group whose members may manage this VM")
    create.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    create.add_argument("--no-start", action="store_true")
    create.add_argument(
        "--container",
        metavar="NAME[:TAG]",
        help="run this image of the node's container store in the VM "
        "(with the appliance's --kernel and --initrd; docs/appliance.md)",
    )
    create.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="container environment (repeatable)",
    )
    create.add_argument(
        "--port",
        action="append",
        default=[],
        type=int,
        help="a port the container serves on the VM's address (repeatable)",
    )
    create.set_defaults(func=_command(_create, _render_vm))

    for name, run, render, help_text in (
        ("list", _list, _render_vms, "list VMs"),
        ("show", _show, _render_vm, "show one VM"),
        ("start", _start, _say("vm {r[name]} is {r[state]}"), "start a VM"),
        ("destroy", _destroy, _say("vm {r[destroyed]} destroyed"), "stop hard and delete"),
        (
            "refresh",
            _refresh,
            _say("vm {r[name]} runs on QEMU pid {r[pid]}"),
            "move a running VM onto a new QEMU process (no guest reboot)",
        ),
        (
            "suspend",
            _suspend,
            _say("vm {r[name]} is {r[state]}"),
            "save a VM's state to its folder and stop QEMU; start resumes it",
        ),
    ):
        cmd = sub.add_parser(name, help=help_text)
        if name != "list":
            cmd.add_argument("name")
        cmd.set_defaults(func=_command(run, render))

    stop = sub.add_parser("stop", help="ACPI shutdown, then hard stop after --timeout")
    stop.add_argument("name")
    stop.add_argument("--timeout", type=int, default=30, help="seconds before a hard stop")
    stop.add_argument("--force", action="store_true", help="hard stop at once")
    stop.set_defaults(func=_command(_stop, _say("vm {r[name]} is {r[state]}")))

    console = sub.add_parser("console", help="print the VM's serial console, or --attach to it")
    console.add_argument("name")
    console.add_argument("--follow", "-f", action="store_true")
    console.add_argument(
        "--attach",
        action="store_true",
        help="interactive: type into the console (raw terminal, Ctrl-] detaches)",
    )
    console.add_argument("--read-only", action="store_true",
                         help="with --attach: watch only (vm.read is enough)")  # fmt: skip
    console.set_defaults(func=_console_command)

    user_data = sub.add_parser("user-data", help="replace the VM's user data")
    user_data.add_argument("name")
    user_data.add_argument("file", type=Path)
    user_data.set_defaults(func=_command(_user_data, _say("user data of {a.name} replaced")))
    for cmd in sub.choices.values():
        connection_args(cmd)


def register_pool(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pool_command", required=True)
    add = sub.add_parser("add", help="add an address, or a range START END")
    add.add_argument("start")
    add.add_argument("end", nargs="?")
    add.add_argument("--mac", help="MAC for a single address (default: derived from the IP)")
    add.set_defaults(func=_command(_pool_add, _say("{r[added]} added, {r[free]} free")))
    ls = sub.add_parser("list", help="list the pool")
    ls.set_defaults(func=_command(_pool_list, _render_pool))
    for cmd in sub.choices.values():
        connection_args(cmd)


def register_subnet(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="subnet_command", required=True)
    add = sub.add_parser("add", help="add a subnet on a bridge")
    add.add_argument("--bridge", required=True)
    add.add_argument("--cidr", required=True)
    add.add_argument("--gateway")
    add.add_argument("--dns", help="comma-separated")
    add.set_defaults(func=_command(_subnet_add, _say("subnet added: {r[added]}")))
    ls = sub.add_parser("list", help="list subnets")
    ls.set_defaults(func=_command(_subnet_list, _render_subnets))
    for cmd in sub.choices.values():
        connection_args(cmd)


def register_health(parser: argparse.ArgumentParser) -> None:
    connection_args(parser)
    parser.set_defaults(func=_command(_health, _render_health))
