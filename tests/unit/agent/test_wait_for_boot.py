"""``hatchery-agent run --after PATH``: the agent loads its code, then waits for the node's
boot (``hatchery-node-ready.service`` creates PATH), telling systemd why it still starts and
feeding the watchdog meanwhile. systemd's side is a real datagram socket here."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hatchery import agent_main


def _datagrams(sock: socket.socket) -> list[str]:
    got: list[str] = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            return got


def test_the_agent_waits_for_the_boot_feeding_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "run" / "node-ready"
    told: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 0.05 s
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

        def boot_reaches_the_agent() -> None:
            """The node is ready only once the waiting agent has fed the watchdog 3 times
            (or after 30 s without a datagram: then the test fails, it does not hang)."""
            try:
                while told.count("WATCHDOG=1") < 3:
                    told.append(systemd.recv(4096).decode())
            finally:
                marker.parent.mkdir()
                marker.touch()

        boot = threading.Thread(target=boot_reaches_the_agent)
        boot.start()
        agent_main.wait_for_boot(marker)
        boot.join()
        systemd.setblocking(False)
        told += _datagrams(systemd)
    assert told[0] == f"STATUS=loaded; waiting for the node's boot ({marker})"
    assert told[-1] == "STATUS=starting"
    assert told.count("WATCHDOG=1") >= 3
    assert not any(t.startswith("READY") for t in told)  # ready is for run_agent to say


def test_a_node_already_booted_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent restarted on a running node (a crash, a live patch) goes on at once."""
    marker = tmp_path / "node-ready"
    marker.touch()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        agent_main.wait_for_boot(marker)
        assert _datagrams(systemd) == []


def test_the_agent_unit_loads_early_and_starts_after_the_node() -> None:
    """The unit's ordering (it cannot run here: PID 1 is not systemd; the image's boot tests
    run it): started early with no wait on sysinit, the gate ordered where the agent used to
    be, and the stop still before /data is unmounted."""
    units = Path(__file__).parents[3] / "images/hypervisor/mkosi.extra/usr/lib/systemd/system"
    agent = (units / "hatchery-agent.service").read_text()
    gate = (units / "hatchery-node-ready.service").read_text()
    assert "DefaultDependencies=no" in agent
    assert "Wants=hatchery-node-ready.service" in agent
    assert "After=data.mount" in agent and "Before=shutdown.target" in agent
    assert "run --after /run/hatchery/node-ready --seed" in agent
    assert "After=hatchery-data.service systemd-networkd.service network.target" in gate
    assert "/run/hatchery/node-ready" in gate
    assert "DefaultDependencies=no" not in gate  # after sysinit.target and basic.target
    # KVM's module is loaded early, and before the gate opens: the agent chooses its
    # accelerator once, at its start (the image's boot test asserts it chose KVM)
    kvm = (units / "hatchery-kvm.service").read_text()
    assert "Wants=hatchery-kvm.service" in gate and "After=hatchery-kvm.service" in gate
    assert "DefaultDependencies=no" in kvm and "modprobe -q kvm_intel" in kvm


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority")
def test_the_agent_loads_at_the_units_priority_then_runs_at_the_default(tmp_path: Path) -> None:
    """The unit's ``Nice=-10`` is for loading: the agent's threads and its VMs' QEMU
    processes (its children) must not inherit it."""
    marker = tmp_path / "node-ready"
    marker.touch()
    probe = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from hatchery import agent_main\n"
        "agent_main.wait_for_boot(Path(sys.argv[1]))\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
    )
    result = subprocess.run(["nice", "-n", "-10", sys.executable, "-c", probe, str(marker)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert result.stdout.strip() == "0"


def test_the_agent_says_what_loading_it_cost(tmp_path: Path) -> None:
    """The line that tells an operator (and ``bench images``) how long the agent took to load
    on this boot and how much CPU it spent: a process that spends 0.3 s of CPU, then sleeps
    0.5 s, reports at least both as its wall time and at least the first as its CPU."""
    marker = tmp_path / "node-ready"
    marker.touch()
    probe = (
        "import logging, sys, time\n"
        "from pathlib import Path\n"
        "from hatchery import agent_main\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "start = time.process_time()\n"
        "while time.process_time() - start < 0.3:\n"
        "    pass\n"
        "time.sleep(0.5)\n"
        "agent_main.wait_for_boot(Path(sys.argv[1]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(marker)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    found = re.search(r"agent loaded in ([\d.]+) s \(([\d.]+) s of CPU: ([\d.]+) user, "
                      r"([\d.]+) system\)", result.stderr)  # fmt: skip
    assert found is not None, result.stderr
    wall, cpu, user, system = (float(g) for g in found.groups())
    assert wall >= 0.8
    assert 0.3 <= cpu <= wall
    assert abs(user + system - cpu) <= 0.11  # each is rounded to 0.1 s
