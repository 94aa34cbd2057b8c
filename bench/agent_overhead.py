"""Agent overhead: what the agent adds to starting a VM, against running QEMU by hand.

Ours: ``POST /v1/vms`` over mutual TLS → the answer (QEMU exec'd, daemonized, QMP attached,
state written) and → the guest's marker in the console log. Reference: the very same QEMU
command line (read back from the agent's QEMU in /proc) started by hand with ``-daemonize``
→ pidfile, and → the marker. Median of 10 each, interleaved.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import median, table, write_section
from hatchery.client import AgentClient, Credentials
from hatchery.metadata.service import teardown_bridge
from hatchery_lab.agent import AgentProcess, Pki
from hatchery_lab.guest import (
    INIT_PRELUDE,
    VIRTIO_NET_MODULES,
    busybox_initramfs,
    find_guest_kernel,
)
from hatchery_lab.net import bridge

RUNS = 10
MARKER = b"BENCH-GUEST-UP"
INIT = INIT_PRELUDE + f"echo {MARKER.decode()}\nwhile true; do sleep 60; done\n"


def _wait_marker(path: Path, start: float, timeout: float = 120) -> float:
    while True:
        try:
            if MARKER in path.read_bytes():
                return time.monotonic() - start
        except FileNotFoundError:
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"no marker in {path}")
        time.sleep(0.02)


async def _agent_run(agent: AgentProcess, creds: Credentials, kernel: Path, initrd: Path,
                     i: int) -> tuple[float, float, list[str]]:  # fmt: skip
    async with AgentClient(f"127.0.0.1:{agent.port}", creds) as client:
        body = {"name": f"bench{i}", "kernel": {"kernel": str(kernel), "initrd": str(initrd),
                "cmdline": "console=ttyS0 quiet"}, "memory_mib": 192}  # fmt: skip
        start = time.monotonic()
        vm = await client.request("POST", "/v1/vms", json=body)
        answered = time.monotonic() - start
        marker = _wait_marker(agent.state_dir / "vms" / vm["name"] / "console.log", start)
        argv = Path(f"/proc/{vm['pid']}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        await client.request("DELETE", f"/v1/vms/{vm['name']}")
    return answered, marker, [a.decode() for a in argv]


def _hand_run(argv: list[str], workdir: Path, br: str) -> tuple[float, float]:
    """The agent's QEMU command line with its per-VM paths and tap swapped for ours."""
    tap = f"hbt{random.randrange(16**6):06x}"
    subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", tap, "master", br, "up"], check=True)
    vm_dir = Path(argv[argv.index("-qmp") + 1].split(",")[0].removeprefix("unix:")).parent
    fixed = [a.replace(str(vm_dir), str(workdir)) for a in argv]
    fixed = [a.replace(a.split("ifname=")[1].split(",")[0], tap) if "ifname=" in a else a
             for a in fixed]  # fmt: skip
    fixed = [a for a in fixed if a not in ("-daemonize",)]
    pidfile = workdir / "pid"
    log = workdir / "console.log"
    log.unlink(missing_ok=True)
    try:
        start = time.monotonic()
        subprocess.run([*fixed[: fixed.index("-pidfile")], "-daemonize", "-pidfile", str(pidfile)],
                       check=True)  # fmt: skip
        execd = time.monotonic() - start
        marker = _wait_marker(log, start)
        subprocess.run(["kill", "-9", pidfile.read_text().strip()], check=False)
    finally:
        subprocess.run(["ip", "link", "del", tap], check=False)
    return execd, marker


def run() -> None:
    kernel = find_guest_kernel()
    if kernel is None:
        raise SystemExit("no guest kernel: run make guest-kernel")
    with tempfile.TemporaryDirectory(prefix="hatchery-bench-") as tmp_name:
        tmp = Path(tmp_name)
        initrd = tmp / "initrd"
        mods = [kernel.module(m) for m in VIRTIO_NET_MODULES]
        initrd.write_bytes(busybox_initramfs(INIT, modules=mods))
        pki = Pki.make(tmp / "pki")
        admin = pki.client("admin", "admin")
        creds = Credentials(pki.ca, admin.cert, admin.key)
        with bridge("10.254.77.1/24") as br:
            pool = {"start": "10.254.77.10", "end": "10.254.77.30"}
            subnets = [{"cidr": "10.254.77.0/24", "pool": pool}]
            folders = [str(kernel.vmlinux().parent), str(initrd.parent)]  # VM sources
            agent = AgentProcess.configure(tmp, pki, [{"name": br, "subnets": subnets}],
                                           vm_sources={"folders": folders})  # fmt: skip
            agent.start()
            ours_api, ours_marker, hand_exec, hand_marker = [], [], [], []
            try:
                for i in range(RUNS):
                    a, m, argv = asyncio.run(_agent_run(agent, creds, kernel.vmlinux(), initrd, i))
                    ours_api.append(a)
                    ours_marker.append(m)
                    hand_dir = tmp / f"hand{i}"
                    hand_dir.mkdir()
                    e, hm = _hand_run(argv, hand_dir, br)
                    hand_exec.append(e)
                    hand_marker.append(hm)
                    print(f"  run {i + 1}: agent {a:.2f}/{m:.2f} s, by hand {e:.2f}/{hm:.2f} s")
            finally:
                agent.kill()
                asyncio.run(teardown_bridge(br))
    rows = [
        ("request → QEMU running (agent: API answer; hand: -daemonize returns)",
         f"{median(ours_api):.3f}", f"{median(hand_exec):.3f}",
         f"{median(ours_api) / median(hand_exec):.2f}x"),
        ("request → guest serial marker", f"{median(ours_marker):.3f}",
         f"{median(hand_marker):.3f}", f"{median(ours_marker) / median(hand_marker):.2f}x"),
    ]  # fmt: skip
    body = (
        f"Same QEMU command line (q35, vmlinux direct boot, busybox initramfs, virtio-net on a "
        f"tap, TCG here), median of {RUNS}. The agent's time includes mutual TLS, validation, "
        f"address allocation, the atomic state writes, the tap, and attaching QMP.\n\n"
        + table(["what", "agent s", "by hand s", "agent / hand"], rows)
    )
    write_section("agent-overhead", "Agent overhead: VM start through the API vs by hand", body)
    print(body)
