"""The PXE chain, QEMU start → marker printed by the guest's /init: our DHCP + RA + boot HTTP
against dnsmasq (DHCP, RA with ``enable-ra``, option 175/176) + nginx serving the same script
and the same kernel and initrd.

Same guest (disk-less, SeaBIOS, QEMU's own iPXE ROM on virtio-net), same bridge set-up, a fresh
private network per boot; rounds interleaved; median of the runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.boothttp import nginx_argv
from bench.report import median, table, write_section
from hatchery.boothttp.profiles import Profiles
from hatchery.qemu.accel import choose_accel
from hatchery_lab import pxe_chain
from hatchery_lab.netenv import NetEnv, boot_network, sh

RUNS = 5
MAC = "52:54:00:be:00:01"
NGINX_PORT = 8081
ULA = "fd5a:5a5a:5a5a::1/64"  # dnsmasq's RA needs a prefix on the interface to advertise


def _dnsmasq_stack(env: NetEnv, work: Path, profiles: Path) -> None:
    base = f"http://{env.server_ip}:{NGINX_PORT}"
    profile = Profiles.load(profiles).for_mac(MAC)
    assert profile is not None
    (work / "boot.ipxe").write_text(profile.render(MAC, base))
    sh("ip", "-n", env.ns, "addr", "add", ULA, "dev", env.bridge, "nodad")
    nginx_tmp = work / "nginx"
    nginx_tmp.mkdir(exist_ok=True)
    env.start("nginx", nginx_argv(nginx_tmp, work, f"{env.server_ip}:{NGINX_PORT}"))
    dnsmasq = env.start("dnsmasq", [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root",
        f"--interface={env.bridge}", "--bind-interfaces", "--log-dhcp", "--no-ping",
        f"--dhcp-range={env.subnet}.100,{env.subnet}.199,255.255.255.0,1h",
        f"--dhcp-range=::,constructor:{env.bridge},ra-only", "--enable-ra",
        f"--dhcp-leasefile={work / 'dnsmasq.leases'}", f"--pid-file={work / 'dnsmasq.pid'}",
        "--dhcp-match=set:ipxe,175",
        f"--dhcp-boot=tag:ipxe,{base}/boot.ipxe",
        "--dhcp-option=tag:ipxe,encap:175,176,1",
    ])  # fmt: skip
    dnsmasq.wait_for("started, version")
    wait_port_in_ns(env, NGINX_PORT)


def wait_port_in_ns(env: NetEnv, port: int) -> None:
    # nginx listens inside the namespace: probe from there with curl
    for _ in range(200):
        if env.run("curl", "-s", "-o", "/dev/null", f"http://{env.server_ip}:{port}/",
                   check=False).returncode == 0:  # fmt: skip
            return
        time.sleep(0.05)
    raise TimeoutError(f"nginx did not listen on {port}")


def _one(kind: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with boot_network(work) as env:
            root, profiles = pxe_chain.prepare_artefacts(work)
            if kind == "ours":
                pxe_chain.start_our_services(env, root, profiles)
            else:
                _dnsmasq_stack(env, work, profiles)
            return pxe_chain.boot_guest(env, MAC, "bios").seconds


def run() -> None:
    times: dict[str, list[float]] = {"ours": [], "dnsmasq + nginx": []}
    for _ in range(RUNS):
        times["ours"].append(_one("ours"))
        times["dnsmasq + nginx"].append(_one("dnsmasq"))
    ours, ref = median(times["ours"]), median(times["dnsmasq + nginx"])
    accel = choose_accel()
    rows = [
        (name, f"{median(t):.1f}", f"{min(t):.1f}", f"{max(t):.1f}") for name, t in times.items()
    ]
    body = (
        f"QEMU (accelerator {accel.accel}), SeaBIOS, no disk, `-boot n`, virtio-net with QEMU's "
        "own iPXE ROM, on a bridge in a private namespace; the guest gets DHCP (iPXE user "
        "class → the script URL, option 175/176=1), an IPv6 RA, then the script, Debian's "
        "stock kernel and a busybox initramfs over HTTP; seconds from QEMU start to /init's "
        f"marker, {RUNS} interleaved runs each.\n\n"
        + table(["services", "median s", "min s", "max s"], rows)
        + f"\n\nRatio dnsmasq / ours (above 1: ours is faster): **{ref / ours:.2f}x**."
    )
    write_section("pxe-chain", "PXE chain: QEMU start → guest marker, ours vs dnsmasq", body)
    print(body)


if __name__ == "__main__":
    run()
