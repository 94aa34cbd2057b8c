"""The pause a guest sees when it outlives its QEMU (issue 16), on the host, through a real
agent: a 256 MiB and a 1 GiB guest (direct kernel boot of the test guest kernel, the busybox
initramfs the tests use, TCG here), each

- refreshed (``vm refresh``: local live migration to a new QEMU process) and
- suspended to a file and resumed by a new QEMU (``vm suspend`` + ``vm start``, back to back
  over one API connection: what a reboot adds on top of the node's own boot),

``RUNS`` times, the node's QEMU binary alternating between the host's 7.2 and the next one
(``make qemu-next``: 10.0) before each, as live patches would; the pause is the agent's
(``pause_seconds``: guest paused → running again), the state file's size is read from disk.
Then ``CYCLES`` suspend/resume cycles of one guest alternating 7.2 and 10: every one must be
resumed (not cold-started) and the guest's ``boot_id`` must be the same at the end.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import median, table, write_section
from hatchery.client import AgentClient, Credentials
from hatchery_lab.agent import AgentProcess
from hatchery_lab.guest import find_guest_kernel
from hatchery_lab.outlive import agent_on_bridge, create, next_tick, ticks
from hatchery_lab.qemu_versions import (
    QemuSwitch,
    host_qemu,
    qemu_switch,
    runnable_next_qemu,
    version,
)

RUNS = 5
CYCLES = 10
SIZES_MIB = (256, 1024)


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _client(agent: AgentProcess) -> AgentClient:
    pair = agent.pki.client("admin", "admin")
    return AgentClient(f"127.0.0.1:{agent.port}", Credentials(agent.pki.ca, pair.cert, pair.key),
                       timeout=600)  # fmt: skip


def _binary(switch: QemuSwitch, binaries: tuple[str, str], index: int) -> str:
    """Point the node's QEMU at the other version each time (the first move goes to 10)."""
    target = binaries[(index + 1) % 2]
    switch.point_to(target)
    return target


async def _moves(agent: AgentProcess, name: str, switch: QemuSwitch,
                 binaries: tuple[str, str]) -> dict[str, list[float]]:  # fmt: skip
    out: dict[str, list[float]] = {"refresh": [], "resume": [], "size": [], "suspend_s": []}
    async with _client(agent) as api:
        for i in range(RUNS):
            _binary(switch, binaries, i)
            moved = await api.request("POST", f"/v1/vms/{name}/refresh")
            assert moved["state"] == "running", moved
            out["refresh"].append(float(moved["pause_seconds"]))
        for i in range(RUNS):
            _binary(switch, binaries, i)
            started = time.monotonic()
            saved = await api.request("POST", f"/v1/vms/{name}/suspend")
            out["suspend_s"].append(time.monotonic() - started)
            out["size"].append(Path(saved["state_file"]).stat().st_size)
            resumed = await api.request("POST", f"/v1/vms/{name}/start")
            assert resumed["state"] == "running" and resumed["reason"] is None, resumed
            out["resume"].append(float(resumed["pause_seconds"]))
    return out


async def _cycles(agent: AgentProcess, name: str, switch: QemuSwitch,
                  binaries: tuple[str, str]) -> tuple[int, list[float]]:  # fmt: skip
    """``CYCLES`` suspend/resume cycles; how many were resumed, and their pauses."""
    resumed, pauses = 0, []
    async with _client(agent) as api:
        for i in range(CYCLES):
            await api.request("POST", f"/v1/vms/{name}/suspend")
            _binary(switch, binaries, i)
            after = await api.request("POST", f"/v1/vms/{name}/start")
            if after["state"] == "running" and after["reason"] is None:
                resumed += 1
                pauses.append(float(after["pause_seconds"]))
            else:
                print(f"cycle {i + 1}: {after['state']}: {after['reason']}", flush=True)
    return resumed, pauses


def _booted(lab: dict[str, Any], name: str, mib: int) -> str:
    create(lab, name, memory=mib)
    return next_tick(lab["agent"], name, 0)[0]


def _same_boot(agent: AgentProcess, name: str, boot: str) -> bool:
    return next_tick(agent, name, len(ticks(agent, name)))[0] == boot


def run() -> None:
    with runnable_next_qemu() as new:
        _run(new)


def _run(new: str | None) -> None:
    kernel, old = find_guest_kernel(), host_qemu()
    if kernel is None:
        raise SystemExit("no guest kernel: run make guest-kernel")
    if old is None or new is None:
        raise SystemExit("needs the host's QEMU and the next one: run make qemu-next")
    binaries = (old, new)
    versions = f"{version(old)} and {version(new)}"
    load_before = _load()
    rows, kept = [], []
    with tempfile.TemporaryDirectory() as tmp, qemu_switch(old) as switch, agent_on_bridge(
        Path(tmp), kernel, 82, qemu={"binary": str(switch.path)}
    ) as lab:  # fmt: skip
        agent: AgentProcess = lab["agent"]
        for mib in SIZES_MIB:
            name = f"pause{mib}"
            switch.point_to(old)
            boot = _booted(lab, name, mib)
            got = asyncio.run(_moves(agent, name, switch, binaries))
            kept.append(_same_boot(agent, name, boot))
            agent.cli("vm", "destroy", name)
            size = median(got["size"]) / (1 << 20)
            rows.append((f"{mib} MiB", "refresh (live migration to a new QEMU)",
                         f"{median(got['refresh']):.3f}", f"{min(got['refresh']):.3f}",
                         f"{max(got['refresh']):.3f}", "-"))  # fmt: skip
            rows.append((f"{mib} MiB", "suspend to a file + resume in a new QEMU",
                         f"{median(got['resume']):.3f}", f"{min(got['resume']):.3f}",
                         f"{max(got['resume']):.3f}", f"{size:.0f}"))  # fmt: skip
            print(f"{mib} MiB: {got}", flush=True)
        switch.point_to(old)
        boot = _booted(lab, "cycler", SIZES_MIB[0])
        resumed, pauses = asyncio.run(_cycles(agent, "cycler", switch, binaries))
        cycled_kept = _same_boot(agent, "cycler", boot)
        agent.cli("vm", "destroy", "cycler")
    load_after = _load()
    lost = CYCLES - resumed + (0 if cycled_kept else 1)
    body = (
        f"A real agent on a lab bridge, guests under TCG on machine `pc-q35-7.2` (created by "
        f"QEMU {version(old)}): direct kernel boot of {kernel.vmlinuz.parent.name}, the tests' "
        f"busybox initramfs. The node's QEMU binary alternates between {versions} before each "
        f"move (the first move goes from 7.2 to 10). Pause = the agent's `pause_seconds`, guest "
        f"paused → running again; for suspend + resume the two API calls are back to back, so "
        f"it is what a reboot adds besides the node's own boot. {RUNS} runs each.\n\n"
        + table(["guest", "move", "median pause s", "min s", "max s", "state file MiB"], rows)
        + f"\n\nGuests' `boot_id` unchanged after all their moves: "
        f"{'yes' if all(kept) else 'NO'}.\n\n"
        f"{CYCLES} consecutive suspend/resume cycles of one {SIZES_MIB[0]} MiB guest, resumed "
        f"alternately by QEMU {versions}: {resumed}/{CYCLES} resumed, `boot_id` unchanged: "
        f"{'yes' if cycled_kept else 'NO'}, **{lost} VMs lost**; pause median "
        f"{median(pauses) if pauses else float('nan'):.3f} s, max "
        f"{max(pauses) if pauses else float('nan'):.3f} s.\n\n"
        f"Machine load (`uptime`, shared machine) before: `{load_before}`; after: "
        f"`{load_after}`."
    )
    write_section("vm-pause", "VM pause: refresh and suspend/resume across QEMU 7.2 and 10", body)
    print(body)
