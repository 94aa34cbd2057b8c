"""Issue 5: the metadata service in its namespace, reached through the bridge redirect,
answering each VM with its own data only; spoofers, garbage and floods get nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from hatchery.metadata.plumbing import Names
from hatchery.metadata.ruleset import Port, table_name
from hatchery.metadata.server import VmMetadata
from hatchery.metadata.service import MetadataService
from hatchery_lab.net import bridge
from hatchery_lab.vmns import NsVm, ns_vm, sh

MD = "http://169.254.169.254"


@dataclass
class Directory:
    """A small real implementation of the service's MetadataSource."""

    vms: dict[str, VmMetadata]

    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None:
        return self.vms.get(ip)


@dataclass
class Lab:
    bridge: str
    a: NsVm
    b: NsVm
    stranger: NsVm
    service: MetadataService


@pytest.fixture
async def lab(require_root: None, require_tool: Callable[[str], str]) -> AsyncIterator[Lab]:
    require_tool("curl")
    require_tool("nft")
    net = f"10.{random.randrange(16, 250)}.{random.randrange(0, 250)}"
    with ExitStack() as stack:
        br = stack.enter_context(bridge(f"{net}.1/24"))
        a = stack.enter_context(ns_vm(br, "52:54:00:00:0a:0a", f"{net}.10", f"{net}.1"))
        b = stack.enter_context(ns_vm(br, "52:54:00:00:0b:0b", f"{net}.11", f"{net}.1"))
        stranger = stack.enter_context(ns_vm(br, "52:54:00:00:0c:0c", f"{net}.12", f"{net}.1"))
        directory = Directory(
            {
                vm.ip: VmMetadata(
                    name,
                    f"uuid-{name}",
                    vm.ip,
                    vm.mac,
                    user_data=f"#!/bin/sh\necho {name}\n",
                    public_keys=(f"ssh-ed25519 AAAA{name} {name}@test",),
                )  # fmt: skip
                for name, vm in (("alpha", a), ("beta", b))
            }
        )
        ports = [Port(a.port, a.mac, a.ip), Port(b.port, b.mac, b.ip)]
        service = MetadataService(directory, lambda _: ports)
        try:
            await service.add_bridge(br, [ipaddress.IPv4Network(f"{net}.0/24")])
            yield Lab(br, a, b, stranger, service)
        finally:
            await service.close(teardown=True)
    # Nothing the test made is left behind.
    names = Names.for_bridge(br)
    assert names.netns not in sh("ip", "netns", "list").stdout
    assert sh("ip", "link", "show", names.outer, check=False).returncode != 0
    assert table_name(br) not in sh("nft", "list", "tables", "bridge").stdout


async def curl(
    vm: NsVm, path: str, *extra: str, timeout: float = 3
) -> subprocess.CompletedProcess[str]:
    argv = ["curl", "-sS", "-m", str(timeout), "-w", "\n%{http_code}", *extra, MD + path]
    return await asyncio.to_thread(vm.run, *argv, timeout=timeout + 10)


async def test_each_vm_reads_its_own_identity(lab: Lab) -> None:
    for vm, name in ((lab.a, "alpha"), (lab.b, "beta")):
        result = await curl(vm, "/latest/dynamic/instance-identity/document")
        body, code = result.stdout.rsplit("\n", 1)
        assert code == "200", result.stderr
        doc = json.loads(body)
        assert doc["instanceName"] == name and doc["privateIp"] == vm.ip
        assert doc["macAddress"] == vm.mac
        # The guest's own facts and nothing of its host (which VMs share one is no tenant's
        # business: co-residency is where cross-VM side channels start).
        assert set(doc) == {"instanceId", "instanceName", "privateIp", "macAddress",
                            "hostname", "launchTime"}, doc  # fmt: skip
        user = await curl(vm, "/latest/user-data")
        assert user.stdout == f"#!/bin/sh\necho {name}\n\n200"


async def test_all_paths(lab: Lab) -> None:
    def body(r: subprocess.CompletedProcess[str]) -> str:
        text, code = r.stdout.rsplit("\n", 1)
        assert code == "200", r.stdout + r.stderr
        return text

    assert body(await curl(lab.a, "/datasource/SmallStack")) == "true"
    seconds, nanos = body(await curl(lab.a, "/latest/dynamic/epoch-time")).split(".")
    assert int(seconds) > 1_700_000_000 and len(nanos) == 9
    assert "local-ipv4" in body(await curl(lab.a, "/latest/meta-data/"))
    assert body(await curl(lab.a, "/latest/meta-data/local-ipv4")) == lab.a.ip
    assert body(await curl(lab.a, "/latest/meta-data/instance-id")) == "uuid-alpha"
    assert body(await curl(lab.a, "/latest/meta-data/mac")) == lab.a.mac
    assert body(await curl(lab.a, "/latest/meta-data/public-keys/")) == "0=key0"
    assert "AAAAalpha" in body(await curl(lab.a, "/latest/meta-data/public-keys/0/openssh-key"))
    assert "instance-id: uuid-alpha" in body(await curl(lab.a, "/nocloud/meta-data"))
    assert "echo alpha" in body(await curl(lab.a, "/nocloud/user-data"))
    assert body(await curl(lab.a, "/nocloud/vendor-data")) == ""
    # IMDSv2: a token is issued and accepted; a wrong one is refused; another VM's too.
    token = body(await curl(lab.a, "/latest/api/token", "-X", "PUT", "-H",
                            "X-aws-ec2-metadata-token-ttl-seconds: 60"))  # fmt: skip
    assert body(await curl(lab.a, "/latest/meta-data/hostname", "-H",
                           f"X-aws-ec2-metadata-token: {token}")) == "alpha"  # fmt: skip
    stolen = await curl(
        lab.b, "/latest/meta-data/hostname", "-H", f"X-aws-ec2-metadata-token: {token}"
    )
    assert stolen.stdout.endswith("401")
    bad_ttl = await curl(lab.a, "/latest/api/token", "-X", "PUT", "-H",
                         "X-aws-ec2-metadata-token-ttl-seconds: 99999999")  # fmt: skip
    assert bad_ttl.stdout.endswith("400")


async def test_forged_ip_gets_nothing(lab: Lab) -> None:
    lab.a.set_ip(lab.b.ip)  # alpha pretends to be beta
    forged = await curl(lab.a, "/latest/user-data")
    assert forged.returncode != 0 and "echo beta" not in forged.stdout
    lab.a.set_ip(lab.a.ip)
    honest = await curl(lab.a, "/latest/user-data")
    assert "echo alpha" in honest.stdout


async def test_forged_mac_gets_nothing(lab: Lab) -> None:
    lab.a.set_mac(lab.b.mac)
    forged = await curl(lab.a, "/latest/user-data")
    assert forged.returncode != 0 and "echo" not in forged.stdout
    lab.a.set_mac(lab.a.mac)


async def test_unknown_port_gets_nothing(lab: Lab) -> None:
    result = await curl(lab.stranger, "/latest/user-data")
    assert result.returncode != 0 or result.stdout.endswith("403")
    assert "echo" not in result.stdout


async def test_bad_requests_and_floods(lab: Lab) -> None:
    for path in ("/nocloud/../../etc/passwd", "/latest/meta-data/../../../../etc/shadow",
                 "/latest/meta-data/public-keys/99/openssh-key", "/nope"):  # fmt: skip
        result = await curl(lab.a, path, "--path-as-is")
        assert result.stdout.endswith("404"), (path, result.stdout)
    post = await curl(lab.a, "/latest/user-data", "-X", "POST", "--data", "x")
    assert post.stdout.endswith("405")
    ttl = "X-aws-ec2-metadata-token-ttl-seconds: 60"
    huge = await curl(lab.a, "/latest/api/token", "-X", "PUT", "-H", ttl, "--data", "x" * 100_000)
    assert huge.stdout.endswith("413")
    long_header = await curl(lab.a, "/latest/user-data", "-H", "X-Junk: " + "j" * 20_000)
    assert long_header.stdout.endswith("400") or long_header.returncode != 0
    # Raw garbage on the socket, then a flood of parallel requests: the service stays up.
    script = (
        "import socket\n"
        "for junk in (b'\\x00\\xff' * 500, b'GET / HTTP/9.9\\r\\n\\r\\n', b'\\r\\n' * 100):\n"
        "    s = socket.create_connection(('169.254.169.254', 80), timeout=3)\n"
        "    s.sendall(junk)\n"
        "    try:\n        s.recv(100)\n    except OSError:\n        pass\n"
        "    s.close()\n"
    )
    await asyncio.to_thread(lab.a.run, "python3", "-c", script)
    flood = await asyncio.to_thread(
        lab.a.run, "sh", "-c",
        f"for i in $(seq 200); do curl -s -o /dev/null -m 5 {MD}/latest/meta-data/mac & done; wait",
        timeout=120,
    )  # fmt: skip
    assert flood.returncode == 0
    after = await curl(lab.a, "/latest/meta-data/hostname")
    assert after.stdout == "alpha\n200"
