"""A simulated fleet in one subprocess (hatchery_rollout.simfleet) over real mutual TLS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hatchery import pki


@dataclass(frozen=True)
class Tls:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def args(self) -> list[str]:
        return [
            "--ca",
            str(self.ca),
            "--cert",
            str(self.client_cert),
            "--key",
            str(self.client_key),
        ]


@dataclass
class SimFleet:
    proc: subprocess.Popen[bytes]
    fleet: Path
    admin: int
    ports: dict[str, int]

    def stats(self) -> dict[str, dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats", timeout=10) as r:
            data: dict[str, dict[str, Any]] = json.loads(r.read())
            return data

    def configure(self, **changes: list[str]) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}/config",
            data=json.dumps(changes).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    d = tmp_path_factory.mktemp("pki")
    ca = pki.init_ca(d / "ca")
    server = pki.issue(d / "ca", "sim-agent", d, server_names=("127.0.0.1", "localhost"))
    client = pki.issue(d / "ca", "rollout", d, groups=("admin",))
    return Tls(ca, server.cert, server.key, client.cert, client.key)


@pytest.fixture
def simfleet(tls: Tls, tmp_path: Path) -> Iterator[Callable[..., SimFleet]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(hosts: int, **config: Any) -> SimFleet:
        cfg = {
            "hosts": hosts,
            "ca": str(tls.ca),
            "cert": str(tls.server_cert),
            "key": str(tls.server_key),
            "fleet": str(tmp_path / "fleet.yaml"),
            "ready": str(tmp_path / "ready.json"),
            **config,
        }
        (tmp_path / "sim.json").write_text(json.dumps(cfg))
        log = (tmp_path / "sim.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hatchery_rollout.simfleet", str(tmp_path / "sim.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(proc)
        deadline = time.monotonic() + 60
        ready = tmp_path / "ready.json"
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"simfleet exited: {(tmp_path / 'sim.log').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("simfleet did not become ready in 60 s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        return SimFleet(proc, tmp_path / "fleet.yaml", info["admin"], info["ports"])

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
