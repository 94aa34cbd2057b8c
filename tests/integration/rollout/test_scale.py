"""The rollout's connections at scale: each host's requests share one connection that the
last one closes.

Real simulated agents (hatchery_rollout.simfleet, mutual TLS on loopback) count open
connections and requests; the clients are the tool's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from hatchery.pki import client_context
from hatchery.wire import Mode, UpgradeRequest
from hatchery_rollout import preflight
from hatchery_rollout.client import AgentClient
from hatchery_rollout.inventory import load_fleet
from tests.integration.rollout.conftest import SimFleet, Tls

HOSTS = 40


def _open_connections(sim: SimFleet, *, settle: float = 5.0) -> int:
    """Client connections the agents hold, once closes in flight have landed."""
    deadline = time.monotonic() + settle
    while True:
        url = f"http://127.0.0.1:{sim.admin}/connections"
        with urllib.request.urlopen(url, timeout=10) as r:
            n = int(json.loads(r.read())["open"])
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def test_survey_and_upgrade_each_use_one_connection_a_host_and_close_it(
    simfleet: Callable[..., SimFleet], tls: Tls
) -> None:
    sim = simfleet(HOSTS, upgrade_delay=0.02)
    hosts = load_fleet(sim.fleet).hosts
    ctx = client_context(tls.ca, tls.client_cert, tls.client_key)

    async def survey() -> dict[str, preflight.HostFacts]:
        # A long keep-alive: only the survey's own closing can leave no connection open.
        async with AgentClient(ctx, connections=8, keepalive=60.0) as c:
            facts = await preflight.gather(c, hosts, 8)
            assert _open_connections(sim) == 0
            return facts

    facts = asyncio.run(survey())
    assert all(f.health is not None and f.images is not None for f in facts.values())

    async def upgrade() -> None:
        async with AgentClient(ctx, connections=8, keepalive=60.0) as c:
            for host in hosts:
                await c.health(host)
                posted = await c.upgrade(host, UpgradeRequest("v2", Mode.LIVE))
                assert posted.status == 202, host.name
                await c.health(host, close=True)

    asyncio.run(upgrade())
    stats = sim.stats()
    for name, s in stats.items():
        # health, images (survey); health, POST, health (the upgrade): one connection each
        assert (s["requests"], s["connections"]) == (5, 2), (name, s)
        assert s["upgrades"] == 1, (name, s)
    assert _open_connections(sim) == 0


def test_a_host_costs_six_requests_and_waves_start_with_their_upgrade_requests(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    """Survey: health and images on one connection. Rollout: the baseline (taken while the
    previous wave upgrades), the POST, one long poll, one health that both confirms the
    version and gates the host. Main asks for health once more (7)."""
    sim = simfleet(HOSTS, upgrade_delay=0.2)
    journal = tmp_path / "j.jsonl"
    argv = [sys.executable, "-m", "hatchery_rollout.cli", "run", "--fleet", str(sim.fleet),
            "--version", "v2", "--journal", str(journal), "--poll-interval", "0.05",
            *tls.args()]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    stats = sim.stats()
    assert all(s["upgrades"] == 1 for s in stats.values())
    # a long poll answered a hair early is asked again: a little slack, never a 7th per host
    assert sum(s["requests"] for s in stats.values()) <= 6 * HOSTS + HOSTS // 10
    # From wave 2 on, a host's baseline was taken before its wave began: its "baseline" and
    # "posting" records come at once (no request between them).
    state = [json.loads(line) for line in journal.read_text().splitlines()]
    at: dict[tuple[str, str], float] = {}
    for r in state:
        if r.get("t") == "host":
            at.setdefault((r["host"], r["state"]), r["ts"])
    waves = state[0]["waves"]
    later = [h for w in waves[1:] for h in w]
    quick = [h for h in later if at[(h, "posting")] - at[(h, "baseline")] < 0.001]
    assert len(quick) >= len(later) * 0.9, (len(quick), len(later))
