"""The agent API: VMs, pool, subnets, health, upgrades and images on one aiohttp app.

Served over HTTPS with mutual TLS (``api.server``); every handler starts with the
``api.http.require`` guard naming its permission, reads its body through ``api.validate``
and fails with the one error body. The image routes are in ``api.images``, the attachable
console in ``api.console``, the node's logs in ``api.logs``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from hatchery.addresses import AddressPool, Subnet
from hatchery.api import console as live_console
from hatchery.api import containers as container_routes
from hatchery.api import crl, images, logs
from hatchery.api.http import (
    ANY_CLIENT,
    Identify,
    TooLarge,
    Unavailable,
    Visible,
    allowed,
    caller,
    hold,
    json_body,
    new_app,
    read_body,
    require,
    tls_identity,
)
from hatchery.api.policy import Policy
from hatchery.api.validate import BadRequest, Body
from hatchery.containers.oci import split_reference
from hatchery.containers.runtime import check_env
from hatchery.containers.signed import check_name
from hatchery.containers.store import ContainerStore
from hatchery.errors import HatcheryError
from hatchery.log import recent_log
from hatchery.logs import LogSource, node_logs
from hatchery.metrics import CONTENT_TYPE, Metrics, ReadCollector, Reading
from hatchery.qemu.cmdline import DEFAULT_MACHINE, MACHINES
from hatchery.revocation import Revocations
from hatchery.upgrade.controller import Upgrader
from hatchery.vms.console import Consoles
from hatchery.vms.manager import CreateRequest, DiskRequest, KernelRequest, NotFound, VmManager
from hatchery.vms.model import ContainerSpec, VmRecord, VmState
from hatchery.vms.sandbox import read_tail
from hatchery.vms.sources import parse_source
from hatchery.wire import BootStatus, Health, Mode, Phase, UpgradeRequest, UpgradeStatus

log = logging.getLogger(__name__)
MAX_USER_DATA = 256 * 1024
#: What the console route hands the TLS transport at a time (a few ms of encryption).
CONSOLE_PIECE = 256 * 1024


class HealthSource(Protocol):
    """What /healthz needs beyond VMs: the image version and extra checks (units, upgrade)."""

    def version(self) -> str: ...

    async def checks(self) -> dict[str, str]:
        """Named checks, ``ok`` or ``fail: <why>``; awaited, so it must not block the loop."""
        ...

    def upgrade_status(self) -> UpgradeStatus: ...

    def boot_status(self) -> BootStatus: ...

    def free_bytes(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class ApiContext:
    manager: VmManager
    pool: AddressPool
    policy: Policy
    health: HealthSource
    started: float
    upgrader: Upgrader | None = None
    metrics: Metrics = field(default_factory=Metrics)
    consoles: Consoles = field(default_factory=Consoles)
    logs: LogSource = field(default_factory=lambda: node_logs(recent_log()))


CONTEXT = web.AppKey("context", ApiContext)


def vm_view(vm: VmRecord, now: float | None = None) -> dict[str, Any]:
    """A VM as the API shows it: no user data (it may hold secrets), uptime added."""
    data = vm.to_json()
    data.pop("user_data", None)
    data["has_user_data"] = bool(vm.user_data)
    live = vm.state in (VmState.RUNNING, VmState.PAUSED) and vm.started
    data["uptime"] = round((now or time.time()) - vm.started, 1) if live and vm.started else None
    return data


# --- health and metrics -----------------------------------------------------------------
@require(ANY_CLIENT)
async def healthz(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    counts = {s.value: 0 for s in VmState}
    for vm in ctx.manager.records():
        counts[vm.state.value] += 1
    checks = {"agent": "ok", **await ctx.health.checks()}
    checks["vms"] = "ok" if counts["crashed"] == 0 else f"fail: {counts['crashed']} crashed"
    upgrade, boot = ctx.health.upgrade_status(), ctx.health.boot_status()
    if not allowed(request, "upgrade.read"):
        # Any verified client reads /healthz (tenants, peers): the phase, target and times
        # are the node's, but the per-VM report names every tenant's VMs, and the error,
        # detail and fallback reason can quote them (and host paths): ``upgrade.read`` only.
        upgrade = replace(upgrade, vms=(), error=None, detail=None)
        boot = replace(boot, reason=None)
    health = Health(
        version=ctx.health.version(),
        healthy=all(v == "ok" for v in checks.values()),
        checks=checks,
        vms={"total": sum(counts.values()), **counts},
        upgrade=upgrade,
        boot=boot,
        uptime=round(time.time() - ctx.started, 1),
        free_bytes=ctx.health.free_bytes(),
    )
    return web.json_response(health.to_json())


def node_gauges(manager: VmManager, pool: AddressPool) -> ReadCollector:
    """VMs by state, pool addresses and capacity: read from the manager and pool when scraped."""

    def vms() -> list[tuple[tuple[str, ...], float]]:
        counts = {s.value: 0 for s in VmState}
        for vm in manager.records():
            counts[vm.state.value] += 1
        return [((state,), n) for state, n in counts.items()]

    def addresses() -> list[tuple[tuple[str, ...], float]]:
        stats = pool.stats()
        return [(("free",), stats.free), (("used",), stats.total - stats.free)]

    def capacity() -> list[tuple[tuple[str, ...], float]]:
        used, total = manager.used(), manager.capacity
        return [
            ((resource, kind), getattr(amount, resource))
            for resource in ("vcpus", "memory_mib", "disk_mib")
            for kind, amount in (("total", total), ("used", used))
        ]

    return ReadCollector([
        Reading("hatchery_vms", "VMs by state.", ("state",), vms),
        Reading("hatchery_pool_addresses", "Addresses in the pool.", ("status",), addresses),
        Reading("hatchery_capacity", "Capacity offered to VMs and used by them.",
              ("resource", "kind"), capacity),
    ])  # fmt: skip


@require("health.read")
async def metrics(request: web.Request) -> web.Response:
    """Every family of ``hatchery.metrics``, in the Prometheus text format (0.0.4)."""
    body = await request.app[CONTEXT].metrics.scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# --- VMs --------------------------------------------------------------------------------
def _create_request(body: Body) -> CreateRequest:
    kernel = body.obj("kernel")
    disk = body.obj("disk")
    kernel_boot = disk_boot = None
    if kernel is not None:
        initrd = kernel.value("initrd")
        kernel_boot = KernelRequest(
            kernel=parse_source(kernel.value("kernel", required=True), "kernel.kernel"),
            initrd=parse_source(initrd, "kernel.initrd") if initrd is not None else None,
            cmdline=str(kernel.text("cmdline", default="console=ttyS0", max_len=4096)),
        )
        kernel.finish("kernel.")
    if disk is not None:
        fmt = disk.choice("format", ("qcow2", "raw"), default="qcow2")
        disk_boot = DiskRequest(parse_source(disk.value("image", required=True), "disk.image"), fmt)
        disk.finish("disk.")
    if (kernel_boot is None) == (disk_boot is None):
        raise BadRequest("give exactly one of kernel (direct kernel boot) or disk", "kernel")
    machine = body.choice("machine", MACHINES, default=DEFAULT_MACHINE)
    request = CreateRequest(
        name=str(body.text("name", required=True, max_len=32)),
        vcpus=body.integer("vcpus", default=1, low=1, high=64),
        memory_mib=body.integer("memory_mib", default=256, low=64, high=1024 * 1024),
        disk_mib=body.integer("disk_mib", default=0, low=0, high=64 * 1024 * 1024),
        bridge=body.text("bridge", max_len=15),
        kernel_boot=kernel_boot,
        disk_boot=disk_boot,
        user_data=str(body.text("user_data", default="", max_len=MAX_USER_DATA)),
        public_keys=body.text_list("public_keys", max_items=16, max_len=8192),
        owner_group=body.text("owner_group", max_len=64),
        machine=machine,
        start=body.flag("start", default=True),
        labels=body.mapping("labels"),
        container=_container(body.obj("container")),
    )
    body.finish()
    return request


def _container(body: Body | None) -> ContainerSpec | None:
    """``{"image": "NAME[:TAG]", "env": {K: V}, "ports": [80]}``: checked here, so a bad
    name or variable is a 400 at create, not a failure inside the VM."""
    if body is None:
        return None
    image = str(body.text("image", required=True, max_len=200))
    try:
        name, tag = check_name(*split_reference(image))
        env = check_env(body.mapping("env", max_items=64))
    except HatcheryError as exc:
        raise BadRequest(exc.message, "container") from None
    ports = body.value("ports") or []
    if (
        not isinstance(ports, list)
        or len(ports) > 16
        or not all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports
        )
    ):
        raise BadRequest("container.ports must be a list of at most 16 ports (1-65535)",
                         "container.ports")  # fmt: skip
    body.finish("container.")
    return ContainerSpec(f"{name}:{tag}", env, tuple(ports))


@require("vm.read", filtered=True)
async def list_vms(request: web.Request) -> web.Response:
    """Only the VMs the caller may read: all with ``vm.read``, else those of its groups."""
    visible = [
        vm
        for vm in request.app[CONTEXT].manager.records()
        if allowed(request, "vm.read", vm.owner_group)
    ]
    return web.json_response({"vms": [vm_view(vm) for vm in visible]})


def _vm(request: web.Request) -> VmRecord:
    """The VM named in the path; ``NotFound`` (404) when there is none."""
    return request.app[CONTEXT].manager.get(request.match_info["name"])


async def vm_owner(request: web.Request, visible: Visible) -> str | None:
    """The owner group of the VM in the path, for the guard. A VM the caller may not see is
    refused with the very error a missing one gets (same status, same body): a tenant
    cannot tell another group's VM from no VM."""
    vm = _vm(request)
    if not visible(vm.owner_group):
        raise NotFound(f"no vm named {vm.name!r}")
    return vm.owner_group


async def owner_in_body(request: web.Request, visible: Visible) -> str | None:
    """The owner group a create asks for: the guard checks that the caller holds a grant
    for *that* group (``vm.manage:own`` under it) or an unscoped ``vm.manage``. The body
    only names the target; it never grants anything.

    Read leniently (a malformed body names no owner, which only an unscoped grant covers):
    the handler validates the body after the guard, so a caller without the permission
    learns nothing from validation errors.
    """
    try:
        owner = (await json_body(request)).peek("owner_group")
    except TooLarge:
        raise
    except BadRequest:
        return None
    return owner if isinstance(owner, str) else None


@require("vm.manage", owner=owner_in_body)
async def create_vm(request: web.Request) -> web.Response:
    create = _create_request(await json_body(request))
    log.info("%s creates vm %s", caller(request).name, create.name)
    manager = request.app[CONTEXT].manager
    vm = await manager.create(create)
    view = vm_view(vm)
    view["limits"] = await asyncio.to_thread(manager.applied_limits, vm)
    return web.json_response(view, status=201)


@require("vm.read", owner=vm_owner, seen_with="vm.read")
async def show_vm(request: web.Request) -> web.Response:
    vm, manager = _vm(request), request.app[CONTEXT].manager
    view = vm_view(vm)
    # what the kernel holds its QEMU to (cgroup files), not what the agent asked for
    view["limits"] = await asyncio.to_thread(manager.applied_limits, vm)
    if vm.container is not None:  # what its init last said on the status port
        view["container_status"] = await manager.container_status(vm)
    return web.json_response(view)


@require("vm.manage", owner=vm_owner, seen_with="vm.read")
async def start_vm(request: web.Request) -> web.Response:
    vm = _vm(request)
    return web.json_response(vm_view(await request.app[CONTEXT].manager.start(vm.name)))


@require("vm.manage", owner=vm_owner, seen_with="vm.read")
async def stop_vm(request: web.Request) -> web.Response:
    vm = _vm(request)
    body = await json_body(request) if request.can_read_body else Body({})
    timeout = body.integer("timeout", default=30, low=0, high=3600)
    force = body.flag("force", default=False)
    body.finish()
    stopped = await request.app[CONTEXT].manager.stop(vm.name, timeout=timeout, force=force)
    return web.json_response(vm_view(stopped))


@require("vm.manage", owner=vm_owner, seen_with="vm.read")
async def destroy_vm(request: web.Request) -> web.Response:
    vm = _vm(request)
    await request.app[CONTEXT].manager.destroy(vm.name)
    return web.json_response({"destroyed": vm.name})


@require("vm.manage", owner=vm_owner, seen_with="vm.read")
async def refresh_vm(request: web.Request) -> web.Response:
    """Move a running VM onto a new QEMU process (live, no guest reboot)."""
    vm = _vm(request)
    log.info("%s refreshes vm %s", caller(request).name, vm.name)
    return web.json_response(vm_view(await request.app[CONTEXT].manager.refresh(vm.name)))


@require("vm.manage", owner=vm_owner, seen_with="vm.read")
async def suspend_vm(request: web.Request) -> web.Response:
    """Save a VM's whole state to its folder and stop its QEMU; a start resumes it."""
    vm = _vm(request)
    log.info("%s suspends vm %s", caller(request).name, vm.name)
    return web.json_response(vm_view(await request.app[CONTEXT].manager.suspend(vm.name)))


@require("vm.read", owner=vm_owner, seen_with="vm.read")
async def console(request: web.Request) -> web.StreamResponse:
    vm = _vm(request)
    try:
        want = min(max(int(request.query.get("bytes", "65536")), 1), 4 * 1024 * 1024)
    except ValueError as exc:
        raise BadRequest("bytes must be an integer", "bytes") from exc
    path: Path = request.app[CONTEXT].manager.console_log(vm.name)
    data = await asyncio.to_thread(_tail, path, want)  # up to 4 MiB: not on the event loop
    # Sent a piece at a time: the TLS transport encrypts what it is given in one go, and
    # 4 MiB held the event loop for 60-190 ms on a fresh 2-core machine (every other
    # request, DHCP and metadata waited; tests/unit/agent/test_api_loop.py).
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    resp.content_length = len(data)
    await resp.prepare(request)
    view = memoryview(data)
    for start in range(0, len(data), CONSOLE_PIECE):
        await resp.write(view[start : start + CONSOLE_PIECE])
    await resp.write_eof()
    return resp


def _tail(path: Path, want: int) -> bytes:
    """The last ``want`` bytes of ``path``; nothing if it does not exist (yet). QEMU writes
    it, in a folder of its own: never read through a symlink it put there, nor a FIFO."""
    try:
        return read_tail(path, want)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        log.warning("console log %s refused: %s", path, exc)
        return b""


@require("vm.manage", owner=vm_owner, seen_with="vm.read")
async def put_user_data(request: web.Request) -> web.Response:
    vm = _vm(request)
    data = await read_body(request, MAX_USER_DATA, field="user_data")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest("user data must be UTF-8 text", "user_data") from exc
    updated = await request.app[CONTEXT].manager.set_user_data(vm.name, text)
    return web.json_response(vm_view(updated))


# --- pool and subnets ------------------------------------------------------------------------
def _ip(body: Body, name: str, required: bool = True) -> ipaddress.IPv4Address | None:
    text = body.text(name, required=required, max_len=15)
    if text is None:
        return None
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise BadRequest(f"{name} is not an IPv4 address", name) from exc


@require("pool.read")
async def list_pool(request: web.Request) -> web.Response:
    pool = request.app[CONTEXT].pool
    stats = pool.stats()
    return web.json_response(
        {"addresses": pool.listing(), "total": stats.total, "free": stats.free}
    )


@require("pool.manage")
async def add_pool(request: web.Request) -> web.Response:
    body = await json_body(request)
    pool = request.app[CONTEXT].pool
    start, end = _ip(body, "start", False), _ip(body, "end", False)
    mac = body.text("mac", max_len=17)
    body.finish()
    if start is None:
        raise BadRequest("start is required", "start")
    if mac is not None:
        if end is not None and end != start:
            raise BadRequest("a MAC can be given only for a single address", "mac")
        added = pool.add_addresses([(start, mac)])
    else:
        added = pool.add_range(start, end or start)
    return web.json_response({"added": added, "free": pool.stats().free})


@require("pool.read")
async def list_subnets(request: web.Request) -> web.Response:
    return web.json_response(
        {"subnets": [s.to_json() for s in request.app[CONTEXT].pool.subnets()]}
    )


@require("pool.manage")
async def add_subnet(request: web.Request) -> web.Response:
    body = await json_body(request)
    bridge = str(body.text("bridge", required=True, max_len=15))
    cidr_text = str(body.text("cidr", required=True, max_len=18))
    gateway = _ip(body, "gateway", False)
    dns_raw = body.text("dns", max_len=255)
    body.finish()
    try:
        cidr = ipaddress.IPv4Network(cidr_text, strict=True)
        dns = tuple(ipaddress.IPv4Address(d) for d in dns_raw.split(",")) if dns_raw else ()
    except ValueError as exc:
        raise BadRequest(str(exc), "cidr") from exc
    added = request.app[CONTEXT].pool.add_subnet(Subnet(bridge, cidr, gateway, dns))
    return web.json_response({"added": added}, status=201 if added else 200)


@require("upgrade.read")
async def upgrade_status(request: web.Request) -> web.Response:
    """``?wait=SECONDS`` (at most 60) holds the answer while an upgrade is running, and no
    longer than this agent runs: a live patch that restarts the agent, or a reboot, answers
    the poll with the status as it is, and the client asks the next agent."""
    ctx = request.app[CONTEXT]
    try:
        wait = min(max(float(request.query.get("wait", "0")), 0.0), 60.0)
    except ValueError as exc:
        raise BadRequest("wait must be a number of seconds", "wait") from exc
    deadline = time.monotonic() + wait
    while ctx.health.upgrade_status().state is Phase.RUNNING:
        left = deadline - time.monotonic()
        if left <= 0 or not await hold(request, min(left, 0.2)):
            break
    return web.json_response(ctx.health.upgrade_status().to_json())


@require("upgrade.manage")
async def start_upgrade(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    asked = _upgrade_request(await json_body(request))
    if ctx.upgrader is None:
        raise Unavailable("upgrades are not enabled on this agent")
    status, answer = await ctx.upgrader.request(asked.version, asked.mode, asked.guard_seconds,
                                                allow_downgrade=asked.allow_downgrade,
                                                refresh_vms=asked.refresh_vms)  # fmt: skip
    log.info("%s asked for an upgrade to %s (%s%s%s): %s", caller(request).name, asked.version,
             asked.mode, ", downgrade allowed" if asked.allow_downgrade else "",
             ", VMs refreshed" if asked.refresh_vms else "", answer.state)  # fmt: skip
    return web.json_response(answer.to_json(), status=status)


def _upgrade_request(body: Body) -> UpgradeRequest:
    """The wire schema's ``UpgradeRequest`` from a body, every field checked."""
    version = str(body.text("version", required=True, max_len=128))
    mode_text = body.choice("mode", tuple(Mode), default=Mode.LIVE)
    guard = body.integer("guard_seconds", default=0, low=0, high=3600)
    allow_downgrade = body.flag("allow_downgrade", default=False)
    refresh_vms = body.flag("refresh_vms", default=False)
    body.finish()
    if 0 < guard < 30:
        raise BadRequest("guard_seconds must be at least 30", "guard_seconds")
    if refresh_vms and mode_text != Mode.LIVE:
        raise BadRequest("refresh_vms is for live mode (a reboot saves and resumes every VM)",
                         "refresh_vms")  # fmt: skip
    return UpgradeRequest(version, Mode(mode_text), guard or None, allow_downgrade, refresh_vms)


def make_app(
    context: ApiContext,
    image_store: images.ImagesContext | None = None,
    *,
    revocations: Revocations | None = None,
    identify: Identify = tls_identity,
    middlewares: tuple[Middleware, ...] = (),
    containers: ContainerStore | None = None,
) -> web.Application:
    """The API app: ``identify`` says who calls (the TLS peer certificate unless a test
    drives the app in-process); the image routes exist when ``image_store`` is given, the CRL
    routes (and the revocation check of callers) when ``revocations`` is."""
    app = new_app(context.policy, identify, middlewares)
    app[CONTEXT] = context
    context.metrics.add(node_gauges(context.manager, context.pool))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", create_vm)
    app.router.add_get("/v1/vms/{name}", show_vm)
    app.router.add_delete("/v1/vms/{name}", destroy_vm)
    app.router.add_post("/v1/vms/{name}/start", start_vm)
    app.router.add_post("/v1/vms/{name}/stop", stop_vm)
    app.router.add_post("/v1/vms/{name}/refresh", refresh_vm)
    app.router.add_post("/v1/vms/{name}/suspend", suspend_vm)
    app.router.add_get("/v1/vms/{name}/console", console)
    app.router.add_put("/v1/vms/{name}/user-data", put_user_data)
    if containers is not None:
        container_routes.add_routes(app, containers)
    live_console.add_routes(app, context.manager, context.consoles)
    logs.add_routes(app, context.logs)
    app.router.add_get("/v1/pool", list_pool)
    app.router.add_post("/v1/pool", add_pool)
    app.router.add_get("/v1/subnets", list_subnets)
    app.router.add_post("/v1/subnets", add_subnet)
    app.router.add_get("/v1/upgrade", upgrade_status)
    app.router.add_post("/v1/upgrade", start_upgrade)
    if image_store is not None:
        images.add_routes(app, image_store)
    if revocations is not None:
        crl.add_routes(app, revocations)
    return app
