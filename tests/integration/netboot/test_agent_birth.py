"""A real agent births a machine: DHCP births range, iPXE script, the image from the agent's
own store, and the machine's seed named on its command line — QEMU's iPXE ROM, no disk.

The seed holds the machine's private key: it is not an artefact, the host (on the bridge,
without a birth lease) gets neither the script nor the seed, and the machine gets its seed
once, through the single-use birth token its script named; asking again gets a 404."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import random
import re
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from hatchery.images.signing import generate_key, sign_build_dir
from hatchery.metadata.service import teardown_bridge
from hatchery.qemu.accel import choose_accel
from hatchery.qemu.cmdline import GuestSpec, Nic, build_argv
from hatchery.sealing import SeedKey
from hatchery_lab import pxe_chain
from hatchery_lab.agent import AgentProcess, Pki, free_port
from hatchery_lab.cpio_writer import Entry
from hatchery_lab.guest import (
    INIT_PRELUDE,
    VIRTIO_NET_MODULES,
    busybox_initramfs,
    find_guest_kernel,
    run_guest,
)
from hatchery_lab.net import bridge, unique_name
from hatchery_lab.vmns import ns_vm
from tests.conftest import missing
from tests.support.synthetic_images import make_build

MAC = "52:54:00:b1:47:01"
LEASE = r"""#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface" && echo "BIRTH-LEASE ip=$ip"
"""
KEY = SeedKey()  # the newborn's: the test opens what the guest received
KEY_OCTAL = "".join(f"\\{b:03o}" for b in KEY.public)
INIT = (
    INIT_PRELUDE
    + r"""
seed=$(sed -n 's/.*hatchery\.seed=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "BIRTH-CMDLINE seed=$seed"
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
udhcpc -i eth0 -q -n -t 20 -T 1 -s /bin/lease
hostport=${seed#http://}; hostport=${hostport%%/*}; path=/${seed#http://*/}
request="POST $path HTTP/1.0\r\nHost: $hostport\r\nContent-Length: 32\r\n\r\n"
# The seed is asked for with the newborn's public key and comes back sealed to it.
# Keep nc's sending side open while the answer comes: busybox nc half-closes at the end of
# its input, and aiohttp drops a connection whose FIN it reads before it has answered (a race
# the agent's own seed fetch, hatchery.seed, does not run: it does not half-close).
{ printf "$request"; printf '@KEY@'; sleep 2; } | nc "${hostport%:*}" "${hostport#*:}" > /tmp/reply
status=$(head -n 1 /tmp/reply | tr -d '\r')
# The token is single-use: the same request from the same machine now gets a 404.
{ printf "$request"; printf '@KEY@'; sleep 2; } | nc "${hostport%:*}" "${hostport#*:}" > /tmp/again
again=$(head -n 1 /tmp/again | tr -d '\r')
echo "BIRTH-REPLY $(od -An -tx1 -v /tmp/reply | tr -d ' \n') REPLY-END"
echo "BIRTH-SEED $status $(grep -c 'listen: 0.0.0.0:6976' /tmp/reply) AGAIN $again END"
poweroff -f
""".replace("@KEY@", KEY_OCTAL)
)


def seed_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = b"listen: 0.0.0.0:6976\n"
        info = tarfile.TarInfo("hatchery/agent.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@contextlib.contextmanager
def site_dhcp(dnsmasq: str, br: str, net: str, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The site's DHCP server for proxy mode: dnsmasq on a namespace of its own on the bridge,
    addresses only (the same range the births range would be), no boot options, no TFTP."""
    with ns_vm(br, "52:54:00:b1:47:fe", f"{net}.2") as site:
        log = (workdir / "site-dnsmasq.log").open("wb")
        argv = ["ip", "netns", "exec", site.netns, dnsmasq, "--no-daemon", "--port=0",
                "--conf-file=/dev/null", "--interface=eth0", "--bind-interfaces", "--user=root",
                "--group=root", "--no-ping", f"--dhcp-range={net}.50,{net}.59,255.255.255.0,1h",
                f"--dhcp-leasefile={workdir / 'site.leases'}", "--log-dhcp", "--log-facility=-",
                f"--pid-file={workdir / 'site.pid'}"]  # fmt: skip
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            yield server
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.mark.parametrize("mode", ["full", "proxy", "https"])
def test_agent_births_a_machine(
    tmp_path: Path, require_root: None, require_tool: Callable[[str], str], mode: str
) -> None:
    """``full``: our DHCP gives the birth lease. ``proxy`` (``boot.dhcp: proxy``): dnsmasq
    gives the address, our proxyDHCP only the boot answers; the script and the seed go to
    the address the machine's iPXE came from on port 4011, with the same guarantees.
    ``https`` (``boot.https``): OVMF with the boot CA pinned HTTP-boots the machine's unified
    kernel image from the agent over TLS (no iPXE); its seed URL names the plain port."""
    require_tool("qemu-system-x86_64")
    curl = require_tool("curl")
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
        return
    # The image the agent serves: Debian's kernel and an initramfs that reports its birth.
    mods = [kernel.module(m) for m in VIRTIO_NET_MODULES]
    files = [Entry.file("bin/lease", LEASE.encode(), 0o755)]
    initrd = busybox_initramfs(INIT, modules=mods, files=files)
    build = make_build(tmp_path / "builds", "v1", kernel=kernel.vmlinuz.read_bytes())
    (build / "hypervisor.cpio.zst").write_bytes(zstandard.ZstdCompressor().compress(initrd))
    manifest = json.loads((build / "manifest.json").read_text())
    for name in ("hypervisor.cpio.zst", "hypervisor.vmlinuz"):
        data = (build / name).read_bytes()
        manifest["artefacts"][name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    (build / "manifest.json").write_text(json.dumps(manifest))
    key = generate_key(tmp_path / "keys", "birth")
    sign_build_dir(build, key.private)
    # The node's "running root" says v1: it serves v1 to the machines it births.
    root = tmp_path / "root" / "usr/lib"
    root.mkdir(parents=True)
    (root / "os-release").write_text("IMAGE_VERSION=v1\n")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / f"{MAC}.tar").write_bytes(seed_tar())
    (seeds / f"{MAC}.tar").chmod(0o644)  # the agent makes it private
    net = f"10.{random.randrange(16, 250)}.{random.randrange(0, 250)}"
    http_port = free_port()
    pki = Pki.make(tmp_path / "pki")
    dhcp: dict[str, object] = {"births": {"start": f"{net}.50", "end": f"{net}.59"}}
    if mode == "proxy":
        dhcp = {"dhcp": "proxy"}
    dnsmasq = require_tool("dnsmasq") if mode == "proxy" else ""
    boot_pki = None
    if mode == "https":
        if not pxe_chain.OVMF_CODE.exists():
            missing("OVMF is not installed (package ovmf)")
        boot_pki = pxe_chain.make_boot_pki(tmp_path / "boot-pki", f"{net}.1")
        https = {"cert": str(boot_pki.cert), "key": str(boot_pki.key), "port": free_port()}
        dhcp = {**dhcp, "https": https}
    with bridge(f"{net}.1/24") as br, contextlib.ExitStack() as stack:
        if mode == "proxy":
            stack.enter_context(site_dhcp(dnsmasq, br, net, tmp_path))
        agent = AgentProcess.configure(
            tmp_path, pki,
            [{"name": br, "metadata": False,
              "subnets": [{"cidr": f"{net}.0/24", "gateway": f"{net}.1"}],
              "boot": {"http_port": http_port, **dhcp, "seeds": str(seeds),
                       "cmdline": "console=ttyS0 quiet panic=-1", "tftp": True}}],
            root=str(tmp_path / "root"), image_keys=str(key.public.parent),
        )  # fmt: skip
        tap = unique_name("hbt")
        try:
            agent.start(timeout=60)
            agent.cli("image", "publish", str(build))
            exported = agent.state_dir / "netboot" / br / "hypervisor" / "current" / "initrd"
            deadline = time.monotonic() + 180  # refreshed every 15 s; generous on a busy host
            while not exported.exists():
                assert time.monotonic() < deadline, "the agent did not export its image"
                time.sleep(1)
            base = f"http://{net}.1:{http_port}"

            def status(url: str, *extra: str) -> str:
                argv = [curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "30", *extra,
                        url]  # fmt: skip
                return subprocess.run(argv, capture_output=True, text=True).stdout

            # The host is on the bridge but holds no birth lease: no seed, no script.
            assert status(f"{base}/artefacts/seeds/{MAC}.tar") == "404"
            assert status(f"{base}/artefacts/seeds/{MAC.upper()}.tar") == "404"
            assert status(f"{base}/boot/ipxe?mac={MAC}") == "404"
            assert status(f"{base}/artefacts/hypervisor/current/vmlinuz") == "200"  # public
            assert stat.S_IMODE((seeds / f"{MAC}.tar").stat().st_mode) == 0o600
            subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
            subprocess.run(["ip", "link", "set", tap, "master", br, "up"], check=True)
            spec = GuestSpec(name="birth", accel=choose_accel(), memory_mib=512,
                             nics=(Nic(tap, MAC),), extra=("-boot", "n", "-no-reboot"))  # fmt: skip
            argv = build_argv(spec)
            if boot_pki is not None:
                argv = pxe_chain.firmware_argv(tmp_path, tap, MAC, "uefi-http",
                                               boot_pki.firmware_args())  # fmt: skip
            with run_guest(argv) as guest:
                guest.wait_for(b" END", timeout=420)
            console = guest.output.decode(errors="replace")
            url = re.search(r"BIRTH-CMDLINE seed=(\S+)", console)
            assert url is not None, console[-2000:]
            assert re.fullmatch(rf"{re.escape(base)}/seed/[A-Za-z0-9_-]{{43}}", url[1]), url[1]
            assert f"BIRTH-LEASE ip={net}.5" in console
            # Sealed on the wire (the plain text is not in what the guest received), and
            # it opens with the newborn's key to exactly the seed.
            assert "BIRTH-SEED HTTP/1.0 200 OK 0 AGAIN HTTP/1.0 404 Not Found END" in console, (
                console[-2000:]
            )
            reply = re.search(r"BIRTH-REPLY ([0-9a-f]+) REPLY-END", console)
            assert reply is not None, console[-2000:]
            _, _, body = bytes.fromhex(reply[1]).partition(b"\r\n\r\n")
            assert KEY.open(body) == seed_tar()
            key_file = tmp_path / "key.bin"
            key_file.write_bytes(SeedKey().public)
            # burnt, and the host is not the machine anyway; a plain GET gets no seed at all
            assert status(url[1], "--data-binary", f"@{key_file}") == "404"
            assert status(url[1]) == "405"
            if mode == "https":  # the whole boot came over TLS, as one image
                assert f"URI: https://{net}.1:" in console
                assert f"unified kernel image for {MAC}: profile hypervisor" in (
                    agent.log_path.read_text()
                )
            if mode == "proxy":  # the address came from the site's server, not from us
                site_log = (tmp_path / "site-dnsmasq.log").read_text()
                assert re.search(rf"DHCPACK\(eth0\) {re.escape(net)}\.5\d {MAC}", site_log)
                assert "proxyDHCP on" in agent.log_path.read_text()
            # Firmware PXE ROMs get iPXE itself over the agent's TFTP (curl's client here).
            got = subprocess.run([curl, "-sS", "--max-time", "30", f"tftp://{net}.1/undionly.kpxe"],
                                 capture_output=True, check=True).stdout  # fmt: skip
            assert got == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        finally:
            agent.kill()
            subprocess.run(["ip", "link", "del", tap], capture_output=True, check=False)
            asyncio.run(teardown_bridge(br))
