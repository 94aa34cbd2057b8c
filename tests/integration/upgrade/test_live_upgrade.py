"""Live upgrades end to end on loopback: signed images published to two real agents, then
``hatchery-rollout`` upgrades both in live mode, health-gated. Each agent patches a directory
standing in for its root (the real root is patched inside a booted image: tests/image)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hatchery.client import AgentClient, ApiError, Credentials
from hatchery.images.signing import generate_key
from hatchery_lab.agent import AgentProcess, Pki
from tests.support.live_images import build, root
from tests.support.upgrade_roots import unpack

BIN = Path(sys.executable).parent


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[list[AgentProcess], Path, Path]]:
    pki = Pki.make(tmp_path / "pki")
    key = generate_key(tmp_path / "keys", "fleet")
    builds = [build(tmp_path, v, key.private) for v in ("v1", "v2")]
    agents = []
    try:
        for name in ("hv1", "hv2"):
            node = tmp_path / name
            node.mkdir()
            (node / "root").mkdir()
            unpack(root("v1"), node / "root")
            agent = AgentProcess.configure(node, pki, [], root=str(node / "root"),
                                           image_keys=str(key.public.parent))  # fmt: skip
            agent.start(timeout=120)
            agents.append(agent)
            for b in builds:
                agent.cli("image", "publish", str(b))
        yield agents, tmp_path, builds[1]
    finally:
        for agent in agents:
            agent.kill()


def test_rollout_live_upgrades_two_agents(fleet: tuple[list[AgentProcess], Path, Path]) -> None:
    agents, tmp, _ = fleet
    assert [a.cli_json("health")["version"] for a in agents] == ["v1", "v1"]
    admin = agents[0].pki.client("admin", "admin")
    inventory = tmp / "fleet.yaml"
    inventory.write_text(yaml.safe_dump({"hosts": [
        {"name": f"hv{i + 1}", "address": f"127.0.0.1:{a.port}", "location": f"lab/r{i}"}
        for i, a in enumerate(agents)
    ]}))  # fmt: skip
    result = subprocess.run(
        [str(BIN / "hatchery-rollout"), "run", "--fleet", str(inventory), "--version", "v2",
         "--mode", "live", "--journal", str(tmp / "journal.jsonl"), "--ca", str(agents[0].pki.ca),
         "--cert", str(admin.cert), "--key", str(admin.key), "--poll-interval", "0.2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for agent in agents:
        health = agent.cli_json("health")
        assert health["version"] == "v2" and health["upgrade"]["state"] == "done"
        assert (agent.config_path.parent / "root/etc/motd").read_text() == "Hatchery v2\n"
        assert agent.cli_json("image", "list")["current"] == "v2"
    # Again: every host is already on v2, nothing is done twice.
    again = subprocess.run(
        [str(BIN / "hatchery-rollout"), "run", "--fleet", str(inventory), "--version", "v2",
         "--journal", str(tmp / "journal2.jsonl"), "--ca", str(agents[0].pki.ca),
         "--cert", str(admin.cert), "--key", str(admin.key)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr


def test_upgrade_refusals_over_the_api(fleet: tuple[list[AgentProcess], Path, Path]) -> None:
    agents, _, _ = fleet
    admin = agents[0].pki.client("admin", "admin")
    reader = agents[0].pki.client("viewer", "reader")

    async def go() -> None:
        url = f"127.0.0.1:{agents[0].port}"
        async with AgentClient(url, Credentials(agents[0].pki.ca, reader.cert, reader.key)) as c:
            with pytest.raises(ApiError) as err:
                await c.request("POST", "/v1/upgrade", json={"version": "v2"})
            assert err.value.status == 403
        async with AgentClient(url, Credentials(agents[0].pki.ca, admin.cert, admin.key)) as c:
            with pytest.raises(ApiError) as err:
                await c.request("POST", "/v1/upgrade", json={"version": "v7", "mode": "live"})
            assert err.value.status == 404
            with pytest.raises(ApiError) as err:
                await c.request("POST", "/v1/upgrade", json={"version": "v2", "mode": "sideways"})
            assert err.value.status == 400
            same = await c.request("POST", "/v1/upgrade", json={"version": "v1", "mode": "live"})
            assert "nothing to do" in same["detail"]

    asyncio.run(go())
    assert agents[0].cli_json("health")["version"] == "v1"
