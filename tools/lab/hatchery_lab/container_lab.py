"""A real agent for container VMs on a throwaway bridge: what the image-tier test and the
container bench both run (``container_lab``).

The agent trusts one image key made here; the appliance's kernel and initrds are its VM
sources; ``publish`` signs an OCI archive with the CLI and publishes it through the API.
Everything is removed afterwards, on failure too: the agent, every QEMU it started, the
bridge and its metadata namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hatchery.images.signing import generate_key
from hatchery.metadata.service import teardown_bridge
from hatchery_lab.agent import BIN, AgentProcess, Pki, qemu_alive
from hatchery_lab.appliance_initrd import read_member
from hatchery_lab.net import bridge


@dataclass
class ContainerLab:
    agent: AgentProcess
    appliance: Path  # build/images/appliance-vm
    key: Path  # the private image key the agent trusts
    subnet: str  # "10.x.y"

    @functools.cached_property
    def busybox(self) -> bytes:
        """The appliance's own static busybox, for images made here."""
        return read_member(self.appliance / "appliance-vm.cpio.lz4", "usr/bin/busybox")

    def publish(self, archive: Path, ref: str) -> None:
        sign = [str(BIN / "hatchery"), "container", "sign", str(archive), ref,
                "--key", str(self.key)]  # fmt: skip
        subprocess.run(sign, check=True, capture_output=True, timeout=60)
        self.agent.cli("container", "publish", str(archive))


@contextlib.contextmanager
def container_lab(tmp: Path, appliance: Path, prefix: str, vms: int = 10) -> Iterator[ContainerLab]:
    """An agent on a new bridge with room for ``vms`` VMs; torn down on the way out."""
    keys = tmp / "image-keys"
    pair = generate_key(keys)
    subnet = f"10.{random.randrange(16, 250)}.{random.randrange(1, 250)}"
    with bridge(f"{subnet}.1/24", prefix=prefix) as br:
        pool = {"start": f"{subnet}.10", "end": f"{subnet}.{10 + vms}"}
        agent = AgentProcess.configure(
            tmp, Pki.make(tmp / "pki"),
            [{"name": br, "subnets": [{"cidr": f"{subnet}.0/24", "gateway": f"{subnet}.1",
                                       "pool": pool}]}],
            vm_sources={"folders": [str(appliance)]}, image_keys=str(keys),
        )  # fmt: skip
        pids: list[int] = []
        try:
            agent.start()
            yield ContainerLab(agent, appliance, pair.private, subnet)
        finally:
            agent.kill()
            for pid_file in (agent.state_dir / "vms").glob("*/pid"):
                with contextlib.suppress(OSError, ValueError):
                    pids.append(int(pid_file.read_text()))
                    if qemu_alive(pids[-1]):
                        os.kill(pids[-1], 9)
            asyncio.run(teardown_bridge(br))
        left = [pid for pid in pids if qemu_alive(pid)]
        if left:
            raise RuntimeError(f"QEMU processes left behind: {left}")
