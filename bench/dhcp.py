"""DHCP DISCOVER→OFFER→REQUEST→ACK round trips per second: ours against dnsmasq.

Same client driver (this module, run with ``client`` inside a client namespace), same bridge
in a private namespace, same static leases for the same MACs (dnsmasq: ``dhcp-host``), one
server at a time, interleaved rounds; median of the rounds. The driver keeps one exchange in
flight (lock-step), so the figure is the server's latency-bound rate, not a flood.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import median, table, write_section
from hatchery.dhcp.packet import (
    BROADCAST_FLAG,
    DecodeError,
    DhcpPacket,
    MessageType,
    Op,
    Opt,
    opt_ip,
    opt_u8,
)
from hatchery_lab import REPO
from hatchery_lab.netenv import NetEnv, boot_network

ROUNDS = 5
SECONDS = 3.0
MACS = 32


def _mac(i: int) -> str:
    return f"52:54:00:d0:{i // 256:02x}:{i % 256:02x}"


# --- the client driver (runs in the client namespace) ----------------------------------------


def _exchange(sock: socket.socket, packet: DhcpPacket, want: MessageType) -> DhcpPacket | None:
    sock.sendto(packet.encode(), ("255.255.255.255", 67))
    deadline = time.monotonic() + 1.0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        data = sock.recv(2048)
        try:
            reply = DhcpPacket.decode(data)
        except DecodeError:
            continue
        if reply.op == Op.BOOTREPLY and reply.xid == packet.xid and reply.message_type == want:
            return reply


def client_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interface", default="eth0")
    ap.add_argument("--seconds", type=float, default=SECONDS)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.interface.encode())
    sock.bind(("0.0.0.0", 68))
    done = failed = 0
    xid = int.from_bytes(os.urandom(4), "big")
    start = 0.0
    i = 0
    while True:
        if i == args.warmup:
            start, done, failed = time.monotonic(), 0, 0
        if i > args.warmup and time.monotonic() - start >= args.seconds:
            break
        i += 1
        xid = (xid + 1) & 0xFFFFFFFF
        chaddr = bytes.fromhex(_mac(i % MACS).replace(":", ""))
        kind = opt_u8(Opt.MESSAGE_TYPE, MessageType.DISCOVER)
        discover = DhcpPacket(Op.BOOTREQUEST, xid, chaddr, flags=BROADCAST_FLAG, options=(kind,))
        offer = _exchange(sock, discover, MessageType.OFFER)
        if offer is None or offer.server_id is None:
            failed += 1
            continue
        request = DhcpPacket(Op.BOOTREQUEST, xid, chaddr, flags=BROADCAST_FLAG, options=(
            opt_u8(Opt.MESSAGE_TYPE, MessageType.REQUEST),
            opt_ip(Opt.SERVER_ID, offer.server_id),
            opt_ip(Opt.REQUESTED_IP, offer.yiaddr),
        ))  # fmt: skip
        if _exchange(sock, request, MessageType.ACK) is None:
            failed += 1
            continue
        done += 1
    elapsed = time.monotonic() - start
    print(f"RESULT done={done} failed={failed} seconds={elapsed:.3f}")
    return 0


# --- the benchmark ----------------------------------------------------------------------------


def _drive(env: NetEnv, client_ns: str) -> tuple[float, int]:
    argv = env.in_ns([sys.executable, "-m", "bench.dhcp", "client", "--seconds", str(SECONDS)],
                     client_ns)  # fmt: skip
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return int(fields["done"]) / float(fields["seconds"]), int(fields["failed"])


def _ours(env: NetEnv, leases: Path) -> None:
    svc = env.agent("ours", "dhcp", "--interface", env.bridge, "--no-ra", "--leases", str(leases),
                    "--router", env.server_ip, "--dns", env.server_ip, debug=False)  # fmt: skip
    svc.wait_for("dhcp: serving on")


def _dnsmasq(env: NetEnv, workdir: Path) -> None:
    hosts = [f"--dhcp-host={_mac(i)},{env.subnet}.{10 + i}" for i in range(MACS)]
    svc = env.start("dnsmasq", [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root",
        f"--interface={env.bridge}", "--bind-interfaces", "--no-ping",
        f"--dhcp-range={env.subnet}.10,{env.subnet}.250,255.255.255.0,1h",
        f"--dhcp-leasefile={workdir / 'dnsmasq.leases'}", f"--pid-file={workdir / 'dnsmasq.pid'}",
        f"--dhcp-option=option:router,{env.server_ip}",
        f"--dhcp-option=option:dns-server,{env.server_ip}", *hosts,
    ])  # fmt: skip
    svc.wait_for("started, version")


def run() -> None:
    results: dict[str, list[float]] = {"ours": [], "dnsmasq": []}
    failures = {"ours": 0, "dnsmasq": 0}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        leases = work / "leases.yaml"
        with boot_network(work) as env:
            leases.write_text("".join(f'"{_mac(i)}": {env.subnet}.{10 + i}\n' for i in range(MACS)))
            client = env.add_client("c")
            for _ in range(ROUNDS):
                for name in ("ours", "dnsmasq"):
                    if name == "ours":
                        _ours(env, leases)
                    else:
                        _dnsmasq(env, work)
                    rate, failed = _drive(env, client)
                    env.services.pop().stop()
                    results[name].append(rate)
                    failures[name] += failed
    ours, ref = median(results["ours"]), median(results["dnsmasq"])
    rows = [
        (name, f"{median(r):.0f}", f"{min(r):.0f}", f"{max(r):.0f}", failures[name])
        for name, r in results.items()
    ]
    body = (
        f"One client driver (Python, lock-step: DISCOVER→OFFER→REQUEST→ACK, broadcast) in a "
        f"network namespace on a veth, servers on a bridge in another namespace; {MACS} MACs "
        f"with static leases (ours: `--leases`, dnsmasq: `dhcp-host`, `--no-ping`); "
        f"{ROUNDS} interleaved rounds of {SECONDS:.0f} s each.\n\n"
        + table(["server", "median exchanges/s", "min", "max", "timeouts"], rows)
        + f"\n\nRatio ours / dnsmasq: **{ours / ref:.2f}x**. dnsmasq also rewrites its lease "
        "file on every ACK; static leases in ours write nothing (births are persisted)."
    )
    write_section("dhcp", "DHCP: DISCOVER→ACK round trips, ours vs dnsmasq", body)
    print(body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2:]))
    run()
