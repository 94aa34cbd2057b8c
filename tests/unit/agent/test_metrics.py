"""What each server counts for ``/metrics``: the real servers, on loopback, with real clients.

DHCP datagrams go through the real protocol object (its socket is the only thing left
out); TFTP is fetched with curl's ``tftp://``; boot HTTP with an aiohttp client. The values
are read back from the agent's registry as Prometheus would see them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from hatchery.boothttp.app import BootHttpConfig, BootHttpServer
from hatchery.dhcp.leases import Lease, StaticLeases
from hatchery.dhcp.packet import DhcpPacket, MessageType, Op, Opt, opt_u8
from hatchery.dhcp.responder import DhcpConfig, Responder
from hatchery.dhcp.server import DhcpProtocol
from hatchery.metadata.ruleset import DROP_REASONS, drops
from hatchery.metrics import Metrics, ReadCollector, Reading
from hatchery.tftp.server import TftpServer

IP = ipaddress.IPv4Address
VM_MAC = "52:54:00:00:00:10"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class _Sent:
    """The DHCP transport's one method the protocol uses: remembers what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


def _discover(mac: str) -> bytes:
    packet = DhcpPacket(Op.BOOTREQUEST, 0x1234, bytes.fromhex(mac.replace(":", "")),
                        options=(opt_u8(Opt.MESSAGE_TYPE, MessageType.DISCOVER),))  # fmt: skip
    return packet.encode()


def test_dhcp_counts_each_datagram_once_by_type_and_outcome() -> None:
    metrics = Metrics()
    config = DhcpConfig(IP("10.9.0.1"), ipaddress.IPv4Network("10.9.0.0/24"), IP("10.9.0.254"),
                        (), "example.test", 1200, None)  # fmt: skip
    static = StaticLeases({VM_MAC: Lease(VM_MAC, IP("10.9.0.10"), "vm10")})
    protocol = DhcpProtocol(Responder(config, static), meter=metrics.dhcp("br0"))
    protocol.transport = _Sent()  # type: ignore[assignment]
    protocol.datagram_received(_discover(VM_MAC), ("0.0.0.0", 68))
    protocol.datagram_received(_discover("52:54:00:99:99:99"), ("0.0.0.0", 68))  # no lease
    protocol.datagram_received(b"\x01garbage", ("10.9.0.7", 68))
    labels = {"bridge": "br0", "type": "DISCOVER"}
    assert value(metrics, "hatchery_dhcp_messages_total", **labels, outcome="answered") == 1
    assert value(metrics, "hatchery_dhcp_messages_total", **labels, outcome="ignored") == 1
    assert value(metrics, "hatchery_dhcp_messages_total", bridge="br0", type="unknown",
                 outcome="malformed") == 1  # fmt: skip
    assert value(metrics, "hatchery_dhcp_replies_total", bridge="br0", type="OFFER",
                 client="plain") == 1  # fmt: skip


async def test_tftp_counts_transfers_bytes_and_refusals(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    curl = require_tool("curl")
    (tmp_path / "ipxe.efi").write_bytes(bytes(range(256)) * 40)  # 10240 bytes, 20 blocks
    metrics = Metrics()
    async with TftpServer(tmp_path, "127.0.0.1", 0, meter=metrics.tftp("br0")) as server:
        port = server.address[1]

        def fetch(name: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([curl, "-s", f"tftp://127.0.0.1:{port}/{name}"],
                                  capture_output=True, timeout=30, check=False)  # fmt: skip

        got = await asyncio.to_thread(fetch, "ipxe.efi")
        assert got.stdout == (tmp_path / "ipxe.efi").read_bytes()
        await asyncio.to_thread(fetch, "missing.efi")
        for _ in range(100):  # the transfer thread reports as it ends
            if value(metrics, "hatchery_tftp_transfers_total", bridge="br0", outcome="done"):
                break
            await asyncio.sleep(0.02)
    assert value(metrics, "hatchery_tftp_transfers_total", bridge="br0", outcome="done") == 1
    assert value(metrics, "hatchery_tftp_sent_bytes_total", bridge="br0") == 10240
    assert value(metrics, "hatchery_tftp_requests_total", bridge="br0", outcome="accepted") == 1
    assert value(metrics, "hatchery_tftp_requests_total", bridge="br0",
                 outcome="refused_file_not_found") == 1  # fmt: skip


async def test_boot_http_counts_routes_statuses_and_bytes(tmp_path: Path) -> None:
    image = tmp_path / "v1"
    image.mkdir()
    (image / "vmlinuz").write_bytes(b"k" * 5000)
    metrics = Metrics()
    server = BootHttpServer(BootHttpConfig(tmp_path, ipxe_dir=None), "127.0.0.1", 0,
                            meter=metrics.http("boot", "br0"))  # fmt: skip
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/artefacts/v1/vmlinuz") as resp:
                assert resp.status == 200 and len(await resp.read()) == 5000
            headers = {"Range": "bytes=0-99"}
            async with session.get(f"{base}/artefacts/v1/vmlinuz", headers=headers) as resp:
                assert resp.status == 206 and len(await resp.read()) == 100
            async with session.get(f"{base}/artefacts/../../etc/passwd") as resp:
                assert resp.status == 404
            async with session.get(f"{base}/nowhere/{'x' * 50}") as resp:
                assert resp.status == 404
    finally:
        await server.stop()
    labels = {"server": "boot", "bridge": "br0"}
    route = "/artefacts/{path}"
    assert value(metrics, "hatchery_http_requests_total", **labels, route=route, status="200") == 1
    assert value(metrics, "hatchery_http_requests_total", **labels, route=route, status="206") == 1
    assert value(metrics, "hatchery_http_sent_bytes_total", **labels) == 5100
    # aiohttp normalises the path first, so ".." never reaches a route: "other", one series
    text = (await metrics.scrape()).decode()
    assert "etc/passwd" not in text and "xxxxx" not in text
    assert value(metrics, "hatchery_http_requests_total", **labels, route="other",
                 status="404") == 2  # fmt: skip
    assert value(metrics, "hatchery_http_connections_total", **labels, outcome="accepted")


async def test_readings_are_gauges_or_counters_read_at_scrape() -> None:
    metrics = Metrics()
    state = {"n": 1.0}
    metrics.add(ReadCollector([
        Reading("hatchery_test_level", "A level.", ("k",), lambda: [(("a",), state["n"])]),
        Reading("hatchery_test_events", "Events.", (), lambda: [((), 7.0)], counter=True),
    ]))  # fmt: skip
    state["n"] = 3.0
    text = (await metrics.scrape()).decode()
    assert "# TYPE hatchery_test_level gauge" in text and 'hatchery_test_level{k="a"} 3.0' in text
    assert (
        "# TYPE hatchery_test_events_total counter" in text
        and "hatchery_test_events_total 7.0" in text
    )


def test_drops_sums_counters_by_reason_and_ignores_the_rest() -> None:
    def rule(comment: str | None, packets: Any) -> dict[str, Any]:
        expr: list[Any] = [
            {"match": {}},
            {"counter": {"packets": packets, "bytes": 0}},
            {"drop": None},
        ]
        body: dict[str, Any] = {"family": "bridge", "expr": expr}
        if comment is not None:
            body["comment"] = comment
        return {"rule": body}

    listing = {"nftables": [
        {"metainfo": {}}, {"table": {}}, rule("mac", 3), rule("mac", 2), rule("arp", 1),
        rule(None, 50), rule("somebody-else", 9), rule("router", "many"), "junk",
    ]}  # fmt: skip
    found = drops(listing)
    assert set(found) == set(DROP_REASONS)
    assert (found["mac"], found["arp"], found["router"], found["dhcp-server"]) == (5, 1, 0, 0)
