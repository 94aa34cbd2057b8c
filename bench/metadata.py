"""Metadata service throughput and latency from one guest (a namespace on the bridge).

The client runs inside the guest namespace (a separate process, so it does not share the
agent's event loop) and fetches the identity document through the bridge redirect: with
keep-alive (one connection, sequential) and without (a new connection per request).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from bench.report import table, write_section
from hatchery.metadata.ruleset import Port
from hatchery.metadata.server import VmMetadata
from hatchery.metadata.service import MetadataService
from hatchery_lab.net import bridge
from hatchery_lab.vmns import NsVm, ns_vm

SECONDS = 5.0
CLIENT = textwrap.dedent(
    """
    import json, socket, statistics, sys, time
    keep_alive = sys.argv[1] == "keep-alive"
    request = (b"GET /latest/dynamic/instance-identity/document HTTP/1.1\\r\\n"
               b"Host: 169.254.169.254\\r\\n"
               + (b"" if keep_alive else b"Connection: close\\r\\n") + b"\\r\\n")
    def read_response(sock):
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            data += sock.recv(65536)
        head, body = data.split(b"\\r\\n\\r\\n", 1)
        lines = head.split(b"\\r\\n")
        cl = next(l for l in lines if l.lower().startswith(b"content-length"))
        length = int(cl.split(b":")[1])
        while len(body) < length:
            body += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head
    latencies = []
    sock = None
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        t = time.perf_counter()
        if sock is None:
            sock = socket.create_connection(("169.254.169.254", 80))
        sock.sendall(request)
        read_response(sock)
        if not keep_alive:
            sock.close(); sock = None
        latencies.append(time.perf_counter() - t)
    latencies.sort()
    n = len(latencies)
    print(json.dumps({"n": n, "seconds": float(sys.argv[2]),
                      "p50": latencies[n // 2], "p99": latencies[int(n * 0.99)]}))
    """
)


@dataclass
class _Dir:
    vm: VmMetadata

    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None:
        return self.vm if ip == self.vm.ip else None


@contextmanager
def _guest() -> Iterator[tuple[str, NsVm]]:
    with ExitStack() as stack:
        br = stack.enter_context(bridge("10.253.9.1/24"))
        vm = stack.enter_context(ns_vm(br, "52:54:00:fd:09:0a", "10.253.9.10", "10.253.9.1"))
        yield br, vm


async def _serve_and_measure(br: str, vm: NsVm) -> dict[str, dict[str, float]]:
    meta = VmMetadata("bench", "uuid-bench", vm.ip, vm.mac, "#!/bin/sh\n")
    service = MetadataService(_Dir(meta), lambda _: [Port(vm.port, vm.mac, vm.ip)])
    await service.add_bridge(br, [ipaddress.IPv4Network("10.253.9.0/24")])
    results = {}
    try:
        for mode in ("keep-alive", "new connection"):
            argv = ["ip", "netns", "exec", vm.netns, sys.executable, "-c", CLIENT,
                    "keep-alive" if mode == "keep-alive" else "close", str(SECONDS)]  # fmt: skip
            proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            results[mode] = json.loads(out)
    finally:
        await service.close(teardown=True)
    return results


def run() -> None:
    with _guest() as (br, vm):
        results = asyncio.run(_serve_and_measure(br, vm))
    rows = [
        (mode, f"{r['n'] / r['seconds']:.0f}", f"{r['p50'] * 1000:.2f}", f"{r['p99'] * 1000:.2f}")
        for mode, r in results.items()
    ]
    body = (
        "One guest namespace on a bridge, through the nft redirect into the metadata "
        f"namespace; one client process, sequential requests for {SECONDS:.0f} s each; the "
        "server is the agent's aiohttp app on one asyncio loop.\n\n"
        + table(["mode", "requests/s", "p50 ms", "p99 ms"], rows)
    )
    write_section("metadata", "Metadata service: identity document from one guest", body)
    print(body)
