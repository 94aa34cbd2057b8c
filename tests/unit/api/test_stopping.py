"""Answers held open end when the agent begins to stop, so they never hold its restart.

aiohttp's graceful stop waits for every answer in flight (60 s, then 60 s more once it has
cancelled them), longer than systemd waits before it kills the agent. On main a
``GET /v1/upgrade?wait=`` held an agent's stop for up to its wait (a live patch that
restarts the agent, and with it the rollout, stalled about 30 s a host), and one
``hatchery logs --follow`` held it for two minutes. The real API app on a test server; the
upgrade in flight is a stand-in for the controller (``health.UpgradeView``), since what is
tested is the route's wait, not an upgrade. A follow across a real agent's restart:
``tests/integration/agent/test_logs.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Middleware

from hatchery.addresses import AddressPool
from hatchery.api.app import ApiContext, make_app
from hatchery.api.http import Handler
from hatchery.api.policy import load_policy
from hatchery.capacity import HostCapacity
from hatchery.health import NodeHealth
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery.wire import BootStatus, Mode, Phase, UpgradeStatus
from tests.unit.api.conftest import ADMIN, header_identity


class _Installing:
    """An upgrade to v3 that is still running, as the controller shows one."""

    status = UpgradeStatus(state=Phase.RUNNING, target="v3", mode=Mode.LIVE, started=1.0)

    def running_version(self) -> str:
        return "v2"

    def boot_status(self) -> BootStatus:
        return BootStatus()


@contextlib.asynccontextmanager
async def _installing(
    tmp_path: Path, *middlewares: Middleware
) -> AsyncIterator[tuple[TestServer, TestClient]]:  # type: ignore[type-arg]
    """The API app of a node whose upgrade is still running, on a test server."""
    with AddressPool(tmp_path / "pool.db") as pool:
        manager = VmManager(tmp_path, pool, HostCapacity(1, 1, 1), AccelChoice(Accel.TCG, "t"))
        health = NodeHealth(upgrades=_Installing())
        context = ApiContext(manager, pool, load_policy(None), health, time.time())
        app = make_app(context, identify=header_identity, middlewares=middlewares)
        server = TestServer(app)
        async with TestClient(server) as client:
            yield server, client


async def test_a_long_poll_is_answered_when_the_agent_stops(tmp_path: Path) -> None:
    entered = asyncio.Event()

    @web.middleware
    async def seen(request: web.Request, handler: Handler) -> web.StreamResponse:
        entered.set()
        return await handler(request)

    async with _installing(tmp_path, seen) as (server, client):
        poll = asyncio.create_task(client.get("/v1/upgrade?wait=60", headers=ADMIN))
        await asyncio.wait_for(entered.wait(), 30)
        # The stop, as the agent's: the runner cleaned up. A deadline to fail by: on main
        # the poll held it for its whole wait (60 s), then it would have been cut.
        await asyncio.wait_for(server.runner.cleanup(), 20)
        answer = await asyncio.wait_for(poll, 5)
        assert answer.status == 200
        body = await answer.json()
        assert body["state"] == "running" and body["target"] == "v3"


async def test_a_long_poll_still_waits_while_the_agent_runs(tmp_path: Path) -> None:
    async with _installing(tmp_path) as (_, client):
        asked = time.monotonic()
        answer = await client.get("/v1/upgrade?wait=0.6", headers=ADMIN)
        assert answer.status == 200 and (await answer.json())["state"] == "running"
        assert time.monotonic() - asked >= 0.6  # held for its wait: nothing stopped it
