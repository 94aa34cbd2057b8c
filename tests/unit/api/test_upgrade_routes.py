"""The upgrade routes: who may read the status, and the downgrade refusal (issue 14).

The real app and the real upgrade controller on a folder standing in for the node's root,
driven in-process (identities from the test resolver, as in conftest). On main
``GET /v1/upgrade`` answered any verified client, and an older version was installed
without a word.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hatchery.addresses import AddressPool
from hatchery.api.app import ApiContext, make_app
from hatchery.api.policy import load_policy
from hatchery.capacity import HostCapacity
from hatchery.health import NodeHealth
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.state import write_json
from hatchery.upgrade.controller import Upgrader
from hatchery.vms.manager import VmManager
from hatchery.wire import Mode, Phase, UpgradeStatus, VmOutcome, VmResult
from tests.support.upgrade_roots import RELEASE, DirImages, root_image, unpack, wait_done
from tests.unit.api.conftest import ADMIN, READER, header_identity, who

NODE = who("node-a", "node")
TENANT = who("walt", "web")
OPS = who("otto", "ops")


class Node:
    def __init__(self, root: Path, upgrader: Upgrader, client: TestClient) -> None:  # type: ignore[type-arg]
        self.root = root
        self.upgrader = upgrader
        self.client = client

    def version(self) -> str:
        return (self.root / "usr/lib/os-release").read_text().strip().split("=", 1)[1]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with serve(tmp_path) as served:
        yield served


@contextlib.asynccontextmanager
async def serve(tmp_path: Path) -> AsyncIterator[Node]:
    root = tmp_path / "root"
    root.mkdir()
    unpack(root_image("v2"), root)  # the node runs v2
    images = DirImages(tmp_path / "images")
    for each in ("v1", "v2"):
        images.add(each, root_image(each))

    def version() -> str:
        return (root / "usr/lib/os-release").read_text().strip().split("=", 1)[1]

    upgrader = Upgrader(tmp_path, images, root, version=version, kernel_release=RELEASE)
    with AddressPool(tmp_path / "pool.db") as pool:
        manager = VmManager(tmp_path, pool, HostCapacity(1, 1, 1), AccelChoice(Accel.TCG, "t"))
        health = NodeHealth(upgrades=upgrader)
        context = ApiContext(manager, pool, load_policy(None), health, time.time(), upgrader)
        app = make_app(context, identify=header_identity)
        async with TestClient(TestServer(app)) as client:
            yield Node(root, upgrader, client)
        await upgrader.close()


CALLERS = [(ADMIN, 200), (OPS, 200), (READER, 200), (NODE, 403), (TENANT, 403)]


@pytest.mark.parametrize(("headers", "status"), CALLERS)
async def test_the_upgrade_status_needs_upgrade_read(
    node: Node, headers: dict[str, str], status: int
) -> None:
    resp = await node.client.get("/v1/upgrade", headers=headers)
    assert resp.status == status, await resp.text()
    if status == 403:
        assert "may not upgrade.read" in (await resp.json())["error"]
    else:
        assert (await resp.json())["state"] == "idle"


async def test_a_downgrade_is_refused_with_both_versions_and_the_hint(node: Node) -> None:
    resp = await node.client.post("/v1/upgrade", json={"version": "v1"}, headers=ADMIN)
    assert resp.status == 409
    body = await resp.json()
    assert "v1 is older than the running v2" in body["error"]
    assert "allow_downgrade" in body["hint"]
    assert node.version() == "v2" and node.upgrader.status.state.value == "idle"


async def test_a_downgrade_goes_through_when_the_request_allows_it(node: Node) -> None:
    body = {"version": "v1", "mode": "live", "allow_downgrade": True}
    resp = await node.client.post("/v1/upgrade", json=body, headers=ADMIN)
    assert resp.status == 202, await resp.text()
    await wait_done(node.upgrader)
    assert node.version() == "v1" and node.upgrader.status.state.value == "done"


async def test_allow_downgrade_must_be_a_boolean(node: Node) -> None:
    body = {"version": "v1", "allow_downgrade": "yes"}
    resp = await node.client.post("/v1/upgrade", json=body, headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["field"] == "allow_downgrade"


async def test_the_vm_report_of_a_reboot_is_served(tmp_path: Path) -> None:
    """After a reboot upgrade, ``GET /v1/upgrade`` and ``/healthz``'s ``upgrade`` say what
    became of each VM (the status as the controller persisted it)."""
    vms = [
        {"name": "web1", "result": "resumed", "pause_seconds": 41.2, "reason": None},
        {"name": "db1", "result": "cold-started", "pause_seconds": None,
         "reason": "resume failed: its state file is missing; cold-started"},
    ]  # fmt: skip
    write_json(tmp_path / "upgrade.json", {"state": "done", "target": "v2", "mode": "reboot",
                                           "detail": "rebooted into v2", "vms": vms})  # fmt: skip
    async with serve(tmp_path) as node:
        resp = await node.client.get("/v1/upgrade", headers=READER)
        assert resp.status == 200 and (await resp.json())["vms"] == vms
        health = await (await node.client.get("/healthz", headers=READER)).json()
        assert health["upgrade"]["vms"] == vms


async def test_refresh_vms_is_taken_in_live_mode_and_refused_with_a_reboot(node: Node) -> None:
    reboot = {"version": "v1", "mode": "reboot", "allow_downgrade": True, "refresh_vms": True}
    resp = await node.client.post("/v1/upgrade", json=reboot, headers=ADMIN)
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["field"] == "refresh_vms"
    resp = await node.client.post("/v1/upgrade", json={"version": "v1", "refresh_vms": 1},
                                  headers=ADMIN)  # fmt: skip
    assert resp.status == 400 and (await resp.json())["field"] == "refresh_vms"
    assert node.upgrader.status.state.value == "idle"
    live = {"version": "v1", "mode": "live", "allow_downgrade": True, "refresh_vms": True}
    resp = await node.client.post("/v1/upgrade", json=live, headers=ADMIN)
    assert resp.status == 202, await resp.text()
    await wait_done(node.upgrader)
    status = node.upgrader.status
    assert status.state.value == "done" and status.vms == ()  # no VM runs on this node
    assert status.detail is not None and status.detail.endswith("no VMs to refresh")


async def test_healthz_gives_the_per_vm_report_only_to_upgrade_readers(tmp_path: Path) -> None:
    """Any verified client reads /healthz; the upgrade's VM report names every tenant's VMs
    and its error quotes them: a tenant sees the phase and target, not those."""
    report = UpgradeStatus(
        state=Phase.FAILED, target="v2", mode=Mode.REBOOT, error="vm other-tenant-db: resume "
        "failed, state kept in /data/vms/other-tenant-db/suspend-failed.state",
        detail="fallback", vms=(VmOutcome("other-tenant-db", VmResult.COLD_STARTED, reason="x"),),
    )  # fmt: skip
    write_json(tmp_path / "upgrade.json", report.to_json())
    async with serve(tmp_path) as node:
        for headers, full in ((ADMIN, True), (OPS, True), (TENANT, False), (NODE, False)):
            resp = await node.client.get("/healthz", headers=headers)
            assert resp.status == 200
            text = await resp.text()
            upgrade = (await resp.json())["upgrade"]
            assert (upgrade["state"], upgrade["target"]) == ("failed", "v2")
            assert ("other-tenant-db" in text) is full, headers
            if not full:
                assert (upgrade["vms"], upgrade["error"], upgrade["detail"]) == ([], None, None)
