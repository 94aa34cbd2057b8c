"""A real agent for tests: certificates, a config, the daemon as a subprocess, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hatchery import pki

BIN = Path(sys.executable).parent


def qemu_alive(pid: int) -> bool:
    """Whether ``pid`` is still a QEMU process (the VM a test started is still running)."""
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def bridge_config(bridge: str, subnet: str, **keys: Any) -> dict[str, Any]:
    """A bridge of the agent's config for a test's VMs: ``subnet``.0/24 (``subnet`` is its first
    three octets), the bridge's own address .1 as gateway, two VM addresses (.10, .11);
    ``keys``: any other bridge setting (``dhcp``, ``metadata``, ...)."""
    return {"name": bridge, **keys,
            "subnets": [{"cidr": f"{subnet}.0/24", "gateway": f"{subnet}.1",
                         "pool": {"start": f"{subnet}.10", "end": f"{subnet}.11"}}]}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    """A CA, the agent's server certificate and client certificates by name."""

    root: Path
    clients: dict[str, pki.IssuedPair] = field(default_factory=dict)

    @classmethod
    def make(cls, root: Path) -> Pki:
        pki.init_ca(root / "ca")
        made = cls(root)
        # Like a node's: it serves the API and is the agent's identity towards peers.
        made.server = pki.issue(root / "ca", "agent", root / "agent", server_names=("127.0.0.1",),
                                groups=("node",), client=True)  # fmt: skip
        return made

    server: pki.IssuedPair = field(init=False)

    @property
    def ca(self) -> Path:
        return self.root / "ca" / "ca.pem"

    def client(self, name: str, *groups: str) -> pki.IssuedPair:
        if name not in self.clients:
            self.clients[name] = pki.issue(self.root / "ca", name, self.root / "clients",
                                           groups=groups)  # fmt: skip
        return self.clients[name]


@dataclass
class AgentProcess:
    config_path: Path
    state_dir: Path
    port: int
    pki: Pki
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def configure(
        cls, tmp: Path, pki_: Pki, bridges: list[dict[str, Any]], **extra: Any
    ) -> AgentProcess:
        port = free_port()
        state_dir = tmp / "state"
        config = {
            "state_dir": str(state_dir),
            "listen": f"127.0.0.1:{port}",
            "tls": {
                "ca": str(pki_.ca),
                "cert": str(pki_.server.cert),
                "key": str(pki_.server.key),
                "crl": str(tmp / "tls" / "crl.pem"),
            },  # never the host's /etc/hatchery
            "capacity": {"reserve_memory_mib": 512, "reserve_disk_mib": 0},
            "bridges": bridges,
            **extra,
        }
        path = tmp / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        return cls(path, state_dir, port, pki_, tmp / "agent.log")

    @classmethod
    @contextlib.contextmanager
    def bare(cls, tmp: Path, timeout: float = 120) -> Iterator[AgentProcess]:
        """An agent with its own PKI and no bridges, running, killed afterwards: the API, the
        store and the listeners without any network plumbing."""
        agent = cls.configure(tmp, Pki.make(tmp / "pki"), bridges=[])
        agent.start(timeout=timeout)
        try:
            yield agent
        finally:
            agent.kill()

    def start(self, timeout: float = 30, *, debug: bool = True) -> None:
        """Start the agent and wait until it is ready; ``debug``: log at DEBUG, as tests want
        (a benchmark measures the agent as nodes run it: ``debug=False``)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "hatchery-agent"), *(["--debug"] if debug else []), "run", "--config",
             str(self.config_path)],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while b"agent ready" not in self.log_path.read_bytes()[offset:]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent not ready: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def kill_with_vms(self) -> None:
        """A test's cleanup: the agent killed, then every QEMU its VM records name (VMs outlive
        their agent, so killing it alone would leave them running)."""
        self.kill()
        for record in (self.state_dir / "vms").glob("*/vm.json"):
            pid = json.loads(record.read_text()).get("pid")
            if pid is not None and qemu_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def cli(
        self, *args: str, client: str = "admin", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        pair = self.pki.client(client, "admin") if client == "admin" else self.pki.clients[client]
        argv = [
            str(BIN / "hatchery"), *args, "--agent", f"127.0.0.1:{self.port}",
            "--ca", str(self.pki.ca), "--cert", str(pair.cert), "--key", str(pair.key),
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stderr}{result.stdout}")
        return result

    def cli_json(self, *args: str, client: str = "admin") -> Any:
        return json.loads(self.cli(*args, "--json", client=client).stdout)
