"""Upgrades of a real node (our image in QEMU): live-patch duration and the API's
unavailability window during it (``/healthz`` polled at 10 Hz), and a kexec reboot against a
full (cold) boot of the same node, both to the agent answering again.

Then the VMs' side (issue 16): two ticking guests (``hatchery_lab.outlive``: 256 MiB and
1 GiB) on the node through ``REBOOTS`` consecutive reboot upgrades alternating between v3
(backports' 6.12) and v2 (6.1): each VM's pause as the upgrade reports it, next to how long
the node's API was away (the kexec reboot itself), and whether each guest came back without
a reboot of its own (its ``boot_id``, read over HTTP from the host)."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
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
from hatchery_lab.guest import find_guest_kernel
from hatchery_lab.node import (
    KEXEC_NODE_VCPUS,
    NodeSpec,
    RunningNode,
    boot_node,
    lab_network,
    serve_folder,
)
from hatchery_lab.outlive import guest_state, ticking_initrd

BIN = Path(sys.executable).parent
SIZES_MIB = (256, 1024)
REBOOTS = int(os.environ.get("BENCH_UPGRADE_REBOOTS", "10"))


async def _poll(
    node: RunningNode, until: str, timeout: float, *, upgraded: bool = True
) -> dict[str, float]:
    """Poll /healthz at 10 Hz until ``until`` runs (and, if ``upgraded``, its upgrade is
    done): duration and longest gap. The cold boot is timed by the same poll as the upgrades.

    The polls share one kept-alive connection (a new one only once the agent that held it
    is gone): a mutual-TLS handshake per poll, ten a second, took the emulated node's one vCPU
    from the upgrade being measured (kexec -l took 9.6 s with them, 5.0 s without).
    """
    started = time.monotonic()
    last_ok = started
    gap = 0.0
    async with AgentClient(node.address, node.credentials, timeout=2) as client:
        while True:
            now = time.monotonic()
            try:
                health: dict[str, Any] = await client.request("GET", "/healthz")
                gap = max(gap, time.monotonic() - last_ok)
                last_ok = time.monotonic()
                if health["version"] == until and (
                    not upgraded or health["upgrade"]["state"] == "done"
                ):
                    return {"seconds": time.monotonic() - started, "gap": gap}
            except ApiError:
                pass
            if now - started > timeout:
                raise TimeoutError(f"{node.spec.name} did not reach {until}")
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - now)))


def _outcomes(node: RunningNode, version: str, timeout: float = 600) -> list[dict[str, Any]]:
    """The upgrade's report of each VM, once none is still being restored."""
    deadline = time.monotonic() + timeout
    while True:
        health = node.wait_agent(120, version=version)
        vms: list[dict[str, Any]] = health["upgrade"].get("vms", [])
        if not any(v["result"] == "restoring" for v in vms):
            return vms
        if time.monotonic() > deadline:
            raise TimeoutError(f"VMs still restoring: {vms}")
        time.sleep(2)


def _boot_ids(ips: dict[str, str], timeout: float = 600) -> dict[str, str]:
    """Each guest's ``boot_id``, asked over HTTP once it answers."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(ips):
        for name, ip in ips.items():
            if name not in found:
                try:
                    found[name] = guest_state(ip, timeout=20)["boot"]
                except OSError:
                    if time.monotonic() > deadline:
                        raise
        time.sleep(1 if len(found) < len(ips) else 0)
    return found


def _reboots(node: RunningNode, ips: dict[str, str]) -> list[dict[str, Any]]:
    """``REBOOTS`` reboot upgrades alternating v2 and v3 with the guests running: per
    upgrade, its duration, the API's longest gap, each VM's result and pause, and the
    guests that came back with another ``boot_id`` (lost)."""
    boots = _boot_ids(ips)
    cycles = []
    for i in range(REBOOTS):
        target = "v2" if i % 2 == 0 else "v3"  # the node runs v3 when this starts
        ask = {"version": target, "mode": "reboot", "allow_downgrade": target == "v2"}
        asyncio.run(node.api("POST", "/v1/upgrade", json=ask))
        timing = asyncio.run(_poll(node, target, 1800))
        outcomes = {v["name"]: v for v in _outcomes(node, target)}
        now = _boot_ids(ips)
        lost = [n for n in ips if now[n] != boots[n] or outcomes[n]["result"] != "resumed"]
        cycles.append({"target": target, **timing, "vms": outcomes, "lost": lost})
        print(f"reboot {i + 1}/{REBOOTS} to {target}: {timing['seconds']:.1f} s, API away "
              f"{timing['gap']:.1f} s, pauses "
              + ", ".join(f"{n} {v['pause_seconds'] or 0:.1f} s" for n, v in outcomes.items())
              + (f", LOST {lost}" if lost else ""), flush=True)  # fmt: skip
        boots = now
    return cycles


def _vm_section(cycles: list[dict[str, Any]], load: tuple[float, float]) -> str:
    """Per guest: its pauses next to each upgrade's duration and the API's absence."""
    rows = []
    for mib in SIZES_MIB:
        name = f"g{mib}"
        runs = [(c["vms"][name]["pause_seconds"], c["seconds"], c["gap"]) for c in cycles
                if c["vms"][name]["pause_seconds"] is not None]  # fmt: skip
        pauses = [p for p, _, _ in runs]
        over = max(p - s for p, s, _ in runs)
        rows.append((
            f"{mib} MiB", f"{statistics.median(pauses):.1f}", f"{max(pauses):.1f}",
            f"{statistics.median(s for _, s, _ in runs):.1f}",
            f"{statistics.median(g for _, _, g in runs):.1f}", f"{over:+.1f}",
            f"{max(p - g for p, _, g in runs):+.1f}", "met" if over <= 10 else "not met",
        ))  # fmt: skip
    lost = sum(len(c["lost"]) for c in cycles)
    return (
        f"The same node then ran two ticking guests (256 MiB and 1 GiB, direct kernel boot of "
        f"the tests' guest kernel) through {len(cycles)} consecutive reboot upgrades, "
        f"alternating v2 (6.1) and v3 (6.12); load average {load[0]:.2f} before, "
        f"{load[1]:.2f} after. Pause = the upgrade report's `pause_seconds` (guest paused "
        "before its state was saved → running again after the boot). Upgrade = request → the "
        "agent answering on the new version (the kexec row above); API away = the longest "
        "time the node's API did not answer (shutdown, kexec, boot, agent start).\n\n"
        + table(
            [
                "guest",
                "median pause s",
                "max pause s",
                "upgrade, median s",
                "API away, median s",
                "worst pause − upgrade s",
                "worst pause − API away s",
                "goal: pause ≤ upgrade + 10 s",
            ],
            rows,
        )  # fmt: skip
        + f"\n\n**{lost} VMs lost** in {len(cycles)} upgrades ({len(cycles) * len(SIZES_MIB)} "
        "resumes; lost = not resumed, or back with another `boot_id`)."
    )


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
                            (f"{prefix}.100", f"{prefix}.109"), memory_mib=2560,
                            vcpus=KEXEC_NODE_VCPUS)  # fmt: skip
            v1 = builds["v1"]
            kwargs = {"kernel": v1 / "hypervisor.vmlinuz", "initrd": v1 / "hypervisor.cpio.zst",
                      "image_keys": key.public.parent}  # fmt: skip
            guest = find_guest_kernel()
            if guest is None:
                raise SystemExit("no guest kernel in .cache: make guest-kernel")
            folder = tmp / "served"
            folder.mkdir()
            (folder / "vmlinux").write_bytes(guest.vmlinux().read_bytes())
            (folder / "initrd").write_bytes(ticking_initrd(guest))
            with (
                serve_folder(lab, folder) as served,
                boot_node(spec, lab, pki, tmp / "node", **kwargs) as node,
            ):
                asyncio.run(_poll(node, "v1", 1200, upgraded=False))
                cold = time.monotonic() - node.started  # from QEMU's start
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
                ips = {}
                for mib in SIZES_MIB:
                    created = asyncio.run(node.api("POST", "/v1/vms", json={
                        "name": f"g{mib}", "memory_mib": mib,
                        "kernel": {"kernel": f"{served}/vmlinux", "initrd": f"{served}/initrd",
                                   "cmdline": "console=ttyS0 quiet"},
                    }))  # fmt: skip
                    ips[f"g{mib}"] = created["ip"]
                load_before = os.getloadavg()[0]
                cycles = _reboots(node, ips)
                load_after = os.getloadavg()[0]
    initrd_mb = (builds["v3"] / "hypervisor.cpio.zst").stat().st_size / 1e6  # the one kexec'd
    rows = [
        ("live patch v1 → v2 (request → v2 reported, agent restarted)", f"{live['seconds']:.1f}",
         f"{live['gap']:.1f}"),
        ("reboot mode v2 → v3 by kexec (request → agent answers on v3)", f"{kexec['seconds']:.1f}",
         f"{kexec['gap']:.1f}"),
        ("full (cold) boot of the same node: QEMU start → agent answers", f"{cold:.1f}", "-"),
    ]  # fmt: skip
    body = (
        "One node booted from our hypervisor image in QEMU (TCG here, 2 shared cores), "
        "/healthz polled at 10 Hz over one kept-alive mutual-TLS connection (a new one once "
        "the agent that held it is gone), the cold boot by the same poll from QEMU's start. "
        "The live patch includes restarting the "
        "changed units and the agent itself (the API is away only while the agent restarts); "
        "the VMs' QEMU processes are untouched. The reboot goes to v3, whose kernel is "
        "another (backports' 6.12 against 6.1); kexec skips the firmware but not the kernel "
        f"unpacking the {initrd_mb:.0f} MB live initrd; a cold boot adds the firmware and the "
        "data-disk and seed set-up.\n\n"
        + table(["what", "seconds", "longest API gap s"], rows)
        + f"\n\nReboot by kexec, request to agent: {kexec['seconds']:.0f} s; cold boot, QEMU start "
        f"to agent: {cold:.0f} s (kexec / cold = {kexec['seconds'] / cold:.2f}). The kexec path "
        "also stages the new kernel and root (hard links to the store's files) and shuts the "
        "node down cleanly first; no VM runs during this one.\n\n"
        + _vm_section(cycles, (load_before, load_after))
    )
    write_section("upgrade", "Upgrades: live patch, kexec reboot, cold boot", body)
    print(body)
