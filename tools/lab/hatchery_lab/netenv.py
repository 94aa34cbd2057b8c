"""A private boot network for tests and benchmarks: one network namespace holding a bridge
(the "boot interface" our services bind to), plus client namespaces on veths and taps for
QEMU guests on that bridge. Everything lives inside namespaces this module created, so
removing the namespaces removes every interface; processes we start are killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

AGENT = Path(sys.executable).parent / "hatchery-agent"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


@dataclass
class Service:
    """A process we started (in a namespace); stopped by PID, SIGTERM then SIGKILL."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {needle!r} in {timeout}s:\n{self.text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class NetEnv:
    tag: str
    workdir: Path
    subnet: str = "10.231.0"  # /24 inside our own namespace only
    ns: str = ""
    bridge: str = "hbr0"
    client_namespaces: list[str] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    @property
    def server_ip(self) -> str:
        return f"{self.subnet}.1"

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check)

    def in_ns(self, argv: Sequence[str], ns: str | None = None) -> list[str]:
        return ["ip", "netns", "exec", ns or self.ns, *argv]

    def start(self, name: str, argv: Sequence[str], ns: str | None = None) -> Service:
        log = self.workdir / f"{name}.log"
        out = log.open("wb")
        proc = subprocess.Popen(self.in_ns(argv, ns), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
        out.close()
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    def agent(self, name: str, *args: str, debug: bool = True) -> Service:
        """``hatchery-agent [--debug] serve ...`` in the server namespace."""
        return self.start(name, [str(AGENT), *(["--debug"] if debug else []), "serve", *args])

    def port_of(self, name: str) -> str:
        """The bridge port (outer veth end) of client ``name``."""
        return f"v{name}{self.tag}"[:15]

    def add_client(self, name: str, mac: str | None = None) -> str:
        """A client namespace with ``eth0`` on the bridge; returns the namespace's name."""
        ns = f"{self.ns}-{name}"
        sh("ip", "netns", "add", ns)
        self.client_namespaces.append(ns)
        port = self.port_of(name)
        sh("ip", "-n", self.ns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", ns)  # fmt: skip
        sh("ip", "-n", self.ns, "link", "set", port, "master", self.bridge, "up")
        if mac:
            sh("ip", "-n", ns, "link", "set", "eth0", "address", mac)
        _sysctl(ns, "net.ipv6.conf.eth0.accept_dad", "0")  # link-local usable at once
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns

    def add_tap(self, name: str) -> str:
        tap = f"t{name}{self.tag}"[:15]
        sh("ip", "-n", self.ns, "tuntap", "add", "dev", tap, "mode", "tap")
        sh("ip", "-n", self.ns, "link", "set", tap, "master", self.bridge, "up")
        return tap


def _sysctl(ns: str, key: str, value: str) -> None:
    sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}", check=False)


@contextlib.contextmanager
def boot_network(
    workdir: Path, subnet: str = "10.231.0", bridge: str = "hbr0", *, ipv4: bool = True,
    ipv6: str | None = None,
) -> Iterator[NetEnv]:  # fmt: skip
    """Create the namespace and bridge; always stop our services and remove it all.

    ``ipv4=False``: the bridge has no IPv4 address at all (IPv6 births); ``ipv6``: an
    address with prefix length for the bridge (``fd42::1/64``), usable at once (no DAD).

    Name the bridge uniquely (``hatchery_lab.net.unique_name``) when something outside the
    namespace is named after it, such as the metadata service's ``hmd-<bridge>`` namespace.
    """
    tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    env = NetEnv(tag=tag, workdir=workdir, subnet=subnet, ns=f"hnb{tag}", bridge=bridge)
    sh("ip", "netns", "add", env.ns)
    try:
        sh("ip", "-n", env.ns, "link", "set", "lo", "up")
        sh("ip", "-n", env.ns, "link", "add", env.bridge, "type", "bridge", "forward_delay", "0")
        # the bridge's link-local address must be usable at once (RA source), without DAD
        _sysctl(env.ns, f"net.ipv6.conf.{env.bridge}.accept_dad", "0")
        _sysctl(env.ns, f"net.ipv6.conf.{env.bridge}.disable_ipv6", "0")
        if ipv4:
            sh("ip", "-n", env.ns, "addr", "add", f"{env.server_ip}/24", "dev", env.bridge)
        if ipv6:
            sh("ip", "-n", env.ns, "addr", "add", ipv6, "dev", env.bridge, "nodad")
        sh("ip", "-n", env.ns, "link", "set", env.bridge, "up")
        yield env
    finally:
        for service in reversed(env.services):
            service.stop()
        for ns in env.client_namespaces:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "del", env.ns, check=False)
