"""The hypervisor image booted in QEMU (into RAM) with a data disk: blank, reused, foreign.

The image's own self-check (hatchery-selfcheck.service, enabled by ``hatchery.selfcheck=1`` on
the kernel command line) prints ``HATCHERY-CHECK: ...`` facts and a final
``HATCHERY-CHECK-STATUS: N`` on the serial console, then powers the guest off. Between boots the
test reads and writes the data disk's ext4 from the host with debugfs (no mounts, no loop
devices): it provisions the agent's TLS files as an operator would.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from hatchery import pki
from hatchery_lab.guest import run_guest
from hatchery_lab.images import hypervisor_argv
from hatchery_lab.liveroot import is_live_initrd

BOOT_TIMEOUT = 900  # TCG on a shared machine: ~1-3 minutes per boot, generous margin
DISK_MIB = 512


@dataclass
class Boot:
    console: str
    facts: dict[str, str]
    checks: list[str]
    status: int

    def fact(self, key: str) -> str:
        return self.facts.get(key, "")


def boot(images: Path, disk: Path | None, cmdline: str = "") -> Boot:
    argv = hypervisor_argv(
        images, disk, f"hatchery.selfcheck=1 hatchery.selfcheck-poweroff=1 {cmdline}"
    )
    with run_guest(argv) as guest:
        guest.wait_for(b"HATCHERY-CHECK-STATUS: ", BOOT_TIMEOUT)
        guest.wait_for(b"reboot: Power down", 300)
        assert guest.process.wait(timeout=60) == 0
        console = guest.output.decode(errors="replace")
    facts: dict[str, str] = {}
    checks: list[str] = []
    for match in re.finditer(r"HATCHERY-CHECK: (\S+) ?([^\r\n]*)", console):
        key, rest = match.group(1), match.group(2).strip()
        if key in ("ok", "FAIL"):
            checks.append(f"{key} {rest}")
        else:
            facts[key] = rest
    status = re.search(r"HATCHERY-CHECK-STATUS: (\d+)", console)
    assert status is not None
    return Boot(console, facts, checks, int(status.group(1)))


def data_partition_offset(disk: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]  # fmt: skip
    parts = table["partitions"]
    assert len(parts) == 1, parts
    return int(parts[0]["start"]) * int(table.get("sectorsize", 512))


def debugfs(disk: Path, request: str, *, write: bool = False) -> str:
    offset = data_partition_offset(disk)
    argv = ["debugfs", *(["-w"] if write else []), "-R", request, f"{disk}?offset={offset}"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tools(require_tool: Callable[[str], str], require_root: None, images: Path) -> Path:
    for tool in ("qemu-system-x86_64", "sfdisk", "debugfs", "mkfs.vfat"):
        require_tool(tool)
    return images


def test_blank_disk_is_formatted_and_state_survives_reboot(tools: Path, tmp_path: Path) -> None:
    images = tools
    disk = tmp_path / "data.img"
    subprocess.run(["truncate", "-s", f"{DISK_MIB}M", str(disk)], check=True)

    first = boot(images, disk, "hatchery.selfcheck-write=first-boot-token")
    assert "hatchery-data: creating the data partition on /dev/vda" in first.console
    assert "hatchery-data: mounted /dev/vda1 at /data: state is persistent" in first.console
    assert first.fact("data").startswith("persistent=yes"), first.facts
    assert first.fact("findmnt").split()[1:4] == ["/dev/vda1", "ext4", "hatchery-data"]
    assert first.fact("token-found") == "none"
    assert first.fact("token-written") == "first-boot-token"
    assert first.fact("agent").startswith("not-provisioned"), first.facts
    assert first.status == 0, first.checks
    machine_id = first.fact("machine-id").split()[0]
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id)

    # From the host: the state is on the disk; provision the agent's TLS files onto /data.
    assert "first-boot-token" in debugfs(disk, "cat /var/lib/hatchery/selfcheck-token")
    assert machine_id in debugfs(disk, "cat /etc/machine-id")
    ca_dir, out = tmp_path / "ca", tmp_path / "issued"
    pki.init_ca(ca_dir)
    pair = pki.issue(ca_dir, "agent", out, server_names=("localhost",))
    for src, name in ((ca_dir / pki.CA_CERT, "ca.pem"), (pair.cert, "agent.pem"),
                      (pair.key, "agent.key")):  # fmt: skip
        debugfs(disk, f"write {src} /etc/hatchery/tls/{name}", write=True)

    second = boot(images, disk, "hatchery.selfcheck-write=second-boot-token")
    assert "creating the data partition" not in second.console
    assert "mounted /dev/vda1 at /data: state is persistent" in second.console
    assert second.fact("token-found") == "first-boot-token"
    assert second.fact("machine-id").split()[0] == machine_id
    assert second.fact("agent") == "active", second.console[-3000:]
    # TCG's -cpu max offers SVM: KVM's module is loaded before the agent chooses (it chose
    # TCG in one of two such boots when nothing ordered udev's load of it first). The choice
    # is read from this boot's journal, which journalctl finds only since journald files it
    # under the machine-id restored from /data (it read nothing before: data-setup)
    assert second.fact("cpu-virt") == "svm", second.facts
    assert second.fact("accelerator") == "kvm", second.facts
    # What loading the agent cost (bench images reports it): its first line, which a later
    # boot files under the machine-id PID 1 made up, before /data gave the node's own
    load = r"in [\d.]+ s \([\d.]+ s of CPU: [\d.]+ user, [\d.]+ system\)"
    assert re.fullmatch(load, second.fact("agent-load")), second.facts
    assert second.status == 0, second.checks


def test_disk_with_foreign_partitions_is_never_formatted(tools: Path, tmp_path: Path) -> None:
    images = tools
    disk = tmp_path / "foreign.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\nstart=2048, type=c\n",
                   text=True, check=True)  # fmt: skip
    subprocess.run(["mkfs.vfat", "-n", "SOMEONES", "--offset=2048", str(disk), "30000"],
                   capture_output=True, check=True)  # fmt: skip
    before = sha256(disk)

    result = boot(images, disk)
    assert "hatchery-data: NOT formatting /dev/vda: it already has partitions or data" in (
        result.console
    )
    assert "hatchery.wipe-data=1" in result.console
    assert "WARNING: no data disk; /data is in RAM and the node's state is NOT persistent" in (
        result.console
    )
    assert result.fact("data").startswith("persistent=no")
    assert result.status == 0, result.checks  # the node still works: paths point into RAM
    assert sha256(disk) == before, "the foreign disk was modified"


def test_the_live_root_keeps_the_root_compressed(tools: Path, tmp_path: Path) -> None:
    """The live root (hatchery_lab.liveroot, the default layout): the root kept as a squashfs
    image under a tmpfs overlay boots, mounts /data and starts the agent, and holds the
    compressed image's size in RAM, not the unpacked tree's."""
    live = tools
    assert is_live_initrd(live / "hypervisor" / "hypervisor.cpio.zst")
    # A data disk made on the host as a node would find it (a file system labelled
    # hatchery-data is used as is), holding the agent's TLS files: one boot shows it all.
    tls = tmp_path / "data" / "etc/hatchery/tls"
    tls.mkdir(parents=True)
    ca_dir = tmp_path / "ca"
    pki.init_ca(ca_dir)
    pair = pki.issue(ca_dir, "agent", tmp_path / "issued", server_names=("localhost",))
    for src, name in ((ca_dir / pki.CA_CERT, "ca.pem"), (pair.cert, "agent.pem"),
                      (pair.key, "agent.key")):  # fmt: skip
        shutil.copy(src, tls / name)
    disk = tmp_path / "data.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "hatchery-data", "-d", str(tmp_path / "data"),
                    str(disk), f"{DISK_MIB}M"], check=True)  # fmt: skip

    result = boot(live, disk)
    assert "hatchery-init:" not in result.console  # /init reported no failure
    assert "hatchery-data: mounted /dev/vda at /data: state is persistent" in result.console
    assert result.fact("agent") == "active", result.console[-3000:]
    assert result.status == 0, result.checks
    root = dict(field.split("=") for field in result.fact("root-ram").split())
    assert root["layout"] == "squashfs", result.facts
    image_mb, writes_mb = (
        int(root["image"].removesuffix("MB")),
        int(root["writes"].removesuffix("MB")),
    )
    assert 50 < image_mb < 200 and writes_mb < 64, root
