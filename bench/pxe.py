"""The PXE chain, QEMU start → marker printed by the guest's /init: our DHCP + RA + boot HTTP
against dnsmasq (DHCP, RA with ``enable-ra``, option 175/176) + nginx serving the same script
and the same kernel and initrd.

Same guest (disk-less, SeaBIOS, QEMU's own iPXE ROM on virtio-net), same bridge set-up, a fresh
private network per boot; rounds interleaved; median of the runs.

Then the other boot paths of ours, each next to that IPv4 chain (docs/netboot.md, "Boot
paths"): proxyDHCP beside a site dnsmasq that gives the addresses (BIOS iPXE ROM); UEFI HTTP
Boot on an IPv4 network (OVMF → ``ipxe.efi`` over HTTP → script); the same over HTTPS with the
boot CA pinned (OVMF → a unified kernel image over TLS, no iPXE); UEFI HTTP Boot on an
IPv6-only network (OVMF tries HTTPv4 first and waits out its DHCPv4, as it would at a site).
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

RUNS = 3  # the IPv6 row alone is ~2 minutes a boot under TCG
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
        if kind == "ipv6":
            with boot_network(work, ipv4=False, ipv6=f"{pxe_chain.SERVER6}/64") as env:
                root, profiles = pxe_chain.prepare_artefacts(work)
                pxe_chain.start_our_services6(env, root, profiles)
                return pxe_chain.boot_guest(env, MAC, "uefi-http", timeout=900).seconds
        with boot_network(work) as env:
            root, profiles = pxe_chain.prepare_artefacts(work)
            if kind == "ours":
                pxe_chain.start_our_services(env, root, profiles)
            elif kind == "dnsmasq":
                _dnsmasq_stack(env, work, profiles)
            elif kind == "proxy":
                pxe_chain.start_site_dnsmasq(env)
                pxe_chain.start_our_services(env, root, profiles, proxy=True)
            elif kind == "uefi-http":
                pxe_chain.start_our_services(env, root, profiles)
                return pxe_chain.boot_guest(env, MAC, "uefi-http", timeout=600).seconds
            elif kind == "uefi-https":
                keys = pxe_chain.make_boot_pki(work, env.server_ip)
                pxe_chain.start_our_services(env, root, profiles, tls=(keys.cert, keys.key))
                return pxe_chain.boot_guest(
                    env, MAC, "uefi-http", timeout=600, more=keys.firmware_args()
                ).seconds
            return pxe_chain.boot_guest(env, MAC, "bios").seconds


#: name in the table → the ``_one`` kind; the first two are the IPv4 chain compared
CHAINS = {
    "BIOS iPXE ROM, IPv4: ours": "ours",
    "BIOS iPXE ROM, IPv4: dnsmasq + nginx": "dnsmasq",
    "BIOS iPXE ROM, proxyDHCP beside a site dnsmasq: ours": "proxy",
    "UEFI HTTP Boot (OVMF → ipxe.efi), IPv4: ours": "uefi-http",
    "UEFI HTTPS Boot (OVMF → UKI, boot CA pinned), IPv4: ours": "uefi-https",
    "UEFI HTTP Boot (OVMF → ipxe.efi), IPv6 only: ours": "ipv6",
}


def run() -> None:
    times: dict[str, list[float]] = {name: [] for name in CHAINS}
    for _ in range(RUNS):  # interleaved: each round boots every chain once
        for name, kind in CHAINS.items():
            times[name].append(_one(kind))
    ipv4_ours, ipv4_dnsmasq = list(CHAINS)[:2]
    ours, ref = median(times[ipv4_ours]), median(times[ipv4_dnsmasq])
    accel = choose_accel()
    rows = [
        (name, f"{median(t):.1f}", f"{min(t):.1f}", f"{max(t):.1f}", f"{median(t) / ours:.2f}")
        for name, t in times.items()
    ]
    body = (
        f"QEMU (accelerator {accel.accel}), no disk, `-boot n`, on a bridge in a private "
        "namespace; seconds from QEMU start to the marker printed by the busybox initramfs's "
        f"/init after Debian's stock kernel, {RUNS} interleaved rounds. The IPv4 chain: "
        "SeaBIOS with QEMU's own iPXE ROM on virtio-net gets DHCP (iPXE user class → the "
        "script URL, option 175/176=1), an IPv6 RA, then the script, kernel and initrd over "
        'HTTP. The other paths are ours alone (docs/netboot.md, "Boot paths"); OVMF\'s own '
        "network stack (no iPXE ROM) for the UEFI rows.\n\n"
        + table(["chain", "median s", "min s", "max s", "÷ ours IPv4"], rows)
        + f"\n\nRatio dnsmasq / ours on the IPv4 chain (above 1: ours is faster): "
        f"**{ref / ours:.2f}x**."
    )
    write_section("pxe-chain", "PXE chain: QEMU start → guest marker, ours vs dnsmasq", body)
    print(body)


if __name__ == "__main__":
    run()
