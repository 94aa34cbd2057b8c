"""Request paths never block the event loop: the API in-process under asyncio's debug mode.

asyncio in debug mode logs every callback that holds the loop longer than
``slow_callback_duration``. The API app is served in-process over mutual TLS (aiohttp's test
server and client), ``/healthz`` asks a stand-in ``systemctl`` that takes 0.3 s to answer,
and the console route reads a 4 MiB log: any of that on the loop shows up as a slow callback.

A busy test machine can stall any callback now and then; real blocking stalls every round.
So a scenario counts as blocking only if each of ``ROUNDS`` rounds logged a slow callback, and
a control run with a health source that blocks on purpose proves the detector sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hatchery import host
from hatchery.addresses import AddressPool, Subnet
from hatchery.api.app import ApiContext, HealthSource, make_app
from hatchery.api.policy import load_policy
from hatchery.capacity import HostCapacity
from hatchery.config import VmSourcesConfig
from hatchery.health import NodeHealth
from hatchery.pki import client_context, server_context
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery.vms.sources import SourceFetcher
from hatchery.wire import BootStatus, UpgradeStatus
from hatchery_lab.agent import Pki

SLOW = 0.05  # seconds a callback may hold the loop
# Fresh-clone CI runs saw stalls of 55-253 ms in every round, put down to load at first: it
# was the console route handing 4 MiB to the TLS transport at once (now sent in pieces).
ROUNDS = 6
CONSOLE_BYTES = 4 * 1024 * 1024

Scenario = Callable[[TestClient], Awaitable[None]]


@dataclass
class Api:
    tmp: Path
    pki: Pki
    systemctl: Path

    @contextlib.asynccontextmanager
    async def serve(self, health: HealthSource) -> AsyncIterator[TestClient]:
        with AddressPool(self.tmp / "pool.db") as pool:
            if not pool.subnets():
                pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
                pool.add_range(
                    ipaddress.IPv4Address("10.5.0.10"), ipaddress.IPv4Address("10.5.0.19")
                )
            capacity = HostCapacity(8, 4096, 10_000)
            sources = SourceFetcher(VmSourcesConfig(folders=(self.tmp,)))  # make_vm's kernel
            manager = VmManager(self.tmp, pool, capacity, AccelChoice(Accel.TCG, "test"),
                                sources=sources)  # fmt: skip
            app = make_app(ApiContext(manager, pool, load_policy(None), health, time.time()))
            server = TestServer(app, host="127.0.0.1")
            await server.start_server(ssl=server_context(self.pki.ca, self.pki.server.cert,
                                                         self.pki.server.key))  # fmt: skip
            admin = self.pki.client("admin", "admin")
            connector = aiohttp.TCPConnector(ssl=client_context(self.pki.ca, admin.cert, admin.key))
            client = TestClient(server, connector=connector)
            await client.start_server()
            try:
                yield client
            finally:
                await client.close()


@pytest.fixture
def api(tmp_path: Path) -> Api:
    systemctl = tmp_path / "systemctl"
    systemctl.write_text("#!/bin/sh\nsleep 0.3\necho 'hatchery-dhcp.service loaded failed'\n")
    systemctl.chmod(0o755)
    return Api(tmp_path, Pki.make(tmp_path / "pki"), systemctl)


async def slow_callbacks(
    client: TestClient, scenario: Scenario, caplog: pytest.LogCaptureFixture
) -> list[str]:
    """Run ``scenario`` under debug mode; the slow callbacks asyncio logged ([] if none in
    one of the rounds)."""
    loop = asyncio.get_running_loop()
    debug, threshold = loop.get_debug(), loop.slow_callback_duration
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW
    seen: list[str] = []
    try:
        for _ in range(ROUNDS):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="asyncio"):
                await scenario(client)
            slow = [r.getMessage() for r in caplog.records
                    if r.name == "asyncio" and "took" in r.getMessage()]  # fmt: skip
            if not slow:
                return []
            seen += slow
    finally:
        loop.set_debug(debug)
        loop.slow_callback_duration = threshold
    return seen


async def health_and_console(client: TestClient) -> None:
    async def healthz() -> None:
        async with client.get("/healthz") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["checks"]["units"] == "fail: hatchery-dhcp.service", body

    await asyncio.gather(*(healthz() for _ in range(3)))
    async with client.get(f"/v1/vms/web1/console?bytes={CONSOLE_BYTES}") as resp:
        assert resp.status == 200
        data = await resp.read()
    assert len(data) == CONSOLE_BYTES and data.endswith(b"the end\n")


async def make_vm(client: TestClient, tmp: Path) -> None:
    kernel = tmp / "kernel"
    kernel.write_bytes(b"not really a kernel")
    body = {"name": "web1", "kernel": {"kernel": str(kernel)}, "start": False}
    async with client.post("/v1/vms", json=body) as resp:
        assert resp.status == 201, await resp.text()
    log = tmp / "vms" / "web1" / "console.log"
    log.write_bytes(b"x" * (CONSOLE_BYTES + 4096 - 8) + b"the end\n")


async def test_healthz_and_console_do_not_block_the_loop(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    units = functools.partial(host.failed_units, str(api.systemctl))
    health = NodeHealth("v1", failed_units=units, cache_seconds=0)  # ask on every request
    async with api.serve(health) as client:
        await make_vm(client, api.tmp)
        slow = await slow_callbacks(client, health_and_console, caplog)
    assert slow == [], f"the event loop was blocked in every round: {slow}"


class BlockingHealth:
    """A health source that does what /healthz used to: systemctl run synchronously."""

    def version(self) -> str:
        return "v1"

    async def checks(self) -> dict[str, str]:
        time.sleep(0.3)  # the old subprocess.run(["systemctl", ...]) on the loop
        return {"units": "fail: hatchery-dhcp.service"}

    def upgrade_status(self) -> UpgradeStatus:
        return UpgradeStatus()

    def boot_status(self) -> BootStatus:
        return BootStatus()

    def free_bytes(self) -> int | None:
        return None


async def test_the_detector_sees_a_blocking_health_check(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    async with api.serve(BlockingHealth()) as client:
        await make_vm(client, api.tmp)
        slow = await slow_callbacks(client, health_and_console, caplog)
    assert slow and all("took" in line for line in slow)


async def test_healthz_shares_one_systemctl_and_caches_it(tmp_path: Path) -> None:
    calls: list[float] = []

    async def units() -> list[str] | None:
        calls.append(time.monotonic())
        await asyncio.sleep(0.1)
        return ["a.service"] if len(calls) > 1 else []

    health = NodeHealth("v1", failed_units=units, cache_seconds=0.5)
    answers = await asyncio.gather(*(health.checks() for _ in range(5)))
    assert answers == [{"units": "ok"}] * 5 and len(calls) == 1, "callers share one question"
    assert await health.checks() == {"units": "ok"} and len(calls) == 1, "cached"
    await asyncio.sleep(0.5)
    assert await health.checks() == {"units": "fail: a.service"} and len(calls) == 2


async def test_a_systemd_that_does_not_answer_is_a_failing_check(tmp_path: Path) -> None:
    systemctl = tmp_path / "systemctl"
    systemctl.write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
    systemctl.chmod(0o755)
    health = NodeHealth(failed_units=functools.partial(host.failed_units, str(systemctl)))
    checks = await health.checks()
    assert checks["units"].startswith("fail: cannot ask systemd: ")
    assert "Failed to connect to bus" in checks["units"]
