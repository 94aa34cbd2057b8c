"""``hatchery vm console NAME --attach`` into a real QEMU guest's shell (issue 17).

The guest (Debian's kernel under TCG, a busybox initramfs) runs a shell on its serial
console. The CLI runs under a pseudo-terminal, as an operator's would: it puts the terminal
in raw mode, types a command into the guest and reads its answer, and on ``Ctrl-]`` exits 0
with the terminal as it found it. Meanwhile a reader (``--read-only``, another tenant of the
group) sees the same output, a second writer is refused with the first one's name, a
reader-only certificate may not type, and a tenant of another group gets the answer a
missing VM gets. The console log is kept as before.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery.metadata.service import teardown_bridge
from hatchery_lab.agent import BIN, AgentProcess, Pki, bridge_config
from hatchery_lab.guest import INIT_PRELUDE, GuestKernel, busybox_initramfs, find_guest_kernel
from hatchery_lab.net import bridge
from hatchery_lab.terminal import Terminal
from tests.conftest import missing

pytestmark = pytest.mark.integration

GUEST_INIT = INIT_PRELUDE + "echo GUEST-SHELL-READY\nexec setsid cttyhack sh\n"


@pytest.fixture
def lab(tmp_path: Path, require_root: None, require_tool: Callable[[str], str]) -> Iterator[dict]:
    require_tool("qemu-system-x86_64")
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    assert isinstance(kernel, GuestKernel)
    subnet = f"10.{random.randrange(16, 250)}.78"
    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    initrd = artefacts / "initrd"
    initrd.write_bytes(busybox_initramfs(GUEST_INIT))
    pki_ = Pki.make(tmp_path / "pki")
    for name, group in (("walt", "web"), ("wanda", "web"), ("rita", "reader"), ("dora", "db")):
        pki_.client(name, group)
    with bridge(f"{subnet}.1/24") as br:
        agent = AgentProcess.configure(
            tmp_path, pki_, [bridge_config(br, subnet, dhcp=False, metadata=False)],
            vm_sources={"folders": [str(kernel.vmlinux().parent), str(artefacts)]},
        )  # fmt: skip
        agent.start()
        try:
            yield {"agent": agent, "kernel": kernel.vmlinux(), "initrd": initrd}
        finally:
            agent.kill_with_vms()
            asyncio.run(teardown_bridge(br))


def _argv(agent: AgentProcess, client: str, *args: str) -> list[str]:
    pair = agent.pki.clients[client]
    return [str(BIN / "hatchery"), "vm", "console", *args, "--agent", f"127.0.0.1:{agent.port}",
            "--ca", str(agent.pki.ca), "--cert", str(pair.cert),
            "--key", str(pair.key)]  # fmt: skip


def _wait_log(agent: AgentProcess, name: str, marker: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while marker not in (text := agent.cli("vm", "console", name).stdout):
        assert time.monotonic() < deadline, f"no {marker!r} on {name}'s console:\n{text[-2000:]}"
        time.sleep(1)


def test_attach_types_into_the_guest_and_detaches(lab: dict, tmp_path: Path) -> None:
    agent: AgentProcess = lab["agent"]
    agent.cli("vm", "create", "web1", "--kernel", str(lab["kernel"]), "--initrd",
              str(lab["initrd"]), "--cmdline", "console=ttyS0 quiet", "--memory", "192",
              "--owner-group", "web")  # fmt: skip
    _wait_log(agent, "web1", "GUEST-SHELL-READY")

    # A reader of the same group, without a terminal: it sees what the writer makes happen.
    watched = tmp_path / "reader.out"
    with watched.open("wb") as sink:
        reader = subprocess.Popen(_argv(agent, "walt", "web1", "--attach", "--read-only"),
                                  stdin=subprocess.DEVNULL, stdout=sink,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    term = Terminal(_argv(agent, "walt", "web1", "--attach"))
    try:
        cooked = term.lflag()
        assert cooked & termios.ICANON and cooked & termios.ECHO
        term.read_until(b"Escape character is ^]")
        assert term.lflag() & (termios.ICANON | termios.ECHO) == 0  # raw while attached
        assert b"as writer" in term.output
        deadline = time.monotonic() + 60
        while b"as reader" not in watched.read_bytes():
            assert reader.poll() is None and time.monotonic() < deadline, watched.read_text()
            time.sleep(0.2)

        term.type(b"\r")  # wake the shell, then ask it something only it can answer
        term.type(b"echo ANSWER-$((6*7))-$(cat /proc/sys/kernel/ostype)\r")
        term.read_until(b"ANSWER-42-Linux", timeout=120)

        # A second writer is refused, naming the one there is; --read-only is the way in.
        second = agent.cli("vm", "console", "web1", "--attach", client="wanda", check=False)
        assert second.returncode == 1
        assert "has a writer already (walt)" in second.stderr and "--read-only" in second.stderr
        # A reader certificate may watch but not type.
        rita = agent.cli("vm", "console", "web1", "--attach", client="rita", check=False)
        assert rita.returncode == 1 and "HTTP 403" in rita.stderr
        assert "may not vm.console" in rita.stderr
        # Another group's tenant: exactly what a VM that does not exist answers.
        theirs = agent.cli("vm", "console", "web1", "--attach", "--read-only", client="dora",
                           check=False)  # fmt: skip
        nothing = agent.cli("vm", "console", "nope", "--attach", "--read-only", client="dora",
                            check=False)  # fmt: skip
        assert theirs.returncode == nothing.returncode == 1
        assert "HTTP 404" in theirs.stderr
        assert theirs.stderr == nothing.stderr.replace("'nope'", "'web1'")

        term.type(b"\x1d")  # Ctrl-]
        assert term.wait() == 0, term.output[-2000:]
        assert b"Detached from vm web1" in term.output
        restored = term.lflag()
        assert restored & termios.ICANON and restored & termios.ECHO, "terminal left raw"
    finally:
        term.close()
        if reader.poll() is None:
            reader.send_signal(signal.SIGTERM)  # a watcher detaches on SIGTERM, exit 0
        assert reader.wait(timeout=30) == 0, watched.read_text()
    assert b"ANSWER-42-Linux" in watched.read_bytes()
    # The console log is kept as before, what was typed and answered included.
    _wait_log(agent, "web1", "ANSWER-42-Linux", timeout=30)
    # The writer's seat is free again.
    again = Terminal(_argv(agent, "wanda", "web1", "--attach"))
    try:
        again.read_until(b"as writer")
        again.type(b"\x1d")
        assert again.wait() == 0
    finally:
        again.close()
    agent.cli("vm", "destroy", "web1")
