"""Issue 16 across two QEMU versions on the host: a guest started by the host's QEMU 7.2 on its
versioned machine (``pc-q35-7.2``) is moved to QEMU 10 (bookworm-backports, unpacked by
``make qemu-next``) by ``vm refresh``, and one suspended by 7.2 is resumed by 10; neither
reboots (its ``boot_id`` is unchanged), both keep their address and MAC and answer.

The agent's ``qemu.binary`` is a symlink the test re-points, as a live patch replaces
``/usr/bin/qemu-system-x86_64`` under running VMs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hatchery_lab.agent import AgentProcess, qemu_alive
from hatchery_lab.outlive import (
    agent_on_bridge,
    create,
    next_tick,
    ping,
    ping_loss,
    ticks,
    wait_ping,
)
from hatchery_lab.qemu_versions import QemuSwitch, qemu_switch
from tests.integration.qemu_versions.conftest import TwoQemus

pytestmark = pytest.mark.timeout(900)  # TCG on a loaded machine


@pytest.fixture
def lab(tmp_path: Path, two_qemus: TwoQemus) -> Iterator[dict[str, Any]]:
    old, new, kernel = two_qemus.old, two_qemus.new, two_qemus.kernel
    with (
        qemu_switch(old) as switch,
        agent_on_bridge(tmp_path, kernel, 79, qemu={"binary": str(switch.path)}) as lab,
    ):
        yield {**lab, "switch": switch, "old": old, "new": new}


def _qemu_of(pid: int) -> str:
    """The binary a running QEMU was started from."""
    return str(Path(f"/proc/{pid}/exe").resolve())


def test_refresh_moves_a_7_2_guest_to_qemu_10(lab: dict[str, Any]) -> None:
    agent: AgentProcess = lab["agent"]
    switch: QemuSwitch = lab["switch"]
    vm = create(lab, "crosser")
    assert vm["machine"] == "pc-q35-7.2", vm["machine"]
    assert _qemu_of(vm["pid"]) == str(Path(lab["old"]).resolve())
    boot, up = next_tick(agent, "crosser", 0)
    wait_ping(lab["ip"])

    switch.point_to(lab["new"])  # the live patch
    seen = len(ticks(agent, "crosser"))
    baseline = ping_loss(lab["ip"], lambda: time.sleep(5))
    answers: list[dict[str, Any]] = []
    lost = ping_loss(lab["ip"], lambda: answers.append(agent.cli_json("vm", "refresh", "crosser")))
    moved = answers[0]
    print(f"refresh 7.2 -> 10: pause {moved['pause_seconds']:.3f}s, {lost} pings at 10 ms "
          f"lost (none refreshed: {baseline})")  # fmt: skip
    assert lost <= baseline + 5
    assert moved["state"] == "running", moved
    assert moved["machine"] == "pc-q35-7.2"
    assert moved["ip"] == vm["ip"] and moved["mac"] == vm["mac"]
    assert not qemu_alive(vm["pid"])
    assert "qemu-next" in _qemu_of(moved["pid"])
    after_boot, after_up = next_tick(agent, "crosser", seen)
    assert after_boot == boot, "the guest was rebooted"
    assert after_up > up
    wait_ping(lab["ip"], 30)
    assert ping(lab["ip"])


def test_a_guest_suspended_by_7_2_is_resumed_by_qemu_10(lab: dict[str, Any]) -> None:
    agent: AgentProcess = lab["agent"]
    switch: QemuSwitch = lab["switch"]
    vm = create(lab, "sleeper")
    assert vm["machine"] == "pc-q35-7.2", vm["machine"]
    boot, _ = next_tick(agent, "sleeper", 0)
    wait_ping(lab["ip"])
    seen = len(ticks(agent, "sleeper"))
    up = ticks(agent, "sleeper")[-1][1]

    suspended = agent.cli_json("vm", "suspend", "sleeper")
    assert suspended["state"] == "suspended" and not qemu_alive(vm["pid"])
    switch.point_to(lab["new"])  # the node's QEMU changed while the guest slept
    resumed = agent.cli_json("vm", "start", "sleeper")
    print(f"suspend by 7.2, resume by 10: pause {resumed['pause_seconds']:.3f}s")
    assert resumed["state"] == "running" and resumed["reason"] is None, resumed
    assert resumed["machine"] == "pc-q35-7.2"
    assert resumed["ip"] == vm["ip"] and resumed["mac"] == vm["mac"]
    assert "qemu-next" in _qemu_of(resumed["pid"])
    after_boot, after_up = next_tick(agent, "sleeper", seen)
    assert after_boot == boot, "the guest was rebooted"
    assert after_up >= up
    wait_ping(lab["ip"], 30)
