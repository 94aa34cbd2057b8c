"""A guest that writes without end fills no host disk: its console log and its status port.

Real QEMU guests (Debian's kernel under TCG, a busybox initramfs) run by the real agent:

- ``noisy`` prints 4 MB on its serial console, 30 times the agent's ``vms.log_limit_bytes``
  here; its ``console.log`` stays within the limit on disk and still ends with what the guest
  said last (``vms.logtrim``).
- ``boxed`` is a container VM whose init floods its status port (``org.hatchery.status``)
  with 8 MB between ``started`` and ``exited 7``, then powers off, all while the agent is
  down. QEMU's ring (``vms.status_port``) holds 4 KiB, nothing of it reaches a file; the
  QEMU waits, paused, until the restarted agent has read the guest's last word, and the VM
  is recorded stopped with ``container_status: exited 7``, not crashed.
- ``dumper``'s QEMU is driven as a guest that took it over could drive it (its QMP, with the
  agent down): it can create no file in its VM's folder, its ``run/`` or the agent's state,
  and a 1.1 GiB memory dump into the one world-writable folder it finds ends at its file size
  limit (``vms.limits``), with QEMU, not with the disk.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery.metadata.service import teardown_bridge
from hatchery.vms import limits
from hatchery.vms.monitor import Monitor, MonitorError
from hatchery_lab.agent import AgentProcess, Pki, bridge_config, qemu_alive
from hatchery_lab.guest import INIT_PRELUDE, GuestKernel, busybox_initramfs, find_guest_kernel
from hatchery_lab.net import bridge
from tests.conftest import missing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LIMIT = 128 * 1024
# virtio-serial for the status port: Debian builds it as modules, loaded in this order.
SERIAL_MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/char/virtio_console",
)
NOISY_INIT = (
    INIT_PRELUDE
    + r"""
echo FLOOD-START
yes "noise noise noise noise noise noise noise noise noise noise noise" | head -c 4000000
echo
echo FLOOD-END
exec sleep 3600
"""
)
QUIET_INIT = INIT_PRELUDE + "echo QUIET-READY\nexec sleep 3600\n"
BOXED_INIT = (
    INIT_PRELUDE
    + r"""
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name")" = org.hatchery.status ] && port=/dev/${p##*/}
done
echo "STATUS-PORT $port"
echo started > "$port"
sleep 25
yes "exited 0" | head -n 900000 > "$port"  # 8.1 MB
echo "exited 7" > "$port"
echo FLOOD-END
poweroff -f
"""
)


@pytest.fixture
def lab(tmp_path: Path, require_root: None, require_tool: Callable[[str], str]) -> Iterator[dict]:
    require_tool("qemu-system-x86_64")
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    assert isinstance(kernel, GuestKernel)
    subnet = f"10.{random.randrange(16, 250)}.79"
    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    (artefacts / "noisy").write_bytes(busybox_initramfs(NOISY_INIT))
    (artefacts / "dumper").write_bytes(busybox_initramfs(QUIET_INIT))
    modules = [kernel.module(m) for m in SERIAL_MODULES]
    (artefacts / "boxed").write_bytes(busybox_initramfs(BOXED_INIT, modules=modules))
    pki_ = Pki.make(tmp_path / "pki")
    with bridge(f"{subnet}.1/24") as br:
        agent = AgentProcess.configure(
            tmp_path, pki_, [bridge_config(br, subnet, dhcp=False, metadata=False)],
            vm_sources={"folders": [str(kernel.vmlinux().parent), str(artefacts)]},
            vms={"log_limit_bytes": LIMIT},
        )  # fmt: skip
        agent.start()
        try:
            yield {"agent": agent, "kernel": kernel.vmlinux(), "artefacts": artefacts}
        finally:
            agent.kill_with_vms()
            asyncio.run(teardown_bridge(br))


def _create(lab: dict, name: str, *extra: str, memory: int = 192) -> None:
    lab["agent"].cli("vm", "create", name, "--kernel", str(lab["kernel"]), "--initrd",
                     str(lab["artefacts"] / name), "--cmdline", "console=ttyS0 quiet",
                     "--memory", str(memory), *extra)  # fmt: skip


def _on_disk(folder: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*"))


def _wait(what: str, check: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_console_flood_is_kept_to_the_log_limit(lab: dict) -> None:
    agent: AgentProcess = lab["agent"]
    _create(lab, "noisy")
    log = agent.state_dir / "vms" / "noisy" / "run" / "console.log"
    _wait("the end of the flood", lambda: b"FLOOD-END" in log.read_bytes()[-4096:])
    # The agent trims every 2 s: once it has, the file holds at most the limit, on disk.
    _wait("the trim", lambda: log.stat().st_blocks * 512 <= LIMIT, timeout=30)
    assert "FLOOD-END" in agent.cli("vm", "console", "noisy").stdout  # the newest stays
    assert "console.log over" in agent.log_path.read_text()
    shown = agent.cli_json("vm", "show", "noisy")
    assert shown["state"] == "running" and shown["container_status"] is None
    agent.cli("vm", "destroy", "noisy")


def test_a_status_port_flood_reaches_no_file_and_its_last_word_outlives_the_agent(
    lab: dict,
) -> None:
    agent: AgentProcess = lab["agent"]
    _create(lab, "boxed", "--container", "web:1")
    folder = agent.state_dir / "vms" / "boxed"
    _wait("started", lambda: agent.cli_json("vm", "show", "boxed")["container_status"]
          == "started")  # fmt: skip
    pid = agent.cli_json("vm", "show", "boxed")["pid"]

    agent.kill()  # down while the guest floods its port and powers off
    log = folder / "run" / "console.log"
    _wait("the guest's power-off", lambda: b"FLOOD-END" in log.read_bytes()[-4096:], 120)
    time.sleep(2)
    assert qemu_alive(pid), "QEMU must wait, paused, for the agent to read the status"
    assert _on_disk(folder / "run") < LIMIT  # 8 MB written, none of it to a file

    agent.start()
    _wait("the VM's stop", lambda: agent.cli_json("vm", "show", "boxed")["state"] == "stopped",
          60)  # fmt: skip
    shown = agent.cli_json("vm", "show", "boxed")
    assert shown["container_status"] == "exited 7", shown
    assert not shown["reason"], shown  # a clean power-off, not a crash
    assert not qemu_alive(pid)
    agent.cli("vm", "destroy", "boxed")


async def _dump(qmp: Path, targets: list[str]) -> list[str]:
    """What QEMU answers to a memory dump into each of ``targets``, in order."""
    monitor = Monitor("dumper", qmp, lambda kind, data: None)
    await monitor.connect(30)
    answers = []
    try:
        for target in targets:
            try:
                await monitor.execute("dump-guest-memory",
                                      {"paging": False, "protocol": f"file:{target}"})  # fmt: skip
                answers.append("written")
            except MonitorError as exc:
                answers.append(exc.message)
    finally:
        await monitor.close()
    return answers


def test_a_qemu_taken_over_cannot_fill_the_data_disk(lab: dict) -> None:
    agent: AgentProcess = lab["agent"]
    _create(lab, "dumper", memory=1100)
    folder = agent.state_dir / "vms" / "dumper"
    _wait("the guest", lambda: "QUIET-READY" in agent.cli("vm", "console", "dumper").stdout)
    vm = agent.cli_json("vm", "show", "dumper")
    assert vm["limits"]["file_max"] == limits.FILE_FLOOR  # no disk; logs far below
    assert "files 1024 MiB each" in agent.cli("vm", "show", "dumper").stdout
    spill = Path("/tmp") / f"hatchery-dump-{vm['uuid']}"  # world-writable: QEMU can write here
    agent.kill()  # its QMP is free: as a hostile guest inside QEMU would use it
    try:
        refused = ["run/dump", "dump", str(agent.state_dir / "dump")]
        answers = asyncio.run(_dump(folder / "run" / "qmp", [*refused, str(spill)]))
        for target, answer in zip(refused, answers, strict=False):
            assert "Permission denied" in answer, (target, answer)
        assert answers[-1] != "written", "1.1 GiB went past the file size limit"
        assert spill.stat().st_size <= limits.FILE_FLOOR
        _wait("QEMU's end (SIGXFSZ)", lambda: not qemu_alive(vm["pid"]), 30)
    finally:
        spill.unlink(missing_ok=True)
    assert not any(p.name == "dump" for p in folder.rglob("*"))
    agent.start()
    assert agent.cli_json("vm", "show", "dumper")["state"] == "crashed"
    agent.cli("vm", "destroy", "dumper")
