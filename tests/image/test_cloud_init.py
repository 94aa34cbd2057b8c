"""Issue 5: Debian's stock cloud-init runs the agent's user data through the NoCloud path.

The guest image (tests/image/cloud_guest/, built with mkosi by hatchery_lab.cloud_guest) is
Debian 12 with Debian's own cloud-init and no change of Hatchery's: only systemd-networkd and
its wait-online unit are enabled. A real agent on a throwaway bridge creates the VM through
its CLI over mutual TLS, with ``--user-data``; the agent points cloud-init at its metadata
service by the SMBIOS serial ``ds=nocloud-net;s=http://169.254.169.254/nocloud/`` (direct
kernel boot: the table comes from QEMU's ``-smbios``, the guest firmware still publishes it).

The user data proves, on the serial console (read with ``hatchery vm console``), that it ran
and what the guest learnt: the instance-id and hostname of *this* VM, an address leased from
the agent's DHCP. cloud-init cannot wait for itself from runcmd (runcmd runs inside its final
stage), so runcmd starts a transient unit with ``systemd-run --no-block`` that waits with
``cloud-init status --wait`` and then writes ``cloud-init status --long`` to the console.
All of this is user data; the image stays stock.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hatchery.metadata.service import teardown_bridge
from hatchery_lab.agent import AgentProcess, Pki, qemu_alive
from hatchery_lab.cloud_guest import CloudGuestImage, build_cloud_guest
from hatchery_lab.net import bridge
from tests.conftest import missing

TIMEOUT = 420  # TCG on a shared machine: ~40-60 s when idle, much more when loaded
VM = "cinit"

# Run by runcmd: the guest's own view of itself, on one console line.
REPORT_RAN = r"""#!/bin/sh
tag="$1"
iid="$(cloud-init query instance_id 2>&1)"
addr="$(ip -4 -o addr show scope global dynamic | awk '{print $4}' | tr '\n' ' ')"
gw="$(ip -4 route show default | awk '{print $3}' | head -n 1)"
srv="$(cat /run/systemd/netif/leases/* 2>/dev/null | sed -n 's/^SERVER_ADDRESS=//p' | head -n 1)"
up="$(cut -d ' ' -f 1 /proc/uptime)"
echo "CI-RAN-$tag iid=$iid host=$(hostname) addr=${addr% } gw=$gw dhcp=$srv uptime=$up" \
  > /dev/ttyS0
"""

# Run as a transient unit, outside cloud-final.service: waits for cloud-init to finish.
REPORT_STATUS = r"""#!/bin/sh
tag="$1"
cloud-init status --wait > /dev/null 2>&1
{
  echo "CI-STATUS-BEGIN-$tag"
  cloud-init status --long
  echo "CI-STATUS-END-$tag uptime=$(cut -d ' ' -f 1 /proc/uptime)"
} > /dev/ttyS0 2>&1
"""


def user_data(tag: str) -> str:
    config = {
        # cloud-init's default locale step fails on Debian (update-locale) without this.
        "locale": "C.UTF-8",
        "write_files": [
            {"path": "/run/hatchery-test/report-ran", "permissions": "0755", "content": REPORT_RAN},
            {
                "path": "/run/hatchery-test/report-status",
                "permissions": "0755",
                "content": REPORT_STATUS,
            },
        ],  # fmt: skip
        "runcmd": [
            ["/run/hatchery-test/report-ran", tag],
            [
                "systemd-run",
                "--no-block",
                "--unit",
                "hatchery-test-status",
                "/run/hatchery-test/report-status",
                tag,
            ],
        ],  # fmt: skip
    }
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)


@dataclass
class Lab:
    agent: AgentProcess
    image: CloudGuestImage
    bridge: str
    subnet: str  # e.g. "10.123.77"
    qemu_pids: list[int]  # every QEMU the agent started for the test, checked at teardown


@pytest.fixture
def lab(tmp_path: Path, require_root: None, require_tool: Callable[[str], str]) -> Iterator[Lab]:
    require_tool("qemu-system-x86_64")
    require_tool("nft")
    if shutil.which("mkosi") is None:
        missing("mkosi is not installed (make setup installs it)")
    image = build_cloud_guest()
    subnet = f"10.{random.randrange(16, 250)}.{random.randrange(1, 250)}"
    pki_ = Pki.make(tmp_path / "pki")
    with bridge(f"{subnet}.1/24", prefix="hci") as br:
        agent = AgentProcess.configure(
            tmp_path,
            pki_,
            [{"name": br, "subnets": [{"cidr": f"{subnet}.0/24", "gateway": f"{subnet}.1",
                                       "pool": {"start": f"{subnet}.10", "end": f"{subnet}.11"}}]}],
            # The guest's kernel and initrd are VM sources in artefact folders.
            vm_sources={"folders": sorted({str(image.kernel.parent), str(image.initrd.parent)})},
        )  # fmt: skip
        lab = Lab(agent, image, br, subnet, [])
        try:
            agent.start()
            yield lab
        finally:
            _teardown(lab)


def _teardown(lab: Lab) -> None:
    """Destroy the VM through the agent, then make sure of it: nothing of the test survives."""
    agent, br, started_pids = lab.agent, lab.bridge, lab.qemu_pids
    try:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.cli("vm", "destroy", VM, check=False)
    finally:
        agent.kill()
        for pid_file in (agent.state_dir / "vms").glob("*/pid"):
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            started_pids.append(pid)
            if qemu_alive(pid):
                os.kill(pid, 9)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for link in links.splitlines():
            name = link.split(": ")[1].split("@")[0]
            if name.startswith("hv-") and f"master {br}" in link:
                subprocess.run(["ip", "link", "del", name], check=False)
        asyncio.run(teardown_bridge(br))
    leftovers = [f"qemu {pid}" for pid in started_pids if qemu_alive(pid)]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    leftovers += [line for line in netns.splitlines() if br in line]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    leftovers += [line for line in tables.splitlines() if br in line]
    assert not leftovers, f"left behind after the test: {leftovers}"


def _console_until(agent: AgentProcess, pattern: re.Pattern[str], deadline: float) -> str:
    while True:
        text = agent.cli("vm", "console", VM).stdout
        if pattern.search(text):
            return text
        state = agent.cli_json("vm", "show", VM)["state"]
        if state != "running" or time.monotonic() > deadline:
            raise AssertionError(
                f"no {pattern.pattern!r} on the console (vm {state}):\n{text[-6000:]}"
            )
        time.sleep(2)


def test_stock_cloud_init_runs_user_data_from_nocloud(lab: Lab, tmp_path: Path) -> None:
    agent = lab.agent
    # The image really is stock: Debian's cloud-init package, nothing of ours.
    assert lab.image.packages.get("cloud-init", "").startswith("22.4")
    assert not any(name.startswith("hatchery") for name in lab.image.packages)

    tag = secrets.token_hex(8)
    data = tmp_path / "user-data.yaml"
    data.write_text(user_data(tag))
    started = time.monotonic()
    vm = agent.cli_json(
        "vm", "create", VM,
        "--kernel", str(lab.image.kernel), "--initrd", str(lab.image.initrd),
        "--cmdline", "console=ttyS0", "--memory", "1024", "--user-data", str(data),
    )  # fmt: skip
    lab.qemu_pids.append(vm["pid"])
    assert vm["state"] == "running"
    assert vm["ip"] == f"{lab.subnet}.10"
    deadline = started + TIMEOUT

    # runcmd ran: the user data the agent was given reached the guest.
    ran_re = re.compile(rf"CI-RAN-{tag} (.*)")
    console = _console_until(agent, ran_re, deadline)
    ran_after = time.monotonic() - started
    match = ran_re.search(console)
    assert match is not None
    facts = dict(re.findall(r"(\w+)=(\S*)", match.group(1)))
    # The metadata it used is this VM's own: its instance-id is the VM's uuid, its hostname
    # the VM's name.
    shown = agent.cli_json("vm", "show", VM)
    assert facts["iid"] == shown["uuid"] == vm["uuid"], match.group(0)
    assert facts["host"] == VM, match.group(0)
    # Its address is a DHCP lease (dynamic) from the agent's pool, served from the bridge.
    assert facts["addr"] == f"{vm['ip']}/24", match.group(0)
    assert facts["gw"] == f"{lab.subnet}.1", match.group(0)
    assert facts["dhcp"] == f"{lab.subnet}.1", match.group(0)
    # cloud-init's network stage ran after DHCP: its own "Net device info" table (printed by
    # the init stage, before any user data) already shows the leased address.
    assert re.search(rf"ci-info: \|\s*\S+\s*\|\s*True\s*\|\s*{re.escape(vm['ip'])}\s*\|", console)

    # cloud-init finished every stage without an error.
    status_re = re.compile(rf"CI-STATUS-BEGIN-{tag}(.*?)CI-STATUS-END-{tag}", re.S)
    console = _console_until(agent, status_re, deadline)
    done_after = time.monotonic() - started
    block = status_re.search(console)
    assert block is not None
    status = block.group(1)
    (tmp_path / "console.log").write_text(console)  # kept by pytest for a look afterwards
    assert re.search(r"^status: done\s*$", status, re.M), status
    # …with the NoCloud datasource, seeded from the DMI serial the agent set (net mode).
    assert "DataSourceNoCloudNet" in status, status
    assert "http://169.254.169.254/nocloud/" in status, status

    print(
        f"\ncloud-init guest: user-data ran {ran_after:.0f} s after create "
        f"(guest uptime {facts.get('uptime')} s), status done after {done_after:.0f} s; "
        f"initrd {lab.image.initrd.stat().st_size / 1e6:.0f} MB"
        + (f", built in {lab.image.build_seconds:.0f} s" if lab.image.built_now else ", cached")
    )
