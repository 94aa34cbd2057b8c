"""Issue 16 on the host: a guest moved to a new QEMU (``vm refresh``), and saved to a file
and resumed (``vm suspend`` + ``vm start``), without a reboot; a resume that cannot load its
file cold-starts the VM and says why.

The guest proves it was not rebooted: it prints its ``boot_id`` and uptime on its serial
console every second, and answers pings on the lab's bridge.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery_lab.agent import AgentProcess, qemu_alive
from hatchery_lab.guest import GuestKernel, find_guest_kernel
from hatchery_lab.outlive import agent_on_bridge
from hatchery_lab.outlive import create as _create
from hatchery_lab.outlive import next_tick as _next_tick
from hatchery_lab.outlive import ping as _ping
from hatchery_lab.outlive import ping_loss as _ping_loss
from hatchery_lab.outlive import ticks as _ticks
from hatchery_lab.outlive import wait_ping as _wait_ping
from tests.conftest import missing

pytestmark = pytest.mark.timeout(900)  # TCG on a loaded machine


@pytest.fixture
def lab(tmp_path: Path, require_root: None, require_tool: Callable[[str], str]) -> Iterator[dict]:
    require_tool("qemu-system-x86_64")
    require_tool("ping")
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    assert isinstance(kernel, GuestKernel)
    with agent_on_bridge(tmp_path, kernel, 78) as lab:
        yield lab


def test_refresh_moves_the_guest_to_a_new_qemu_without_a_reboot(lab: dict) -> None:
    agent: AgentProcess = lab["agent"]
    vm = _create(lab, "mover")
    # The machine type is recorded versioned, as the QEMU that created it names it.
    assert re.fullmatch(r"pc-q35-\d+\.\d+", vm["machine"]), vm["machine"]
    boot, up = _next_tick(agent, "mover", 0)
    _wait_ping(lab["ip"])
    old_pid = vm["pid"]

    # Pings every 10 ms across the refresh: how many are lost, next to as many without one
    # (a TCG guest on a loaded machine drops a few anyway).
    baseline = _ping_loss(lab["ip"], lambda: time.sleep(5))
    seen = len(_ticks(agent, "mover"))
    answers: list[dict] = []
    lost = _ping_loss(lab["ip"], lambda: answers.append(agent.cli_json("vm", "refresh", "mover")))
    moved = answers[0]
    print(
        f"refresh: {lost} pings at 10 ms lost (none refreshed: {baseline}), "
        f"pause {moved['pause_seconds']:.3f}s"
    )

    assert moved["state"] == "running" and moved["pid"] != old_pid
    assert moved["machine"] == vm["machine"] and moved["ip"] == vm["ip"]
    assert moved["pause_seconds"] is not None and moved["pause_seconds"] < 10
    assert not qemu_alive(old_pid), "the old QEMU still runs"
    assert qemu_alive(moved["pid"])
    assert "Seccomp:\t2" in Path(f"/proc/{moved['pid']}/status").read_text()
    after_boot, after_up = _next_tick(agent, "mover", seen)
    assert after_boot == boot, "the guest was rebooted"
    assert after_up > up
    assert lost <= baseline + 5

    # A restarted agent finds the new QEMU through the usual socket names.
    agent.kill()
    agent.start()
    shown = agent.cli_json("vm", "show", "mover")
    assert shown["state"] == "running" and shown["pid"] == moved["pid"]
    # An agent that stopped in the middle of a refresh whose new QEMU is gone: the old one
    # keeps the guest, the record says so.
    agent.kill()
    record = agent.state_dir / "vms" / "mover" / "vm.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "state": "refreshing", "incoming_pid": None}))
    agent.start()
    shown = agent.cli_json("vm", "show", "mover")
    assert shown["state"] == "running" and shown["pid"] == moved["pid"]
    assert "refresh interrupted" in shown["reason"]
    # It can be refreshed again (the tap descriptor was the new QEMU's own), and stopped.
    again = agent.cli_json("vm", "refresh", "mover")
    assert again["pid"] != moved["pid"] and not qemu_alive(moved["pid"])
    assert _next_tick(agent, "mover", len(_ticks(agent, "mover")))[0] == boot
    assert _ping(lab["ip"])

    # A new QEMU that cannot start (its kernel unreadable to the VM's uid): the refresh
    # fails with the reason, the guest runs on in the QEMU it had, undisturbed.
    kernel = agent.state_dir / "vms" / "mover" / "kernel"
    kernel.chmod(0o600)
    failed = agent.cli("vm", "refresh", "mover", check=False)
    kernel.chmod(0o640)
    assert failed.returncode == 1 and "HTTP 500" in failed.stderr, failed.stderr
    assert "cannot refresh vm mover" in failed.stderr and "kernel" in failed.stderr
    shown = agent.cli_json("vm", "show", "mover")
    assert shown["state"] == "running" and shown["pid"] == again["pid"]
    assert shown["reason"].startswith("refresh failed: ")
    assert _next_tick(agent, "mover", len(_ticks(agent, "mover")))[0] == boot
    assert _ping(lab["ip"])
    assert agent.cli_json("vm", "stop", "mover", "--force")["state"] == "stopped"
    assert not qemu_alive(again["pid"])


def test_suspend_and_resume_keep_the_guest_and_a_bad_file_cold_starts(lab: dict) -> None:
    agent: AgentProcess = lab["agent"]
    vm = _create(lab, "sleeper")
    boot, _ = _next_tick(agent, "sleeper", 0)
    _wait_ping(lab["ip"])
    folder = agent.state_dir / "vms" / "sleeper"

    seen = len(_ticks(agent, "sleeper"))
    up = _ticks(agent, "sleeper")[-1][1]
    suspended = agent.cli_json("vm", "suspend", "sleeper")
    assert suspended["state"] == "suspended" and suspended["pid"] is None
    assert suspended["state_file"] == str(folder / "suspend.state")
    assert (folder / "suspend.state").stat().st_size > 0
    assert not qemu_alive(vm["pid"])
    assert not _ping(lab["ip"])
    time.sleep(2)

    resumed = agent.cli_json("vm", "start", "sleeper")
    assert resumed["state"] == "running" and resumed["reason"] is None
    assert resumed["pause_seconds"] >= 2 and resumed["state_file"] is None
    assert not (folder / "suspend.state").exists(), "a resumed guest's file must go"
    after_boot, after_up = _next_tick(agent, "sleeper", seen)
    assert after_boot == boot, "the guest was rebooted"
    assert after_up >= up, "the guest's uptime went back"
    _wait_ping(lab["ip"], 30)  # its tap and port rules are back

    # A state file that QEMU cannot load: cold start, the reason kept, the file kept aside.
    agent.cli_json("vm", "suspend", "sleeper")
    saved = folder / "suspend.state"
    with saved.open("r+b") as f:
        f.seek(64)
        f.write(os.urandom(4096))
    seen = len(_ticks(agent, "sleeper"))
    cold = agent.cli_json("vm", "start", "sleeper")
    assert cold["state"] == "running"
    assert "resume failed" in cold["reason"] and "cold-started" in cold["reason"], cold["reason"]
    kept = list(folder.glob("suspend-failed-*.state"))
    assert len(kept) == 1 and str(kept[0]) in cold["reason"]
    new_boot, _ = _next_tick(agent, "sleeper", seen)
    assert new_boot != boot, "a guest that could not be resumed was booted afresh"
    _wait_ping(lab["ip"])

    # A missing state file: the same fallback.
    agent.cli_json("vm", "suspend", "sleeper")
    saved.unlink()
    cold = agent.cli_json("vm", "start", "sleeper")
    assert cold["state"] == "running" and "missing" in cold["reason"], cold["reason"]
    agent.cli("vm", "destroy", "sleeper")
