"""``GET /v1/vms/{name}/console/attach``: a VM's serial console over a WebSocket.

The guard and every refusal come before the upgrade, as plain HTTP answers with the one
error body: 404 for a VM the caller may not see (exactly as for a missing one), 403 for a
writer without ``vm.console`` on the VM's group, 409 for a VM that is not running or a
console that has a writer already (``?mode=read`` to watch), 503 when its socket cannot be
reached. Then the first frame is a JSON text frame saying the session's role; the guest's
output follows in binary frames of at most ``vms.console.CHUNK`` bytes; the writer's binary
(or text) frames go to the guest, a reader's are ignored. A session the agent ends is closed
with code 4000 and the reason (the VM stopped, the client read too slowly, idle), a detach
with 1000. The bytes and their bounds are ``vms.console``'s; this module only moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Protocol

from aiohttp import WSMsgType, web

from hatchery.api.http import Forbidden, Visible, allowed, caller, require
from hatchery.api.validate import BadRequest
from hatchery.vms.console import Consoles, Session
from hatchery.vms.manager import NotFound
from hatchery.vms.model import VmRecord, VmState, VmStateError

log = logging.getLogger(__name__)

#: How often the agent pings a client; one that does not answer within half of it is gone.
HEARTBEAT = 30.0
#: Close code of a session the agent ended (RFC 6455 §7.4.2: 4000-4999 are the application's).
ENDED = 4000


class ConsoleVms(Protocol):
    """What the console route needs of the VM manager (``vms.manager.VmManager``)."""

    def get(self, name: str) -> VmRecord:
        """:raise NotFound: no VM of that name."""
        ...

    def console_socket(self, name: str) -> tuple[Path, tuple[int, ...]]: ...


_MANAGER: web.AppKey[ConsoleVms] = web.AppKey("console_vms")
_CONSOLES = web.AppKey("consoles", Consoles)


async def _owner(request: web.Request, visible: Visible) -> str | None:
    """As ``app.vm_owner``: a VM the caller may not see answers like a missing one."""
    vm = request.app[_MANAGER].get(request.match_info["name"])
    if not visible(vm.owner_group):
        raise NotFound(f"no vm named {vm.name!r}")
    return vm.owner_group


@require("vm.read", owner=_owner, seen_with="vm.read")
async def attach(request: web.Request) -> web.StreamResponse:
    """``vm.read`` to watch (``?mode=read``), ``vm.console`` too to type (``mode=write``,
    the default)."""
    manager, consoles = request.app[_MANAGER], request.app[_CONSOLES]
    vm = manager.get(request.match_info["name"])
    mode = request.query.get("mode", "write")
    if mode not in ("write", "read"):
        raise BadRequest("mode must be write or read", "mode")
    who = caller(request)
    if mode == "write" and not allowed(request, "vm.console", vm.owner_group):
        raise Forbidden(
            f"{who.name} may not vm.console on vm {vm.name}",
            hint="attach with --read-only to watch its console",
        )
    if vm.state not in (VmState.RUNNING, VmState.PAUSED):
        raise VmStateError(f"vm {vm.name} is {vm.state}: its console is not live",
                           hint=f"hatchery vm console {vm.name} prints its log")  # fmt: skip
    consoles.check(vm.uuid, mode == "write")
    if request.headers.get("Upgrade", "").lower() != "websocket":
        # Every refusal above is a plain answer; a plain GET that passes them all learns so
        # here (clients ask again without upgrading to read why a WebSocket was refused).
        raise BadRequest("this route is a WebSocket (hatchery vm console NAME --attach)")
    path, owners = manager.console_socket(vm.name)
    session = await consoles.attach(vm.name, vm.uuid, path, owners, who.name, mode == "write")
    try:
        ws = web.WebSocketResponse(max_msg_size=consoles.limits.max_input, heartbeat=HEARTBEAT)
        await ws.prepare(request)
    except BaseException:
        session.close()
        raise
    role = "writer" if session.writer else "reader"
    log.info("%s attached to vm %s's console as %s", who.name, vm.name, role)
    try:
        await ws.send_json({"vm": vm.name, "role": role})
        await _relay(ws, session, consoles.limits.idle_timeout)
    finally:
        session.close()
        log.info("%s detached from vm %s's console%s", who.name, vm.name,
                 f" ({session.dropped})" if session.dropped else "")  # fmt: skip
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                if session.dropped:
                    await ws.close(code=ENDED, message=session.dropped.encode()[:120])
                else:
                    await ws.close()
    return ws


async def _relay(ws: web.WebSocketResponse, session: Session, idle: float) -> None:
    """Move bytes until the client goes, the session ends, or nothing moves for ``idle``."""
    loop = asyncio.get_running_loop()
    active = loop.time()

    async def to_client() -> None:
        nonlocal active
        while data := await session.read():
            active = loop.time()
            await ws.send_bytes(data)

    async def from_client() -> None:
        nonlocal active
        while True:
            try:
                msg = await ws.receive(timeout=min(idle, 60.0))
            except TimeoutError:
                if loop.time() - active >= idle:
                    session.close(f"idle for {idle:g}s")
                    return
                continue
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type is WSMsgType.ERROR:  # over max_msg_size, or a broken frame
                session.close(f"dropped: {ws.exception() or 'bad frame'}")
                return
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT) and session.writer:
                data = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
                active = loop.time()
                await session.write(data)

    tasks = [asyncio.create_task(to_client(), name=f"console-out-{session.who}"),
             asyncio.create_task(from_client(), name=f"console-in-{session.who}")]  # fmt: skip
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a client gone mid-send, say


async def _close_all(app: web.Application) -> None:
    app[_CONSOLES].close()


def add_routes(app: web.Application, manager: ConsoleVms, consoles: Consoles) -> None:
    app[_MANAGER] = manager
    app[_CONSOLES] = consoles
    app.router.add_get("/v1/vms/{name}/console/attach", attach)
    app.on_shutdown.append(_close_all)
