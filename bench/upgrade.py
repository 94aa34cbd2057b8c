"""Upgrades of a real node (our image in QEMU): live-patch duration and the API's
unavailability window during it (``/healthz`` polled at 10 Hz), and a kexec reboot against a
full (cold) boot of the same node, both to the agent answering again."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import table, write_section
from hatchery.client import AgentClient, ApiError
from hatchery_lab.agent import Pki
from hatchery_lab.demo_images import build_version, signed, signing_key
from hatchery_lab.node import NodeSpec, RunningNode, boot_node, lab_network

BIN = Path(sys.executable).parent


async def _poll(node: RunningNode, until: str, timeout: float) -> dict[str, float]:
    """Poll /healthz at 10 Hz until ``until`` runs and is done: duration and longest gap."""
    started = time.monotonic()
    last_ok = started
    gap = 0.0
    while True:
        now = time.monotonic()
        try:
            async with AgentClient(node.address, node.credentials, timeout=2) as client:
                health: dict[str, Any] = await client.request("GET", "/healthz")
            gap = max(gap, time.monotonic() - last_ok)
            last_ok = time.monotonic()
            if health["version"] == until and health["upgrade"]["state"] == "done":
                return {"seconds": time.monotonic() - started, "gap": gap}
        except ApiError:
            pass
        if now - started > timeout:
            raise TimeoutError(f"{node.spec.name} did not reach {until}")
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - now)))


def run() -> None:
    builds = {v: build_version(v) for v in ("v1", "v2", "v3")}
    with tempfile.TemporaryDirectory(prefix="hatchery-bench-upgrade-") as tmp_name:
        tmp = Path(tmp_name)
        key = signing_key(tmp / "keys")
        for b in builds.values():
            signed(b, key)
        pki = Pki.make(tmp / "pki")
        admin = pki.client("admin", "admin")
        prefix = f"10.{random.randrange(100, 200)}.{random.randrange(0, 250)}"
        with lab_network(prefix) as lab:
            spec = NodeSpec("bench-node", "52:54:00:be:00:01", f"{prefix}.11",
                            (f"{prefix}.100", f"{prefix}.109"), memory_mib=2560)  # fmt: skip
            v1 = builds["v1"]
            kwargs = {"kernel": v1 / "hypervisor.vmlinuz", "initrd": v1 / "hypervisor.cpio.zst",
                      "image_keys": key.public.parent}  # fmt: skip
            t0 = time.monotonic()
            with boot_node(spec, lab, pki, tmp / "node", **kwargs) as node:
                node.wait_agent(1200, version="v1")
                cold = time.monotonic() - t0
                for version in ("v1", "v2", "v3"):
                    subprocess.run(
                        [str(BIN / "hatchery"), "image", "publish", str(builds[version]),
                         "--agent", node.address, "--ca", str(pki.ca), "--cert", str(admin.cert),
                         "--key", str(admin.key)], check=True, capture_output=True, timeout=1800,
                    )  # fmt: skip
                asyncio.run(node.api("POST", "/v1/upgrade", json={"version": "v2", "mode": "live"}))
                live = asyncio.run(_poll(node, "v2", 1200))
                asyncio.run(
                    node.api("POST", "/v1/upgrade", json={"version": "v3", "mode": "reboot"})
                )
                kexec = asyncio.run(_poll(node, "v3", 1800))
    rows = [
        ("live patch v1 → v2 (request → v2 reported, agent restarted)", f"{live['seconds']:.1f}",
         f"{live['gap']:.1f}"),
        ("reboot mode v2 → v3 by kexec (request → agent answers on v3)", f"{kexec['seconds']:.1f}",
         f"{kexec['gap']:.1f}"),
        ("full (cold) boot of the same node: QEMU start → agent answers", f"{cold:.1f}", "-"),
    ]  # fmt: skip
    body = (
        "One node booted from our hypervisor image in QEMU (TCG here, 2 shared cores), "
        "/healthz polled at 10 Hz over mutual TLS. The live patch includes restarting the "
        "changed units and the agent itself (the API is away only while the agent restarts); "
        "the VMs' QEMU processes are untouched. The reboot goes to v3, whose kernel is "
        "another (backports' 6.12 against 6.1); kexec skips the firmware but not the kernel "
        "unpacking the 100 MB live initrd; a cold boot adds the firmware and the data-disk and "
        "seed set-up.\n\n"
        + table(["what", "seconds", "longest API gap s"], rows)
        + f"\n\nReboot by kexec, request to agent: {kexec['seconds']:.0f} s; cold boot, QEMU start "
        f"to agent: {cold:.0f} s (kexec / cold = {kexec['seconds'] / cold:.2f}). The kexec path "
        "also stages the new kernel and root out of the image store and shuts the node down "
        "cleanly first; under TCG that staging dominates."
    )
    write_section("upgrade", "Upgrades: live patch, kexec reboot, cold boot", body)
    print(body)
