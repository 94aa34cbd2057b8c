"""A guest that proves it was not rebooted, and an agent on a lab bridge to run it: shared by
the tests of issue 16 (refresh, suspend and resume, across QEMU versions) and the bench of
the pause (``bench/vm_pause.py``).

The guest prints its ``boot_id``, uptime and a counter kept in its RAM on its serial console
every second, answers pings on the lab's bridge once it has its lease, and serves the same
facts, its MAC and IP and whether its metadata service answers, over HTTP
(``guest_state``): what a tenant would notice if the host had rebooted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hatchery.metadata.service import teardown_bridge
from hatchery_lab.agent import AgentProcess, Pki, qemu_alive
from hatchery_lab.cpio_writer import Entry
from hatchery_lab.guest import INIT_PRELUDE, VIRTIO_NET_MODULES, GuestKernel, busybox_initramfs
from hatchery_lab.net import bridge

GUEST_INIT = INIT_PRELUDE + (
    r"""
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
udhcpc -i eth0 -q -n -t 20 -T 1 -s /bin/lease
httpd -h /www -p 80
n=0
while true; do
  n=$((n+1)); echo "$n" > /tmp/count
  echo "TICK boot=$(cat /proc/sys/kernel/random/boot_id) up=$(cut -d' ' -f1 /proc/uptime) n=$n"
  sleep 1
done
"""
)

LEASE_SCRIPT = r"""#!/bin/sh
case "$1" in
bound|renew)
  ip addr add "$ip/$mask" dev "$interface"
  [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
  echo "$ip" > /tmp/ip
  echo "LEASE ip=$ip";;
esac
"""
# What the guest serves at /cgi-bin/state: one key=value a line. The counter lives in the
# guest's RAM (/tmp is the initramfs); metadata= is the status line of the link-local
# metadata service's answer, asked now.
STATE_CGI = r"""#!/bin/sh
echo "Content-Type: text/plain"
echo ""
echo "boot=$(cat /proc/sys/kernel/random/boot_id)"
echo "up=$(cut -d' ' -f1 /proc/uptime)"
echo "count=$(cat /tmp/count)"
echo "mac=$(cat /sys/class/net/eth0/address)"
echo "ip=$(cat /tmp/ip)"
printf 'GET /latest/dynamic/instance-identity/document HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n' |
  timeout 10 nc 169.254.169.254 80 > /tmp/metadata 2>/dev/null
echo "metadata=$(head -n 1 /tmp/metadata | tr -d '\r')"
"""
TICK = re.compile(r"TICK boot=([0-9a-f-]{36}) up=([0-9.]+)")


def ticking_initrd(kernel: GuestKernel) -> bytes:
    """The busybox initramfs of the ticking guest, with the virtio-net modules it needs."""
    modules = [kernel.module(m) for m in VIRTIO_NET_MODULES]
    files = [
        Entry.file("bin/lease", LEASE_SCRIPT.encode(), 0o755),
        Entry.directory("www"),
        Entry.directory("www/cgi-bin"),
        Entry.file("www/cgi-bin/state", STATE_CGI.encode(), 0o755),
    ]
    return busybox_initramfs(GUEST_INIT, modules=modules, files=files)


def guest_state(ip: str, timeout: float = 30) -> dict[str, str]:
    """What the ticking guest at ``ip`` says over HTTP: ``boot``, ``up``, ``count``, ``mac``,
    ``ip`` and ``metadata`` (the status line its metadata service gave)."""
    with urllib.request.urlopen(f"http://{ip}/cgi-bin/state", timeout=timeout) as answer:
        text = answer.read().decode()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@contextlib.contextmanager
def agent_on_bridge(
    tmp_path: Path, kernel: GuestKernel, octet: int, **extra: Any
) -> Iterator[dict[str, Any]]:
    """A running agent with one lab bridge and one pool address; the ticking guest's kernel
    and initrd in a source folder. Afterwards: the agent, every QEMU its records name, the
    taps on the bridge and the bridge are gone."""
    subnet = f"10.{random.randrange(16, 250)}.{octet}"
    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    initrd = artefacts / "initrd"
    initrd.write_bytes(ticking_initrd(kernel))
    with bridge(f"{subnet}.1/24") as br:
        agent = AgentProcess.configure(
            tmp_path,
            Pki.make(tmp_path / "pki"),
            [{"name": br, "subnets": [{"cidr": f"{subnet}.0/24", "gateway": f"{subnet}.1",
                                       "pool": {"start": f"{subnet}.10", "end": f"{subnet}.10"}}]}],
            vm_sources={"folders": [str(kernel.vmlinux().parent), str(artefacts)]},
            **extra,
        )  # fmt: skip
        agent.start()
        try:
            yield {"agent": agent, "kernel": kernel.vmlinux(), "initrd": initrd,
                   "ip": f"{subnet}.10"}  # fmt: skip
        finally:
            agent.kill()
            for record in (agent.state_dir / "vms").glob("*/vm.json"):
                data = json.loads(record.read_text())
                for pid in (data.get("pid"), data.get("incoming_pid")):
                    if pid is not None and qemu_alive(pid):
                        os.kill(pid, 9)
            for link in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                       text=True).stdout.splitlines():  # fmt: skip
                name = link.split(": ")[1].split("@")[0]
                if name.startswith("hv-") and f"master {br}" in link:
                    subprocess.run(["ip", "link", "del", name], check=False)
            asyncio.run(teardown_bridge(br))


def create(lab: dict[str, Any], name: str, memory: int = 160) -> Any:
    return lab["agent"].cli_json(
        "vm", "create", name, "--kernel", str(lab["kernel"]), "--initrd", str(lab["initrd"]),
        "--cmdline", "console=ttyS0 quiet", "--memory", str(memory),
    )  # fmt: skip


def ticks(agent: AgentProcess, name: str) -> list[tuple[str, float]]:
    text = agent.cli("vm", "console", name).stdout
    return [(m[1], float(m[2])) for m in TICK.finditer(text)]


def next_tick(
    agent: AgentProcess, name: str, after: int, timeout: float = 240
) -> tuple[str, float]:
    """The first tick printed after the first ``after`` ticks of the console."""
    deadline = time.monotonic() + timeout
    while True:
        seen = ticks(agent, name)
        if len(seen) > after:
            return seen[after]
        if time.monotonic() > deadline:
            tail = agent.cli("vm", "console", name).stdout[-1500:]
            raise AssertionError(f"no new tick on {name}'s console:\n{tail}")
        time.sleep(1)


def ping(ip: str) -> bool:
    return subprocess.run(["ping", "-c", "1", "-W", "3", ip], capture_output=True).returncode == 0


def ping_loss(ip: str, during: Callable[[], object], settle: float = 2.0) -> int:
    """Pings lost at 10 ms intervals from ``settle`` seconds before ``during()`` to
    ``settle`` seconds after it."""
    pinger = subprocess.Popen(["ping", "-i", "0.01", "-W", "1", ip],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(settle)
        during()
        time.sleep(settle)
    finally:
        pinger.send_signal(signal.SIGINT)
        out, _ = pinger.communicate(timeout=30)
    found = re.findall(r"(\d+) packets transmitted, (\d+) received", out)
    assert found, out[-500:]
    sent, received = (int(n) for n in found[0])
    assert sent > 100, out[-500:]
    return sent - received


def wait_ping(ip: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ping(ip):
        assert time.monotonic() < deadline, f"{ip} does not answer"
