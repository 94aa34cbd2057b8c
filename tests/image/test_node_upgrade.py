"""Issue 7 acceptance in a hypervisor VM booted from our image (QEMU, TCG here).

One node, a VM on it, and the whole upgrade story through the agent's API:
live patch v1 → v2 (the VM's QEMU keeps its PID, the changed unit restarts), the same patch
again is a no-op, reboot mode to v3 (kexec into another kernel, backports' 6.12; the VM is
restored), then v4 whose agent cannot start: the boot guard falls back to v3 by itself and the
VM is restored again.
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

from hatchery_lab.agent import Pki, free_port
from hatchery_lab.demo_images import build_version, signed, signing_key
from hatchery_lab.node import Lab, NodeSpec, RunningNode, boot_node, lab_network

BIN = Path(sys.executable).parent
VERSIONS = ("v1", "v2", "v3", "v4")


@pytest.fixture(scope="module")
def builds(images: Path) -> dict[str, Path]:
    return {v: build_version(v) for v in VERSIONS}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_network(f"10.{random.randrange(100, 200)}.{random.randrange(0, 250)}") as lab:
        yield lab


@pytest.fixture
def served(images: Path, lab: Lab) -> Iterator[str]:
    """The appliance VM's kernel and root, served by the host on the lab bridge."""
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", lab.host_ip,
         "--directory", str(images / "appliance-vm")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1)
        yield f"http://{lab.host_ip}:{port}"
    finally:
        web.kill()
        web.wait()


def api(node: RunningNode, method: str, path: str, **kwargs: Any) -> Any:
    return asyncio.run(node.api(method, path, **kwargs))


def upgrade(node: RunningNode, version: str, mode: str, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = api(node, "POST", "/v1/upgrade",
                                 json={"version": version, "mode": mode, **extra})  # fmt: skip
    return answer


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


def test_live_patch_reboot_and_fallback(
    builds: dict[str, Path], lab: Lab, served: str, tmp_path: Path
) -> None:
    key = signing_key(tmp_path / "keys")
    for build in builds.values():
        signed(build, key)
    pki = Pki.make(tmp_path / "pki")
    admin = pki.client("admin", "admin")
    spec = NodeSpec("node-a", "52:54:00:7a:00:0b", f"{lab.prefix}.11",
                    (f"{lab.prefix}.100", f"{lab.prefix}.109"), memory_mib=2560)  # fmt: skip
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

        # A VM that must keep running through the live patch.
        created = api(node, "POST", "/v1/vms", json={
            "name": "app", "memory_mib": 256,
            "kernel": {"kernel": f"{served}/appliance-vm.vmlinux",
                       "initrd": f"{served}/appliance-vm.cpio.zst",
                       "cmdline": "console=ttyS0 quiet panic=-1"},
        })  # fmt: skip
        assert created["state"] == "running"
        pid = created["pid"]

        # Live patch v1 -> v2: version v2, the changed unit restarted, the VM untouched.
        mark = len(node.console_text())
        assert upgrade(node, "v2", "live")["state"] == "running"
        health = wait_upgrade(node, 900)
        health = node.wait_agent(300, version="v2")
        assert health["upgrade"]["state"] == "done", health["upgrade"]
        assert "hatchery-demo-beacon.service" in (health["upgrade"]["detail"] or "")
        node.wait_console("HATCHERY-DEMO-BEACON v2", 120, after=mark)
        after = vm(node, "app")
        assert after["state"] == "running" and after["pid"] == pid, "the live patch touched the VM"
        # The same patch again is a no-op that says so.
        again = upgrade(node, "v2", "live")
        assert again["state"] == "done" and "nothing to do" in again["detail"]

        # Reboot mode to v3: kexec into another kernel (backports' 6.12, from 6.1), the node
        # comes back on v3 and restores the VM.
        mark = len(node.console_text())
        assert upgrade(node, "v3", "reboot")["state"] == "running"
        node.wait_console("Linux version 6.12", 1200, after=mark)
        health = node.wait_agent(1200, version="v3")
        health = wait_upgrade(node, 300)
        assert health["upgrade"]["state"] == "done", health["upgrade"]
        assert wait_vm_running(node, "app", 300)["pid"] != pid
        # The upgrade reports what became of the VM: saved and resumed (its pause), or
        # cold-started (why). Kept beside the test's files, for the benchmarks' record.
        deadline = time.monotonic() + 300
        while any(v["result"] == "restoring" for v in health["upgrade"].get("vms", [])):
            assert time.monotonic() < deadline, health["upgrade"]
            time.sleep(2)
            health = node.wait_agent(60, version="v3")
        [outcome] = [v for v in health["upgrade"]["vms"] if v["name"] == "app"]
        assert outcome["result"] in ("resumed", "cold-started"), outcome
        (tmp_path / "vm-outcome-v3.json").write_text(json.dumps(outcome) + "\n")

        # v4's agent cannot start: the guard falls back to v3 by itself; the VM is restored.
        assert upgrade(node, "v4", "reboot", guard_seconds=60)["state"] == "running"
        mark = len(node.console_text())
        node.wait_console("HATCHERY-DEMO-BEACON v4", 1200, after=mark)
        node.wait_console("hatchery-boot-guard: waiting up to 60s for v4", 300, after=mark)
        node.wait_console("falling back to v3", 600, after=mark)
        health = node.wait_agent(1200, version="v3")
        assert health["upgrade"]["state"] == "failed"
        assert health["boot"]["fallback"] is True and "v4" in health["boot"]["reason"]
        wait_vm_running(node, "app", 300)
