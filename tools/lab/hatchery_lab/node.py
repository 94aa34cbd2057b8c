"""Hypervisor nodes for tests and the demo: our image booted in QEMU on a lab bridge.

A node boots the hypervisor image into RAM (direct kernel boot, or PXE from a peer) with a
blank data disk. Its identity — agent configuration, certificate, trusted image keys and
network configuration (br0 with a static address, the NIC enslaved) — comes in a *seed*
handed over through QEMU's firmware config (``hatchery-agent seed`` applies it at boot).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hatchery import pki
from hatchery.client import AgentClient, ApiError, Credentials
from hatchery.qemu.accel import choose_accel
from hatchery.qemu.cmdline import DirectKernel, GuestSpec, Nic, build_argv
from hatchery_lab.agent import BIN, Pki, free_port
from hatchery_lab.net import unique_name


@dataclass(frozen=True)
class Lab:
    """The lab segment: a bridge on the host with ``prefix.1``; nodes and VMs live on it."""

    bridge: str
    prefix: str  # "10.77.5"

    @property
    def host_ip(self) -> str:
        return f"{self.prefix}.1"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    mac: str
    ip: str  # the node's own address (on its br0)
    pool: tuple[str, str]  # addresses this node hands to its VMs
    memory_mib: int = 2048
    #: Two, as a server has several cores: under TCG each vCPU is a host thread, so the node's
    #: boot units, and an upload's TLS and its hashing, run side by side (the demo's first node
    #: was up with both images in its store after 54 s with two, 72 s with one).
    vcpus: int = 2


#: A node that kexecs into backports' 6.12 kernel (the upgrade test and bench) gets one vCPU.
#: With two under TCG (QEMU 7.2: one host thread per vCPU), that kernel once died early in its
#: boot with "Oops: int3" in devcgroup_check_permission: one vCPU ran a stale translation of a
#: breakpoint the other had already patched away (the kernel's static-key patching,
#: text_poke_bp). An emulator's race, not one a node's real CPUs have; 6.1 boots on two.
KEXEC_NODE_VCPUS = 1


def seed_tar(
    spec: NodeSpec,
    lab: Lab,
    pki_: Pki,
    image_keys: Path | None,
    boot: dict[str, Any] | None = None,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    """The node's seed: agent.yaml, TLS files, trusted image keys, br0 network config; with
    ``boot``, the node births peers on br0 (``extra`` can carry their seeds)."""
    pair = pki.issue(pki_.root / "ca", spec.name, pki_.root / "nodes",
                     groups=("node",), server_names=(spec.ip,), client=True,
                     force=True)  # fmt: skip
    agent_yaml = {
        "listen": "0.0.0.0:6976",
        "bridges": [{
            "name": "br0",
            "subnets": [{"cidr": f"{lab.prefix}.0/24", "gateway": lab.host_ip,
                         "pool": {"start": spec.pool[0], "end": spec.pool[1]}}],
            **({"boot": boot} if boot else {}),
        }],
    }  # fmt: skip
    files: dict[str, bytes] = {
        "hatchery/agent.yaml": yaml.safe_dump(agent_yaml).encode(),
        "hatchery/tls/ca.pem": pki_.ca.read_bytes(),
        "hatchery/tls/agent.pem": pair.cert.read_bytes(),
        "hatchery/tls/agent.key": pair.key.read_bytes(),
        "systemd/network/10-hatchery-br0.netdev": b"[NetDev]\nName=br0\nKind=bridge\n",
        "systemd/network/20-hatchery-uplink.network": (
            f"[Match]\nMACAddress={spec.mac}\n\n[Network]\nBridge=br0\n".encode()
        ),
        "systemd/network/30-hatchery-br0.network": (
            f"[Match]\nName=br0\n\n[Network]\nAddress={spec.ip}/24\nGateway={lab.host_ip}\n"
            "ConfigureWithoutCarrier=yes\n"
        ).encode(),
    }
    if image_keys is not None:
        for key in sorted(image_keys.glob("*.pub")):
            files[f"hatchery/image-keys/{key.name}"] = key.read_bytes()
    files.update(extra or {})
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# Milestones of a node's boot as its serial console shows them, in boot order: the demo
# prints each once as it happens, so a two-minute boot is not two minutes of silence.
CONSOLE_MILESTONES = (
    ("Linux version", "kernel up"),
    ("Run /init as init process", "root file system unpacked; systemd starting"),
    ("hatchery-agent.service", "agent loading (it starts once /data and the network are up)"),
    ("hatchery-data: mounted", "/data ready (persistent)"),
    ("hatchery-data: WARNING", "/data in RAM (no data disk)"),
)


@dataclass
class RunningNode:
    spec: NodeSpec
    process: subprocess.Popen[bytes]
    console: Path
    credentials: Credentials
    started: float = field(default_factory=time.monotonic)
    seen: set[str] = field(default_factory=set)  # milestones already announced

    def announce_milestones(self, say: Callable[[str], None]) -> None:
        """Say each console milestone reached since the last call, with the time since start."""
        text = self.console_text()
        for marker, label in CONSOLE_MILESTONES:
            if marker in text and label not in self.seen:
                self.seen.add(label)
                say(f"    {self.spec.name}: {label} ({time.monotonic() - self.started:.0f} s)")

    @property
    def address(self) -> str:
        return f"{self.spec.ip}:6976"

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, marker: str, timeout: float, after: int = 0) -> float:
        deadline = time.monotonic() + timeout
        while marker not in self.console_text()[after:]:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited; console:\n{self.console_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: no {marker!r} in {timeout:.0f}s; console:\n"
                                   + self.console_text()[-4000:])  # fmt: skip
            time.sleep(1)
        return time.monotonic() - self.started

    async def api(self, method: str, path: str, **kwargs: Any) -> Any:
        async with AgentClient(self.address, self.credentials, timeout=900) as client:
            return await client.request(method, path, **kwargs)

    def agent_log(self, lines: int = 200, since: str = "30m") -> str:
        """The node's agent log through ``hatchery logs`` (its journal, over the API): what
        to show when the node fails a step while its agent still answers. The CLI's error
        instead when it cannot be read."""
        creds = self.credentials
        argv = [str(BIN / "hatchery"), "logs", "--lines", str(lines), "--since", since,
                "--agent", self.address, "--ca", str(creds.ca), "--cert", str(creds.cert),
                "--key", str(creds.key)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        return done.stdout if done.returncode == 0 else f"(hatchery logs: {done.stderr.strip()})"

    def metric(self, name: str) -> float:
        """One series of the agent's ``/metrics`` (Prometheus text format): its name, with
        its labels as the agent writes them (``name{bridge="br0"}``) if it has any."""
        text = str(asyncio.run(self.api("GET", "/metrics")))
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(f"{self.spec.name}: no {name} in /metrics")

    def health(self) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = asyncio.run(self.api("GET", "/healthz"))
            return result
        except ApiError:
            return None

    def wait_agent(
        self,
        timeout: float,
        version: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Poll /healthz until the agent answers (on ``version`` if given); with ``say``,
        announce the boot's milestones on the way."""
        deadline = time.monotonic() + timeout
        while True:
            if say is not None:
                self.announce_milestones(say)
            health = self.health()
            if health is not None and (version is None or health["version"] == version):
                if say is not None:
                    say(f"    {self.spec.name}: agent answering on {self.address} "
                        f"({time.monotonic() - self.started:.0f} s)")  # fmt: skip
                return health
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited; console:\n{self.console_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: agent not up ({health}); console:\n"
                                   + self.console_text()[-4000:])  # fmt: skip
            time.sleep(2)


@contextlib.contextmanager
def lab_network(prefix: str) -> Iterator[Lab]:
    """A lab bridge on the host with ``prefix.1/24``; removed afterwards."""
    name = unique_name("hlab")
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{prefix}.1/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield Lab(name, prefix)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


@contextlib.contextmanager
def serve_folder(lab: Lab, folder: Path) -> Iterator[str]:
    """``folder`` served over plain HTTP on the lab bridge's host address (where nodes fetch
    VM kernels and initrds from); its base URL. The server is stopped afterwards."""
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", lab.host_ip,
         "--directory", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1)
        yield f"http://{lab.host_ip}:{port}"
    finally:
        web.kill()
        web.wait()


@contextlib.contextmanager
def boot_node(
    spec: NodeSpec,
    lab: Lab,
    pki_: Pki,
    workdir: Path,
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    image_keys: Path | None = None,
    client: pki.IssuedPair | None = None,
    cmdline: str = "",
    seed: bytes | None = None,
) -> Iterator[RunningNode]:
    """Boot a node: from ``kernel``+``initrd`` directly, or over PXE when they are None.

    The seed goes in through the firmware config unless the node is PXE-booted: then its
    peer serves it (``hatchery.seed=`` on the command line its boot script gives)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tap = unique_name("hnt")
    disk = workdir / f"{spec.name}-data.qcow2"
    seed_path = workdir / f"{spec.name}-seed.tar"
    console = workdir / f"{spec.name}-console.log"
    if kernel is not None:
        seed_path.write_bytes(seed if seed is not None else seed_tar(spec, lab, pki_, image_keys))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8G"], check=True)
    subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["ip", "link", "set", tap, "master", lab.bridge, "up"], check=True)
        boot = None
        extra = ["-drive", f"file={disk},format=qcow2,if=virtio,cache=unsafe"]
        if kernel is not None:
            extra += ["-fw_cfg", f"name=opt/hatchery/seed,file={seed_path}"]
            boot = DirectKernel(kernel, initrd, f"console=ttyS0 panic=-1 {cmdline}".strip())
        else:
            extra += ["-boot", "n"]
        argv = build_argv(GuestSpec(
            name=spec.name, accel=choose_accel(), memory_mib=spec.memory_mib, vcpus=spec.vcpus,
            boot=boot, nics=(Nic(tap, spec.mac),), serial=f"file:{console}",
            extra=tuple(extra),
        ))  # fmt: skip
        if kernel is None:
            # PXE: QEMU's own iPXE ROM on virtio-net (no romfile override: see MACHINE-NOTES)
            argv = [a.replace("virtio-net-pci,", "virtio-net-pci,bootindex=1,") for a in argv]
        log = (workdir / f"{spec.name}-qemu.log").open("wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        if client is None:
            client = pki_.client("admin", "admin")
        yield RunningNode(spec, proc, console, Credentials(pki_.ca, client.cert, client.key))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        subprocess.run(["ip", "link", "del", tap], check=False, capture_output=True)
