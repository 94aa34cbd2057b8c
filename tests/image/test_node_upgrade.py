"""Issues 7 and 16 acceptance in a hypervisor VM booted from our image (QEMU, TCG here).

One node, a VM on it, and the whole upgrade story through the agent's API:
live patch v1 → v2 (the VM's QEMU keeps its PID, the changed unit restarts), the same patch
again is a no-op, reboot mode to v3 (kexec into another kernel, backports' 6.12): the VM is
saved to /data and resumed, and its guest cannot tell (same ``boot_id``, its RAM counter
and uptime went on, same IP and MAC, metadata answers). Then v4, whose agent cannot start and
which damages every saved VM state first: the boot guard falls back to v3 by itself, whose
resume fails, so the VM is cold-started and the report says why.

The VM is the ticking guest of ``hatchery_lab.outlive``: it serves its ``boot_id``, uptime
and a counter kept in RAM over HTTP, which the test reads from the host over the lab bridge.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hatchery_lab.agent import Pki
from hatchery_lab.demo_images import VERSIONS, build_version, signed, signing_key
from hatchery_lab.guest import GuestKernel, find_guest_kernel
from hatchery_lab.node import (
    KEXEC_NODE_VCPUS,
    Lab,
    NodeSpec,
    RunningNode,
    boot_node,
    lab_network,
    serve_folder,
)
from hatchery_lab.outlive import guest_state, ticking_initrd
from hatchery_rollout.journal import HostRecord, HostState, read_journal
from tests.conftest import missing

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def builds(images: Path) -> dict[str, Path]:
    return {v: build_version(v) for v in VERSIONS}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_network(f"10.{random.randrange(100, 200)}.{random.randrange(0, 250)}") as lab:
        yield lab


@pytest.fixture
def served(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The ticking guest's kernel and initrd, served by the host on the lab bridge."""
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    assert isinstance(kernel, GuestKernel)
    folder = tmp_path_factory.mktemp("served")
    (folder / "vmlinux").write_bytes(kernel.vmlinux().read_bytes())
    (folder / "initrd").write_bytes(ticking_initrd(kernel))
    with serve_folder(lab, folder) as base:
        yield base


def api(node: RunningNode, method: str, path: str, **kwargs: Any) -> Any:
    return asyncio.run(node.api(method, path, **kwargs))


def upgrade(node: RunningNode, version: str, mode: str, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = api(node, "POST", "/v1/upgrade",
                                 json={"version": version, "mode": mode, **extra})  # fmt: skip
    return answer


def rollout(
    node: RunningNode, tmp_path: Path, creds: list[str], version: str, mode: str
) -> HostRecord:
    """Upgrade the node with ``hatchery-rollout run`` (a fleet of one); its record as the
    tool's own journal replay tells it (state, VM tally)."""
    fleet, journal = tmp_path / f"fleet-{version}.yaml", tmp_path / f"rollout-{version}.jsonl"
    fleet.write_text(yaml.safe_dump({"hosts": [{"name": "node-a", "address": node.address}]}))
    done = subprocess.run(
        [str(BIN / "hatchery-rollout"), "run", "--fleet", str(fleet), "--version", version,
         "--mode", mode, "--journal", str(journal), *creds, "--upgrade-timeout", "1500",
         "--health-timeout", "600"],
        capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + node.agent_log(80)
    return read_journal(journal).hosts["node-a"]


def wait_upgrade(node: RunningNode, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = node.health()
        if status is not None and status["upgrade"]["state"] != "running":
            return status
        time.sleep(3)
    raise TimeoutError(f"upgrade still running; console:\n{node.console_text()[-3000:]}")


def vm(node: RunningNode, name: str) -> dict[str, Any]:
    result: dict[str, Any] = api(node, "GET", f"/v1/vms/{name}")
    return result


def wait_vm_running(node: RunningNode, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        shown = vm(node, name)
        if shown["state"] == "running":
            return shown
        if time.monotonic() > deadline:
            raise TimeoutError(f"vm {name} is {shown['state']}: {shown.get('reason')}")
        time.sleep(3)


def wait_guest(ip: str, timeout: float) -> dict[str, str]:
    """The guest's own word over HTTP, once it answers (booting or resuming under nested
    emulation takes a while)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return guest_state(ip, timeout=20)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(3)


def wait_metadata(ip: str, timeout: float) -> dict[str, str]:
    """The guest's word once its metadata service answered it (under nested emulation a
    node busy right after a boot or a resume can take longer than one try)."""
    deadline = time.monotonic() + timeout
    while True:
        state = wait_guest(ip, timeout)
        if " 200 " in state["metadata"] or time.monotonic() > deadline:
            return state
        time.sleep(3)


def outcome_of(node: RunningNode, version: str, name: str) -> dict[str, Any]:
    """What the upgrade's report says became of VM ``name``, once it is no longer restoring."""
    deadline = time.monotonic() + 300
    while True:
        health = node.wait_agent(60, version=version)
        [outcome] = [v for v in health["upgrade"].get("vms", []) if v["name"] == name]
        if outcome["result"] != "restoring":
            return dict(outcome)
        assert time.monotonic() < deadline, health["upgrade"]
        time.sleep(2)


def test_live_patch_reboot_and_fallback(
    builds: dict[str, Path], lab: Lab, served: str, tmp_path: Path
) -> None:
    key = signing_key(tmp_path / "keys")
    for build in builds.values():
        signed(build, key)
    pki = Pki.make(tmp_path / "pki")
    admin = pki.client("admin", "admin")
    spec = NodeSpec("node-a", "52:54:00:7a:00:0b", f"{lab.prefix}.11",
                    (f"{lab.prefix}.100", f"{lab.prefix}.109"), memory_mib=2560,
                    vcpus=KEXEC_NODE_VCPUS)  # fmt: skip
    v1 = builds["v1"]
    boot = {"kernel": v1 / "hypervisor.vmlinuz", "initrd": v1 / "hypervisor.cpio.zst"}
    with boot_node(spec, lab, pki, tmp_path / "node", image_keys=key.public.parent, **boot) as node:
        assert node.wait_agent(900, version="v1")["healthy"]
        node.wait_console("HATCHERY-DEMO-BEACON v1", 120)
        creds = ["--agent", node.address, "--ca", str(pki.ca), "--cert", str(admin.cert),
                 "--key", str(admin.key)]  # fmt: skip
        for version in VERSIONS:
            subprocess.run([str(BIN / "hatchery"), "image", "publish", str(builds[version]),
                            *creds], check=True, capture_output=True, timeout=1800)  # fmt: skip

        # A VM that must keep running through the live patch, and outlive the reboot.
        created = api(node, "POST", "/v1/vms", json={
            "name": "app", "memory_mib": 192,
            "kernel": {"kernel": f"{served}/vmlinux", "initrd": f"{served}/initrd",
                       "cmdline": "console=ttyS0 quiet"},
        })  # fmt: skip
        assert created["state"] == "running"
        pid, ip, mac = created["pid"], created["ip"], created["mac"]
        first = wait_metadata(ip, 900)
        assert (first["ip"], first["mac"]) == (ip, mac), first
        assert " 200 " in first["metadata"], (first, node.agent_log(80))

        # Live patch v1 -> v2: version v2, the changed unit restarted, the VM untouched.
        mark = len(node.console_text())
        assert upgrade(node, "v2", "live")["state"] == "running"
        health = wait_upgrade(node, 900)
        health = node.wait_agent(300, version="v2")
        assert health["upgrade"]["state"] == "done", health["upgrade"]
        assert "hatchery-demo-beacon.service" in (health["upgrade"]["detail"] or "")
        # v2 also changed a drop-in of nftables.service: restarted, it flushed the node's
        # ruleset, and the agent put the bridge's tables back (the VM checks below pass
        # through them).
        assert "nftables.service" in (health["upgrade"]["detail"] or "")
        assert node.metric("hatchery_bridge_tables_restored_total") >= 1
        node.wait_console("HATCHERY-DEMO-BEACON v2", 120, after=mark)
        after = vm(node, "app")
        assert after["state"] == "running" and after["pid"] == pid, "the live patch touched the VM"
        assert wait_guest(ip, 120)["boot"] == first["boot"]
        # The same patch again is a no-op that says so.
        again = upgrade(node, "v2", "live")
        assert again["state"] == "done" and "nothing to do" in again["detail"]

        # Reboot mode to v3, as an operator runs it: hatchery-rollout, whose long poll is
        # open as the agent stops for the kexec. Another kernel (backports' 6.12, from
        # 6.1); the VM is saved to /data before and resumed after, and its guest cannot tell.
        before = wait_guest(ip, 120)
        mark = len(node.console_text())
        record = rollout(node, tmp_path, creds[2:], "v3", "reboot")
        node.wait_console("Linux version 6.12", 60, after=mark)
        health = node.wait_agent(60, version="v3")
        assert health["upgrade"]["state"] == "done", health["upgrade"]
        assert record.state is HostState.DONE and record.vms is not None, record
        tally = (record.vms.resumed, record.vms.cold_started, record.vms.not_restored)
        assert tally == (1, 0, 0), record
        outcome = outcome_of(node, "v3", "app")
        assert outcome["result"] == "resumed" and outcome["pause_seconds"] > 0, outcome
        (tmp_path / "vm-outcome-v3.json").write_text(json.dumps(outcome) + "\n")
        shown = wait_vm_running(node, "app", 300)
        assert shown["pid"] != pid and (shown["ip"], shown["mac"]) == (ip, mac), shown
        resumed = wait_guest(ip, 300)
        assert resumed["boot"] == before["boot"], "the guest was rebooted"
        assert int(resumed["count"]) > int(before["count"]), (before, resumed)
        assert float(resumed["up"]) > float(before["up"]), (before, resumed)
        assert (resumed["ip"], resumed["mac"]) == (ip, mac), resumed
        assert " 200 " in wait_metadata(ip, 300)["metadata"], "no metadata after the resume"

        # v4's agent cannot start, and it damages every saved VM state first: the guard falls
        # back to v3 by itself, v3's resume fails, the VM is cold-started and the report and
        # its record say why; the damaged file is kept for the operator.
        assert upgrade(node, "v4", "reboot", guard_seconds=60)["state"] == "running"
        mark = len(node.console_text())
        node.wait_console("HATCHERY-DEMO-BEACON v4", 1200, after=mark)
        node.wait_console("HATCHERY-DEMO-DAMAGED", 300, after=mark)
        node.wait_console("hatchery-boot-guard: waiting up to 60s for v4", 300, after=mark)
        node.wait_console("falling back to v3", 600, after=mark)
        health = node.wait_agent(1200, version="v3")
        assert health["upgrade"]["state"] == "failed"
        assert health["boot"]["fallback"] is True and "v4" in health["boot"]["reason"]
        # Not waited out: the guard fell back once v4's agent had failed to start 3 times.
        assert "agent of v4 failed to start" in health["boot"]["reason"], health["boot"]
        outcome = outcome_of(node, "v3", "app")
        assert outcome["result"] == "cold-started", outcome
        assert "resume failed" in outcome["reason"], outcome
        shown = wait_vm_running(node, "app", 300)
        assert "resume failed" in shown["reason"] and "suspend-failed-" in shown["reason"], shown
        assert (shown["ip"], shown["mac"]) == (ip, mac), shown
        cold = wait_metadata(ip, 900)
        assert cold["boot"] != before["boot"], "a guest that could not be resumed booted afresh"
        assert (cold["ip"], cold["mac"]) == (ip, mac), cold
        assert " 200 " in cold["metadata"], cold
