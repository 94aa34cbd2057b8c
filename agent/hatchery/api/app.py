"""The agent API: aiohttp over HTTPS with mutual TLS (see docs/api.md).

Every request carries a verified client certificate (the TLS layer refuses connections
without one); the identity middleware turns it into an ``Identity`` and each handler asks
the policy for one permission. Errors are JSON with a human message; malformed input is a
400 naming the field and changes nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from hatchery.addresses import AddressPool, PoolError, Subnet
from hatchery.api.policy import Policy
from hatchery.api.validate import BadRequest, Body
from hatchery.capacity import CapacityError
from hatchery.errors import HatcheryError
from hatchery.pki import Identity, identity_from_peercert
from hatchery.upgrade.controller import UpgradeError, Upgrader
from hatchery.vms.manager import CreateRequest, NotFound, VmError, VmManager
from hatchery.vms.model import DiskBoot, KernelBoot, VmRecord, VmState, VmStateError
from hatchery.wire import BootStatus, Health, Mode, Phase, UpgradeStatus

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024
MAX_USER_DATA = 256 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HealthSource(Protocol):
    """What /healthz needs beyond VMs: the image version and extra checks (units, upgrade)."""

    def version(self) -> str: ...

    async def checks(self) -> dict[str, str]:
        """Named checks, ``ok`` or ``fail: <why>``; awaited, so it must not block the loop."""
        ...

    def upgrade_status(self) -> UpgradeStatus: ...

    def boot_status(self) -> BootStatus: ...


@dataclass(frozen=True, slots=True)
class ApiContext:
    manager: VmManager
    pool: AddressPool
    policy: Policy
    health: HealthSource
    started: float
    upgrader: Upgrader | None = None


CONTEXT = web.AppKey("context", ApiContext)
IDENTITY = web.RequestKey("identity", Identity)


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status)


class TooLarge(BadRequest):
    """The body is over the size limit."""


_STATUS: tuple[tuple[type[HatcheryError], int], ...] = (
    (TooLarge, 413),
    (BadRequest, 400),
    (NotFound, 404),
    (VmStateError, 409),
    (CapacityError, 409),
    (PoolError, 409),
    (VmError, 400),
)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason or "error")
    except UpgradeError as exc:
        return _error(exc.status, exc.message + (f" (hint: {exc.hint})" if exc.hint else ""))
    except HatcheryError as exc:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
        if status == 500:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return _error(status, exc.message, getattr(exc, "field", None))
    except Exception:
        log.exception("%s %s: internal error", request.method, request.path)
        return _error(500, "internal error (see the agent's log)")


@web.middleware
async def identity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    who = identity_from_peercert(ssl_object.getpeercert()) if ssl_object is not None else None
    if who is None:
        return _error(401, "a client certificate is required")
    request[IDENTITY] = who
    return await handler(request)


def _require(request: web.Request, permission: str, owner_group: str | None = None) -> Identity:
    who: Identity = request[IDENTITY]
    if not request.app[CONTEXT].policy.allows(who, permission, owner_group):
        groups = ", ".join(sorted(who.groups)) or "none"
        raise web.HTTPForbidden(reason=f"{who.name} (groups: {groups}) may not {permission}")
    return who


async def _json_body(request: web.Request) -> Body:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise TooLarge(f"the body is larger than {MAX_BODY} bytes")
    try:
        data = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    return Body(data)


def vm_view(vm: VmRecord, now: float | None = None) -> dict[str, Any]:
    """A VM as the API shows it: no user data (it may hold secrets), uptime added."""
    data = vm.to_json()
    data.pop("user_data", None)
    data["has_user_data"] = bool(vm.user_data)
    live = vm.state in (VmState.RUNNING, VmState.PAUSED) and vm.started
    data["uptime"] = round((now or time.time()) - vm.started, 1) if live and vm.started else None
    return data


# --- health and metrics -----------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    counts = {s.value: 0 for s in VmState}
    for vm in ctx.manager.records():
        counts[vm.state.value] += 1
    checks = {"agent": "ok", **await ctx.health.checks()}
    checks["vms"] = "ok" if counts["crashed"] == 0 else f"fail: {counts['crashed']} crashed"
    health = Health(
        version=ctx.health.version(),
        healthy=all(v == "ok" for v in checks.values()),
        checks=checks,
        vms={"total": sum(counts.values()), **counts},
        upgrade=ctx.health.upgrade_status(),
        boot=ctx.health.boot_status(),
        uptime=round(time.time() - ctx.started, 1),
    )
    return web.json_response(health.to_json())


async def metrics(request: web.Request) -> web.Response:
    _require(request, "health.read")
    ctx = request.app[CONTEXT]
    counts = {s.value: 0 for s in VmState}
    for vm in ctx.manager.records():
        counts[vm.state.value] += 1
    used, cap, pool = ctx.manager.used(), ctx.manager.capacity, ctx.pool.stats()
    lines = ["# HELP hatchery_vms VMs by state.", "# TYPE hatchery_vms gauge"]
    lines += [f'hatchery_vms{{state="{s}"}} {n}' for s, n in counts.items()]
    lines += [
        "# HELP hatchery_pool_addresses Addresses in the pool.",
        "# TYPE hatchery_pool_addresses gauge",
        f'hatchery_pool_addresses{{status="free"}} {pool.free}',
        f'hatchery_pool_addresses{{status="used"}} {pool.total - pool.free}',
        "# HELP hatchery_capacity Capacity offered to VMs and used by them.",
        "# TYPE hatchery_capacity gauge",
        f'hatchery_capacity{{resource="vcpus",kind="total"}} {cap.vcpus}',
        f'hatchery_capacity{{resource="vcpus",kind="used"}} {used.vcpus}',
        f'hatchery_capacity{{resource="memory_mib",kind="total"}} {cap.memory_mib}',
        f'hatchery_capacity{{resource="memory_mib",kind="used"}} {used.memory_mib}',
        f'hatchery_capacity{{resource="disk_mib",kind="total"}} {cap.disk_mib}',
        f'hatchery_capacity{{resource="disk_mib",kind="used"}} {used.disk_mib}',
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


# --- VMs --------------------------------------------------------------------------------
def _create_request(body: Body) -> CreateRequest:
    kernel = body.obj("kernel")
    disk = body.obj("disk")
    kernel_boot = disk_boot = None
    if kernel is not None:
        kernel_boot = KernelBoot(
            kernel=str(kernel.text("kernel", required=True, max_len=4096)),
            initrd=kernel.text("initrd", max_len=4096),
            cmdline=str(kernel.text("cmdline", default="console=ttyS0", max_len=4096)),
        )
        kernel.finish("kernel.")
    if disk is not None:
        fmt = str(disk.text("format", default="qcow2"))
        if fmt not in ("qcow2", "raw"):
            raise BadRequest("disk.format must be qcow2 or raw", "disk.format")
        disk_boot = DiskBoot(str(disk.text("image", required=True, max_len=4096)), fmt)
        disk.finish("disk.")
    if (kernel_boot is None) == (disk_boot is None):
        raise BadRequest("give exactly one of kernel (direct kernel boot) or disk", "kernel")
    machine = str(body.text("machine", default="q35"))
    if machine not in ("q35", "pc", "microvm"):
        raise BadRequest("machine must be q35, pc or microvm", "machine")
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
    )
    body.finish()
    return request


async def list_vms(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    who: Identity = request[IDENTITY]
    visible = [
        vm for vm in ctx.manager.records() if ctx.policy.allows(who, "vm.read", vm.owner_group)
    ]
    return web.json_response({"vms": [vm_view(vm) for vm in visible]})


def _vm_for(request: web.Request, permission: str) -> VmRecord:
    vm = request.app[CONTEXT].manager.get(request.match_info["name"])
    _require(request, permission, vm.owner_group)
    return vm


async def create_vm(request: web.Request) -> web.Response:
    create = _create_request(await _json_body(request))
    who = _require(request, "vm.manage", create.owner_group)
    log.info("%s creates vm %s", who.name, create.name)
    vm = await request.app[CONTEXT].manager.create(create)
    return web.json_response(vm_view(vm), status=201)


async def show_vm(request: web.Request) -> web.Response:
    return web.json_response(vm_view(_vm_for(request, "vm.read")))


async def start_vm(request: web.Request) -> web.Response:
    vm = _vm_for(request, "vm.manage")
    return web.json_response(vm_view(await request.app[CONTEXT].manager.start(vm.name)))


async def stop_vm(request: web.Request) -> web.Response:
    vm = _vm_for(request, "vm.manage")
    body = await _json_body(request) if request.can_read_body else Body({})
    timeout = body.integer("timeout", default=30, low=0, high=3600)
    force = body.flag("force", default=False)
    body.finish()
    stopped = await request.app[CONTEXT].manager.stop(vm.name, timeout=timeout, force=force)
    return web.json_response(vm_view(stopped))


async def destroy_vm(request: web.Request) -> web.Response:
    vm = _vm_for(request, "vm.manage")
    await request.app[CONTEXT].manager.destroy(vm.name)
    return web.json_response({"destroyed": vm.name})


async def console(request: web.Request) -> web.Response:
    vm = _vm_for(request, "vm.read")
    try:
        want = min(max(int(request.query.get("bytes", "65536")), 1), 4 * 1024 * 1024)
    except ValueError as exc:
        raise BadRequest("bytes must be an integer", "bytes") from exc
    path: Path = request.app[CONTEXT].manager.console_log(vm.name)
    data = await asyncio.to_thread(_tail, path, want)  # up to 4 MiB: not on the event loop
    return web.Response(body=data, content_type="text/plain", charset="utf-8")


def _tail(path: Path, want: int) -> bytes:
    """The last ``want`` bytes of ``path``; nothing if it does not exist (yet)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(size - want, 0))
            return f.read()
    except FileNotFoundError:
        return b""


async def put_user_data(request: web.Request) -> web.Response:
    vm = _vm_for(request, "vm.manage")
    data = await request.read()
    if len(data) > MAX_USER_DATA:
        raise TooLarge(f"user data is larger than {MAX_USER_DATA} bytes", "user_data")
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


async def list_pool(request: web.Request) -> web.Response:
    _require(request, "pool.read")
    pool = request.app[CONTEXT].pool
    stats = pool.stats()
    return web.json_response(
        {"addresses": pool.listing(), "total": stats.total, "free": stats.free}
    )


async def add_pool(request: web.Request) -> web.Response:
    _require(request, "pool.manage")
    body = await _json_body(request)
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


async def list_subnets(request: web.Request) -> web.Response:
    _require(request, "pool.read")
    return web.json_response(
        {"subnets": [s.to_json() for s in request.app[CONTEXT].pool.subnets()]}
    )


async def add_subnet(request: web.Request) -> web.Response:
    _require(request, "pool.manage")
    body = await _json_body(request)
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


async def upgrade_status(request: web.Request) -> web.Response:
    """``?wait=SECONDS`` (at most 60) holds the answer while an upgrade is running."""
    ctx = request.app[CONTEXT]
    try:
        wait = min(max(float(request.query.get("wait", "0")), 0.0), 60.0)
    except ValueError as exc:
        raise BadRequest("wait must be a number of seconds", "wait") from exc
    deadline = time.monotonic() + wait
    while ctx.health.upgrade_status().state is Phase.RUNNING and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return web.json_response(ctx.health.upgrade_status().to_json())


async def start_upgrade(request: web.Request) -> web.Response:
    _require(request, "upgrade.manage")
    ctx = request.app[CONTEXT]
    body = await _json_body(request)
    version = str(body.text("version", required=True, max_len=128))
    mode_text = str(body.text("mode", default="live"))
    guard = body.integer("guard_seconds", default=0, low=0, high=3600)
    body.finish()
    if 0 < guard < 30:
        raise BadRequest("guard_seconds must be at least 30", "guard_seconds")
    if mode_text not in (Mode.LIVE, Mode.REBOOT):
        raise BadRequest("mode must be live or reboot", "mode")
    if ctx.upgrader is None:
        raise web.HTTPServiceUnavailable(reason="upgrades are not enabled on this agent")
    status, answer = await ctx.upgrader.request(version, Mode(mode_text), guard or None)
    log.info("%s asked for an upgrade to %s (%s): %s", request[IDENTITY].name, version,
             mode_text, answer.state)  # fmt: skip
    return web.json_response(answer.to_json(), status=status)


def make_app(context: ApiContext) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY, middlewares=[errors_middleware, identity_middleware]
    )
    app[CONTEXT] = context
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", create_vm)
    app.router.add_get("/v1/vms/{name}", show_vm)
    app.router.add_delete("/v1/vms/{name}", destroy_vm)
    app.router.add_post("/v1/vms/{name}/start", start_vm)
    app.router.add_post("/v1/vms/{name}/stop", stop_vm)
    app.router.add_get("/v1/vms/{name}/console", console)
    app.router.add_put("/v1/vms/{name}/user-data", put_user_data)
    app.router.add_get("/v1/pool", list_pool)
    app.router.add_post("/v1/pool", add_pool)
    app.router.add_get("/v1/subnets", list_subnets)
    app.router.add_post("/v1/subnets", add_subnet)
    app.router.add_get("/v1/upgrade", upgrade_status)
    app.router.add_post("/v1/upgrade", start_upgrade)
    return app
