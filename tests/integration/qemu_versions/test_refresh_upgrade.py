"""A live patch that replaces QEMU, with ``refresh_vms``: ``hatchery-rollout run --refresh-vms``
against a real agent whose QEMU binary lives in the root it patches. Image v1's root has
``usr/bin/qemu-system-x86_64`` pointing at the host's QEMU 7.2, v2's at QEMU 10 (``make
qemu-next``), v3's at a QEMU that does not exist. v1 → v2 moves the running guest to QEMU 10
without a reboot and reports it ``refreshed``; v2 → v3 cannot move it: it runs on in QEMU 10,
the report says ``refresh-failed`` and the rollout counts the host degraded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hatchery.images.signing import generate_key
from hatchery_lab.agent import AgentProcess, qemu_alive
from hatchery_lab.cpio_writer import Entry
from hatchery_lab.outlive import agent_on_bridge, create, next_tick, ticks, wait_ping
from hatchery_lab.qemu_versions import searchable_folder
from tests.integration.qemu_versions.conftest import TwoQemus
from tests.support.live_images import build, root
from tests.support.upgrade_roots import unpack

pytestmark = pytest.mark.timeout(900)  # TCG on a loaded machine

BIN = Path(sys.executable).parent
QEMU_LINK = "usr/bin/qemu-system-x86_64"


def qemu_entries(target: str) -> list[Entry]:
    return [Entry.directory("usr/bin"), Entry.symlink(QEMU_LINK, target)]


@pytest.fixture
def node(tmp_path: Path, two_qemus: TwoQemus) -> Iterator[dict[str, Any]]:
    old, new, kernel = two_qemus.old, two_qemus.new, two_qemus.kernel
    key = generate_key(tmp_path / "keys", "fleet")
    targets = {"v1": old, "v2": new, "v3": "/nonexistent/qemu-system-x86_64"}
    builds = {v: build(tmp_path, v, key.private, qemu_entries(t)) for v, t in targets.items()}
    with searchable_folder("hatchery-root-") as node_root:
        unpack(root("v1", qemu_entries(old)), node_root)
        with agent_on_bridge(
            tmp_path, kernel, 81, root=str(node_root), image_keys=str(key.public.parent),
            qemu={"binary": str(node_root / QEMU_LINK)},
        ) as lab:  # fmt: skip
            for folder in builds.values():
                lab["agent"].cli("image", "publish", str(folder))
            yield {**lab, "root": node_root, "tmp": tmp_path}


def rollout(node: dict[str, Any], version: str, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    """``hatchery-rollout run --mode live --refresh-vms`` to ``version``; its exit status
    and the journal's records."""
    agent: AgentProcess = node["agent"]
    admin = agent.pki.client("admin", "admin")
    inventory = node["tmp"] / "fleet.yaml"
    inventory.write_text(yaml.safe_dump({"hosts": [
        {"name": "hv1", "address": f"127.0.0.1:{agent.port}", "location": "lab/r1"}]}))  # fmt: skip
    journal = node["tmp"] / f"journal-{version}.jsonl"
    result = subprocess.run(
        [str(BIN / "hatchery-rollout"), "run", "--fleet", str(inventory), "--version", version,
         "--mode", "live", "--refresh-vms", "--journal", str(journal), *extra,
         "--ca", str(agent.pki.ca), "--cert", str(admin.cert), "--key", str(admin.key),
         "--poll-interval", "0.2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(result.stdout[-2000:], result.stderr[-2000:])
    return result.returncode, [json.loads(line) for line in journal.read_text().splitlines()]


def _qemu_of(pid: int) -> str:
    return str(Path(f"/proc/{pid}/exe").resolve())


def test_a_live_patch_that_replaces_qemu_refreshes_every_vm(node: dict[str, Any]) -> None:
    agent: AgentProcess = node["agent"]
    vm = create(node, "tenant")
    assert vm["machine"] == "pc-q35-7.2"
    assert "qemu-next" not in _qemu_of(vm["pid"])
    boot, _ = next_tick(agent, "tenant", 0)
    wait_ping(node["ip"])

    # v1 -> v2: the patch swaps QEMU 7.2 for 10, then the agent moves the guest onto it.
    code, journal = rollout(node, "v2")
    assert code == 0
    status = agent.cli_json("health")["upgrade"]
    assert status["state"] == "done" and status["target"] == "v2", status
    [outcome] = status["vms"]
    assert outcome["name"] == "tenant" and outcome["result"] == "refreshed", outcome
    assert 0 < outcome["pause_seconds"] < 10
    print(f"live patch v1 -> v2, VM refreshed onto QEMU 10: pause {outcome['pause_seconds']:.3f}s")
    done = [r for r in journal if r.get("state") == "done" and r.get("host") == "hv1"]
    assert done and done[-1]["refreshed"] == 1 and "degraded" not in done[-1], journal
    moved = agent.cli_json("vm", "show", "tenant")
    assert moved["pid"] != vm["pid"] and not qemu_alive(vm["pid"])
    assert "qemu-next" in _qemu_of(moved["pid"])
    assert moved["ip"] == vm["ip"] and moved["mac"] == vm["mac"]
    seen = len(ticks(agent, "tenant"))
    assert next_tick(agent, "tenant", seen)[0] == boot, "the guest was rebooted"
    wait_ping(node["ip"], 30)

    # v2 -> v3: its QEMU cannot start. The guest runs on in QEMU 10; the host is degraded.
    code, journal = rollout(node, "v3")
    assert code == 0, "degraded is reported, not halting, without --halt-on-degraded"
    status = agent.cli_json("health")["upgrade"]
    assert status["state"] == "done" and status["target"] == "v3", status
    [outcome] = status["vms"]
    assert outcome["result"] == "refresh-failed", outcome
    assert "old QEMU" in outcome["reason"], outcome
    done = [r for r in journal if r.get("state") == "done" and r.get("host") == "hv1"]
    assert done and done[-1]["refresh_failed"] == 1 and "refresh-failed" in done[-1]["degraded"]
    summary = subprocess.run(
        [str(BIN / "hatchery-rollout"), "status", str(node["tmp"] / "journal-v3.jsonl"), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    totals = json.loads(summary.stdout)["vms"]
    assert (totals["refreshed"], totals["refresh_failed"]) == (0, 1), totals
    stayed = agent.cli_json("vm", "show", "tenant")
    assert stayed["state"] == "running" and stayed["pid"] == moved["pid"]
    assert qemu_alive(moved["pid"])
    seen = len(ticks(agent, "tenant"))
    assert next_tick(agent, "tenant", seen)[0] == boot, "the guest was rebooted"
    wait_ping(node["ip"], 30)
