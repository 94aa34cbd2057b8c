"""busybox udhcpc, a DHCP client we did not write, against ``hatchery-agent serve dhcp``."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hatchery_lab.netenv import NetEnv

SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr replace "$ip/$subnet" dev "$interface"  # so a RELEASE (-R) can be sent from it
for v in ip subnet router dns lease serverid hostname; do eval "echo LEASE.$v=\\$$v"; done
"""
KNOWN_MAC = "52:54:00:aa:00:01"


@pytest.fixture
def udhcpc(require_tool: Callable[[str], str], tmp_path: Path) -> Callable[..., dict[str, str]]:
    binary = require_tool("udhcpc")
    script = tmp_path / "udhcpc.script"
    script.write_text(SCRIPT)
    script.chmod(0o755)

    def run(env: NetEnv, ns: str, *extra: str) -> dict[str, str]:
        argv = env.in_ns([binary, "-i", "eth0", "-f", "-q", "-n", "-t", "4", "-T", "1",
                          "-s", str(script), *extra], ns)  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        got = dict(
            line[len("LEASE.") :].split("=", 1)
            for line in out.stdout.splitlines()
            if line.startswith("LEASE.")
        )
        got["EVENT"] = "bound" if got else "none"
        got["output"] = out.stdout + out.stderr
        return got

    return run


def _dhcp(env: NetEnv, *args: str) -> None:
    service = env.agent("dhcp", "dhcp", "--interface", env.bridge, "--no-ra", *args)
    service.wait_for("dhcp: serving on")


def test_static_lease_gives_address_router_dns_and_lease_time(netenv: NetEnv, udhcpc, tmp_path):
    leases = tmp_path / "leases.yaml"
    leases.write_text(f'"{KNOWN_MAC}": {{ip: {netenv.subnet}.50, hostname: vm1}}\n')
    _dhcp(netenv, "--leases", str(leases), "--router", netenv.server_ip,
          "--dns", "192.0.2.53", "--dns", "192.0.2.54", "--lease-time", "1800")  # fmt: skip
    ns = netenv.add_client("a", KNOWN_MAC)
    got = udhcpc(netenv, ns)
    assert got["EVENT"] == "bound", got
    assert got["ip"] == f"{netenv.subnet}.50"
    assert got["subnet"] == "255.255.255.0"
    assert got["router"] == netenv.server_ip
    assert got["dns"] == "192.0.2.53 192.0.2.54"
    assert got["lease"] == "1800"
    assert got["serverid"] == netenv.server_ip
    assert got["hostname"] == "vm1"


def test_unknown_mac_gets_nothing_without_birthing(netenv: NetEnv, udhcpc, tmp_path):
    _dhcp(netenv)
    ns = netenv.add_client("b", "52:54:00:aa:00:99")
    got = udhcpc(netenv, ns, "-t", "2")
    assert got["EVENT"] == "none"
    assert "no lease" in got["output"]
    # the server did see the client, and chose silence
    assert "DISCOVER from unknown 52:54:00:aa:00:99: birthing is off" in netenv.services[0].text()


def test_birthing_allocates_from_the_range_persists_and_releases(netenv: NetEnv, udhcpc, tmp_path):
    state = tmp_path / "state"
    _dhcp(netenv, "--birth-range", f"{netenv.subnet}.100-{netenv.subnet}.109",
          "--state-dir", str(state), "--lease-time", "600")  # fmt: skip
    ns = netenv.add_client("c", "52:54:00:bb:00:01")
    # Only network-boot clients are birthed: as a plain client it gets nothing...
    assert udhcpc(netenv, ns)["EVENT"] == "none"
    # ...as a PXE client (vendor class PXEClient) it gets a birth address.
    got = udhcpc(netenv, ns, "-V", "PXEClient:Arch:00000:UNDI:002001")
    assert got["EVENT"] == "bound", got
    assert got["ip"] == f"{netenv.subnet}.100"
    assert got["lease"] == "600"
    saved = json.loads((state / "dhcp-births.json").read_text())
    assert [(x["mac"], x["ip"]) for x in saved["leases"]] == [
        ("52:54:00:bb:00:01", f"{netenv.subnet}.100")
    ]
    # the same client asks again and keeps its address; then releases it (SIGUSR2)
    argv = netenv.in_ns([shutil.which("udhcpc") or "udhcpc", "-i", "eth0", "-f", "-t", "4",
                         "-T", "1", "-s", str(tmp_path / "udhcpc.script")], ns)  # fmt: skip
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert client.stdout is not None
        for line in client.stdout:
            if line.startswith("LEASE.ip="):
                assert line.strip() == f"LEASE.ip={netenv.subnet}.100"
                break
        client.send_signal(signal.SIGUSR2)
        netenv.services[0].wait_for("released")
    finally:
        client.terminate()
        client.wait(timeout=10)
    assert json.loads((state / "dhcp-births.json").read_text())["leases"] == []
