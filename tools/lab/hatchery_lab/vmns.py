"""Stand-in VMs for network tests: a namespace with a veth whose outer end is a bridge port."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from hatchery import host
from hatchery_lab.net import unique_name


def sh(*argv: str, check: bool = True) -> host.Completed:
    """``argv`` run to its end; a failure's message carries the command's stderr (a storm
    bench run once died on ``ip link add … netns`` exiting 2 with no word of why)."""
    return host.run(argv, check=check)


@dataclass(frozen=True)
class NsVm:
    netns: str
    port: str  # the outer veth end, on the bridge (what a tap is for a real VM)
    mac: str
    ip: str | None  # None: no address yet (the namespace asks DHCP for one)
    gateway: str | None = None

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def set_ip(self, ip: str, prefix: int = 24) -> None:
        self.run("ip", "addr", "flush", "dev", "eth0")
        self.run("ip", "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        if self.gateway:
            self.run("ip", "route", "replace", "default", "via", self.gateway)

    def set_mac(self, mac: str) -> None:
        self.run("ip", "link", "set", "eth0", "address", mac)


@contextlib.contextmanager
def ns_vm(bridge: str, mac: str, ip: str | None, gateway: str | None = None) -> Iterator[NsVm]:
    name = unique_name("hvm")
    port = unique_name("hvp")
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "link", "set", port, "master", bridge, "up")
        vm = NsVm(name, port, mac, ip, gateway)
        vm.run("ip", "link", "set", "lo", "up")
        vm.run("ip", "link", "set", "eth0", "address", mac)
        vm.run("ip", "link", "set", "eth0", "up")
        if ip is not None:
            vm.set_ip(ip)
        yield vm
    finally:
        sh("ip", "link", "del", port, check=False)
        sh("ip", "netns", "del", name, check=False)
