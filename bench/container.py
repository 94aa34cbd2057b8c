"""Container VMs (HyperVM): the API request → the container's first log line, median of 10.

A real agent on a throwaway bridge (as the image-tier test has it), the appliance kernel and
initrd from ``make images``, the busybox web image published once. Each run: ``POST /v1/vms``
with ``container: web:1`` (the clock starts just before the request), then the VM's console
log is read every 10 ms until the container's first ``container: `` line; the guest's own
uptime at each marker splits the time. The VM is destroyed before the next run.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path

from bench.report import median, table, write_section
from hatchery.client import AgentClient, Credentials
from hatchery.qemu.accel import choose_accel
from hatchery_lab.agent import AgentProcess
from hatchery_lab.container_lab import container_lab
from hatchery_lab.images import build_images
from hatchery_lab.oci_images import web_image

RUNS = int(os.environ.get("BENCH_CONTAINER_RUNS", "10"))
FIRST_LINE = b"\ncontainer: "
MARKERS = {
    "init": re.compile(rb"HATCHERY-APPLIANCE: init .*?uptime=([0-9.]+)"),
    "lease": re.compile(rb"HATCHERY-APPLIANCE: lease .*?uptime=([0-9.]+)"),
    "pulled": re.compile(rb"HATCHERY-APPLIANCE: container pulled .*?uptime=([0-9.]+)"),
    "started": re.compile(rb"HATCHERY-APPLIANCE: container started .*?uptime=([0-9.]+)"),
}
TIMEOUT = 120.0


async def _one(client: AgentClient, agent: AgentProcess, appliance: Path, name: str
               ) -> dict[str, float]:  # fmt: skip
    body = {"name": name, "memory_mib": 256, "container": {"image": "web:1", "ports": [80]},
            "kernel": {"kernel": str(appliance / "appliance-vm.vmlinux"),
                       "initrd": str(appliance / "appliance-vm.container.cpio.lz4"),
                       "cmdline": "console=ttyS0"}}  # fmt: skip
    log = agent.state_dir / "vms" / name / "run" / "console.log"
    started = time.monotonic()
    await client.request("POST", "/v1/vms", json=body)
    answered = time.monotonic() - started
    try:
        while True:
            text = log.read_bytes() if log.exists() else b""
            if FIRST_LINE in text:
                first = time.monotonic() - started
                break
            if time.monotonic() - started > TIMEOUT:
                raise TimeoutError(f"no container line: {text[-1500:]!r}")
            await asyncio.sleep(0.01)
        result = {"first_line": first, "created": answered}
        for key, pattern in MARKERS.items():
            match = pattern.search(text)
            if match:
                result[key] = float(match.group(1))
        return result
    finally:
        await client.request("DELETE", f"/v1/vms/{name}")


async def _runs(agent: AgentProcess, appliance: Path) -> list[dict[str, float]]:
    admin = agent.pki.client("admin", "admin")
    creds = Credentials(agent.pki.ca, admin.cert, admin.key)
    results = []
    async with AgentClient(f"127.0.0.1:{agent.port}", creds, timeout=120) as client:
        for index in range(RUNS):
            results.append(await _one(client, agent, appliance, f"bench{index}"))
            print(f"run {index + 1}/{RUNS}: first line {results[-1]['first_line']:.2f} s",
                  flush=True)  # fmt: skip
    return results


def run() -> None:
    appliance = build_images("appliance-vm") / "appliance-vm"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-container-") as tmp_name:
        tmp = Path(tmp_name)
        with container_lab(tmp, appliance, "bcv", vms=RUNS + 2) as lab:
            archive = web_image(tmp / "web.tar", lab.busybox)
            lab.publish(archive, "web:1")
            results = asyncio.run(_runs(lab.agent, appliance))
            archive_mb = archive.stat().st_size / 1e6
    load_after = os.getloadavg()

    def med(key: str) -> str:
        values = [r[key] for r in results if key in r]
        return f"{median(values):.2f}" if values else "-"

    firsts = [r["first_line"] for r in results]
    rows = [
        ("API request → first container log line (host clock)", med("first_line"),
         f"{min(firsts):.2f} / {max(firsts):.2f}"),
        ("API request → the API's answer (VM record, QEMU started)", med("created"), ""),
        ("guest uptime at /init", med("init"), ""),
        ("guest uptime at the lease", med("lease"), ""),
        ("guest uptime: image downloaded and checked", med("pulled"), ""),
        ("guest uptime: container started (crun)", med("started"), ""),
    ]  # fmt: skip
    body = (
        f"Accelerator {choose_accel().accel}; a busybox HTTP server image (3 gzip layers, "
        f"{archive_mb:.1f} MB archive), median of {RUNS} runs, one at a time; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. The appliance initrd with "
        f"crun: {(appliance / 'appliance-vm.container.cpio.lz4').stat().st_size / 1e6:.1f} MB.\n\n"
        + table(["step", "median s", "min / max"], rows)
        + "\n\nGoals (issue 20): request → first log line ≤ 3 s under TCG; the appliance "
        "image with the OCI runtime ≤ 8 MB."
    )
    write_section("container", "Container VMs (HyperVM): request → first log line", body)
    print(body)
